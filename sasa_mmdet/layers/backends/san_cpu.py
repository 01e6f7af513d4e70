"""Compiled CPU backend of SAN's operators: ``csrc/san_cpu.cpp`` (built by setup.py).

Reads every input in place, one (batch, channel) plane per task, through
per-axis tables of source pixels: the aggregation makes no per-tap copy of
the values. Computes in float32 (float64 for tests); other dtypes are
converted on the way in and out.
"""
import warnings

import torch
from torch import Tensor

try:
    from .. import _san_cpu as _KERNEL
except ImportError as error:
    _KERNEL, _IMPORT_ERROR = None, error
# A plain bool, so that torch.compile can guard on it.
KERNEL_BUILT = _KERNEL is not None
_WARNED = False


def san_cpu_kernel():
    """The compiled module, or None (with one warning) if it is not built."""
    global _WARNED
    if _KERNEL is None and not _WARNED:
        warnings.warn('sasa_mmdet: the compiled SAN CPU kernel is not built '
                      f'({_IMPORT_ERROR}); using the slower PyTorch path. Reinstall with '
                      '`pip install -e . --no-build-isolation` to build it.')
        _WARNED = True
    return _KERNEL


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _prepared(t: Tensor, dtype) -> Tensor:
    return t.to(dtype).contiguous()


def gather_forward(x: Tensor, window, dilation, border) -> Tensor:
    dtype = _compute_dtype(x.dtype)
    out = _KERNEL.gather_forward(_prepared(x, dtype), *window, *dilation, border == 'reflect')
    return out.to(x.dtype)


def gather_backward(grad: Tensor, height: int, width: int, window, dilation, border) -> Tensor:
    dtype = _compute_dtype(grad.dtype)
    out = _KERNEL.gather_backward(_prepared(grad, dtype), height, width, *window, *dilation,
                                  border == 'reflect')
    return out.to(grad.dtype)


def subtraction_forward(x1: Tensor, x2: Tensor, window, dilation, border) -> Tensor:
    dtype = _compute_dtype(x2.dtype)
    out = _KERNEL.subtraction_forward(_prepared(x1, dtype), _prepared(x2, dtype), *window,
                                      *dilation, border == 'reflect')
    return out.to(x2.dtype)


def subtraction_backward(grad: Tensor, height: int, width: int, window, dilation, border):
    return grad.sum(dim=2), gather_backward(grad, height, width, window, dilation, border).neg_()


def aggregation_forward(value: Tensor, weight: Tensor, window, dilation, border) -> Tensor:
    dtype = _compute_dtype(value.dtype)
    out = _KERNEL.aggregation_forward(_prepared(value, dtype), _prepared(weight, dtype), *window,
                                      *dilation, border == 'reflect')
    return out.to(value.dtype)


def aggregation_backward(grad_out: Tensor, value: Tensor, weight: Tensor, window, dilation,
                         border):
    dtype = _compute_dtype(value.dtype)
    grad_value, grad_weight = _KERNEL.aggregation_backward(
        _prepared(grad_out, dtype), _prepared(value, dtype), _prepared(weight, dtype), *window,
        *dilation, border == 'reflect')
    return grad_value.to(value.dtype), grad_weight.to(weight.dtype)
