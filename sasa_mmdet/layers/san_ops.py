"""SAN's neighbourhood operators: registered ops, several backends.

Zhao, Jia, Koltun, "Exploring Self-attention for Image Recognition", CVPR
2020 (arXiv:2004.13621). Its attention needs three operators over every
pixel's ``kh x kw`` window (``T = kh * kw`` taps):

- aggregation: ``y[b, c] = sum_t w[b, c % Cw, t] * x[b, c] at tap t``, the
  weighted sum of the values with one weight per channel group;
- subtraction: ``x1[b, c] - x2[b, c] at tap t`` for every tap, the pairwise
  relation;
- gather: ``x[b, c] at tap t`` for every tap, the patchwise relation.

Each is registered with ``torch.library`` under ``sasa_mmdet``
(``san_aggregation``, ``san_subtraction``, ``san_gather`` and the
backward ops ``san_aggregation_backward`` and ``san_gather_backward``), with
fake kernels and autograd, so the layers compile with
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``. Behind
them, one file per backend (``backends/``):

- ``'cpp'``: the compiled CPU kernel (``csrc/san_cpu.cpp``, CPU tensors);
- ``'triton'``: elementwise Triton kernels (``backends/san_triton.py``;
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, for tests);
- ``'torch'``: plain PyTorch, tap by tap over one padded copy, any device.

``impl='auto'`` picks ``'cpp'`` for CPU tensors when the kernel is built,
``'torch'`` otherwise; the Triton kernels are verified under the
interpreter only, so ``'auto'`` does not pick them yet (ask for
``impl='triton'``). During ``torch.onnx.export`` the ``'torch'`` forward runs directly
(standard ONNX operators only). Border modes: ``'reflect'`` (SAN's) and
``'mask'`` (``backends/san_geometry.py``). The definitions every backend is
tested against are in ``backends/san_reference.py``.
"""
from typing import Sequence, Tuple

import torch
from torch import Tensor

from .backends import san_cpu, san_pytorch
from .backends.san_geometry import check_border
from .backends.san_reference import (san_aggregation_reference,  # noqa: F401
                                     san_subtraction_reference, san_unfold_reference)
from .local_attention_ops import TRITON_INSTALLED, check_triton_usable  # noqa: F401

SAN_IMPLS = ('auto', 'cpp', 'torch', 'triton')


def resolve_san_backend(impl: str, device: torch.device) -> str:
    """The backend ('cpp' or 'torch') that runs ``impl`` on ``device``."""
    if impl not in SAN_IMPLS:
        raise ValueError(f'impl must be one of {SAN_IMPLS}, got {impl!r}')
    if impl == 'auto':
        if device.type == 'cpu':
            if san_cpu.KERNEL_BUILT:
                return 'cpp'
            san_cpu.san_cpu_kernel()  # warns once that the PyTorch path runs instead
        return 'torch'
    if impl == 'cpp' and (device.type != 'cpu' or not san_cpu.KERNEL_BUILT):
        raise ValueError(f"impl='cpp' needs CPU tensors and the compiled SAN kernel, got "
                         f"{device.type} tensors (kernel built: {san_cpu.KERNEL_BUILT})")
    if impl == 'triton':
        check_triton_usable(device)
    return impl


def _module(backend: str):
    if backend == 'cpp':
        return san_cpu
    if backend == 'torch':
        return san_pytorch
    if backend == 'triton':
        from .backends import san_triton  # kernels defined on first use
        return san_triton
    raise ValueError(f"backend must be 'cpp', 'torch' or 'triton', got {backend!r}")


def _check_geometry(window, dilation, border) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    window, dilation = tuple(window), tuple(dilation)
    if len(window) != 2 or len(dilation) != 2 or min(*window, *dilation) < 1:
        raise ValueError(f'window and dilation must be pairs of positive ints, got '
                         f'{window} and {dilation}')
    check_border(border)
    return window, dilation


def _check_map(name: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f'{name} must be (B, C, H, W), got shape {tuple(x.shape)}')


# ---------------------------------------------------------------------------
# Aggregation.


@torch.library.custom_op('sasa_mmdet::san_aggregation', mutates_args=())
def _aggregation_op(value: Tensor, weight: Tensor, window: Sequence[int],
                    dilation: Sequence[int], border: str, backend: str) -> Tensor:
    return _module(backend).aggregation_forward(value, weight, tuple(window), tuple(dilation),
                                                border).contiguous()


@_aggregation_op.register_fake
def _(value, weight, window, dilation, border, backend):
    return value.new_empty(value.shape)


