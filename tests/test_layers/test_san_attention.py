"""SAN's pairwise and patchwise layers (``sasa_mmdet/layers/san_attention.py``)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sasa_mmdet.layers import PairwiseSelfAttention2d, PatchwiseSelfAttention2d
from sasa_mmdet.layers.backends import san_cpu
from sasa_mmdet.layers.san_attention import pixel_coordinates
from sasa_mmdet.layers.san_ops import TRITON_INSTALLED

LAYERS = [PairwiseSelfAttention2d, PatchwiseSelfAttention2d]
SKIP_CPP = pytest.mark.skipif(not san_cpu.KERNEL_BUILT, reason='the SAN CPU kernel is not built')
SKIP_TRITON = pytest.mark.skipif(not TRITON_INSTALLED, reason='triton is not installed')
# Every impl at every geometry; the Triton kernels (on CUDA where there is a
# GPU, else under the interpreter, tests/conftest.py) at one geometry per
# border (test_san_ops.py covers the others).
IMPL_CASES = [
    pytest.param(impl, border, stride, size, marks=[SKIP_CPP] if impl == 'cpp' else [],
                 id=f'{impl}-{border}-s{stride}-{size[0]}x{size[1]}')
    for impl in ('torch', 'cpp') for border in ('reflect', 'mask')
    for stride, size in ((1, (7, 6)), (2, (7, 5)), (1, (2, 3)))
] + [pytest.param('triton', border, 2, (7, 5), marks=SKIP_TRITON, id=f'triton-{border}-s2-7x5')
     for border in ('reflect', 'mask')]


def _layer(cls, **kwargs):
    torch.manual_seed(0)
    layer = cls(8, 16, 3, **kwargs).double()
    # non-trivial norm statistics and affine parameters
    for module in layer.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return layer


def _input(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def _official_weights(layer, x):
    """The attention weights as the official SAM module computes them
    (model/san.py): ReflectionPad2d + unfold, relations laid out as
    (B, C, k*k, H*W) for pairwise and (B, C', 1, H*W) for patchwise."""
    k = layer.window_size[0]
    batch, _, height, width = x.shape
    unfold = nn.Unfold(k)
    pad = nn.ReflectionPad2d(k // 2)
    x1, x2 = layer.phi(x), layer.psi(x)
    if isinstance(layer, PairwiseSelfAttention2d):
        def subtraction(a, b):
            neighbours = unfold(pad(b)).view(b.shape[0], b.shape[1], k * k, -1)
            return a.flatten(2).unsqueeze(2) - neighbours

        loc_w = torch.linspace(-1.0, 1.0, width).unsqueeze(0).repeat(height, 1)
        loc_h = torch.linspace(-1.0, 1.0, height).unsqueeze(1).repeat(1, width)
        p = layer.position(torch.stack([loc_w, loc_h])[None].to(x.dtype))
        delta = torch.cat([subtraction(x1, x2), subtraction(p, p).repeat(batch, 1, 1, 1)], 1)
        return torch.softmax(layer.gamma(delta), dim=-2)
    x1 = x1.view(batch, -1, 1, height * width)
    x2 = unfold(pad(x2)).view(batch, -1, 1, height * width)
    return layer.gamma(torch.cat([x1, x2], 1)).view(batch, -1, k * k, height * width)


@pytest.mark.parametrize('cls', LAYERS)
def test_matches_the_official_formula(cls):
    layer = _layer(cls, window_size=5).eval()
    x = _input(2, 8, 6, 7)
    weights = layer.attention_weights(x)
    expected = _official_weights(layer, x)
    torch.testing.assert_close(weights.flatten(3), expected)
    # aggregation: output channel c uses weight channel c % (16 / 8)
    value = layer.beta(x)
    neighbours = F.unfold(nn.ReflectionPad2d(2)(value), 5).view(2, 8, 2, 25, 42)
    official = (expected.unsqueeze(1) * neighbours).sum(-2).view(2, 16, 6, 7)
    torch.testing.assert_close(layer(x), official)


@pytest.mark.parametrize('cls', LAYERS)
@pytest.mark.parametrize('impl,border,stride,size', IMPL_CASES)
def test_impls_match_reference_with_every_gradient(cls, impl, border, stride, size):
    device = 'cuda' if impl == 'triton' and torch.cuda.is_available() else 'cpu'
    reference = _layer(cls, stride=stride, window_size=(5, 3), border=border,
                       impl='reference').to(device)
    layer = copy.deepcopy(reference)
    layer.impl = impl
    x = _input(2, 8, *size).to(device).detach().requires_grad_()
    expected, out = reference(x), layer(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [x, *layer.parameters()], grad),
                         torch.autograd.grad(expected, [x, *reference.parameters()], grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('border', ['reflect', 'mask'])
def test_pairwise_weights_are_a_softmax_over_the_window(border):
    layer = _layer(PairwiseSelfAttention2d, window_size=5, border=border)
    weights = layer.attention_weights(_input(1, 8, 4, 6))
    assert weights.shape == (1, 2, 25, 4, 6)
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(1, 2, 4, 6, dtype=torch.float64))
    # in 'mask' mode, taps outside the image weigh exactly 0; corner pixel
    # (0, 0) has 9 of 25 taps inside
    inside = (weights[0, 0, :, 0, 0] > 0).sum().item()
    assert inside == (9 if border == 'mask' else 25)


def test_pixel_coordinates():
    coords = pixel_coordinates(2, 3)
    assert coords.tolist() == [[[[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]],
                                [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]]]


@pytest.mark.parametrize('cls', LAYERS)
def test_with_cp_gives_the_same_gradients(cls):
    layer = _layer(cls)
    checkpointed = copy.deepcopy(layer)
    checkpointed.with_cp = True
    x = _input(2, 8, 5, 5)
    grads = [torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()])
             for m in (layer, checkpointed)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('cls', LAYERS)
def test_compiles_fullgraph(cls):
    torch._dynamo.reset()
    layer = cls(8, 16, 3, window_size=5, stride=2).eval()
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    expected, out = layer(x), compiled(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0],
                               torch.autograd.grad(expected.sum(), x)[0])


