"""The registered operator ``torch.ops.sasa_mmdet.local_attention``.

Each backend behind it passes ``torch.library.opcheck`` (schema, autograd
registration, fake tensors, AOT dispatch with dynamic shapes); the layer
and an attention ResNet compile with ``fullgraph=True`` and match eager,
forward and backward, and export with ``torch.export``.
"""
import pytest
import torch
import torch._dynamo
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from mmdet.registry import MODELS

from sasa_mmdet.layers import LocalSelfAttention2d, local_attention, local_attention_reference
from sasa_mmdet.layers import local_attention_ops
from sasa_mmdet.layers.local_attention_ops import resolve_backend

# The Triton kernels run under the interpreter here (tests/conftest.py).
BACKENDS = ['cpp', 'torch', 'triton']


def _sample(backend, key=True, rel=True, keep=True, dtype=torch.float32, dim=4, window=(3, 3),
            dilation=(1, 1), size=(5, 6), channels_last=False):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    def map_(*shape):  # (B, N, D, H, W), channel-innermost with channels_last
        if not channels_last:
            return rand(*shape)
        batch, heads, dim, height, width = shape
        return rand(batch, height, width, heads, dim).permute(0, 3, 4, 1, 2)

    q = map_(1, 2, dim, *size)
    k = map_(1, 2, dim, *size) if key else None
    v = map_(1, 2, dim, *size)
    rel_row = rand(window[0], 2, (dim + 1) // 2) if rel else None
    rel_col = rand(window[1], 2, dim // 2) if rel else None
    return (q, k, v, rel_row, rel_col, window, dilation, backend, keep)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('variant', [
    dict(),                                       # q.k + q.r, map kept
    dict(keep=False),                             # recompute_attention
    dict(key=False),                              # q.r only
    dict(rel=False, window=(4, 3), dilation=(2, 1)),  # q.k only, even window, dilated
    dict(dim=8, channels_last=True),              # 'triton': channels-last output
])
def test_opcheck_forward(backend, variant):
    torch.library.opcheck(torch.ops.sasa_mmdet.local_attention.default,
                          _sample(backend, **variant))


@pytest.mark.parametrize('backend', BACKENDS)
def test_opcheck_backward(backend):
    args = _sample(backend)
    out, saved = torch.ops.sasa_mmdet.local_attention(*args)
    q, k, v, rel_row, rel_col, window, dilation = [
        a.detach() if isinstance(a, torch.Tensor) else a for a in args[:7]]
    grad_out = torch.randn_like(out)
    buffers = [torch.empty_like(t) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.sasa_mmdet.local_attention_backward.default,
                          (grad_out, out.detach(), saved.detach(), q, k, v, rel_row, rel_col,
                           window, dilation, backend, *buffers))


@pytest.mark.parametrize('backend', ['cpp', 'torch'])
def test_kept_map_has_no_gradient_and_none_is_allocated_for_it(backend):
    """Autograd would otherwise hand the backward a zero-filled tensor the
    size of the map in every attention layer (measured: +44 MB at
    (64, 160, 160), 8 heads, k = 7)."""

    class RecordShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            self.made += [(str(func), tuple(t.shape)) for t in pytree.tree_leaves(result)
                          if isinstance(t, torch.Tensor)]
            return result

    args = _sample(backend)
    out, saved = torch.ops.sasa_mmdet.local_attention(*args)
    assert saved.numel() > 0 and not saved.requires_grad
    with RecordShapes() as record:
        out.sum().backward()
    assert not [made for made in record.made if made[1] == tuple(saved.shape)]
    assert all(t.grad is not None for t in args[:5])


def test_backward_op_writes_into_views_of_one_buffer():
    """What the layer's projection gets: gradients of q, k, v in one buffer."""
    q, k, v, rel_row, rel_col, window, dilation, _, _ = _sample('cpp')
    out, saved = torch.ops.sasa_mmdet.local_attention(q, k, v, rel_row, rel_col, window,
                                                      dilation, 'cpp', True)
    grad_out = torch.randn_like(out)
    packed = torch.full((1, 3, *q.shape[1:]), float('nan'))
    grad_rel = torch.ops.sasa_mmdet.local_attention_backward(
        grad_out, out, saved, q, k, v, rel_row, rel_col, window, dilation, 'cpp',
        *packed.unbind(1))
    expected = torch.autograd.grad(local_attention_reference(q, k, v, window, dilation,
                                                             rel_row, rel_col),
                                   (q, k, v, rel_row, rel_col), grad_out)
    for got, want in zip([*packed.unbind(1), *grad_rel], expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_backends_are_chosen_by_device_and_checked():
    cpu = torch.device('cpu')
    assert resolve_backend('auto', cpu) == 'cpp'
    assert resolve_backend('torch', cpu) == 'torch'
    assert resolve_backend('triton', cpu) == 'triton'  # interpreted
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_backend('cuda', cpu)
    with pytest.raises(ValueError, match="impl='cpp' needs CPU tensors"):
        resolve_backend('cpp', torch.device('meta'))
    assert resolve_backend('auto', torch.device('meta')) == 'torch'


def test_projection_is_channels_last_only_for_the_triton_kernels():
    """q, k, v of a contiguous input are projected channels-last only where
    the Triton kernels read them, at head widths they vectorise; every
    other backend keeps the planar projection. Checked on fake CUDA tensors
    (no GPU needed) and on CPU ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    decide = local_attention_ops.channels_last_projection
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert decide('auto', cuda, 32) and decide('triton', cuda, 8)
    assert decide('triton', cpu, 16)  # interpreted
    assert not decide('auto', cuda, 12) and not decide('triton', cuda, 4)
    assert not any(decide(impl, cuda, 32) for impl in ('torch', 'cpp', 'reference'))
    assert not decide('auto', cpu, 32) and not decide('auto', torch.device('meta'), 32)
    for impl, channels, expected in (('auto', 16, True), ('auto', 12, False),
                                     ('torch', 16, False), ('cpp', 16, False)):
        layer = LocalSelfAttention2d(16, channels, 3, num_heads=2, impl=impl)
        with FakeTensorMode():
            layer.qkv_weight = torch.nn.Parameter(torch.empty(3 * channels, 16, device='cuda'))
            query, key, value = layer.project(torch.empty(2, 16, 5, 7, device='cuda'))
        triton = local_attention_ops.triton_backend()
        assert triton.channels_last(query, key, value) == expected, (impl, channels)
    for impl in ('auto', 'cpp', 'torch', 'reference'):
        layer = LocalSelfAttention2d(16, 16, 3, num_heads=2, impl=impl)
        planar = [t.stride()[2:] for t in layer.project(torch.randn(2, 16, 5, 7))]
        assert planar == [(35, 7, 1)] * 3, impl


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(local_attention_ops, 'TRITON_INTERPRETED', False)
    with pytest.raises(ValueError, match='TRITON_INTERPRET=1'):
        resolve_backend('triton', torch.device('cpu'))


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 2, 4, 5, 6)
    with pytest.raises(ValueError, match='a key, relative tables, or both'):
        local_attention(q, None, q, (3, 3))
    with pytest.raises(ValueError, match='key must be shaped like query'):
        local_attention(q, q[..., :5], q, (3, 3))
    with pytest.raises(ValueError, match=r'rel_row and rel_col must be \(kh=3'):
        local_attention(q, q, q, (3, 3), rel_row=torch.randn(5, 2, 2),
                        rel_col=torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match=r'query must be \(B, N, D, H, W\)'):
        local_attention(q[0], q[0], q[0], (3, 3))


@pytest.mark.parametrize('impl', ['cpp', 'torch'])
@pytest.mark.parametrize('kwargs', [dict(), dict(stride=2, dilation=2, logits='qr'),
                                    dict(position_encoding='absolute', bias=True)])
def test_layer_compiles_without_graph_breaks_and_matches_eager(impl, kwargs):
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 8, 3, num_heads=2, impl=impl, **kwargs)
    x = torch.randn(2, 8, 9, 11, requires_grad=True)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out, expected = compiled(x), layer(x)
    torch.testing.assert_close(out, expected)
    params = [x, *layer.parameters()]
    for got, want in zip(torch.autograd.grad(out.square().sum(), params),
                         torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _tiny_attention_resnet(stem_type='attention'):
    return MODELS.build(dict(
        type='SASAResNet', depth=26, base_channels=8, stem_channels=8, stem_type=stem_type,
        stage_with_attention=(True, True, True, True), out_indices=(0, 1, 2, 3),
        attention_cfg=dict(window_size=3, num_heads=2), stem_cfg=dict(num_heads=2),
        norm_eval=False))


def test_attention_resnet_compiles_fullgraph_forward_and_backward():
    # aot_eager: dynamo's whole-graph capture and AOT autograd (what fails
    # when an operator is opaque or its fake kernel is wrong); inductor's
    # code generation of 26 layers would take minutes on 2 cores.
    torch.manual_seed(0)
    backbone = _tiny_attention_resnet()
    images = torch.randn(2, 3, 64, 48, requires_grad=True)
    compiled = torch.compile(backbone, fullgraph=True, backend='aot_eager')
    outs = compiled(images)
    expected = backbone(images)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    params = [images, *backbone.parameters()]
    grads = torch.autograd.grad(sum(o.square().sum() for o in outs), params)
    grads_eager = torch.autograd.grad(sum(o.square().sum() for o in expected), params)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_layer_and_attention_resnet_export():
    layer = LocalSelfAttention2d(8, 8, 3, num_heads=2, stride=2).eval()
    x = torch.randn(1, 8, 9, 11)
    program = torch.export.export(layer, (x, ))
    ops = {str(node.target) for node in program.graph.nodes}
    assert 'sasa_mmdet.local_attention.default' in ops
    torch.testing.assert_close(program.module()(x), layer(x))

    backbone = _tiny_attention_resnet()
    backbone.eval()
    images = torch.randn(1, 3, 64, 48)
    program = torch.export.export(backbone, (images, ))
    for got, want in zip(program.module()(images), backbone(images)):
        torch.testing.assert_close(got, want)
