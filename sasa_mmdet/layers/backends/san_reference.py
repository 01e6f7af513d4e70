"""SAN's neighbourhood operators by unfolding the window: the reference.

Written to be read, not to be fast: every input is copied once per window
tap, by indexing with the source pixel of every (tap, pixel)
(:func:`~.san_geometry.neighbour_indices`). Autograd differentiates it;
every backend is tested against it, outputs and gradients.

Shapes: maps ``(B, C, H, W)``; per-tap tensors ``(B, C, T, H, W)`` with
``T = kh * kw`` taps in row-major window order; aggregation weights
``(B, Cw, T, H, W)``, output channel ``c`` using weight channel
``c % Cw`` (the official code's sharing of one weight among ``C / Cw``
channels).
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .san_geometry import neighbour_indices


def san_unfold_reference(x: Tensor, window: Sequence[int], dilation: Sequence[int] = (1, 1),
                         border: str = 'reflect') -> Tensor:
    """Every pixel's window: ``(B, C, H, W)`` -> ``(B, C, kh * kw, H, W)``.

    Entry ``[b, c, ty * kw + tx, i, j]`` is ``x[b, c, rows[ty, i],
    cols[tx, j]]`` with the source rows and columns of
    :func:`neighbour_indices`, and 0 where the tap does not exist ('mask').
    """
    height, width = x.shape[-2:]
    rows = neighbour_indices(height, window[0], dilation[0], border, x.device)
    cols = neighbour_indices(width, window[1], dilation[1], border, x.device)
    # Absent taps (-1) read an appended zero row / column.
    rows = torch.where(rows < 0, height, rows)
    cols = torch.where(cols < 0, width, cols)
    x = F.pad(x, (0, 1, 0, 1))
    taps = x[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (B, C, kh, kw, H, W)
    return taps.flatten(2, 3)


def san_subtraction_reference(x1: Tensor, x2: Tensor, window: Sequence[int],
                              dilation: Sequence[int] = (1, 1),
                              border: str = 'reflect') -> Tensor:
    """Centre minus neighbour: ``out[b, c, t, i, j] = x1[b, c, i, j] -
    x2[b, c, (i, j) + tap t]``, ``(B, C, T, H, W)`` (pairwise relations)."""
    return x1.unsqueeze(2) - san_unfold_reference(x2, window, dilation, border)


def san_aggregation_reference(value: Tensor, weight: Tensor, window: Sequence[int],
                              dilation: Sequence[int] = (1, 1),
                              border: str = 'reflect') -> Tensor:
    """``out[b, c, i, j] = sum_t weight[b, c % Cw, t, i, j] * value[b, c,
    (i, j) + tap t]``: value ``(B, C, H, W)``, weight ``(B, Cw, T, H, W)``
    with ``C % Cw == 0``; returns ``(B, C, H, W)``."""
    batch, channels, height, width = value.shape
    weight_channels = weight.shape[1]
    taps = san_unfold_reference(value, window, dilation, border)
    taps = taps.view(batch, channels // weight_channels, weight_channels, -1, height, width)
    return (weight.unsqueeze(1) * taps).sum(dim=3).reshape(batch, channels, height, width)


__all__ = ['san_aggregation_reference', 'san_subtraction_reference', 'san_unfold_reference']