@pytest.mark.parametrize('cls', LAYERS)
def test_conv_cfg_drop_in(cls):
    from mmcv.cnn import ConvModule, build_conv_layer

    conv = build_conv_layer(dict(type=cls.__name__, window_size=5), 16, 32, 3, stride=2,
                            padding=1, bias=False)
    assert isinstance(conv, cls) and conv.window_size == (5, 5) and conv.beta.bias is None
    assert conv(torch.rand(1, 16, 11, 10)).shape == (1, 32, 6, 5)
    module = ConvModule(16, 32, 3, padding=1, conv_cfg=dict(type=cls.__name__),
                        norm_cfg=dict(type='BN'))
    module.init_weights()
    assert module(torch.rand(2, 16, 8, 8)).shape == (2, 32, 8, 8)
    pointwise = build_conv_layer(dict(type=cls.__name__), 16, 32, 1, stride=2)
    assert pointwise.pointwise and pointwise.weight.shape == (32, 16, 1, 1)
    x = torch.rand(1, 16, 7, 7)
    torch.testing.assert_close(pointwise(x), F.conv2d(x, pointwise.weight, pointwise.bias, 2))


@pytest.mark.parametrize('cls', LAYERS)
def test_multiply_adds_count_every_convolution_and_the_aggregation(cls):
    layer = cls(16, 32, 3, window_size=5).eval()
    counted = []

    def hook(module, inputs, output):
        counted.append(output.numel() * module.in_channels)

    handles = [m.register_forward_hook(hook) for m in layer.modules()
               if isinstance(m, nn.Conv2d)]
    layer(torch.rand(2, 16, 6, 7))
    for handle in handles:
        handle.remove()
    aggregation = 2 * 32 * 25 * 6 * 7
    assert layer.multiply_adds((2, 16, 6, 7)) == sum(counted) + aggregation


def test_bad_arguments():
    with pytest.raises(ValueError, match='share_planes must be a positive int dividing'):
        PairwiseSelfAttention2d(8, 12, 3, share_planes=8)
    with pytest.raises(ValueError, match='border must be one of'):
        PatchwiseSelfAttention2d(8, 16, 3, border='zeros')
    with pytest.raises(ValueError, match='rel_channels must be a positive int'):
        PatchwiseSelfAttention2d(8, 16, 3, rel_channels=0)
    with pytest.raises(ValueError, match='impl must be one of'):
        PairwiseSelfAttention2d(8, 16, 3, impl='natten')
    with pytest.raises(ValueError, match='groups must be 1'):
        PairwiseSelfAttention2d(8, 16, 3, groups=2)
    with pytest.raises(ValueError, match='does not preserve the input size'):
        PairwiseSelfAttention2d(8, 16, 3, padding=0)
    with pytest.raises(ValueError, match='in_channels must be a positive int'):
        PairwiseSelfAttention2d(0, 16, 3)
    with pytest.raises(ValueError, match=r'expects input \(N, 8, H, W\)'):
        PatchwiseSelfAttention2d(8, 16, 3)(torch.rand(1, 4, 5, 5))


@pytest.mark.parametrize('cls', LAYERS)
@pytest.mark.parametrize('border', ['reflect', 'mask'])
def test_onnx_export_runs_in_onnxruntime(cls, border):
    """Exported, the layers are standard ONNX operators (the 'torch' forward)."""
    import io

    import numpy as np
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    layer = cls(8, 16, 3, window_size=5, stride=2, border=border).eval()
    x = torch.randn(2, 8, 9, 11)
    buffer = io.BytesIO()
    torch.onnx.export(layer, (x, ), buffer, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, layer(x).detach().numpy(), rtol=1e-4, atol=1e-5)
