"""The Triton kernels held to the unfold reference, outputs and every gradient.

Without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py), which is slow: shapes stay tiny. Compiling the
same kernels for real GPUs is ``tools/analysis/check_triton_kernels.py``'s
job (tested below), because the interpreter accepts programs GPUs reject.
"""
import os
import subprocess
import sys

import pytest
import torch

from sasa_mmdet.layers import LocalSelfAttention2d, local_attention, local_attention_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
# Errors allowed relative to the largest value of the tensor compared. The
# kernels compute in float32 and round when they store; in half precision
# the backward's delta = dout . out reads the rounded output (as
# FlashAttention's does), a few units of rounding in the gradients.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _assert_close(got, want, dtype):
    error = (got.double() - want.double()).abs().max().item()
    scale = want.abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f'max error {error:.3g} at scale {scale:.3g}'


def _inputs(heads, dim, height, width, window, key=True, rel=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    q = rand(2, heads, dim, height, width)
    k = rand(2, heads, dim, height, width) if key else None
    v = rand(2, heads, dim, height, width)
    rel_row = rand(window[0], heads, (dim + 1) // 2) if rel else None
    rel_col = rand(window[1], heads, dim // 2) if rel else None
    return q, k, v, rel_row, rel_col


def _check(inputs, window, dilation=(1, 1), dtype=torch.float32):
    """Triton in ``dtype`` against the reference in float64 on the same
    (rounded) inputs; the tables stay float32, as parameters do."""
    q, k, v, rel_row, rel_col = inputs
    cast = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    tables = [rel_row, rel_col]
    out = local_attention(*cast, window, dilation, *tables, impl='triton')
    assert out.dtype == dtype
    double = [None if t is None else t.detach().double().requires_grad_()
              for t in (*cast, *tables)]
    expected = local_attention_reference(*double[:3], window, dilation, *double[3:])
    _assert_close(out, expected, dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    mine = [t for t in (*cast, *tables) if t is not None]
    theirs = [t for t in double if t is not None]
    for got, want in zip(torch.autograd.grad(out, mine, grad_out.to(dtype)),
                         torch.autograd.grad(expected, theirs, grad_out.double())):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize('height,width,window,dilation', [
    (5, 7, (3, 3), (1, 1)),    # borders on every side
    (6, 9, (5, 5), (2, 2)),    # dilation 2
    (5, 6, (4, 4), (1, 1)),    # even window: one more tap after the centre
    (3, 2, (7, 7), (1, 1)),    # map smaller than the window
    (4, 19, (3, 5), (1, 1)),   # wider than one 16-pixel tile row, rectangular window
])
def test_matches_reference_at_borders_dilations_and_windows(height, width, window, dilation):
    _check(_inputs(2, 4, height, width, window), window, dilation)


@pytest.mark.parametrize('key,rel', [(False, True), (True, False)])
def test_qr_only_and_qk_only(key, rel):
    _check(_inputs(2, 4, 5, 6, (3, 3), key=key, rel=rel), (3, 3))


@pytest.mark.parametrize('dim', [8, 128])
def test_head_widths_8_to_128(dim):
    _check(_inputs(1, dim, 3, 5, (3, 3)), (3, 3))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_inputs_softmax_in_float32(dtype):
    window = (3, 3)
    q, k, v, rel_row, rel_col = _inputs(2, 4, 5, 6, window)
    _check((q, k, v, rel_row, rel_col), window, dtype=dtype)
    # Large logits: a half-precision softmax would saturate; float32 does not.
    big = [t.detach().to(dtype) * 8 for t in (q, k, v)]
    out = local_attention(*big, window, (1, 1), rel_row.detach(), rel_col.detach(),
                          impl='triton')
    expected = local_attention_reference(*[t.double() for t in big], window, (1, 1),
                                         rel_row.detach().double(), rel_col.detach().double())
    assert torch.isfinite(out).all()
    _assert_close(out, expected, dtype)


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


def test_backward_is_bit_reproducible():
    """No reduction uses atomics: two backward passes agree bit for bit."""
    q, k, v, rel_row, rel_col = _inputs(2, 4, 5, 6, (3, 3))
    out = local_attention(q, k, v, (3, 3), (1, 1), rel_row, rel_col, impl='triton')
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v, rel_row, rel_col), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v, rel_row, rel_col), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_forward_keeps_log_sum_exp_not_the_map():
    q, k, v, rel_row, rel_col = _inputs(2, 4, 5, 6, (3, 3))
    out, saved = torch.ops.sasa_mmdet.local_attention(q, k, v, rel_row, rel_col, (3, 3),
                                                      (1, 1), 'triton', True)
    assert saved.shape == (2, 2, 5, 6) and saved.dtype == torch.float32


@pytest.mark.slow
def test_every_kernel_configuration_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools/analysis/check_triton_kernels.py'),
         '--json', str(tmp_path / 'kernels.json')],
        capture_output=True, text=True, env={**os.environ, 'TRITON_INTERPRET': '0'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '0 compile errors, 0 with register spills' in result.stdout
    import json
    rows = json.loads((tmp_path / 'kernels.json').read_text())['rows']
    assert {r['arch'] for r in rows} == {'sm_80', 'sm_90'}
    assert {r['head_dim'] for r in rows} == {8, 16, 32, 64, 128}
