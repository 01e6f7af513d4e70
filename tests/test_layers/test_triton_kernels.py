"""The Triton kernels held to the unfold reference, outputs and every gradient.

Without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py), which is slow: shapes stay tiny. The interpreter
computes ``tl.dot`` on bfloat16 wrongly (Triton 3.8), so under it the
kernels upcast the operands of every product to float32 (the half-precision
rounding of P and dS is kept): the bfloat16 cases check the logic
and the rounding, not the GPU's bfloat16 products, which only a GPU (or the
compile check) sees. Because the interpreter accepts programs GPUs reject,
each kernel is also compiled for sm_80 and sm_90 here (one configuration);
``tools/analysis_tools/check_triton_kernels.py`` compiles every head width,
dtype and logit variant (tests/test_tools/test_gpu_cost_model.py).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sasa_mmdet.layers import LocalSelfAttention2d, local_attention, local_attention_reference
from sasa_mmdet.layers.local_attention_ops import triton_backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
# Errors allowed relative to the largest value of the tensor compared. The
# kernels compute in float32 and round when they store; in half precision P
# and dS are rounded to the input dtype for their products (as
# FlashAttention's are), a few units of rounding in the outputs and gradients.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# Gradients in bfloat16: delta = dout . out reads the output as stored,
# rounded to 8 bits (FlashAttention-2's way), and dP - delta cancels where
# the softmax is peaked (these random inputs' logits have a variance of D).
# There the gradients are off by up to 5% of their largest value (1% with
# delta recomputed exactly); at unit-variance logits, by 1% either way.
GRAD_TOLERANCE = {**TOLERANCE, torch.bfloat16: 6e-2}


def _assert_close(got, want, dtype, what='', tolerance=None):
    error = (got.double() - want.double()).abs().max().item()
    scale = want.abs().max().item()
    assert error <= (tolerance or TOLERANCE[dtype]) * scale, \
        f'{what}: max error {error:.3g} at scale {scale:.3g}'


def _inputs(heads, dim, height, width, window, key=True, rel=True, value_dim=None, batch=2,
            seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    q = rand(batch, heads, dim, height, width)
    k = rand(batch, heads, dim, height, width) if key else None
    v = rand(batch, heads, value_dim or dim, height, width)
    rel_row = rand(window[0], heads, (dim + 1) // 2) if rel else None
    rel_col = rand(window[1], heads, dim // 2) if rel else None
    return q, k, v, rel_row, rel_col


def _check(inputs, window, dilation=(1, 1), dtype=torch.float32, tolerance=None,
           modified_output=False):
    """Triton in ``dtype`` against the reference in float64 on the same
    (rounded) inputs; the tables stay float32, as parameters do. With
    ``modified_output`` the output is modified in place (by ``mul_(1)``)
    before the backward pass, which then recomputes delta."""
    q, k, v, rel_row, rel_col = inputs
    cast = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    tables = [rel_row, rel_col]
    out = local_attention(*cast, window, dilation, *tables, impl='triton')
    assert out.dtype == dtype
    if modified_output:
        out.mul_(1)
    double = [None if t is None else t.detach().double().requires_grad_()
              for t in (*cast, *tables)]
    expected = local_attention_reference(*double[:3], window, dilation, *double[3:])
    _assert_close(out, expected, dtype, 'out', tolerance)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    names = [n for n, t in zip(('q', 'k', 'v', 'rel_row', 'rel_col'), double) if t is not None]
    mine = [t for t in (*cast, *tables) if t is not None]
    theirs = [t for t in double if t is not None]
    for name, got, want in zip(names, torch.autograd.grad(out, mine, grad_out.to(dtype)),
                               torch.autograd.grad(expected, theirs, grad_out.double())):
        _assert_close(got, want, dtype, f'grad {name}', tolerance or GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize('dim,height,width,window,dilation', [
    (8, 5, 7, (3, 3), (1, 1)),      # borders on every side
    (16, 9, 11, (7, 7), (1, 1)),    # the paper's window, two 8 x 8 tiles across
    (32, 5, 16, (5, 5), (1, 1)),    # W divisible by 16
    (32, 13, 20, (3, 3), (2, 2)),   # dilation 2: four sub-lattices
    (64, 4, 16, (3, 3), (2, 3)),    # W divisible by 16, unequal dilations
    (64, 7, 9, (3, 3), (1, 1)),     # W not divisible by 16
])
def test_matches_reference_at_head_widths_8_to_64(dim, height, width, window, dilation):
    """The widths ResNet-50/101 (8 to 64 at 8 heads), the FPN and the heads
    (32) use; batch x heads = 2."""
    _check(_inputs(2, dim, height, width, window, batch=1), window, dilation)


@pytest.mark.parametrize('height,width,window', [
    (5, 6, (4, 4)),    # even window: one more tap after the centre
    (3, 2, (7, 7)),    # map smaller than the window
    (4, 19, (3, 5)),   # rectangular window
    (10, 6, (11, 13)),  # halo wider than 16 rows and columns
])
def test_matches_reference_at_odd_windows(height, width, window):
    _check(_inputs(1, 4, height, width, window, batch=1), window)


@pytest.mark.parametrize('key,rel', [(False, True), (True, False)])
def test_qr_only_and_qk_only(key, rel):
    _check(_inputs(2, 8, 5, 6, (3, 3), key=key, rel=rel), (3, 3))


@pytest.mark.parametrize('dim,key,rel,window,dilation', [
    (8, True, True, (3, 3), (1, 1)),
    (8, False, True, (3, 3), (1, 1)),
    (16, True, False, (5, 5), (2, 1)),
])
def test_output_modified_in_place_recomputes_delta(dim, key, rel, window, dilation):
    """The backward query kernel's walk over the halo for delta, taken
    when the output it would read was modified in place."""
    _check(_inputs(2, dim, 6, 7, window, key=key, rel=rel), window, dilation,
           modified_output=True)


def test_backward_takes_delta_from_the_output_unless_modified_in_place(monkeypatch):
    backend = triton_backend()
    given, backward = [], backend.backward

    def spy(grad_out, out, *args):
        given.append(out)
        return backward(grad_out, out, *args)

    monkeypatch.setattr(backend, 'backward', spy)
    q, k, v, rel_row, rel_col = _inputs(2, 8, 5, 6, (3, 3))
    out = local_attention(q, k, v, (3, 3), (1, 1), rel_row, rel_col, impl='triton')
    out.sum().backward(retain_graph=True)
    assert given[-1] is not None and given[-1].data_ptr() == out.data_ptr()
    out.relu_()
    out.sum().backward()
    assert given[-1] is None


def test_tables_kernel_walking_columns_of_tiles(monkeypatch):
    """With little room for partial sums, each program of the tables kernel
    takes a whole column of tiles (here two per sub-lattice)."""
    monkeypatch.setattr(triton_backend(), 'TABLE_PARTIAL_BYTES', 1)
    _check(_inputs(1, 8, 17, 5, (3, 3), batch=1), (3, 3), (2, 1))


def test_value_width_differs_from_head_width():
    _check(_inputs(2, 8, 5, 6, (3, 3), value_dim=24), (3, 3))


def test_head_width_128():
    _check(_inputs(1, 128, 3, 5, (3, 3)), (3, 3))


@pytest.fixture
def float32_matmul_precision():
    """Sets torch's float32 matmul precision for one test, then restores it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize('precision,dtype,mode', [
    ('highest', torch.float32, 0), ('high', torch.float32, 2), ('medium', torch.float32, 2),
    ('high', torch.bfloat16, 0), ('high', torch.float16, 0)])
