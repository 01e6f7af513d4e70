"""The attention map of local self-attention, in plain tensor operations.

:func:`local_attention_weights` computes the softmax weights that
``local_attention`` applies to the values, for inspection
(``LocalSelfAttention2d.attention_weights``, ``tools/analysis_tools/
visualize_attention.py``): the per-head logits ``q.k + q.r`` of every window
tap, softmax over the taps that fall inside the image. It is the PyTorch
backend's own map (``backends/pytorch.py``: pad, shifted slices, einsum and a
masked softmax only), which the tests hold to the formula and to every
backend's output.

Tap order is row-major over the window, ``t = ty * kw + tx``, the order of
the relative tables (``rel_row[ty]``, ``rel_col[tx]``); tap ``(ty, tx)`` of
pixel ``(i, j)`` is the pixel ``(i + (ty - (kh - 1) // 2) * dh,
j + (tx - (kw - 1) // 2) * dw)``.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends.geometry import neighbourhood_mask
from .backends.pytorch import attention_map


def tap_offsets(window: Sequence[int],
                dilation: Sequence[int] = (1, 1)) -> Tensor:
    """Offsets ``(dy, dx)`` of the window taps, in pixels of the layer input.

    Returns:
        Tensor: long ``(kh * kw, 2)``, row-major tap order.

    Example:
        >>> tap_offsets((3, 2), (2, 1)).tolist()
        [[-2, 0], [-2, 1], [0, 0], [0, 1], [2, 0], [2, 1]]
    """
    (kh, kw), (dh, dw) = tuple(window), tuple(dilation)
    rows = (torch.arange(kh) - (kh - 1) // 2) * dh
    cols = (torch.arange(kw) - (kw - 1) // 2) * dw
    return torch.stack(torch.meshgrid(rows, cols, indexing='ij'), -1).view(-1, 2)


def tap_exists(height: int, width: int, window: Sequence[int],
               dilation: Sequence[int] = (1, 1), device=None) -> Tensor:
    """Which taps of each pixel fall inside an ``height x width`` map.

    Returns:
        Tensor: bool ``(kh * kw, height, width)``.
    """
    return neighbourhood_mask(height, width, tuple(window), tuple(dilation), device)


def local_attention_weights(query: Tensor,
                            key: Optional[Tensor],
                            window: Sequence[int],
                            dilation: Sequence[int] = (1, 1),
                            rel_row: Optional[Tensor] = None,
                            rel_col: Optional[Tensor] = None) -> Tensor:
    """Softmax weights of local multi-head attention over the window taps.

    Args:
        query (Tensor): ``(B, N, D, H, W)``: N heads of D channels.
        key (Tensor, optional): ``(B, N, D, H, W)``; None drops the q.k term
            (the "q.r only" logits).
        window (tuple[int]): Taps ``(kh, kw)``.
        dilation (tuple[int]): Spacing of the taps. Default: (1, 1).
        rel_row (Tensor, optional): ``(kh, N, Dr)`` row-offset embeddings;
            each head's first ``Dr`` channels meet them.
        rel_col (Tensor, optional): ``(kw, N, D - Dr)`` column-offset
            embeddings, for the head's remaining channels. None for both
            drops the q.r term.

    Returns:
        Tensor: ``(B, N, kh * kw, H, W)`` in at least float32, row-major tap
        order: over the taps each pixel's weights sum to 1, and taps outside
        the map have weight exactly 0.

    Example:
        >>> q, k = torch.rand(2, 1, 3, 2, 4, 5).unbind(0)
        >>> weights = local_attention_weights(q, k, (3, 3))
        >>> weights.shape, weights[0, 0, 0, 0, 0].item()  # tap above-left
        (torch.Size([1, 3, 9, 4, 5]), 0.0)
    """
    if key is None and rel_row is None:
        raise ValueError('local_attention_weights needs a key, relative '
                         'tables, or both (the logits would be empty)')
    if (rel_row is None) != (rel_col is None):
        raise ValueError('rel_row and rel_col go together: got rel_row '
                         f'{rel_row is not None}, rel_col {rel_col is not None}')
    return attention_map(query, key, tuple(window), tuple(dilation), rel_row, rel_col)


__all__ = ['local_attention_weights', 'tap_exists', 'tap_offsets']
