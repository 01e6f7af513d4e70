"""Triton backend of SAN's operators (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

The operators are per-channel weighted sums and gathers, not matrix
products, so these kernels are elementwise and memory-bound: no tensor
cores. A program owns a ``BLOCK_C x (TILE_H x TILE_W)`` block of channels
and pixels of one image and walks the window's taps; at each tap it loads
the tile's shifted neighbours, rows contiguous along the image width (the
loads along a row are consecutive addresses), with the source pixel of
every (tap, pixel) computed in the kernel from the border mode (mirrored
with period ``2 (n - 1)``, or absent and masked). The taps of one tile read
overlapping rows (the tile plus its halo), which the caches serve after the
first tap. The aggregation reads the values in place, no per-tap copy.

Backward passes are written as gathers on the padded plane, so no program
writes where another does (no atomics): the gradient of the padded value
(or gathered) map at padded pixel ``P`` sums, over the taps, what the pixel
``P - offset(t)`` read there; ``san_pytorch.unpad_gradient`` then folds the
padding back onto the pixels it mirrors (or drops it, 'mask').

Verified against the reference under the interpreter
(``tests/test_layers/test_san_ops.py``, ``test_san_attention.py``; on CUDA
tensors where a GPU is visible, as ``tools/gpu_check.sh`` runs them).
Every kernel, as the layers launch it, compiles for sm_80 and sm_90
without spills (``tools/analysis_tools/check_triton_kernels.py --layers
san``; table in ``docs/san.md``). Loads at a tile's own pixels are
vectorised when the width is divisible by 16; the shifted taps' loads are
scalar (their column offsets are unaligned in the planar layout, and the
border mode computes their source per pixel). Not yet run or timed on a
GPU.
"""
import triton
import triton.language as tl
import torch

from .geometry import pad_amounts
from .san_pytorch import unpad_gradient

TILE_H, TILE_W, BLOCK_C = 4, 16, 8


@triton.jit
def _source(index, length, REFLECT: tl.constexpr):
    """Source pixel of ``index`` along an axis of ``length`` and whether it exists."""
    if REFLECT:
        period = tl.maximum(2 * (length - 1), 1)
        wrapped = ((index % period) + period) % period
        wrapped = tl.where(wrapped >= length, period - wrapped, wrapped)
        return tl.where(length == 1, 0, wrapped), index == index
    inside = (index >= 0) & (index < length)
    return tl.where(inside, index, 0), inside