def test_float32_products_follow_torch_matmul_precision(float32_matmul_precision, monkeypatch,
                                                        precision, dtype, mode):
    """float32 inputs take one tf32 product per product when torch allows
    tf32 for float32 matrix products; half-precision inputs never change."""
    backend = triton_backend()
    monkeypatch.setattr(backend, 'INTERPRETED', False)
    float32_matmul_precision(precision)
    assert backend.products_mode(dtype) == mode


def test_tf32_products_run_and_match_the_reference(float32_matmul_precision, monkeypatch):
    """The tf32 variant of every kernel runs and matches the reference to
    tf32's accuracy on a GPU (operands rounded to 10-bit mantissas, as
    cuDNN's tf32 convolution does); the interpreter computes tf32 products
    exactly, so there the float32 tolerance holds."""
    float32_matmul_precision('high')
    calls = []
    for name in triton_backend().KERNELS:
        kernel = getattr(triton_backend(), name)
        monkeypatch.setattr(kernel, 'run', _recording(kernel.run, calls))
    for modified_output in (False, True):  # the two ways through the backward
        _check(_inputs(2, 8, 5, 6, (3, 3)), (3, 3), modified_output=modified_output,
               tolerance=5e-3 if DEVICE == 'cuda' else None)
    assert {c['PRODUCTS'] for c in calls} == {2}
    assert len(calls) == 8  # planar maps: each backward runs all three kernels