@torch.library.custom_op('sasa_mmdet::san_aggregation_backward', mutates_args=())
def _aggregation_backward_op(grad_out: Tensor, value: Tensor, weight: Tensor,
                             window: Sequence[int], dilation: Sequence[int], border: str,
                             backend: str) -> Tuple[Tensor, Tensor]:
    grad_value, grad_weight = _module(backend).aggregation_backward(
        grad_out.contiguous(), value, weight, tuple(window), tuple(dilation), border)
    return grad_value.contiguous(), grad_weight.contiguous()


@_aggregation_backward_op.register_fake
def _(grad_out, value, weight, window, dilation, border, backend):
    return value.new_empty(value.shape), weight.new_empty(weight.shape)


def _aggregation_setup(ctx, inputs, output) -> None:
    value, weight, window, dilation, border, backend = inputs
    ctx.save_for_backward(value, weight)
    ctx.geometry = (tuple(window), tuple(dilation), border, backend)


def _aggregation_backward(ctx, grad_out):
    value, weight = ctx.saved_tensors
    grad_value, grad_weight = torch.ops.sasa_mmdet.san_aggregation_backward(
        grad_out, value, weight, *ctx.geometry)
    return grad_value, grad_weight, None, None, None, None


_aggregation_op.register_autograd(_aggregation_backward, setup_context=_aggregation_setup)


# ---------------------------------------------------------------------------
# Gather and subtraction (their backward: the gather's adjoint).


@torch.library.custom_op('sasa_mmdet::san_gather', mutates_args=())
def _gather_op(x: Tensor, window: Sequence[int], dilation: Sequence[int], border: str,
               backend: str) -> Tensor:
    return _module(backend).gather_forward(x, tuple(window), tuple(dilation),
                                           border).contiguous()


def _taps_shape(x: Tensor, window) -> tuple:
    batch, channels, height, width = x.shape
    return (batch, channels, window[0] * window[1], height, width)


@_gather_op.register_fake
def _(x, window, dilation, border, backend):
    return x.new_empty(_taps_shape(x, window))


@torch.library.custom_op('sasa_mmdet::san_gather_backward', mutates_args=())
def _gather_backward_op(grad: Tensor, height: int, width: int, window: Sequence[int],
                        dilation: Sequence[int], border: str, backend: str) -> Tensor:
    return _module(backend).gather_backward(grad.contiguous(), height, width, tuple(window),
                                            tuple(dilation), border).contiguous()


@_gather_backward_op.register_fake
def _(grad, height, width, window, dilation, border, backend):
    return grad.new_empty(grad.shape[0], grad.shape[1], height, width)


def _gather_setup(ctx, inputs, output) -> None:
    x, window, dilation, border, backend = inputs
    ctx.geometry = (tuple(window), tuple(dilation), border, backend)
    ctx.size = tuple(x.shape[-2:])


def _gather_backward(ctx, grad):
    grad_x = torch.ops.sasa_mmdet.san_gather_backward(grad, *ctx.size, *ctx.geometry)
    return grad_x, None, None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op('sasa_mmdet::san_subtraction', mutates_args=())
def _subtraction_op(x1: Tensor, x2: Tensor, window: Sequence[int], dilation: Sequence[int],
                    border: str, backend: str) -> Tensor:
    return _module(backend).subtraction_forward(x1, x2, tuple(window), tuple(dilation),
                                                border).contiguous()


@_subtraction_op.register_fake
def _(x1, x2, window, dilation, border, backend):
    return x2.new_empty(_taps_shape(x2, window))


def _subtraction_setup(ctx, inputs, output) -> None:
    x1, x2, window, dilation, border, backend = inputs
    ctx.geometry = (tuple(window), tuple(dilation), border, backend)
    ctx.size = tuple(x2.shape[-2:])


def _subtraction_backward(ctx, grad):
    grad_x1 = grad.sum(dim=2) if ctx.needs_input_grad[0] else None
    grad_x2 = None
    if ctx.needs_input_grad[1]:
        grad_x2 = -torch.ops.sasa_mmdet.san_gather_backward(grad, *ctx.size, *ctx.geometry)
    return grad_x1, grad_x2, None, None, None, None


_subtraction_op.register_autograd(_subtraction_backward, setup_context=_subtraction_setup)


# ---------------------------------------------------------------------------
# The functional entry points.


