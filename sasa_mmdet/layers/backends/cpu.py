"""Compiled CPU backend: ``csrc/local_attention_cpu.cpp`` (built by setup.py).

Logits (q.k and q.r), masked softmax and weighted sum fused, vectorised
across the pixels of a row (any head width), in the projection's own planar
layout, OpenMP-parallel over bands of rows; its backward keeps no gradient
of the logits beyond one row and reduces without atomics (bit-reproducible).
It computes in float32 (float64 for tests); other dtypes are converted on
the way in and out.

The stored attention map has the kernel's own layout, ``(B, H, N, T * Wp)``
(Wp: W rounded up to a multiple of 16, whatever the build's vector width):
:func:`attention_map_shape`.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from .pytorch import compute_dtype

try:
    from .. import _local_attention_cpu as _KERNEL
except ImportError as error:
    _KERNEL, _IMPORT_ERROR = None, error
# The stored map's rows are padded to this many pixels (kMapWidthMultiple in
# the kernel; a constant, so the fake kernel's shapes never depend on how the
# kernel was built).
MAP_WIDTH_MULTIPLE = 16
# A plain bool, so that torch.compile can guard on it.
KERNEL_BUILT = _KERNEL is not None
_WARNED = False


def cpu_kernel():
    """The compiled CPU kernel module, or None (with one warning) if absent."""
    global _WARNED
    if _KERNEL is None and not _WARNED:
        warnings.warn('sasa_mmdet: the compiled local-attention CPU kernel is not built '
                      f'({_IMPORT_ERROR}); using the slower PyTorch path. Reinstall with '
                      '`pip install -e . --no-build-isolation` to build it.')
        _WARNED = True
    return _KERNEL


def attention_map_shape(query: Tensor, window) -> tuple:
    """Shape of the map the kernel stores for a query ``(B, N, D, H, W)``."""
    batch, heads, _, height, width = query.shape
    multiple = MAP_WIDTH_MULTIPLE
    padded_width = (width + multiple - 1) // multiple * multiple
    return (batch, height, heads, window[0] * window[1] * padded_width)


def _planar(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    """``t`` in ``dtype`` with unit column stride (what the kernel reads),
    copying only if needed."""
    if t is None:
        return None
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(rel_row, rel_col, dtype):
    if rel_row is None:
        return None, None
    return rel_row.to(dtype).contiguous(), rel_col.to(dtype).contiguous()


def forward(query, key, value, rel_row, rel_col, window, dilation, keep_attention):
    """Returns ``(out, attn)``, attn empty unless ``keep_attention``."""
    dtype = compute_dtype(value.dtype)
    rel_row, rel_col = _tables(rel_row, rel_col, dtype)
    out, attn = cpu_kernel().forward(_planar(query, dtype), _planar(key, dtype),
                                     _planar(value, dtype), rel_row, rel_col, *window,
                                     *dilation, keep_attention)
    return out.to(value.dtype), out.new_empty(0) if attn is None else attn


def _kernel_buffer(buffer: Optional[Tensor], dtype) -> Optional[Tensor]:
    """The gradient buffer itself if the kernel can write into it, else a
    temporary of the compute dtype."""
    if buffer is None:
        return None
    if buffer.dtype == dtype and (buffer.stride(-1) == 1 or buffer.shape[-1] == 1):
        return buffer
    return torch.empty(buffer.shape, dtype=dtype)


def backward(grad_out, out, attn, query, key, value, rel_row, rel_col, window, dilation,
             grad_query, grad_key, grad_value):
    """Writes the gradients of q, k, v into the given buffers (any content;
    they may be views into one projection-shaped buffer) and returns those
    of the tables (None without tables). ``attn``: the stored map, or an
    empty tensor to recompute it; ``out`` is not needed."""
    dtype = compute_dtype(value.dtype)
    rel_row, rel_col = _tables(rel_row, rel_col, dtype)
    buffers = (grad_query, grad_key, grad_value)
    targets = [_kernel_buffer(b, dtype) for b in buffers]
    grad_rel_row, grad_rel_col = cpu_kernel().backward(
        _planar(grad_out, dtype), _planar(query, dtype), _planar(key, dtype),
        _planar(value, dtype), rel_row, rel_col, attn if attn.numel() else None,
        *targets, *window, *dilation)
    for buffer, target in zip(buffers, targets):
        if buffer is not None and target is not buffer:
            buffer.copy_(target)
    return grad_rel_row, grad_rel_col