def _recording(run, calls):
    def wrapped(*args, **kwargs):
        calls.append(kwargs)
        return run(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize('value_dim', [136, None])
def test_head_widths_over_128_are_refused(value_dim):
    dim = 8 if value_dim else 136
    q, k, v, rel_row, rel_col = _inputs(1, dim, 2, 3, (3, 3), value_dim=value_dim, batch=1)
    with pytest.raises(ValueError, match='136.*' if value_dim else 'query/key head width is 136'):
        local_attention(q, k, v, (3, 3), (1, 1), rel_row, rel_col, impl='triton')


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_inputs_softmax_in_float32(dtype):
    window = (7, 7)
    q, k, v, rel_row, rel_col = _inputs(1, 32, 7, 9, window)
    _check((q, k, v, rel_row, rel_col), window, dtype=dtype)
    # Large logits: a half-precision softmax would saturate; float32 does not.
    big = [t.detach().to(dtype) * 8 for t in (q, k, v)]
    out = local_attention(*big, window, (1, 1), rel_row.detach(), rel_col.detach(),
                          impl='triton')
    expected = local_attention_reference(*[t.double() for t in big], window, (1, 1),
                                         rel_row.detach().double(), rel_col.detach().double())
    assert torch.isfinite(out).all()
    _assert_close(out, expected, dtype)


def test_packed_qkv_views_are_read_and_written_in_place():
    """q, k, v as the layer passes them (slices of one (B, 3, N, D, H, W)
    projection) and gradients written into one such buffer."""
    window = (5, 5)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 3, 2, 16, 7, 10, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(1)
    rel_row = torch.randn(5, 2, 8, generator=g).to(DEVICE)
    rel_col = torch.randn(5, 2, 8, generator=g).to(DEVICE)
    backend = triton_backend()
    out, lse = backend.forward(q, k, v, rel_row, rel_col, window, (1, 1), False)
    expected = local_attention_reference(q, k, v, window, (1, 1), rel_row, rel_col)
    _assert_close(out, expected, torch.float32)
    grads = torch.full_like(qkv, float('nan'))
    grad_q, grad_k, grad_v = grads.unbind(1)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE)
    grad_rel = backend.backward(grad_out, None, lse, q, k, v, rel_row, rel_col, window, (1, 1),
                                grad_q, grad_k, grad_v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rel_row, rel_col)]
    want = torch.autograd.grad(local_attention_reference(*leaves[:3], window, (1, 1),
                                                         *leaves[3:]), leaves, grad_out)
    for got, expect in zip((grad_q, grad_k, grad_v, *grad_rel), want):
        _assert_close(got, expect, torch.float32)


def _channels_last(t):
    """``(B, N, D, H, W)`` ``t`` as a view of a ``(B, H, W, N, D)`` tensor."""
    return t.detach().permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