def san_aggregation(value: Tensor,
                    weight: Tensor,
                    window: Sequence[int],
                    dilation: Sequence[int] = (1, 1),
                    border: str = 'reflect',
                    impl: str = 'auto') -> Tensor:
    """Neighbourhood aggregation with one weight per channel group.

    ``out[b, c, i, j] = sum_t weight[b, c % Cw, t, i, j] * value[b, c,
    (i, j) + tap t]``.

    Args:
        value (Tensor): ``(B, C, H, W)``.
        weight (Tensor): ``(B, Cw, kh * kw, H, W)``, ``Cw`` dividing ``C``;
            converted to ``value``'s dtype.
        window (tuple[int]): Taps ``(kh, kw)``.
        dilation (tuple[int]): Spacing of the taps. Default: (1, 1).
        border (str): 'reflect' or 'mask' (taps outside the image add
            nothing). Default: 'reflect'.
        impl (str): 'auto', 'cpp', 'torch' or 'triton' (module docstring).

    Returns:
        Tensor: ``(B, C, H, W)`` in ``value``'s dtype.

    Example:
        >>> value, weight = torch.rand(2, 8, 5, 6), torch.rand(2, 2, 9, 5, 6)
        >>> san_aggregation(value, weight, (3, 3)).shape
        torch.Size([2, 8, 5, 6])
    """
    window, dilation = _check_geometry(window, dilation, border)
    _check_map('value', value)
    batch, channels, height, width = value.shape
    if (weight.dim() != 5 or weight.shape[0] != batch or weight.shape[1] < 1
            or channels % weight.shape[1] or weight.shape[2] != window[0] * window[1]
            or tuple(weight.shape[3:]) != (height, width)):
        raise ValueError(f'weight must be (B={batch}, Cw, T={window[0] * window[1]}, '
                         f'H={height}, W={width}) with Cw dividing C={channels}, got '
                         f'{tuple(weight.shape)}')
    weight = weight.to(value.dtype)
    if torch.onnx.is_in_onnx_export():
        return san_pytorch.aggregation_forward(value, weight, window, dilation, border)
    backend = resolve_san_backend(impl, value.device)
    return torch.ops.sasa_mmdet.san_aggregation(value, weight, window, dilation, border,
                                                backend)


def san_subtraction(x1: Tensor,
                    x2: Tensor,
                    window: Sequence[int],
                    dilation: Sequence[int] = (1, 1),
                    border: str = 'reflect',
                    impl: str = 'auto') -> Tensor:
    """Centre minus neighbour for every tap: ``out[b, c, t, i, j] =
    x1[b, c, i, j] - x2[b, c, (i, j) + tap t]`` (0 read for absent taps in
    'mask' mode).

    Args:
        x1, x2 (Tensor): ``(B, C, H, W)``, one shape and dtype.
        window, dilation, border, impl: as :func:`san_aggregation`.

    Returns:
        Tensor: ``(B, C, kh * kw, H, W)``.

    Example:
        >>> x = torch.rand(1, 2, 4, 4)
        >>> san_subtraction(x, x, (3, 3))[0, 0, 4].abs().max().item()
        0.0
    """
    window, dilation = _check_geometry(window, dilation, border)
    _check_map('x1', x1)
    if x1.shape != x2.shape or x1.dtype != x2.dtype:
        raise ValueError(f'x1 and x2 must have one shape and dtype, got {tuple(x1.shape)} '
                         f'{x1.dtype} and {tuple(x2.shape)} {x2.dtype}')
    if torch.onnx.is_in_onnx_export():
        return san_pytorch.subtraction_forward(x1, x2, window, dilation, border)
    backend = resolve_san_backend(impl, x1.device)
    return torch.ops.sasa_mmdet.san_subtraction(x1, x2, window, dilation, border, backend)


def san_gather(x: Tensor,
               window: Sequence[int],
               dilation: Sequence[int] = (1, 1),
               border: str = 'reflect',
               impl: str = 'auto') -> Tensor:
    """Every pixel's neighbours: ``(B, C, H, W)`` -> ``(B, C, kh * kw, H, W)``
    (0 for absent taps in 'mask' mode).

    Example:
        >>> san_gather(torch.rand(2, 3, 5, 5), (3, 3)).shape
        torch.Size([2, 3, 9, 5, 5])
    """
    window, dilation = _check_geometry(window, dilation, border)
    _check_map('x', x)
    if torch.onnx.is_in_onnx_export():
        return san_pytorch.gather_forward(x, window, dilation, border)
    backend = resolve_san_backend(impl, x.device)
    return torch.ops.sasa_mmdet.san_gather(x, window, dilation, border, backend)


__all__ = ['SAN_IMPLS', 'resolve_san_backend', 'san_aggregation', 'san_aggregation_reference',
           'san_gather', 'san_subtraction', 'san_subtraction_reference', 'san_unfold_reference']
