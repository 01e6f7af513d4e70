"""Plain-PyTorch backend of SAN's operators: any device, and the export path.

It walks the window tap by tap over one padded copy of the input (zeros for
'mask', mirrored rows and columns for 'reflect'), reading a shifted view per
tap: the aggregation never holds a per-tap copy of the values. The forward
functions are standard operators only (index_select, pad, slices, products,
sums), which is what ``torch.onnx.export`` records. The backward functions
are written out; the registered operators' autograd formulas call them.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import pad_amounts, shifted_views
from .san_geometry import padded_indices


def pad_map(x: Tensor, window: Sequence[int], dilation: Sequence[int], border: str) -> Tensor:
    """``(..., H, W)`` padded so that every tap of every pixel is inside."""
    if border == 'mask':
        return F.pad(x, pad_amounts(window, dilation))
    height, width = x.shape[-2:]
    rows, _ = padded_indices(height, window[0], dilation[0], x.device)
    cols, _ = padded_indices(width, window[1], dilation[1], x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def unpad_gradient(grad_padded: Tensor, height: int, width: int, window: Sequence[int],
                   dilation: Sequence[int], border: str) -> Tensor:
    """The adjoint of :func:`pad_map`: the gradient of the padded map summed
    back onto the pixels it was read from."""
    left, _, top, _ = pad_amounts(window, dilation)
    if border == 'mask':
        return grad_padded[..., top:top + height, left:left + width]
    rows, _ = padded_indices(height, window[0], dilation[0], grad_padded.device)
    cols, _ = padded_indices(width, window[1], dilation[1], grad_padded.device)
    shape = grad_padded.shape[:-2]
    by_rows = grad_padded.new_zeros(*shape, height, grad_padded.shape[-1])
    by_rows.index_add_(-2, rows, grad_padded)
    out = grad_padded.new_zeros(*shape, height, width)
    return out.index_add_(-1, cols, by_rows)


def gather_forward(x: Tensor, window, dilation, border) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, T, H, W)``: every pixel's neighbours."""
    height, width = x.shape[-2:]
    padded = pad_map(x, window, dilation, border)
    return torch.stack(list(shifted_views(padded, height, width, window, dilation)), dim=2)


def gather_backward(grad: Tensor, height: int, width: int, window, dilation,
                    border) -> Tensor:
    """Adjoint of :func:`gather_forward`: ``(B, C, T, H, W)`` -> ``(B, C, H, W)``."""
    left, right, top, bottom = pad_amounts(window, dilation)
    grad_padded = grad.new_zeros(*grad.shape[:2], height + top + bottom, width + left + right)
    for t, view in enumerate(shifted_views(grad_padded, height, width, window, dilation)):
        view.add_(grad[:, :, t])
    return unpad_gradient(grad_padded, height, width, window, dilation, border)


def subtraction_forward(x1: Tensor, x2: Tensor, window, dilation, border) -> Tensor:
    """``out[:, :, t] = x1 - (x2 at tap t)``, ``(B, C, T, H, W)``."""
    height, width = x2.shape[-2:]
    padded = pad_map(x2, window, dilation, border)
    views = shifted_views(padded, height, width, window, dilation)
    if torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad):
        # traced for export with differentiable inputs: no out= arguments
        return torch.stack([x1 - view for view in views], dim=2)
    out = x1.new_empty(x1.shape[0], x1.shape[1], window[0] * window[1], height, width)
    for t, view in enumerate(views):
        torch.sub(x1, view, out=out[:, :, t])
    return out


def subtraction_backward(grad: Tensor, height: int, width: int, window, dilation,
                         border) -> Tuple[Tensor, Tensor]:
    """Gradients of x1 and x2 of :func:`subtraction_forward`."""
    return grad.sum(dim=2), gather_backward(grad, height, width, window, dilation, border).neg_()


def aggregation_forward(value: Tensor, weight: Tensor, window, dilation, border) -> Tensor:
    """``out[b, c] = sum_t weight[b, c % Cw, t] * (value[b, c] at tap t)``."""
    batch, channels, height, width = value.shape
    weight_channels = weight.shape[1]
    groups = (channels // weight_channels, weight_channels)
    padded = pad_map(value, window, dilation, border)
    out = value.new_zeros(batch, *groups, height, width)
    for t, view in enumerate(shifted_views(padded, height, width, window, dilation)):
        out.addcmul_(weight[:, None, :, t], view.unflatten(1, groups))
    return out.flatten(1, 2)


def aggregation_backward(grad_out: Tensor, value: Tensor, weight: Tensor, window, dilation,
                         border) -> Tuple[Tensor, Tensor]:
    """Gradients ``(value, weight)`` of :func:`aggregation_forward`."""
    batch, channels, height, width = value.shape
    weight_channels = weight.shape[1]
    groups = (channels // weight_channels, weight_channels)
    padded = pad_map(value, window, dilation, border)
    grad_padded = torch.zeros_like(padded)
    grad_out = grad_out.unflatten(1, groups)
    grad_weight = torch.empty_like(weight)
    views = zip(shifted_views(padded, height, width, window, dilation),
                shifted_views(grad_padded, height, width, window, dilation))
    for t, (view, grad_view) in enumerate(views):
        grad_weight[:, :, t] = (grad_out * view.unflatten(1, groups)).sum(dim=1)
        grad_view.unflatten(1, groups).addcmul_(grad_out, weight[:, None, :, t])
    grad_value = unpad_gradient(grad_padded, height, width, window, dilation, border)
    return grad_value, grad_weight