@pytest.mark.parametrize('dim,value_dim,vectorised', [
    (16, 16, True),    # widths of a whole block: no channel mask
    (8, 24, True),     # narrower than a block (padded to 16, 32)
    (4, 4, False),     # not a multiple of 8: planar (copied)
])
def test_channels_last_maps_match_reference(dim, value_dim, vectorised, monkeypatch):
    """q, k, v, the output gradient and the gradient buffers channel-
    innermost, as a channels-last projection makes them: read and written in
    place by the kernels' channels-last variant (vector loads on GPUs), the
    output channels-last too."""
    window = (5, 5)
    calls = []
    for name in triton_backend().KERNELS:
        kernel = getattr(triton_backend(), name)
        monkeypatch.setattr(kernel, 'run', _recording(kernel.run, calls))
    q, k, v, rel_row, rel_col = (None if t is None else t.detach() for t in
                                 _inputs(2, dim, 6, 9, window, value_dim=value_dim))
    q, k, v = (_channels_last(t) for t in (q, k, v))
    backend = triton_backend()
    assert backend.channels_last(q, k, v) == vectorised
    out, lse = backend.forward(q, k, v, rel_row, rel_col, window, (1, 1), False)
    assert backend.channels_last(out) == vectorised
    expected = local_attention_reference(q, k, v, window, (1, 1), rel_row, rel_col)
    _assert_close(out, expected, torch.float32, 'out')
    grad_out = _channels_last(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    buffers = [_channels_last(torch.full_like(t, float('nan'))) for t in (q, k, v)]
    grad_rel = backend.backward(grad_out, out, lse, q, k, v, rel_row, rel_col, window, (1, 1),
                                *buffers)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rel_row, rel_col)]
    want = torch.autograd.grad(local_attention_reference(*leaves[:3], window, (1, 1),
                                                         *leaves[3:]), leaves, grad_out)
    for name, got, expect in zip(('q', 'k', 'v', 'rel_row', 'rel_col'), (*buffers, *grad_rel),
                                 want):
        _assert_close(got, expect, torch.float32, f'grad {name}')
    assert {c['CHANNELS_LAST'] for c in calls} == {vectorised}
    # Channels-last, the tables kernel takes on the query kernel's work.
    assert [c.get('OWNS_DQ') for c in calls] == ([None, True, None] if vectorised else
                                                 [None, None, False, None])


