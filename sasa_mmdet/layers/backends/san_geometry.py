"""Neighbourhood geometry of SAN's operators (Zhao, Jia, Koltun, CVPR 2020).

Windows follow the SASA operator's convention (``geometry.py``): ``k`` taps
with dilation ``d`` sit at offsets ``(t - (k - 1) // 2) * d``, numbered
row-major, ``t = ty * kw + tx`` (for the odd windows SAN uses, the official
code's offsets exactly).

Two border modes say what a tap outside the image reads:

- ``'reflect'`` (SAN's): the pixel mirrored at the border, without repeating
  the edge pixel (``nn.ReflectionPad2d``): row ``-1`` reads row ``1``, row
  ``H`` reads row ``H - 2``. Where a window reaches further than the image is
  long (a 7x7 window on a 2x2 map) the mirroring repeats with period
  ``2 * (H - 1)``, and a one-pixel axis reads its only pixel; the official
  kernels mirror once and read out of bounds there.
- ``'mask'`` (SASA's): the tap does not exist. Gathers read zero there, the
  aggregation adds nothing for it, and the pairwise softmax leaves it out.
"""
from typing import Tuple

import torch
from torch import Tensor

from .geometry import pad_amounts, window_offsets

BORDERS = ('reflect', 'mask')


def reflect(index: int, length: int) -> int:
    """The pixel that index ``index`` of an axis of ``length`` pixels reads
    in 'reflect' mode (see the module docstring)."""
    if length == 1:
        return 0
    period = 2 * (length - 1)
    index %= period
    return index if index < length else period - index


def neighbour_indices(length: int, window: int, dilation: int, border: str,
                      device=None) -> Tensor:
    """Source pixel of every (tap, pixel) along one axis.

    Returns:
        Tensor: int64 ``(window, length)``: entry ``[t, i]`` is the pixel
        that pixel ``i`` reads at tap ``t``, or -1 where the tap does not
        exist ('mask' mode).
    """
    rows = []
    for offset in window_offsets(window, dilation):
        row = []
        for i in range(length):
            j = i + offset
            if border == 'reflect':
                row.append(reflect(j, length))
            else:
                row.append(j if 0 <= j < length else -1)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64, device=device)


def padded_indices(length: int, window: int, dilation: int, device=None) -> Tuple[Tensor, int]:
    """'reflect' mode: for the axis padded by ``pad_amounts``, the pixel each
    padded position reads, ``(length + before + after,)``, and ``before``."""
    before = (window - 1) // 2 * dilation
    after = window // 2 * dilation
    index = [reflect(i, length) for i in range(-before, length + after)]
    return torch.tensor(index, dtype=torch.int64, device=device), before


def check_border(border: str) -> None:
    if border not in BORDERS:
        raise ValueError(f'border must be one of {BORDERS}, got {border!r}')


__all__ = ['BORDERS', 'check_border', 'neighbour_indices', 'pad_amounts', 'padded_indices',
           'reflect']
