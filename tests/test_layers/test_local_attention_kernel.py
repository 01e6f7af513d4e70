"""The compiled CPU kernel's code paths and the memory levers.

The kernel processes blocks of 8 (float32) or 4 (float64) pixels of a row:
blocks in the interior, blocks that touch the left or right border (taps
outside the image masked), the partial last block of a row; any head width
(chunks of 8 channels and a remainder), any window width (chunks of 8 taps
and a remainder); threads take bands of rows, and key rows that two bands
reach are summed after both have run. Every case is held to the unfold
reference, forward and backward.
"""
import pytest
import torch

from sasa_mmdet.layers import LocalSelfAttention2d, local_attention, local_attention_reference
from sasa_mmdet.layers import local_attention_ops
from sasa_mmdet.layers.backends import cpu
from sasa_mmdet.layers.local_attention_ops import cpu_kernel, split_projections

pytestmark = pytest.mark.skipif(cpu_kernel() is None, reason='the CPU kernel is not built')


def _rand(*shape, seed=0, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _inputs(batch, heads, dim, height, width, window, dtype=torch.float64, key=True,
            rel=True, dim_v=None):
    q = _rand(batch, heads, dim, height, width, seed=1, dtype=dtype)
    k = _rand(batch, heads, dim, height, width, seed=2, dtype=dtype) if key else None
    v = _rand(batch, heads, dim_v or dim, height, width, seed=3, dtype=dtype)
    rel_row = _rand(window[0], heads, (dim + 1) // 2, seed=4, dtype=dtype) if rel else None
    rel_col = _rand(window[1], heads, dim // 2, seed=5, dtype=dtype) if rel else None
    return q, k, v, rel_row, rel_col


def _check_against_reference(inputs, window, dilation, atol=None, rtol=None, **kwargs):
    tensors = [t for t in inputs if t is not None]
    fast = local_attention(*inputs[:3], window, dilation, *inputs[3:], impl='cpp', **kwargs)
    ref = local_attention_reference(*inputs[:3], window, dilation, *inputs[3:])
    torch.testing.assert_close(fast, ref, atol=atol, rtol=rtol)
    grad_out = _rand(*fast.shape, seed=6, dtype=fast.dtype, grad=False)
    for g_fast, g_ref in zip(torch.autograd.grad(fast, tensors, grad_out),
                             torch.autograd.grad(ref, tensors, grad_out)):
        torch.testing.assert_close(g_fast, g_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('width,window,dilation', [
    (37, (7, 7), (1, 1)),  # interior blocks, both borders, a partial last block
    (40, (5, 7), (2, 3)),  # dilated: wider borders
    (16, (3, 3), (1, 1)),  # whole blocks, one interior
    (3, (7, 7), (1, 1)),   # one block, narrower than the window
])
def test_interior_border_and_partial_blocks(dtype, width, window, dilation):
    inputs = _inputs(2, 2, 4, 9, width, window, dtype)
    # float32: the kernel's exp is a polynomial (about 1 ulp), sums are
    # accumulated in another order than the reference's.
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else {}
    _check_against_reference(inputs, window, dilation, **tol)


@pytest.mark.parametrize('dim', [1, 3, 5, 9, 12, 17])
def test_head_widths_outside_the_fixed_chunks(dim):
    """Channels go in chunks of 8 plus a remainder of any width."""
    inputs = _inputs(1, 2, dim, 6, 11, (3, 5), dim_v=dim + 2, rel=dim >= 2)
    _check_against_reference(inputs, (3, 5), (1, 2))


@pytest.mark.parametrize('window', [(1, 11), (11, 1), (2, 9), (9, 10)])
def test_window_widths_beyond_one_chunk_of_taps(window):
    """A tap row's taps go in chunks of 8 plus a remainder."""
    inputs = _inputs(1, 2, 4, 12, 13, window)
    _check_against_reference(inputs, window, (1, 1))


@pytest.mark.parametrize('key,rel', [(True, False), (False, True)])
def test_logits_without_content_or_without_position(key, rel):
    inputs = _inputs(2, 3, 4, 7, 10, (5, 5), key=key, rel=rel)
    _check_against_reference(inputs, (5, 5), (1, 1))


@pytest.mark.parametrize('threads', [1, 2, 3])
@pytest.mark.parametrize('batch,height,width', [(1, 13, 20), (3, 5, 20), (2, 1, 80)])
def test_bands_of_rows_split_over_threads(threads, batch, height, width):
    """Bands split images (key rows reached from two bands are summed after
    both have run) and run across image boundaries; results do not depend
    on timing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = _inputs(batch, 2, 4, height, width, (7, 7))
        _check_against_reference(inputs, (7, 7), (2, 1))
        q, k, v, rel_row, rel_col = (t.detach() for t in inputs)
        runs = []
        for _ in range(2):
            q.requires_grad_()
            out = local_attention(q, k, v, (7, 7), (2, 1), rel_row, rel_col, impl='cpp')
            runs.append((out, torch.autograd.grad(out.sum(), q)[0]))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.set_num_threads(previous)


def test_float32_large_logits_stay_finite_and_exact_at_borders():
    """Logits far apart (weights below float32's range) and masked border
    taps: the polynomial exp must give 0 or tiny weights, never NaN."""
    q, k, v, rel_row, rel_col = _inputs(1, 2, 4, 6, 19, (7, 7), torch.float32)
    with torch.no_grad():
        q.mul_(30)
    out = local_attention(q, k, v, (7, 7), (1, 1), rel_row, rel_col, impl='cpp')
    ref = local_attention_reference(q.double(), k.double(), v.double(), (7, 7), (1, 1),
                                    rel_row.double(), rel_col.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('impl', ['cpp', 'torch'])
@pytest.mark.parametrize('content', [True, False])
def test_recompute_attention_matches_reference(impl, content):
    inputs = _inputs(2, 2, 3, 7, 10, (5, 3), key=content)
    tensors = [t for t in inputs if t is not None]
    fast = local_attention(*inputs[:3], (5, 3), (2, 1), *inputs[3:], impl=impl,
                           recompute_attention=True)
    ref = local_attention_reference(*inputs[:3], (5, 3), (2, 1), *inputs[3:])
    torch.testing.assert_close(fast, ref)
    grad_out = _rand(*fast.shape, seed=6, grad=False)
    for g_fast, g_ref in zip(torch.autograd.grad(fast, tensors, grad_out),
                             torch.autograd.grad(ref, tensors, grad_out)):
        torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_recompute_gives_the_stored_maps_gradients(dtype):
    inputs = _inputs(1, 2, 8, 9, 21, (7, 7), dtype)
    tensors = [t for t in inputs if t is not None]
    grads = []
    for recompute in (False, True):
        out = local_attention(*inputs[:3], (7, 7), (1, 1), *inputs[3:], impl='cpp',
                              recompute_attention=recompute)
        grads.append(torch.autograd.grad(out.sum(), tensors))
    for stored, recomputed in zip(*grads):
        torch.testing.assert_close(stored, recomputed, rtol=0, atol=0)


@pytest.mark.parametrize('impl', ['cpp', 'torch'])
@pytest.mark.parametrize('kwargs', [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, dilation=2),
    dict(kernel_size=3, logits='qr'),
])
def test_recompute_attention_gradcheck(impl, kwargs):
    layer = LocalSelfAttention2d(3, 4, num_heads=2, impl=impl, recompute_attention=True,
                                 **kwargs).double()
    x = _rand(1, 3, 5, 4)
    assert torch.autograd.gradcheck(layer, (x, ))


def test_recompute_attention_keeps_no_map():
    q, k, v, rel_row, rel_col = _inputs(1, 2, 4, 6, 9, (3, 3))
    saved = {}
    for recompute in (False, True):
        out = local_attention(q, k, v, (3, 3), (1, 1), rel_row, rel_col, impl='cpp',
                              recompute_attention=recompute)
        saved[recompute] = _saved_by_the_operator(out)
    # q, k, v, rel_row, rel_col, out, and the map (heads * taps numbers per pixel)
    assert saved[False][-1].numel() >= 2 * 9 * 6 * 9
    assert saved[True][-1].numel() == 0
    assert all(a is b for a, b in zip(saved[False][:5], saved[True][:5]))


def _saved_by_the_operator(out):
    """What the registered operator's autograd node saved for ``out``."""
    node = out.grad_fn
    while 'local_attention' not in node.name():
        node = node.next_functions[0][0]
    return node.saved_tensors


def test_no_map_is_stored_without_gradients(monkeypatch):
    stores = []
    kernel = cpu_kernel()

    class Recording:

        def forward(self, *args):
            stores.append(args[-1])
            return kernel.forward(*args)

        def __getattr__(self, name):
            return getattr(kernel, name)

    monkeypatch.setattr(cpu, '_KERNEL', Recording())
    layer = LocalSelfAttention2d(4, 4, 3, num_heads=2).eval()
    x = torch.rand(1, 4, 6, 6)
    with torch.no_grad():
        layer(x)
    layer(x)  # parameters need gradients: the map is kept
    LocalSelfAttention2d(4, 4, 3, num_heads=2, recompute_attention=True)(x)
    assert stores == [False, True, False]


def test_layer_passes_recompute_attention_down():
    layer = LocalSelfAttention2d(4, 8, 3, num_heads=2, recompute_attention=True).double()
    ref = LocalSelfAttention2d(4, 8, 3, num_heads=2, impl='reference').double()
    ref.load_state_dict(layer.state_dict())
    x = _rand(2, 4, 9, 11)
    out = layer(x)
    assert out.grad_fn is not None
    torch.testing.assert_close(out, ref(x))
    out.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    ref(x).sum().backward()
    for g, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad)
    with pytest.raises(ValueError, match='recompute_attention'):
        LocalSelfAttention2d(4, 8, 3, num_heads=2, recompute_attention='yes')


def test_expanded_grad_out_is_read_in_place():
    q, k, v, rel_row, rel_col = _inputs(1, 2, 4, 5, 9, (3, 3))
    out = local_attention(q, k, v, (3, 3), (1, 1), rel_row, rel_col, impl='cpp')
    expanded = torch.ones((), dtype=out.dtype).expand(out.shape)  # stride 0 everywhere
    grads = torch.autograd.grad(out, (q, k, v), expanded, retain_graph=True)
    for g, expected in zip(grads, torch.autograd.grad(out, (q, k, v),
                                                      expanded.contiguous())):
        torch.testing.assert_close(g, expected, rtol=0, atol=0)


def test_split_projections_passes_packed_gradients_without_a_copy():
    stacked = _rand(2, 3, 2, 4, 5, 6)
    parts = split_projections(stacked)
    assert all(p._base is not None for p in parts)  # views, no copy
    backward = local_attention_ops._SplitProjections.backward
    ctx = type('Ctx', (), dict(part=dict(size=parts[0].shape, dtype=stacked.dtype,
                                         device=stacked.device)))()
    packed = torch.randn(2, 3, 2, 4, 5, 6, dtype=stacked.dtype)
    grad = backward(ctx, *packed.unbind(1))
    assert grad.data_ptr() == packed.data_ptr() and torch.equal(grad, packed)
    # Separate (or missing) gradients are stacked.
    separate = [torch.randn(2, 2, 4, 5, 6, dtype=stacked.dtype) for _ in range(3)]
    grad = backward(ctx, separate[0], None, separate[2])
    torch.testing.assert_close(grad, torch.stack(
        [separate[0], torch.zeros_like(separate[1]), separate[2]], dim=1))


def test_kernel_gradients_reach_the_projection_in_one_buffer():
    """q, k, v are slices of one projection, and so are their gradients."""
    layer = LocalSelfAttention2d(4, 8, 3, num_heads=2)
    x = torch.rand(1, 4, 6, 7)
    q, k, v = layer.project(x)
    out = local_attention(q, k, v, (3, 3), (1, 1), layer.rel_row.detach(),
                          layer.rel_col.detach(), impl='cpp')
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert local_attention_ops._packed(grads) is not None


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward of ``fn()``."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize('impl', ['cpp', 'torch'])
@pytest.mark.parametrize('kwargs', [dict(), dict(stride=2, dilation=2, bias=True),
                                    dict(recompute_attention=True)])
def test_with_cp_gives_the_same_gradients_and_keeps_only_the_input(impl, kwargs):
    layer = LocalSelfAttention2d(8, 16, 3, num_heads=2, window_size=5, impl=impl,
                                 **kwargs).double()
    checkpointed = LocalSelfAttention2d(8, 16, 3, num_heads=2, window_size=5, impl=impl,
                                        with_cp=True, **kwargs).double()
    checkpointed.load_state_dict(layer.state_dict())
    x = _rand(2, 8, 11, 13)
    results = []
    for module in (layer, checkpointed):
        out, saved = _saved_bytes(lambda: module(x))
        grads = torch.autograd.grad(out.square().sum(), (x, *module.parameters()))
        results.append((out, saved, grads))
    (out, saved, grads), (out_cp, saved_cp, grads_cp) = results
    torch.testing.assert_close(out_cp, out, rtol=0, atol=0)
    for g, g_cp in zip(grads, grads_cp):
        torch.testing.assert_close(g_cp, g)
    # The checkpoint keeps the input (and parameters); the plain layer keeps
    # the projections, which alone are 3 * 16 / 8 = 6x the input.
    assert saved_cp <= x.numel() * 8 + sum(p.numel() * 8 for p in layer.parameters())
    assert saved > 4 * saved_cp
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(x), out.detach(), rtol=0, atol=0)
    assert 'with_cp=True' in repr(checkpointed)
    with pytest.raises(ValueError, match='with_cp'):
        LocalSelfAttention2d(4, 8, 3, num_heads=2, with_cp=1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('width', [1, 11, 16, 17])
def test_stored_map_shape_is_the_same_for_every_build(dtype, width):
    """The fake kernel's shape of the stored map (what torch.compile caches
    graphs with) is the kernel's, and depends on no vector width: rows
    padded to a fixed multiple."""
    assert cpu_kernel().map_width_multiple() == cpu.MAP_WIDTH_MULTIPLE == 16
    q, k, v, rel_row, rel_col = _inputs(2, 3, 4, 5, width, (3, 5), dtype=dtype)
    _, saved = torch.ops.sasa_mmdet.local_attention(q, k, v, rel_row, rel_col, (3, 5), (1, 1),
                                                    'cpp', True)
    padded = -(-width // 16) * 16
    assert saved.shape == cpu.attention_map_shape(q, (3, 5)) == (2, 5, 3, 15 * padded)
