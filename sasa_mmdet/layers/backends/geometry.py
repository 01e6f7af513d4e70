"""Window geometry shared by every backend.

A window of ``k`` taps with dilation ``d`` covers the offsets
``(t - (k - 1) // 2) * d`` for ``t in range(k)``: centred for odd ``k`` and,
for even ``k``, one more tap after the centre than before it, the convention
of ``nn.Conv2d(padding='same')``. Taps are numbered row-major,
``t = ty * kw + tx``, the order of the relative tables.
"""
from typing import Iterator, Tuple

import torch
from torch import Tensor


def window_offsets(window: int, dilation: int) -> list:
    """Offsets (in pixels) of a window's taps along one axis."""
    return [(t - (window - 1) // 2) * dilation for t in range(window)]


def pad_amounts(window: Tuple[int, int], dilation: Tuple[int, int]) -> tuple:
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


def shifted_views(padded: Tensor, height: int, width: int,
                  window: Tuple[int, int], dilation: Tuple[int, int]) -> Iterator[Tensor]:
    """Yield, tap by tap, the ``(..., height, width)`` view of a padded map
    (padded by :func:`pad_amounts`) whose pixel (i, j) is the neighbour of
    (i, j) at that tap."""
    for ty in range(window[0]):
        y = ty * dilation[0]
        for tx in range(window[1]):
            x = tx * dilation[1]
            yield padded[..., y:y + height, x:x + width]
