"""Plain-PyTorch backend: any device, and the export path.

It walks the ``kh * kw`` window offsets: at each tap it reads a shifted view
of one zero-padded K (or V), so nothing is copied per tap. The forward is
made of standard operators only (pad, slices, products, sums, a masked
softmax) and is what ``torch.onnx.export`` records. The backward is written
out (no autograd inside): the registered operator's autograd formula calls
it.

Tensors: q, k ``(B, N, D, H, W)``, v ``(B, N, Dv, H, W)``, rel_row
``(kh, N, Dr)``, rel_col ``(kw, N, Dc)`` with ``Dr + Dc = D``; the attention
map is ``(B, N, kh * kw, H, W)``, float32 (or float64).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import neighbourhood_mask, pad_amounts, shifted_views


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax runs in at least float32."""
    return torch.promote_types(dtype, torch.float32)


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


def attention_map(query: Tensor, key: Optional[Tensor], window, dilation,
                  rel_row: Optional[Tensor], rel_col: Optional[Tensor]) -> Tensor:
    """Softmax weights over the taps, ``(B, N, kh * kw, H, W)``, at least
    float32; exactly 0 at taps outside the image."""
    dtype = compute_dtype(query.dtype)
    query = query.to(dtype)
    height, width = query.shape[-2:]
    logits = None
    if key is not None:
        key_pad = F.pad(key.to(dtype), pad_amounts(window, dilation))
        logits = torch.stack([(query * key_t).sum(dim=2) for key_t in
                              shifted_views(key_pad, height, width, window, dilation)], dim=2)
    if rel_row is not None:
        rel = relative_logits(query, rel_row.to(dtype), rel_col.to(dtype))
        logits = rel if logits is None else logits + rel
    mask = neighbourhood_mask(height, width, window, dilation, query.device)
    return logits.masked_fill(~mask, float('-inf')).softmax(dim=2)


def weighted_sum(attn: Tensor, value: Tensor, window, dilation) -> Tensor:
    """``out[..., d, i, j] = sum_t attn[:, :, t, i, j] * v[..., d, (i, j) + tap t]``."""
    height, width = value.shape[-2:]
    value_pad = F.pad(value.to(attn.dtype), pad_amounts(window, dilation))
    out = None
    for t, value_t in enumerate(shifted_views(value_pad, height, width, window, dilation)):
        weight = attn[:, :, t].unsqueeze(2)
        if out is None:
            out = weight * value_t
        else:
            out.addcmul_(weight, value_t)  # in place: one output-sized buffer, not one per tap
    return out


def forward(query: Tensor, key: Optional[Tensor], value: Tensor,
            rel_row: Optional[Tensor], rel_col: Optional[Tensor], window, dilation,
            keep_attention: bool) -> Tuple[Tensor, Tensor]:
    """Returns ``(out, attn)``: out in v's dtype; the map if
    ``keep_attention``, else an empty tensor (the backward recomputes it)."""
    attn = attention_map(query, key, window, dilation, rel_row, rel_col)
    out = weighted_sum(attn, value, window, dilation).to(value.dtype)
    return out, attn if keep_attention else attn.new_empty(0)


def _scatter_to_taps(weights: Tensor, source: Tensor, window, dilation) -> Tensor:
    """Gradient of a map read at every tap: ``sum_t weights[:, :, t] * source``
    added at each pixel's tap-t neighbour (the adjoint of the shifted views),
    outside-the-map contributions dropped. ``source`` is ``(B, N, D, H, W)``."""
    height, width = source.shape[-2:]
    left, right, top, bottom = pad_amounts(window, dilation)
    grad_pad = source.new_zeros(source.shape[:-2] +
                                (height + top + bottom, width + left + right))
    for t, grad_t in enumerate(shifted_views(grad_pad, height, width, window, dilation)):
        grad_t.addcmul_(weights[:, :, t].unsqueeze(2), source)
    return grad_pad[..., top:top + height, left:left + width]


def gradients(grad_out: Tensor, attn: Tensor, query: Tensor, key: Optional[Tensor],
              value: Tensor, rel_row: Optional[Tensor], rel_col: Optional[Tensor],
              window, dilation) -> tuple:
    """Gradients ``(q, k or None, v, rel_row or None, rel_col or None)`` in
    the compute dtype. ``attn``: the map, or an empty tensor to recompute it."""
    if attn.numel() == 0:
        attn = attention_map(query, key, window, dilation, rel_row, rel_col)
    dtype = attn.dtype
    height, width = query.shape[-2:]
    grad_out, query, value = grad_out.to(dtype), query.to(dtype), value.to(dtype)
    value_pad = F.pad(value, pad_amounts(window, dilation))
    grad_attn = torch.stack([(grad_out * value_t).sum(dim=2) for value_t in
                             shifted_views(value_pad, height, width, window, dilation)], dim=2)
    grad_value = _scatter_to_taps(attn, grad_out, window, dilation)
    # Softmax backward; taps outside the image have attn = 0, so grad 0.
    grad_logits = attn * (grad_attn - (attn * grad_attn).sum(dim=2, keepdim=True))
    grad_query = torch.zeros_like(query)
    grad_key = grad_rel_row = grad_rel_col = None
    if key is not None:
        key_pad = F.pad(key.to(dtype), pad_amounts(window, dilation))
        for t, key_t in enumerate(shifted_views(key_pad, height, width, window, dilation)):
            grad_query.addcmul_(grad_logits[:, :, t].unsqueeze(2), key_t)
        grad_key = _scatter_to_taps(grad_logits, query, window, dilation)
    if rel_row is not None:
        kh, kw = window
        dim_row = rel_row.shape[-1]
        grid = grad_logits.unflatten(2, (kh, kw))  # (B, N, kh, kw, H, W)
        grad_row, grad_col = grid.sum(dim=3), grid.sum(dim=2)  # (B, N, kh|kw, H, W)
        grad_query[:, :, :dim_row] += torch.einsum('bnkhw,knd->bndhw', grad_row,
                                                   rel_row.to(dtype))
        grad_query[:, :, dim_row:] += torch.einsum('bnkhw,knd->bndhw', grad_col,
                                                   rel_col.to(dtype))
        grad_rel_row = torch.einsum('bnkhw,bndhw->knd', grad_row, query[:, :, :dim_row])
        grad_rel_col = torch.einsum('bnkhw,bndhw->knd', grad_col, query[:, :, dim_row:])
    return grad_query, grad_key, grad_value, grad_rel_row, grad_rel_col


def backward(grad_out, out, attn, query, key, value, rel_row, rel_col, window, dilation,
             grad_query, grad_key, grad_value):
    """:func:`gradients` of q, k, v written into the given buffers; returns
    those of the tables (None without tables). ``out`` is not needed."""
    grads = gradients(grad_out, attn, query, key, value, rel_row, rel_col, window, dilation)
    for buffer, grad in zip((grad_query, grad_key, grad_value), grads[:3]):
        if buffer is not None:
            buffer.copy_(grad)
    return grads[3:]
