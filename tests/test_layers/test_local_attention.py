import itertools

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_conv_layer
from mmdet.models.data_preprocessors import DetDataPreprocessor

from sasa_mmdet.layers import (LocalSelfAttention2d, local_attention,
                               local_attention_reference, neighbourhood_mask)
from sasa_mmdet.layers.local_attention_ops import cpu_kernel


def _rand(*shape, seed=0, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _brute_force(layer, x):
    """The paper's formula pixel by pixel: only in-image neighbours exist."""
    q, k, v = (t.detach() for t in layer.project(x))
    _, heads, dim, height, width = q.shape
    (kh, kw), (dh, dw) = layer.window_size, layer.dilation
    out = torch.zeros_like(v)
    for i, j in itertools.product(range(height), range(width)):
        for n in range(heads):
            logits, values = [], []
            for ty, tx in itertools.product(range(kh), range(kw)):
                a = i + (ty - (kh - 1) // 2) * dh
                b = j + (tx - (kw - 1) // 2) * dw
                if not (0 <= a < height and 0 <= b < width):
                    continue
                r = torch.cat([layer.rel_row[ty, n], layer.rel_col[tx, n]]).detach()
                logits.append(q[0, n, :, i, j] @ k[0, n, :, a, b] + q[0, n, :, i, j] @ r)
                values.append(v[0, n, :, a, b])
            weights = torch.stack(logits).softmax(0)
            out[0, n, :, i, j] = (weights[:, None] * torch.stack(values)).sum(0)
    return out.flatten(1, 2)


CASES = [
    # B, heads, D, H, W, window, dilation
    (2, 2, 3, 5, 7, (3, 3), (1, 1)),
    (1, 3, 4, 6, 5, (5, 3), (2, 1)),
    (1, 1, 2, 1, 1, (7, 7), (1, 1)),
    (1, 2, 2, 2, 3, (7, 7), (3, 2)),
    (1, 2, 2, 4, 4, (4, 4), (1, 1)),
    (2, 4, 2, 9, 11, (7, 7), (2, 2)),
]


FAST_IMPLS = ['cpp', 'torch']


def test_cpu_kernel_is_built_and_chosen_by_default():
    assert cpu_kernel() is not None, 'setup.py should have compiled the CPU kernel'
    layer = LocalSelfAttention2d(4, 4, 3, num_heads=2)
    assert layer.impl == 'auto'


@pytest.mark.parametrize('impl', FAST_IMPLS)
@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('content', [True, False])
def test_fast_path_matches_reference(case, content, impl):
    batch, heads, dim, height, width, window, dilation = case
    q = _rand(batch, heads, dim, height, width, seed=1)
    k = _rand(batch, heads, dim, height, width, seed=2) if content else None
    v = _rand(batch, heads, dim + 1, height, width, seed=3)
    rel_row = _rand(window[0], heads, (dim + 1) // 2, seed=4)
    rel_col = _rand(window[1], heads, dim // 2, seed=5)
    inputs = [t for t in (q, k, v, rel_row, rel_col) if t is not None]
    fast = local_attention(q, k, v, window, dilation, rel_row, rel_col, impl=impl)
    ref = local_attention_reference(q, k, v, window, dilation, rel_row, rel_col)
    torch.testing.assert_close(fast, ref)
    grad_out = _rand(*fast.shape, seed=6, grad=False)
    for g_fast, g_ref in zip(torch.autograd.grad(fast, inputs, grad_out),
                             torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_random_layers_fast_matches_reference(impl):
    gen = torch.Generator().manual_seed(0)
    for trial in range(12):
        pick = lambda options: options[torch.randint(len(options), (1, ), generator=gen)]  # noqa
        heads = pick([1, 2, 4])
        out_channels = heads * pick([2, 3, 4])
        kernel, dilation = pick([3, 5, 7]), pick([1, 2, 3])
        stride, window = pick([1, 2]), pick([None, 3, 4, 5])
        height, width = pick([1, 2, 5, 8, 13]), pick([1, 3, 6, 9])
        kwargs = dict(kernel_size=kernel, stride=stride, dilation=dilation,
                      num_heads=heads, window_size=window,
                      position_encoding=pick(['relative', 'absolute', 'none']))
        fast = LocalSelfAttention2d(3, out_channels, impl=impl, **kwargs).double()
        ref = LocalSelfAttention2d(3, out_channels, impl='reference', **kwargs).double()
        ref.load_state_dict(fast.state_dict())
        x = _rand(2, 3, height, width, seed=trial)
        out_fast, out_ref = fast(x), ref(x)
        torch.testing.assert_close(out_fast, out_ref, msg=lambda m: f'{kwargs}: {m}')
        grad_out = torch.randn_like(out_fast)
        out_fast.backward(grad_out)
        grad_x_fast = x.grad.clone()
        x.grad = None
        out_ref.backward(grad_out)
        torch.testing.assert_close(grad_x_fast, x.grad)
        for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p_fast.grad, p_ref.grad, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('impl', FAST_IMPLS)
@pytest.mark.parametrize('kwargs', [
    dict(kernel_size=3, stride=1),
    dict(kernel_size=3, stride=2, dilation=2),
    dict(kernel_size=4, stride=1),
    dict(kernel_size=3, position_encoding='absolute'),
    dict(kernel_size=3, logits='qr', bias=True),
])
def test_gradcheck(kwargs, impl):
    layer = LocalSelfAttention2d(3, 4, num_heads=2, impl=impl, **kwargs).double()
    x = _rand(1, 3, 5, 4)
    assert torch.autograd.gradcheck(layer, (x, ))
    params = [p for p in layer.parameters()]
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(
            layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x.detach(), )),
        params)


def test_matches_the_formula_pixel_by_pixel_at_borders():
    layer = LocalSelfAttention2d(3, 4, 5, num_heads=2, dilation=(1, 2)).double()
    x = _rand(1, 3, 4, 6, grad=False)
    torch.testing.assert_close(layer(x), _brute_force(layer, x))


def test_outside_pixels_do_not_exist_rather_than_being_zero():
    """A corner output is the attention over in-image neighbours only: zero
    keys inside the softmax (a known re-implementation bug) would change it."""
    layer = LocalSelfAttention2d(2, 2, 3, num_heads=1, position_encoding='none').double()
    x = _rand(1, 2, 3, 3, grad=False)
    q, k, v = (t[0, 0] for t in layer.project(x))
    logits = torch.einsum('d,dab->ab', q[:, 0, 0], k[:, :2, :2]).flatten()
    expected = (logits.softmax(0) * v[:, :2, :2].flatten(1)).sum(1)
    torch.testing.assert_close(layer(x)[0, :, 0, 0], expected)
    with_zeros = torch.cat([logits, logits.new_zeros(5)]).softmax(0)[:4]
    assert not torch.allclose((with_zeros * v[:, :2, :2].flatten(1)).sum(1), expected)


@pytest.mark.parametrize('window,dilation', [((3, 3), (1, 1)), ((5, 3), (2, 1)), ((4, 4), (1, 1))])
def test_receptive_field_is_exactly_the_window(window, dilation):
    layer = LocalSelfAttention2d(2, 4, window, num_heads=2, dilation=dilation).double()
    height, width = 11, 12
    taps = neighbourhood_mask(height, width, window, dilation)
    for i, j in [(5, 6), (0, 0), (10, 11), (1, 9)]:
        x = _rand(1, 2, height, width, seed=i * 13 + j)
        layer(x)[0, :, i, j].sum().backward()
        reached = x.grad[0].abs().sum(0) > 0
        expected = torch.zeros(height, width, dtype=torch.bool)
        for t, (oy, ox) in enumerate(itertools.product(
                [(t - (window[0] - 1) // 2) * dilation[0] for t in range(window[0])],
                [(t - (window[1] - 1) // 2) * dilation[1] for t in range(window[1])])):
            if taps.view(-1, height, width)[t, i, j]:
                expected[i + oy, j + ox] = True
        assert torch.equal(reached, expected), (i, j)


def test_translation_equivariance_away_from_borders():
    layer = LocalSelfAttention2d(3, 8, 5, num_heads=2).double()
    x = _rand(1, 3, 16, 16, grad=False)
    shifted = torch.roll(x, shifts=(2, 3), dims=(2, 3))
    out, out_shifted = layer(x), layer(shifted)
    # Pixels whose windows stay inside the image in both inputs.
    torch.testing.assert_close(out_shifted[..., 4:14, 5:14], out[..., 2:12, 2:11])


def test_absolute_encoding_is_not_translation_equivariant():
    layer = LocalSelfAttention2d(3, 8, 5, num_heads=2, position_encoding='absolute').double()
    x = _rand(1, 3, 16, 16, grad=False)
    out, out_shifted = layer(x), layer(torch.roll(x, shifts=(2, 3), dims=(2, 3)))
    assert not torch.allclose(out_shifted[..., 4:14, 5:14], out[..., 2:12, 2:11])


@pytest.mark.parametrize('size', [(1, 1), (2, 3), (7, 5), (25, 30), (31, 17)])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('kernel,dilation', [(3, 1), (3, 2), (5, 1), (1, 1)])
def test_output_size_matches_conv(size, stride, kernel, dilation):
    padding = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(4, 4, kernel, stride, padding, dilation)
    attn = LocalSelfAttention2d(4, 4, kernel, stride, padding, dilation, num_heads=2,
                                window_size=7)
    x = torch.rand(1, 4, *size)
    assert attn(x).shape == conv(x).shape


def test_stride_is_average_pool_right_after_attention():
    strided = LocalSelfAttention2d(3, 4, 3, stride=2, num_heads=2, bias=True).double()
    plain = LocalSelfAttention2d(3, 4, 3, stride=1, num_heads=2, bias=True).double()
    plain.load_state_dict(strided.state_dict())
    with torch.no_grad():
        plain.bias.zero_()
    x = _rand(1, 3, 7, 6, grad=False)
    full = plain(x)
    expected = nn.functional.avg_pool2d(full, 2, 2, ceil_mode=True) + strided.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(strided(x), expected)
    # The odd last row is the mean of the one real row, not of a zero row.
    torch.testing.assert_close(expected[..., 3, 0] - strided.bias,
                               full[..., 6, 0:2].mean(-1))


@pytest.mark.parametrize('bias', [False, True])
def test_parameter_count_is_three_dense_projections_plus_tables(bias):
    layer = LocalSelfAttention2d(64, 128, 3, window_size=7, bias=bias)
    tables = 7 * 128  # k rows x out/2 + k columns x out/2
    expected = 3 * 64 * 128 + tables + (128 if bias else 0)
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert LocalSelfAttention2d(64, 128, 7, position_encoding='absolute').qkv_weight.numel() \
        == sum(p.numel() for p in LocalSelfAttention2d(
            64, 128, 7, position_encoding='absolute').parameters())


def test_pointwise_request_is_a_1x1_convolution():
    layer = LocalSelfAttention2d(6, 5, 1, stride=2, bias=True, window_size=7)
    conv = nn.Conv2d(6, 5, 1, stride=2)
    conv.load_state_dict(layer.state_dict())  # same parameter names and shapes
    x = torch.rand(2, 6, 9, 8)
    torch.testing.assert_close(layer(x), conv(x))


def test_qr_logits_ignore_the_keys():
    layer = LocalSelfAttention2d(3, 4, 3, num_heads=2, logits='qr').double()
    x = _rand(1, 3, 5, 5, grad=False)
    out = layer(x)
    with torch.no_grad():
        layer.qkv_weight[4:8].normal_()  # W_K
    torch.testing.assert_close(layer(x), out)


def test_initialisation_scales():
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(256, 256, 3, window_size=7, value_init_std=0.01)
    w_q, w_k, w_v = layer.qkv_weight.detach().chunk(3)
    assert abs(w_v.std().item() - 0.01) < 1e-3
    assert abs(w_k.std().item() - 256**-0.5) < 2e-3
    assert abs(w_q.std().item() - (256 * 32)**-0.5) < 1e-3


def test_built_by_mmcv_wherever_a_convolution_is():
    cfg = dict(type='LocalSelfAttention2d', window_size=5, num_heads=2)
    layer = build_conv_layer(cfg, 4, 8, 3, stride=2, padding=1)
    assert isinstance(layer, LocalSelfAttention2d) and layer.window_size == (5, 5)
    module = ConvModule(4, 8, 3, stride=2, padding=1, conv_cfg=cfg,
                        norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU'))
    module.init_weights()
    out = module(torch.rand(2, 4, 9, 10))
    assert out.shape == (2, 8, 5, 5) and (out >= 0).all()
    assert module.with_norm and not module.with_bias


BAD_ARGS = [
    (dict(in_channels=0), 'in_channels'),
    (dict(out_channels=6, num_heads=4), 'num_heads'),
    (dict(num_heads=0), 'num_heads'),
    (dict(groups=2), 'groups'),
    (dict(window_size=0), 'window_size'),
    (dict(window_size=-3), 'window_size'),
    (dict(kernel_size=2.5), 'kernel_size'),
    (dict(stride=0), 'stride'),
    (dict(dilation=0), 'dilation'),
    (dict(padding=0), 'padding'),
    (dict(position_encoding='rotary'), 'position_encoding'),
    (dict(logits='qk'), 'logits'),
    (dict(logits='qr', position_encoding='none'), 'logits'),
    (dict(out_channels=4, num_heads=4), 'position_encoding'),
    (dict(impl='cuda-magic'), 'impl'),
    (dict(value_init_std=-1.0), 'value_init_std'),
]


@pytest.mark.parametrize('overrides,name', BAD_ARGS)
def test_bad_arguments_name_the_argument(overrides, name):
    kwargs = dict(in_channels=4, out_channels=8, kernel_size=3, num_heads=2)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=name):
        LocalSelfAttention2d(**kwargs)


def test_bad_input_names_the_expected_shape():
    layer = LocalSelfAttention2d(4, 8, 3, num_heads=2)
    with pytest.raises(ValueError, match=r'\(N, 4, H, W\)'):
        layer(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize('dim', [4, 8, 16, 32])
def test_cpu_kernel_fixed_head_widths_match_reference(dim):
    """Head widths that fill whole chunks of the kernel's channel loops
    (other widths: test_local_attention_kernel.py)."""
    q, k, v = (_rand(2, 2, dim, 5, 6, seed=s) for s in (1, 2, 3))
    rel_row, rel_col = _rand(3, 2, dim // 2, seed=4), _rand(5, 2, dim // 2, seed=5)
    inputs = (q, k, v, rel_row, rel_col)
    fast = local_attention(q, k, v, (3, 5), (1, 2), rel_row, rel_col, impl='cpp')
    ref = local_attention_reference(q, k, v, (3, 5), (1, 2), rel_row, rel_col)
    torch.testing.assert_close(fast, ref)
    grad_out = _rand(*fast.shape, seed=6, grad=False)
    for g_fast, g_ref in zip(torch.autograd.grad(fast, inputs, grad_out),
                             torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize('impl', FAST_IMPLS + ['reference'])
def test_bf16_autocast_is_finite_and_close_to_float32(impl, softmax_dtypes):
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 16, 3, stride=2, num_heads=2, window_size=5, impl=impl)
    x = torch.randn(2, 8, 11, 9) * 10  # large logits: a bf16 softmax would saturate
    expected = layer(x)
    softmax_dtypes.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # the softmax itself ran in float32, on the path asked for
    assert softmax_dtypes == [('kernel' if impl == 'cpp' else 'torch', torch.float32)]
    torch.testing.assert_close(out.float(), expected, atol=0.1 * expected.abs().max().item(),
                               rtol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_constant_image_gives_uniform_finite_output():
    layer = LocalSelfAttention2d(3, 8, 3, num_heads=2, position_encoding='none').double()
    out = layer(torch.full((1, 3, 6, 7), 0.5, dtype=torch.float64))
    assert torch.isfinite(out).all()
    # Every value is the same, so any convex combination of them is too.
    torch.testing.assert_close(out, out[..., :1, :1].expand_as(out))


def _pad_batch(small, large):
    """mmdet's DetDataPreprocessor on a batch of two sizes: normalises, then
    pads the smaller image with zeros at its bottom and right."""
    preprocessor = DetDataPreprocessor(mean=[100.0] * 3, std=[50.0] * 3, pad_size_divisor=8)
    batch = preprocessor(dict(inputs=[small, large]), training=False)['inputs']
    return batch[:1]  # the smaller image, padded


def test_padding_of_mixed_size_batches_is_not_masked():
    """Pins the README's account of padding: the attention does not see
    mmdet's padding mask. Padded pixels are zeros after normalisation; the
    attention drops out-of-image neighbours from its softmax but attends to
    padded ones, so the outputs of real pixels within half a window of the
    padded border change, and only theirs. A zero-padded convolution's own
    padding is zeros too: its first layer does not change, a second one
    does, near the border."""
    torch.manual_seed(0)
    height, width, reach = 9, 11, 2  # reach: half the 5x5 window
    small = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    large = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    padded = _pad_batch(small, large)
    assert padded.shape == (1, 3, 16, 16)
    assert (padded[..., height:, :] == 0).all() and (padded[..., width:] == 0).all()
    alone = padded[..., :height, :width]  # the image normalised, unpadded
    torch.testing.assert_close(alone[0], (small.float() - 100) / 50)

    def near_padding(band):
        """Real pixels at most ``band`` pixels from the padded ones."""
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[height - band:, :] = True
        mask[:, width - band:] = True
        return mask

    def changed(layer):
        """Real pixels whose output changes when the image is padded."""
        with torch.no_grad():
            out_alone = layer(alone)[0]
            out_padded = layer(padded)[0, :, :height, :width]
        # beyond float rounding (the padded input has other strides)
        return (out_alone - out_padded).abs().amax(0) > 1e-5 * out_alone.abs().max()

    for impl in FAST_IMPLS + ['reference']:
        attention = LocalSelfAttention2d(3, 8, 5, num_heads=2, impl=impl)
        assert torch.equal(changed(attention), near_padding(reach)), impl
    conv = nn.Conv2d(3, 8, 5, padding=2)
    assert not changed(conv).any()
    # padded pixels leave the first layer non-zero (bias, ReLU): the second
    # layer's 3x3 window brings them in
    two_convs = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    assert torch.equal(changed(two_convs), near_padding(1))