def test_channels_last_layer_equals_reference_and_stays_channels_last():
    """A channels-last input: q, k, v and their gradients in one
    channels-last buffer, the output channels-last, the numbers the
    reference's."""
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(16, 16, 3, num_heads=2, impl='triton').to(DEVICE)
    ref = LocalSelfAttention2d(16, 16, 3, num_heads=2, impl='reference').to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 7, 9, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    query, key, value = layer.project(x)
    assert triton_backend().channels_last(query, key, value)
    out, expected = layer(x), ref(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_close(out, expected, torch.float32)
    for got, want in zip(torch.autograd.grad(out.square().sum(), [x, *layer.parameters()]),
                         torch.autograd.grad(expected.square().sum(), [x, *ref.parameters()])):
        _assert_close(got, want, torch.float32)


@pytest.mark.parametrize('channels,kwargs,vectorised', [
    (16, dict(), True),
    (16, dict(stride=2, bias=True), True),
    (16, dict(with_cp=True), True),
    (16, dict(position_encoding='absolute'), True),
    (12, dict(), False),  # head width 6, not a multiple of 8: planar, as before
])
def test_contiguous_input_runs_the_channels_last_kernels(channels, kwargs, vectorised,
                                                         monkeypatch):
    """A contiguous input at a head width that is a multiple of 8: q, k, v
    projected channels-last, the kernels' channels-last variant launched,
    the output left channels-last; outputs and every gradient (x, weights,
    tables) those of the 'torch' backend and of the same input
    channels-last."""
    calls = []
    for name in triton_backend().KERNELS:
        kernel = getattr(triton_backend(), name)
        monkeypatch.setattr(kernel, 'run', _recording(kernel.run, calls))
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(16, channels, 3, num_heads=2, impl='triton', **kwargs)
    ref = LocalSelfAttention2d(16, channels, 3, num_heads=2, impl='torch', **kwargs)
    ref.load_state_dict(layer.state_dict())
    layer, ref = layer.to(DEVICE), ref.to(DEVICE)
    x = torch.randn(2, 16, 7, 9, device=DEVICE)
    results = []
    for module, memory_format in ((layer, torch.contiguous_format), (ref, torch.contiguous_format),
                                  (layer, torch.channels_last)):
        x_in = x.contiguous(memory_format=memory_format).requires_grad_()
        out = module(x_in)
        results.append((out, torch.autograd.grad(out.square().sum(), [x_in, *module.parameters()])))
        if len(results) == 1:
            assert calls and {c['CHANNELS_LAST'] for c in calls} == {vectorised}
            assert out.is_contiguous(memory_format=torch.channels_last) == vectorised
    (out, grads), *others = results
    names = ['x'] + [name for name, _ in layer.named_parameters()]
    for expected, expected_grads in others:
        _assert_close(out, expected, torch.float32, 'out')
        for name, got, want in zip(names, grads, expected_grads):
            _assert_close(got, want, torch.float32, f'grad {name}')


def test_projecting_a_contiguous_input_channels_last_copies_nothing():
    """The projection reads x as its transpose, as it lies (no copy of x,
    as F.linear's or matmul's folding would make when the weight needs a
    gradient), and writes q, k, v as one channels-last buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):

        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    layer = LocalSelfAttention2d(16, 32, 3, num_heads=4, impl='triton').to(DEVICE)
    x = torch.randn(2, 16, 7, 9, device=DEVICE, requires_grad=True)
    with RecordOps() as record:
        query, key, value = layer.project(x)
    assert triton_backend().channels_last(query, key, value)
    assert 'bmm.default' in record.ops
    assert not [op for op in record.ops if 'copy' in op or 'clone' in op], record.ops


@pytest.mark.parametrize('kwargs', [
    dict(stride=2),
    dict(position_encoding='absolute'),
    dict(position_encoding='none', logits='qk+qr'),
])
def test_layer_on_triton_equals_layer_on_reference(kwargs):
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(4, 8, 3, num_heads=2, impl='triton', **kwargs).to(DEVICE)
    ref = LocalSelfAttention2d(4, 8, 3, num_heads=2, impl='reference', **kwargs).to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 7, 5, device=DEVICE, requires_grad=True)
    out, expected = layer(x), ref(x)
    _assert_close(out, expected, torch.float32)
    for got, want in zip(torch.autograd.grad(out.square().sum(), [x, *layer.parameters()]),
                         torch.autograd.grad(expected.square().sum(), [x, *ref.parameters()])):
        _assert_close(got, want, torch.float32)


def test_in_place_activation_after_the_layer_keeps_gradients_right():
    """A layer without bias followed by an in-place ReLU (ConvModule with
    ``bias=False``, ``inplace=True``): the ReLU overwrites the attention's
    output, which the backward pass therefore must not need."""
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(4, 8, 3, num_heads=2, bias=False, impl='triton').to(DEVICE)
    ref = LocalSelfAttention2d(4, 8, 3, num_heads=2, bias=False, impl='torch').to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 6, 5, device=DEVICE, requires_grad=True)
    grads = []
    for module in (layer, ref):
        out = F.relu(module(x), inplace=True)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))
    for got, want in zip(*grads):
        _assert_close(got, want, torch.float32)


def test_kernels_launch_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device; inputs on another one
    (``cuda:1`` while the current device is 0) must make theirs current.
    Checked without a GPU: fake tensors on cuda:1, ``torch.cuda.device``
    recorded, and each kernel launch asked which device is current."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    backend = triton_backend()
    current = [0]  # the current device, as torch.cuda.device sets it

    class RecordingDevice:

        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    launches = []

    class Kernel:

        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, current[0]))

    monkeypatch.setattr(torch.cuda, 'device', RecordingDevice)
    for name in backend.KERNELS:
        monkeypatch.setattr(backend, name, Kernel(name))
    window = (3, 3)
    with FakeTensorMode():
        like = torch.empty(1, device='cuda:1')
        q, k, v = (backend.empty_map((1, 2, 8, 5, 6), like, True) for _ in range(3))
        rel_row, rel_col = (torch.empty(3, 2, 4, device='cuda:1') for _ in range(2))
        out, lse = backend.forward(q, k, v, rel_row, rel_col, window, (1, 1), False)
        for given_out in (out, None):  # None: delta recomputed by the query kernel
            backend.backward(out, given_out, lse, q, k, v, rel_row, rel_col, window, (1, 1),
                             *(torch.empty_like(t) for t in (q, k, v)))
    assert launches == [('_forward_kernel', 1), ('_backward_tables_kernel', 1),
                        ('_backward_key_kernel', 1), ('_backward_query_kernel', 1),
                        ('_backward_tables_kernel', 1), ('_backward_key_kernel', 1)]
    assert current == [0]


def test_backward_is_bit_reproducible():
    """No reduction uses atomics: two backward passes agree bit for bit."""
    q, k, v, rel_row, rel_col = _inputs(2, 8, 5, 6, (3, 3))
    out = local_attention(q, k, v, (3, 3), (1, 1), rel_row, rel_col, impl='triton')
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v, rel_row, rel_col), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v, rel_row, rel_col), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_forward_keeps_log_sum_exp_not_the_map_nor_the_output():
    q, k, v, rel_row, rel_col = _inputs(2, 4, 5, 6, (3, 3))
    out, saved = torch.ops.sasa_mmdet.local_attention(q, k, v, rel_row, rel_col, (3, 3),
                                                      (1, 1), 'triton', True)
    assert saved.shape == (2, 2, 5, 6) and saved.dtype == torch.float32
    node = out.grad_fn
    kept = [t for t in getattr(node, 'saved_tensors', ()) if t is not None]
    assert all(t.data_ptr() != out.data_ptr() for t in kept)


def test_layer_compiles_fullgraph_on_triton_and_matches_eager():
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 8, 3, num_heads=2, impl='triton').to(DEVICE)
    x = torch.randn(1, 8, 5, 7, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    out, expected = compiled(x), layer(x)
    torch.testing.assert_close(out, expected)
    params = [x, *layer.parameters()]
    for got, want in zip(torch.autograd.grad(out.square().sum(), params),
                         torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(got, want)


# Compiles each kernel (as a launch at head width 64 in bfloat16 specialises
# it: the wide-head settings, where register pressure is highest) for
# ``sys.argv[1]`` = sm_XY without a GPU, and prints per kernel the spill
# bytes from ptxas's log and the SASS (Triton's bundled cuobjdump).
# A subprocess: the kernels must be defined with the interpreter off.
_COMPILE_SCRIPT = """
import contextlib, io, json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sasa_mmdet.layers.local_attention_ops import triton_backend
backend = triton_backend()
triton.knobs.nvidia.dump_ptxas_log = True
triton.knobs.compilation.always_compile = True
cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                         'cuobjdump')
result = {}
# Each kernel as a training step launches it, and the query kernel as it
# runs after an in-place op on the output (the tables kernel at this width
# and layout is the same either way).
variants = [(name, True) for name in backend.KERNELS] + [('_backward_query_kernel', False)]
for name, has_out in variants:
    fn, signature, constexprs, attrs, options = backend.compile_source_args(
        name, torch.bfloat16, 64, has_out=has_out)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget('cuda', int(sys.argv[1]), 32),
                                  options=options)
    spills = re.search(r'(\\d+) bytes spill stores, (\\d+) bytes spill loads',
                       log.getvalue())
    with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
        cubin.write(compiled.asm['cubin'])
        cubin.flush()
        sass = subprocess.run([cuobjdump, '-sass', cubin.name], capture_output=True,
                              text=True, check=True).stdout
    result[name if has_out else name + ' (output modified)'] = dict(
        spills=[int(g) for g in spills.groups()], sass=sass)
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.parametrize('arch,instruction', [(90, 'HGMMA'), (80, 'HMMA')])
def test_kernels_compile_to_tensor_core_instructions(arch, instruction):
    """Each kernel compiles for the GPU (no GPU needed) to code with
    tensor-core instructions and without register spills."""
    import json
    import re
    result = subprocess.run([sys.executable, '-c', _COMPILE_SCRIPT, str(arch)],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, 'TRITON_INTERPRET': '0'})
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(kernels) == set(triton_backend().KERNELS) | {
        '_backward_query_kernel (output modified)'}
    for name, compiled in kernels.items():
        assert re.search(rf'\b{instruction}', compiled['sass']), \
            f'{name}: no {instruction} for sm_{arch}'
        assert compiled['spills'] == [0, 0], f'{name}: spills {compiled["spills"]}'
