"""Functional core of local (k x k window) multi-head self-attention.

Two implementations of the same function, tested against each other:

- :func:`local_attention_reference` unfolds the window, so every query sees
  an explicit ``(k*k)``-long list of keys and values. It is short and
  obviously correct, and costs ``k*k`` copies of K and V.
- :func:`local_attention` dispatches to one of two fast paths, neither of
  which copies K and V ``k*k`` times (the largest tensor kept for backward
  is the attention map, ``heads * k*k`` numbers per pixel, unless
  ``recompute_attention``):

  * ``'cpp'``: the compiled CPU kernel (``csrc/local_attention_cpu.cpp``,
    built by setup.py): logits (q.k and q.r), masked softmax and weighted
    sum fused, vectorised across the pixels of a row (any head width), in
    the projection's own planar layout, OpenMP-parallel over bands of rows;
    its backward keeps no gradient of the logits beyond one row.
  * ``'torch'``: pure PyTorch, any device. It walks the ``k*k`` window
    offsets; its two primitives, :class:`LocalQK` (query . key for every
    offset) and :class:`LocalAV` (attention-weighted sum of values), read
    shifted views of one zero-padded K or V and accumulate gradients in
    place.

  ``'auto'`` picks ``'cpp'`` for CPU tensors when the kernel is built and
  ``'torch'`` otherwise.

Both follow the paper's formula (Ramachandran et al., 2019, eq. 3):

    y_ij = sum_{ab in N_k(ij)} softmax_ab(q_ij . k_ab + q_ij . r_{a-i,b-j}) v_ab

per head, with neighbours outside the image excluded from the softmax (they
do not exist; they are not zeros).

Window geometry: a window of ``k`` taps with dilation ``d`` covers the
offsets ``(t - (k - 1) // 2) * d`` for ``t in range(k)``: centred for odd
``k`` and, for even ``k``, one more tap after the centre than before it, the
convention of ``nn.Conv2d(padding='same')``.
"""
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def window_offsets(window: int, dilation: int) -> list:
    """Offsets (in pixels) of a window's taps along one axis."""
    return [(t - (window - 1) // 2) * dilation for t in range(window)]


def _pad_amounts(window: Tuple[int, int], dilation: Tuple[int, int]) -> tuple:
    """``F.pad`` amounts (left, right, top, bottom) that hold every tap."""
    (kh, kw), (dh, dw) = window, dilation
    top, left = (kh - 1) // 2 * dh, (kw - 1) // 2 * dw
    bottom, right = kh // 2 * dh, kw // 2 * dw
    return left, right, top, bottom


def neighbourhood_mask(height: int, width: int, window: Tuple[int, int],
                       dilation: Tuple[int, int],
                       device=None) -> Tensor:
    """Which window taps of each pixel fall inside the image.

    Returns:
        Tensor: bool ``(kh * kw, height, width)``, True where the key at that
        tap exists.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_ok = torch.stack([(rows + o >= 0) & (rows + o < height)
                          for o in window_offsets(window[0], dilation[0])])
    col_ok = torch.stack([(cols + o >= 0) & (cols + o < width)
                          for o in window_offsets(window[1], dilation[1])])
    # (kh, 1, H, 1) & (1, kw, 1, W) -> (kh * kw, H, W)
    mask = row_ok[:, None, :, None] & col_ok[None, :, None, :]
    return mask.flatten(0, 1)


def _shifted_views(padded: Tensor, height: int, width: int,
                   window: Tuple[int, int], dilation: Tuple[int, int]):
    """Yield, tap by tap, the ``(..., height, width)`` view of a padded map
    whose pixel (i, j) is the neighbour of (i, j) at that tap."""
    for ty in range(window[0]):
        y = ty * dilation[0]
        for tx in range(window[1]):
            x = tx * dilation[1]
            yield padded[..., y:y + height, x:x + width]


def _scatter_to_taps(weights: Tensor, source: Tensor, window, dilation) -> Tensor:
    """Gradient of a map read at every tap: ``sum_t weights[:, :, t] * source``
    added at each pixel's tap-t neighbour (the adjoint of the shifted views),
    outside-the-map contributions dropped. ``source`` is ``(B, N, D, H, W)``."""
    height, width = source.shape[-2:]
    left, right, top, bottom = _pad_amounts(window, dilation)
    grad_pad = source.new_zeros(source.shape[:-2] +
                                (height + top + bottom, width + left + right))
    for t, grad_t in enumerate(_shifted_views(grad_pad, height, width, window, dilation)):
        grad_t.addcmul_(weights[:, :, t].unsqueeze(2), source)
    return grad_pad[..., top:top + height, left:left + width]


class LocalQK(torch.autograd.Function):
    """``logits[b, n, t, i, j] = sum_d q[b, n, d, i, j] * k[b, n, d, (i, j) + tap t]``.

    Keys outside the map read as zeros (the caller masks those taps).
    Shapes: q, k ``(B, N, D, H, W)`` -> logits ``(B, N, kh * kw, H, W)``.
    """

    @staticmethod
    def forward(ctx, query, key, window, dilation):
        ctx.save_for_backward(query, key)
        ctx.window, ctx.dilation = window, dilation
        height, width = query.shape[-2:]
        key_pad = F.pad(key, _pad_amounts(window, dilation))
        logits = query.new_empty(query.shape[:2] + (window[0] * window[1], height, width))
        for t, key_t in enumerate(_shifted_views(key_pad, height, width, window, dilation)):
            torch.sum(query * key_t, dim=2, out=logits[:, :, t])
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        query, key = ctx.saved_tensors
        window, dilation = ctx.window, ctx.dilation
        height, width = query.shape[-2:]
        grad_query = grad_key = None
        if ctx.needs_input_grad[0]:
            key_pad = F.pad(key, _pad_amounts(window, dilation))
            grad_query = torch.zeros_like(query)
            for t, key_t in enumerate(_shifted_views(key_pad, height, width, window, dilation)):
                grad_query.addcmul_(grad_logits[:, :, t].unsqueeze(2), key_t)
        if ctx.needs_input_grad[1]:
            grad_key = _scatter_to_taps(grad_logits, query, window, dilation)
        return grad_query, grad_key, None, None


class LocalAV(torch.autograd.Function):
    """``out[b, n, d, i, j] = sum_t attn[b, n, t, i, j] * v[b, n, d, (i, j) + tap t]``.

    Values outside the map read as zeros.
    Shapes: attn ``(B, N, kh * kw, H, W)``, v ``(B, N, D, H, W)`` -> out like v.
    """

    @staticmethod
    def forward(ctx, attn, value, window, dilation):
        ctx.save_for_backward(attn, value)
        ctx.window, ctx.dilation = window, dilation
        height, width = value.shape[-2:]
        value_pad = F.pad(value, _pad_amounts(window, dilation))
        out = torch.zeros_like(value)
        for t, value_t in enumerate(_shifted_views(value_pad, height, width, window, dilation)):
            out.addcmul_(attn[:, :, t].unsqueeze(2), value_t)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        window, dilation = ctx.window, ctx.dilation
        height, width = value.shape[-2:]
        grad_attn = grad_value = None
        if ctx.needs_input_grad[0]:
            value_pad = F.pad(value, _pad_amounts(window, dilation))
            grad_attn = torch.empty_like(attn)
            for t, value_t in enumerate(
                    _shifted_views(value_pad, height, width, window, dilation)):
                torch.sum(grad_out * value_t, dim=2, out=grad_attn[:, :, t])
        if ctx.needs_input_grad[1]:
            grad_value = _scatter_to_taps(attn, grad_out, window, dilation)
        return grad_attn, grad_value, None, None


def relative_logits(query: Tensor, rel_row: Tensor, rel_col: Tensor) -> Tensor:
    """``q_ij . r_{a-i, b-j}`` for every tap, r = [row embedding, column embedding].

    Args:
        query (Tensor): ``(B, N, D, H, W)``.
        rel_row (Tensor): ``(kh, N, Dr)``, one row-offset embedding per tap row.
        rel_col (Tensor): ``(kw, N, Dc)``, with ``Dr + Dc == D``: each head's
            channels are its row part then its column part.

    Returns:
        Tensor: ``(B, N, kh * kw, H, W)``.
    """
    dim_row = rel_row.shape[-1]
    row = torch.einsum('bndhw,knd->bnkhw', query[:, :, :dim_row], rel_row.to(query.dtype))
    col = torch.einsum('bndhw,knd->bnkhw', query[:, :, dim_row:], rel_col.to(query.dtype))
    # (B, N, kh, 1, H, W) + (B, N, 1, kw, H, W) -> (B, N, kh * kw, H, W)
    return (row.unsqueeze(3) + col.unsqueeze(2)).flatten(2, 3)


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the taps (dim 2), absent neighbours excluded.

    Computed in at least float32 (half-precision logits are upcast). The
    centre tap always exists, so no pixel has every tap masked.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.masked_fill(~mask, float('-inf')).softmax(dim=2)


def local_attention(query: Tensor,
                    key: Optional[Tensor],
                    value: Tensor,
                    window: Sequence[int],
                    dilation: Sequence[int] = (1, 1),
                    rel_row: Optional[Tensor] = None,
                    rel_col: Optional[Tensor] = None,
                    impl: str = 'auto',
                    recompute_attention: bool = False) -> Tensor:
    """Local multi-head self-attention (the default, fast paths).

    Args:
        query (Tensor): ``(B, N, D, H, W)``: N heads of D channels.
        key (Tensor, optional): ``(B, N, D, H, W)``. None drops the content
            term q.k from the logits (the paper's "q.r only" ablation).
        value (Tensor): ``(B, N, Dv, H, W)``.
        window (tuple[int]): taps ``(kh, kw)`` of the window.
        dilation (tuple[int]): spacing of the taps.
        rel_row, rel_col (Tensor, optional): relative embedding tables (see
            :func:`relative_logits`); None drops the q.r term.
        impl (str): 'auto', 'cpp' or 'torch' (see the module docstring).
        recompute_attention (bool): keep no attention map for the backward
            pass and recompute it there. Saves the map (``heads * k*k``
            float32 numbers per pixel: about 6x a 64-channel input at k = 7
            and 8 heads). The 'cpp' kernel recomputes the logits and softmax
            (on CPU about the cost of writing and reading the map); the
            'torch' path recomputes its whole forward (activation
            checkpointing). Default: False.

    Returns:
        Tensor: ``(B, N, Dv, H, W)``, in the dtype of ``value``.
    """
    if key is None and rel_row is None:
        raise ValueError('local_attention needs a key, relative tables, or both')
    window, dilation = tuple(window), tuple(dilation)
    if impl == 'auto':
        impl = 'cpp' if query.device.type == 'cpu' and cpu_kernel() is not None else 'torch'
    if impl == 'cpp':
        return _local_attention_cpp(query, key, value, window, dilation, rel_row, rel_col,
                                    recompute_attention)
    if impl != 'torch':
        raise ValueError(f"impl must be 'auto', 'cpp' or 'torch', got {impl!r}")
    if recompute_attention and torch.is_grad_enabled():
        return checkpoint(_local_attention_torch, query, key, value, window, dilation,
                          rel_row, rel_col, use_reentrant=False)
    return _local_attention_torch(query, key, value, window, dilation, rel_row, rel_col)


def _local_attention_torch(query, key, value, window, dilation, rel_row, rel_col):
    height, width = query.shape[-2:]
    logits = None
    if key is not None:
        logits = LocalQK.apply(query, key, window, dilation)
    if rel_row is not None:
        rel = relative_logits(query, rel_row, rel_col)
        logits = rel if logits is None else logits + rel
    mask = neighbourhood_mask(height, width, window, dilation, query.device)
    attn = _masked_softmax(logits, mask).to(value.dtype)
    return LocalAV.apply(attn, value, window, dilation)


_CPU_KERNEL = None


def cpu_kernel():
    """The compiled CPU kernel module, or None (with one warning) if absent."""
    global _CPU_KERNEL
    if _CPU_KERNEL is None:
        try:
            from . import _local_attention_cpu as module
        except ImportError as error:
            warnings.warn('sasa_mmdet: the compiled local-attention CPU kernel is not built '
                          f'({error}); using the slower PyTorch path. Reinstall with '
                          '`pip install -e . --no-build-isolation` to build it.')
            module = False
        _CPU_KERNEL = module
    return _CPU_KERNEL or None


class FusedLocalAttention(torch.autograd.Function):
    """The compiled kernel's forward and backward as one autograd function.

    Planar layout, the projection's own: q, k ``(B, N, D, H, W)``, v
    ``(B, N, Dv, H, W)``, each channel an ``H x W`` plane with unit column
    stride (views into one ``(B, 3C, H, W)`` projection need no copy);
    rel_row ``(kh, N, Dr)`` and rel_col ``(kw, N, Dc)`` (the kernel adds the
    q.r logits itself). Returns ``(B, N, Dv, H, W)``.

    ``store_attention``: keep the attention map for the backward; without
    it the backward recomputes the map (see :func:`local_attention`).
    """

    @staticmethod
    def forward(ctx, query, key, value, rel_row, rel_col, window, dilation,
                store_attention):
        out, attn = cpu_kernel().forward(query, key, value, rel_row, rel_col, *window,
                                         *dilation, store_attention)
        ctx.save_for_backward(query, key, value, rel_row, rel_col, attn)
        ctx.geometry = (*window, *dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, rel_row, rel_col, attn = ctx.saved_tensors
        grad_query, grad_key, grad_value = _gradient_buffers(query, key, value)
        grad_rel_row, grad_rel_col = cpu_kernel().backward(
            grad_out, query, key, value, rel_row, rel_col, attn, grad_query, grad_key,
            grad_value, *ctx.geometry)
        return (grad_query, grad_key, grad_value, grad_rel_row, grad_rel_col, None, None,
                None)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _packed(parts) -> Optional[Tensor]:
    """The contiguous ``(B, len(parts), ...)`` tensor whose slices along dim
    1 are ``parts``, as a view of their memory; None if they do not lie so."""
    first = parts[0]
    if any(p is None or p.shape != first.shape or p.dtype != first.dtype
           or p.device != first.device for p in parts):
        return None
    shape = (first.shape[0], len(parts), *first.shape[1:])
    stride = _contiguous_strides(shape)
    part_stride = (stride[0], *stride[2:])
    for i, p in enumerate(parts):
        if (p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or p.storage_offset() != first.storage_offset() + i * stride[1]
                or any(s != want for s, want, size in zip(p.stride(), part_stride, p.shape)
                       if size > 1)):
            return None
    return first.as_strided(shape, stride)


def _gradient_buffers(query, key, value) -> tuple:
    """Empty gradients of q, k, v for the kernel to fill. When q, k, v are the
    slices of one projection, so are their gradients (see
    :func:`split_projections`)."""
    if _packed((query, key, value)) is not None:
        return torch.empty((query.shape[0], 3, *query.shape[1:]), dtype=query.dtype).unbind(1)
    return tuple(None if t is None else t.new_empty(t.shape) for t in (query, key, value))


class _SplitProjections(torch.autograd.Function):

    @staticmethod
    def forward(ctx, stacked):
        part = stacked[:, 0]
        ctx.part = dict(size=part.shape, dtype=part.dtype, device=part.device)
        return stacked.unbind(1)

    @staticmethod
    def backward(ctx, *grads):
        packed = _packed(grads)
        if packed is not None:
            return packed
        return torch.stack([torch.zeros(**ctx.part) if g is None else g for g in grads], dim=1)


def split_projections(stacked: Tensor) -> Tuple[Tensor, ...]:
    """``stacked.unbind(1)``, e.g. q, k, v out of one ``(B, 3, ...)``
    projection, whose backward takes gradients that already lie in one
    buffer of ``stacked``'s layout (as the CPU kernel writes them) as they
    are, instead of stacking them into a copy: one projection-sized
    allocation and copy less per backward pass."""
    return _SplitProjections.apply(stacked)


def _planar(t: Tensor, dtype) -> Tensor:
    """``t`` in ``dtype`` with unit column stride (what the kernel reads),
    copying only if needed."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _local_attention_cpp(query, key, value, window, dilation, rel_row, rel_col,
                         recompute_attention):
    if query.device.type != 'cpu' or cpu_kernel() is None:
        raise ValueError("impl='cpp' needs CPU tensors and the compiled kernel")
    dtype = torch.promote_types(value.dtype, torch.float32)  # softmax in >= float32
    if rel_row is not None:
        rel_row, rel_col = rel_row.to(dtype).contiguous(), rel_col.to(dtype).contiguous()
    inputs = (query, key, value, rel_row, rel_col)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs)
    out = FusedLocalAttention.apply(
        _planar(query, dtype), None if key is None else _planar(key, dtype),
        _planar(value, dtype), rel_row, rel_col, window, dilation,
        needs_grad and not recompute_attention)
    return out.to(value.dtype)


def _unfold_window(x: Tensor, window, dilation) -> Tensor:
    """``(B, N, D, H, W)`` -> ``(B, N, D, kh * kw, H, W)``, zeros outside."""
    batch, heads, dim, height, width = x.shape
    x = F.pad(x.flatten(1, 2), _pad_amounts(window, dilation))
    cols = F.unfold(x, window, dilation=dilation)
    return cols.view(batch, heads, dim, window[0] * window[1], height, width)


def local_attention_reference(query: Tensor,
                              key: Optional[Tensor],
                              value: Tensor,
                              window: Sequence[int],
                              dilation: Sequence[int] = (1, 1),
                              rel_row: Optional[Tensor] = None,
                              rel_col: Optional[Tensor] = None) -> Tensor:
    """Local multi-head self-attention by unfolding the window (reference).

    Same arguments and result as :func:`local_attention`; written to be
    read, not to be fast: K and V are copied once per window tap.
    """
    window, dilation = tuple(window), tuple(dilation)
    batch, heads, dim, height, width = query.shape
    taps = window[0] * window[1]
    logits = query.new_zeros(batch, heads, taps, height, width)
    if key is not None:
        keys = _unfold_window(key, window, dilation)  # (B, N, D, taps, H, W)
        logits = logits + (query.unsqueeze(3) * keys).sum(dim=2)
    if rel_row is not None:
        # r for tap (ty, tx) = [rel_row[ty], rel_col[tx]] per head.
        r = torch.cat([rel_row[:, None].expand(-1, window[1], -1, -1),
                       rel_col[None, :].expand(window[0], -1, -1, -1)], dim=-1)
        r = r.flatten(0, 1).to(query.dtype)  # (taps, N, D)
        logits = logits + torch.einsum('bndhw,tnd->bnthw', query, r)
    # A tap exists where an all-ones image, zero-padded, reads 1.
    ones = query.new_ones(1, 1, 1, height, width)
    exists = _unfold_window(ones, window, dilation)[0, 0, 0] > 0  # (taps, H, W)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    attn = logits.masked_fill(~exists, float('-inf')).softmax(dim=2)
    values = _unfold_window(value, window, dilation)  # (B, N, Dv, taps, H, W)
    return (attn.to(value.dtype).unsqueeze(2) * values).sum(dim=3)
