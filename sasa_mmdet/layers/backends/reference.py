"""Local multi-head self-attention by unfolding the window: the reference.

Written to be read, not to be fast: K and V are copied once per window tap.
Every other backend is tested against it, outputs and gradients (autograd
differentiates it).

The paper's formula (Ramachandran et al., 2019, eq. 3), per head:

    y_ij = sum_{ab in N_k(ij)} softmax_ab(q_ij . k_ab + q_ij . r_{a-i,b-j}) v_ab

with neighbours outside the image excluded from the softmax (they do not
exist; they are not zeros).
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import pad_amounts


def unfold_window(x: Tensor, window, dilation) -> Tensor:
    """``(B, N, D, H, W)`` -> ``(B, N, D, kh * kw, H, W)``, zeros outside."""
    batch, heads, dim, height, width = x.shape
    x = F.pad(x.flatten(1, 2), pad_amounts(window, dilation))
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

    Same arguments and result as
    :func:`sasa_mmdet.layers.local_attention_ops.local_attention`.

    Example:
        >>> q = k = v = torch.rand(1, 2, 4, 5, 6)
        >>> local_attention_reference(q, k, v, (3, 3)).shape
        torch.Size([1, 2, 4, 5, 6])
    """
    window, dilation = tuple(window), tuple(dilation)
    batch, heads, dim, height, width = query.shape
    taps = window[0] * window[1]
    logits = query.new_zeros(batch, heads, taps, height, width)
    if key is not None:
        keys = unfold_window(key, window, dilation)  # (B, N, D, taps, H, W)
        logits = logits + (query.unsqueeze(3) * keys).sum(dim=2)
    if rel_row is not None:
        # r for tap (ty, tx) = [rel_row[ty], rel_col[tx]] per head.
        r = torch.cat([rel_row[:, None].expand(-1, window[1], -1, -1),
                       rel_col[None, :].expand(window[0], -1, -1, -1)], dim=-1)
        r = r.flatten(0, 1).to(query.dtype)  # (taps, N, D)
        logits = logits + torch.einsum('bndhw,tnd->bnthw', query, r)
    # A tap exists where an all-ones image, zero-padded, reads 1.
    ones = query.new_ones(1, 1, 1, height, width)
    exists = unfold_window(ones, window, dilation)[0, 0, 0] > 0  # (taps, H, W)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    attn = logits.masked_fill(~exists, float('-inf')).softmax(dim=2)
    values = unfold_window(value, window, dilation)  # (B, N, Dv, taps, H, W)
    return (attn.to(value.dtype).unsqueeze(2) * values).sum(dim=3)