@triton.jit
def _tile(pid_c, pid_t, channels, height, width, BLOCK_C: tl.constexpr, TILE_H: tl.constexpr,
          TILE_W: tl.constexpr):
    tiles_w = tl.cdiv(width, TILE_W)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, TILE_H * TILE_W)
    row = (pid_t // tiles_w) * TILE_H + p // TILE_W
    col = (pid_t % tiles_w) * TILE_W + p % TILE_W
    pixel_ok = (row < height) & (col < width)
    return c, row, col, (c[:, None] < channels) & pixel_ok[None, :]


@triton.jit
def _aggregation_fwd(value, weight, out, channels, weight_channels, height, width, kw, taps,
                     dh, dw, top, left, REFLECT: tl.constexpr, BLOCK_C: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(2)
    c, row, col, ok = _tile(tl.program_id(0), tl.program_id(1), channels, height, width,
                            BLOCK_C, TILE_H, TILE_W)
    plane = height * width
    v_base = value + (b * channels + c[:, None]).to(tl.int64) * plane
    w_base = weight + ((b * weight_channels + c[:, None] % weight_channels) * taps).to(
        tl.int64) * plane
    acc = tl.zeros((BLOCK_C, TILE_H * TILE_W), dtype=ACC)
    for t in range(0, taps):
        src_row, row_ok = _source(row + (t // kw) * dh - top, height, REFLECT)
        src_col, col_ok = _source(col + (t % kw) * dw - left, width, REFLECT)
        exists = ok & (row_ok & col_ok)[None, :]
        v = tl.load(v_base + (src_row * width + src_col)[None, :], mask=exists, other=0.0)
        # the weight at the tile's own pixels: masked by the tile alone (an
        # absent tap's value is 0, as in the reference), so the load is
        # vectorised where rows are aligned
        w = tl.load(w_base + t * plane + (row * width + col)[None, :], mask=ok, other=0.0)
        acc += v.to(ACC) * w.to(ACC)
    tl.store(out + (b * channels + c[:, None]).to(tl.int64) * plane +
             (row * width + col)[None, :], acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _aggregation_bwd_weight(grad_out, value, grad_weight, channels, weight_channels, height,
                            width, kw, taps, dh, dw, top, left, REFLECT: tl.constexpr,
                            BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                            ACC: tl.constexpr):
    b = tl.program_id(2)
    cw, row, col, ok = _tile(tl.program_id(0), tl.program_id(1), weight_channels, height, width,
                             BLOCK_C, TILE_H, TILE_W)
    plane = height * width
    pixel = (row * width + col)[None, :]
    for t in range(0, taps):
        src_row, row_ok = _source(row + (t // kw) * dh - top, height, REFLECT)
        src_col, col_ok = _source(col + (t % kw) * dw - left, width, REFLECT)
        exists = ok & (row_ok & col_ok)[None, :]
        acc = tl.zeros((BLOCK_C, TILE_H * TILE_W), dtype=ACC)
        for c0 in range(0, channels, weight_channels):
            base = (b * channels + c0 + cw[:, None]).to(tl.int64) * plane
            go = tl.load(grad_out + base + pixel, mask=ok, other=0.0)  # unshifted: as w above
            v = tl.load(value + base + (src_row * width + src_col)[None, :], mask=exists,
                        other=0.0)
            acc += go.to(ACC) * v.to(ACC)
        target = ((b * weight_channels + cw[:, None]) * taps + t).to(tl.int64) * plane + pixel
        tl.store(grad_weight + target, acc.to(grad_weight.dtype.element_ty), mask=ok)


@triton.jit
def _aggregation_bwd_value(grad_out, weight, grad_padded, channels, weight_channels, height,
                           width, padded_h, padded_w, kw, taps, dh, dw, BLOCK_C: tl.constexpr,
                           TILE_H: tl.constexpr, TILE_W: tl.constexpr, ACC: tl.constexpr):
    """Gradient of the padded value map: padded pixel P sums, over the taps
    t, grad_out * weight of the pixel that reads P at t (P - offset(t))."""
    b = tl.program_id(2)
    c, prow, pcol, ok = _tile(tl.program_id(0), tl.program_id(1), channels, padded_h, padded_w,
                              BLOCK_C, TILE_H, TILE_W)
    plane = height * width
    go_base = grad_out + (b * channels + c[:, None]).to(tl.int64) * plane
    w_base = weight + ((b * weight_channels + c[:, None] % weight_channels) * taps).to(
        tl.int64) * plane
    acc = tl.zeros((BLOCK_C, TILE_H * TILE_W), dtype=ACC)
    for t in range(0, taps):
        row = prow - (t // kw) * dh
        col = pcol - (t % kw) * dw
        reads = ok & ((row >= 0) & (row < height) & (col >= 0) & (col < width))[None, :]
        pixel = (row * width + col)[None, :]
        go = tl.load(go_base + pixel, mask=reads, other=0.0)
        w = tl.load(w_base + t * plane + pixel, mask=reads, other=0.0)
        acc += go.to(ACC) * w.to(ACC)
    tl.store(grad_padded + (b * channels + c[:, None]).to(tl.int64) * (padded_h * padded_w) +
             (prow * padded_w + pcol)[None, :], acc, mask=ok)


@triton.jit
def _gather_fwd(centre, x, out, channels, height, width, kw, taps, dh, dw, top, left,
                SUBTRACT: tl.constexpr, REFLECT: tl.constexpr, BLOCK_C: tl.constexpr,
                TILE_H: tl.constexpr, TILE_W: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(2)
    c, row, col, ok = _tile(tl.program_id(0), tl.program_id(1), channels, height, width,
                            BLOCK_C, TILE_H, TILE_W)
    plane = height * width
    base = (b * channels + c[:, None]).to(tl.int64) * plane
    pixel = (row * width + col)[None, :]
    if SUBTRACT:
        here = tl.load(centre + base + pixel, mask=ok, other=0.0)
    for t in range(0, taps):
        src_row, row_ok = _source(row + (t // kw) * dh - top, height, REFLECT)
        src_col, col_ok = _source(col + (t % kw) * dw - left, width, REFLECT)
        exists = ok & (row_ok & col_ok)[None, :]
        v = tl.load(x + base + (src_row * width + src_col)[None, :], mask=exists, other=0.0)
        if SUBTRACT:
            v = here - v
        target = ((b * channels + c[:, None]) * taps + t).to(tl.int64) * plane + pixel
        tl.store(out + target, v, mask=ok)


@triton.jit
def _gather_bwd(grad, grad_padded, channels, height, width, padded_h, padded_w, kw, taps, dh,
                dw, BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                            ACC: tl.constexpr):
    b = tl.program_id(2)
    c, prow, pcol, ok = _tile(tl.program_id(0), tl.program_id(1), channels, padded_h, padded_w,
                              BLOCK_C, TILE_H, TILE_W)
    plane = height * width
    acc = tl.zeros((BLOCK_C, TILE_H * TILE_W), dtype=ACC)
    for t in range(0, taps):
        row = prow - (t // kw) * dh
        col = pcol - (t % kw) * dw
        reads = ok & ((row >= 0) & (row < height) & (col >= 0) & (col < width))[None, :]
        source = ((b * channels + c[:, None]) * taps + t).to(tl.int64) * plane + \
            (row * width + col)[None, :]
        acc += tl.load(grad + source, mask=reads, other=0.0).to(ACC)
    tl.store(grad_padded + (b * channels + c[:, None]).to(tl.int64) * (padded_h * padded_w) +
             (prow * padded_w + pcol)[None, :], acc, mask=ok)


def _compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(channels: int, batch: int, height: int, width: int) -> tuple:
    return (triton.cdiv(channels, BLOCK_C),
            triton.cdiv(height, TILE_H) * triton.cdiv(width, TILE_W), batch)


def _geometry(window, dilation):
    left, right, top, bottom = pad_amounts(window, dilation)
    return dict(kw=window[1], taps=window[0] * window[1], dh=dilation[0], dw=dilation[1]), \
        (top, left, top + bottom, left + right)


def aggregation_forward(value, weight, window, dilation, border):
    value, weight = value.contiguous(), weight.contiguous()
    batch, channels, height, width = value.shape
    geo, (top, left, _, _) = _geometry(window, dilation)
    out = torch.empty_like(value)
    _aggregation_fwd[_grid(channels, batch, height, width)](
        value, weight, out, channels, weight.shape[1], height, width, **geo, top=top, left=left,
        REFLECT=border == 'reflect', BLOCK_C=BLOCK_C, TILE_H=TILE_H, TILE_W=TILE_W,
        ACC=_acc(value.dtype))
    return out


def aggregation_backward(grad_out, value, weight, window, dilation, border):
    grad_out, value, weight = grad_out.contiguous(), value.contiguous(), weight.contiguous()
    batch, channels, height, width = value.shape
    weight_channels = weight.shape[1]
    geo, (top, left, extra_h, extra_w) = _geometry(window, dilation)
    grad_weight = torch.empty_like(weight)
    _aggregation_bwd_weight[_grid(weight_channels, batch, height, width)](
        grad_out, value, grad_weight, channels, weight_channels, height, width, **geo, top=top,
        left=left, REFLECT=border == 'reflect', BLOCK_C=BLOCK_C, TILE_H=TILE_H, TILE_W=TILE_W,
        ACC=_acc(value.dtype))
    padded_h, padded_w = height + extra_h, width + extra_w
    grad_padded = torch.empty(batch, channels, padded_h, padded_w, device=value.device,
                              dtype=_compute(value.dtype))
    _aggregation_bwd_value[_grid(channels, batch, padded_h, padded_w)](
        grad_out, weight, grad_padded, channels, weight_channels, height, width, padded_h,
        padded_w, **geo, BLOCK_C=BLOCK_C, TILE_H=TILE_H, TILE_W=TILE_W,
        ACC=_acc(value.dtype))
    grad_value = unpad_gradient(grad_padded, height, width, window, dilation, border)
    return grad_value.to(value.dtype), grad_weight


def _neighbours(centre, x, window, dilation, border):
    x = x.contiguous()
    batch, channels, height, width = x.shape
    geo, (top, left, _, _) = _geometry(window, dilation)
    out = x.new_empty(batch, channels, geo['taps'], height, width)
    _gather_fwd[_grid(channels, batch, height, width)](
        x if centre is None else centre.contiguous(), x, out, channels, height, width, **geo,
        top=top, left=left, SUBTRACT=centre is not None, REFLECT=border == 'reflect',
        BLOCK_C=BLOCK_C, TILE_H=TILE_H, TILE_W=TILE_W,
        ACC=_acc(x.dtype))
    return out


def gather_forward(x, window, dilation, border):
    return _neighbours(None, x, window, dilation, border)


def subtraction_forward(x1, x2, window, dilation, border):
    return _neighbours(x1, x2, window, dilation, border)


def gather_backward(grad, height, width, window, dilation, border):
    grad = grad.contiguous()
    batch, channels = grad.shape[:2]
    geo, (_, _, extra_h, extra_w) = _geometry(window, dilation)
    padded_h, padded_w = height + extra_h, width + extra_w
    grad_padded = torch.empty(batch, channels, padded_h, padded_w, device=grad.device,
                              dtype=_compute(grad.dtype))
    _gather_bwd[_grid(channels, batch, padded_h, padded_w)](
        grad, grad_padded, channels, height, width, padded_h, padded_w, **geo, BLOCK_C=BLOCK_C,
        TILE_H=TILE_H, TILE_W=TILE_W, ACC=_acc(grad.dtype))
    return unpad_gradient(grad_padded, height, width, window, dilation, border).to(grad.dtype)


def subtraction_backward(grad, height, width, window, dilation, border):
    return grad.sum(dim=2), gather_backward(grad, height, width, window, dilation, border).neg_()
