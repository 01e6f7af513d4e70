"""The local-attention operator: one registered op, several backends.

``torch.ops.sasa_mmdet.local_attention`` (forward) and
``torch.ops.sasa_mmdet.local_attention_backward`` are registered with
``torch.library`` (schemas inferred from the signatures below, fake kernels
for shape propagation, autograd through ``register_autograd``), so the layer
compiles with ``torch.compile(fullgraph=True)``, exports with
``torch.export`` and passes ``torch.library.opcheck``. Behind them, one file
per backend (``backends/``):

- ``'cpp'``: the compiled CPU kernel (CPU tensors);
- ``'triton'``: fused Triton kernels (CUDA tensors; CPU tensors under
  ``TRITON_INTERPRET=1``, for tests);
- ``'torch'``: plain PyTorch, any device.

``impl='auto'`` picks ``'cpp'`` for CPU tensors when the kernel is built,
``'triton'`` for CUDA tensors when triton is installed, ``'torch'``
otherwise. During ``torch.onnx.export`` the layer records what
``backends/onnx_graph.py`` says: a few standard ONNX operators per layer
(default), or the registered op, exported as one ``sasa_mmdet::LocalAttention``
node (``sasa_mmdet.deployment``).

All follow the paper's formula (Ramachandran et al., 2019, eq. 3):

    y_ij = sum_{ab in N_k(ij)} softmax_ab(q_ij . k_ab + q_ij . r_{a-i,b-j}) v_ab

per head, with neighbours outside the image excluded from the softmax (they
do not exist; they are not zeros), and the softmax in at least float32.
:func:`local_attention_reference` (``backends/reference.py``) is the
definition every backend is tested against.
"""
import importlib.util
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import cpu, onnx_graph, pytorch
from .backends.cpu import cpu_kernel  # noqa: F401  (re-exported)
from .backends.geometry import neighbourhood_mask, window_offsets  # noqa: F401
from .backends.pytorch import relative_logits  # noqa: F401
from .backends.reference import local_attention_reference  # noqa: F401

IMPLS = ('auto', 'cpp', 'torch', 'triton')


# Plain bools, read once at import, so that torch.compile can guard on them
# (TRITON_INTERPRET must be set before import anyway).
TRITON_INSTALLED = importlib.util.find_spec('triton') is not None
TRITON_INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'


def triton_backend():
    """The Triton backend module (kernels defined on first use)."""
    from .backends import triton as module
    return module


def resolve_backend(impl: str, device: torch.device) -> str:
    """The backend that runs ``impl`` on ``device`` ('cpp', 'triton' or 'torch')."""
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    if impl == 'auto':
        if device.type == 'cpu':
            if cpu.KERNEL_BUILT:
                return 'cpp'
            cpu_kernel()  # warns, once, that the slower PyTorch path runs instead
        if device.type == 'cuda' and TRITON_INSTALLED:
            return 'triton'
        return 'torch'
    if impl == 'cpp' and (device.type != 'cpu' or not cpu.KERNEL_BUILT):
        raise ValueError(f"impl='cpp' needs CPU tensors and the compiled kernel, got "
                         f"{device.type} tensors (kernel built: {cpu.KERNEL_BUILT})")
    if impl == 'triton':
        check_triton_usable(device)
    return impl


def check_triton_usable(device: torch.device) -> None:
    """Raises a ValueError unless Triton kernels can run on ``device``
    (CUDA, or CPU under ``TRITON_INTERPRET=1``); shared by every operator
    with a Triton backend."""
    if not TRITON_INSTALLED:
        raise ValueError("impl='triton' needs triton installed (pip install triton)")
    if device.type != 'cuda' and not (device.type == 'cpu' and TRITON_INTERPRETED):
        raise ValueError(f"impl='triton' runs on CUDA tensors, or on CPU tensors with "
                         f"TRITON_INTERPRET=1 set before import; got {device.type} tensors")


def channels_last_projection(impl: str, device: torch.device, head_dim: int) -> bool:
    """Whether a layer should project q, k and v channels-last (one ``(B, H,
    W, 3, N, D)`` buffer) whatever its input's layout: when the Triton
    kernels will read them (``impl`` 'triton', or 'auto' on CUDA) at a head
    width they read so, with vector loads (a multiple of the backend's
    ``VECTOR``). The other backends take planar maps (the CPU kernel is
    vectorised along rows); an ONNX export records the planar projection."""
    if impl not in ('auto', 'triton') or not TRITON_INSTALLED or \
            torch.onnx.is_in_onnx_export():
        return False
    if impl == 'auto' and resolve_backend(impl, device) != 'triton':
        return False
    return head_dim % triton_backend().VECTOR == 0


def _backend_module(backend: str):
    if backend == 'cpp':
        return cpu
    if backend == 'triton':
        return triton_backend()
    if backend == 'torch':
        return pytorch
    raise ValueError(f"backend must be 'cpp', 'triton' or 'torch', got {backend!r}")


def _check_inputs(query, key, value, rel_row, rel_col, window, dilation) -> None:
    if query.dim() != 5:
        raise ValueError(f'query must be (B, N, D, H, W), got shape {tuple(query.shape)}')
    batch, heads, dim, height, width = query.shape
    if key is not None and key.shape != query.shape:
        raise ValueError(f'key must be shaped like query {tuple(query.shape)}, '
                         f'got {tuple(key.shape)}')
    if value.dim() != 5 or value.shape[:2] != query.shape[:2] or \
            value.shape[3:] != query.shape[3:]:
        raise ValueError(f'value must be (B, N, Dv, H, W) with B, N, H, W of query '
                         f'{tuple(query.shape)}, got {tuple(value.shape)}')
    if key is None and rel_row is None:
        raise ValueError('local attention needs a key, relative tables, or both')
    if (rel_row is None) != (rel_col is None):
        raise ValueError('rel_row and rel_col go together')
    if rel_row is not None:
        kh, kw = window
        if (rel_row.dim() != 3 or rel_col.dim() != 3 or rel_row.shape[:2] != (kh, heads)
                or rel_col.shape[:2] != (kw, heads)
                or rel_row.shape[2] + rel_col.shape[2] != dim):
            raise ValueError(f'rel_row and rel_col must be (kh={kh}, N={heads}, Dr) and '
                             f'(kw={kw}, N={heads}, Dc) with Dr + Dc = D = {dim}, got '
                             f'{tuple(rel_row.shape)} and {tuple(rel_col.shape)}')
    if len(window) != 2 or len(dilation) != 2 or min(*window, *dilation) < 1:
        raise ValueError(f'window and dilation must be pairs of positive ints, got '
                         f'{window} and {dilation}')


# ---------------------------------------------------------------------------
# The registered operator.


@torch.library.custom_op('sasa_mmdet::local_attention', mutates_args=())
def _local_attention_op(query: Tensor, key: Optional[Tensor], value: Tensor,
                        rel_row: Optional[Tensor], rel_col: Optional[Tensor],
                        window: Sequence[int], dilation: Sequence[int], backend: str,
                        keep_attention: bool) -> Tuple[Tensor, Tensor]:
    """Returns ``(out, saved)``: the attention output ``(B, N, Dv, H, W)``
    in v's dtype, and what this backend's backward needs besides the inputs
    and the output: the attention map ('cpp', 'torch'; empty unless
    ``keep_attention``) or the softmax's log-sum-exp ('triton',
    ``(B, N, H, W)`` float32)."""
    out, saved = _backend_module(backend).forward(query, key, value, rel_row, rel_col,
                                                  tuple(window), tuple(dilation),
                                                  keep_attention)
    if backend != 'triton':  # the 'triton' output is in its layout (_empty_output)
        out = out.contiguous()
    return out, saved.contiguous()


def _empty_output(query, key, value, backend: str) -> Tensor:
    """The operator's output as a backend returns it: contiguous, or for
    'triton' channels-last when it reads q, k, v so."""
    if backend == 'triton':
        triton = _backend_module('triton')
        return triton.empty_map(value.shape, value, triton.channels_last(query, key, value))
    return value.new_empty(value.shape)


def _saved_shape(query: Tensor, window, backend: str, keep_attention: bool) -> tuple:
    batch, heads, _, height, width = query.shape
    if backend == 'triton':
        return (batch, heads, height, width)
    if not keep_attention:
        return (0,)
    if backend == 'cpp':
        return cpu.attention_map_shape(query, window)
    return (batch, heads, window[0] * window[1], height, width)


@_local_attention_op.register_fake
def _(query, key, value, rel_row, rel_col, window, dilation, backend, keep_attention):
    _check_inputs(query, key, value, rel_row, rel_col, window, dilation)
    saved_dtype = torch.float32 if backend == 'triton' else pytorch.compute_dtype(value.dtype)
    return (_empty_output(query, key, value, backend),
            query.new_empty(_saved_shape(query, window, backend, keep_attention),
                            dtype=saved_dtype))


@torch.library.custom_op('sasa_mmdet::local_attention_backward',
                         mutates_args=('grad_query', 'grad_key', 'grad_value'))
def _local_attention_backward_op(grad_out: Tensor, out: Optional[Tensor], saved: Tensor,
                                 query: Tensor, key: Optional[Tensor], value: Tensor,
                                 rel_row: Optional[Tensor], rel_col: Optional[Tensor],
                                 window: Sequence[int], dilation: Sequence[int],
                                 backend: str, grad_query: Tensor, grad_key: Optional[Tensor],
                                 grad_value: Tensor) -> Tuple[Tensor, Tensor]:
    """Writes the gradients of q, k and v into ``grad_query``, ``grad_key``
    and ``grad_value`` (any initial content; they may be views into one
    buffer) and returns those of ``rel_row`` and ``rel_col`` (empty without
    tables). ``out``, the forward's output or None: 'cpp' and 'torch' do
    not read it (they keep the attention map or recompute it); 'triton'
    takes ``delta = grad_out . out`` from it, or without it recomputes that
    from the log-sum-exp."""
    grad_rel_row, grad_rel_col = _backend_module(backend).backward(
        grad_out, out, saved, query, key, value, rel_row, rel_col, tuple(window),
        tuple(dilation), grad_query, grad_key, grad_value)
    if rel_row is None:
        return query.new_empty(0), query.new_empty(0)
    return (grad_rel_row.to(rel_row.dtype).contiguous(),
            grad_rel_col.to(rel_col.dtype).contiguous())


@_local_attention_backward_op.register_fake
def _(grad_out, out, saved, query, key, value, rel_row, rel_col, window, dilation, backend,
      grad_query, grad_key, grad_value):
    if rel_row is None:
        return query.new_empty(0), query.new_empty(0)
    return rel_row.new_empty(rel_row.shape), rel_col.new_empty(rel_col.shape)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, rel_row, rel_col, window, dilation, backend, _ = inputs
    out, saved = output
    # Not saved: an in-place op on the output (a ReLU after a layer without
    # bias) would then fail the backward pass. The 'triton' backward takes
    # delta = dout . out from it when it is unchanged (a walk over every
    # window less); an alias (sharing its version counter) tells.
    ctx.save_for_backward(query, key, value, rel_row, rel_col, None, saved)
    ctx.geometry = (tuple(window), tuple(dilation), backend)
    ctx.output = (out.detach(), out._version) if backend == 'triton' else None
    # `saved` has no gradient. Without these two calls autograd hands the
    # backward a zero-filled tensor of its shape: for a kept map, 6x a
    # 64-channel input at k = 7, allocated in every attention layer's backward.
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_saved):
    query, key, value, rel_row, rel_col, out, saved = ctx.saved_tensors
    window, dilation, backend = ctx.geometry
    if grad_out is None:  # the output is not used by anything that needs a gradient
        return (None,) * 9
    if ctx.output is not None and ctx.output[0]._version == ctx.output[1]:
        out = ctx.output[0]
    grad_query, grad_key, grad_value = _gradient_buffers(query, key, value)
    grad_rel_row, grad_rel_col = torch.ops.sasa_mmdet.local_attention_backward(
        grad_out, out, saved, query, key, value, rel_row, rel_col, window, dilation, backend,
        grad_query, grad_key, grad_value)
    if rel_row is None:
        grad_rel_row = grad_rel_col = None
    return (grad_query, grad_key, grad_value, grad_rel_row, grad_rel_col, None, None, None,
            None)


_local_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Packed q, k, v: the layer's projection writes them into one buffer, and the
# backward writes their gradients into one buffer of the same layout, so the
# projection's backward needs no stacking copy.


def _packed(parts) -> Optional[Tensor]:
    """The ``(B, len(parts), ...)`` tensor whose slices along dim 1 are
    ``parts``, as a view of their memory, when they lie so in one dense
    buffer (a contiguous or a channels-last projection's); None otherwise
    (or when they have no memory to look at, as under ``torch.compile``)."""
    first = parts[0]
    if len(parts) < 2 or any(
            p is None or type(p) not in (Tensor, torch.nn.Parameter) or p.shape != first.shape
            or p.dtype != first.dtype or p.device != first.device for p in parts):
        return None  # also for fake and functional tensors (torch.compile's)
    step = parts[1].storage_offset() - first.storage_offset()
    base = first.untyped_storage().data_ptr()
    if any(p.untyped_storage().data_ptr() != base
           or p.storage_offset() != first.storage_offset() + i * step
           or any(s != want for s, want, size in zip(p.stride(), first.stride(), p.shape)
                  if size > 1) for i, p in enumerate(parts)):
        return None
    shape = (first.shape[0], len(parts), *first.shape[1:])
    stacked = first.as_strided(shape, (first.stride(0), step, *first.stride()[1:]))
    return stacked if _dense(stacked) else None


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its memory span, each once."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride())
                               if size > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _gradient_buffers(query, key, value) -> tuple:
    """Empty gradients of q, k, v for the backward op to fill. When q, k, v
    are the slices of one projection, so are their gradients, in its layout
    (see :func:`split_projections`)."""
    packed = _packed((query, key, value))
    if packed is not None:
        return torch.empty_strided(packed.shape, packed.stride(), dtype=query.dtype,
                                   device=query.device).unbind(1)
    return tuple(None if t is None else t.new_empty(t.shape) for t in (query, key, value))


class _SplitProjections(torch.autograd.Function):

    @staticmethod
    def forward(ctx, stacked):
        part = stacked[:, 0]
        ctx.part = dict(size=part.shape, dtype=part.dtype, device=part.device)
        return stacked.unbind(1)

    @staticmethod
    def backward(ctx, *grads):
        packed = _packed(grads)
        if packed is not None:
            return packed
        return torch.stack([torch.zeros(**ctx.part) if g is None else g for g in grads], dim=1)


def split_projections(stacked: Tensor) -> Tuple[Tensor, ...]:
    """``stacked.unbind(1)``, e.g. q, k, v out of one ``(B, 3, ...)``
    projection, whose backward takes gradients that already lie in one
    buffer of ``stacked``'s layout (as the operator's backward writes them)
    as they are, instead of stacking them into a copy: one projection-sized
    allocation and copy less per backward pass. Under ``torch.compile`` (the
    compiler plans the memory itself) and ``torch.onnx.export`` (where an
    autograd Function leaves a dangling node) it is a plain ``unbind``."""
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return stacked.unbind(1)
    return _SplitProjections.apply(stacked)


# ---------------------------------------------------------------------------
# The functional entry point.


def local_attention(query: Tensor,
                    key: Optional[Tensor],
                    value: Tensor,
                    window: Sequence[int],
                    dilation: Sequence[int] = (1, 1),
                    rel_row: Optional[Tensor] = None,
                    rel_col: Optional[Tensor] = None,
                    impl: str = 'auto',
                    recompute_attention: bool = False) -> Tensor:
    """Local multi-head self-attention.

    Args:
        query (Tensor): ``(B, N, D, H, W)``: N heads of D channels.
        key (Tensor, optional): ``(B, N, D, H, W)``. None drops the content
            term q.k from the logits (the paper's "q.r only" ablation).
        value (Tensor): ``(B, N, Dv, H, W)``.
        window (tuple[int]): taps ``(kh, kw)`` of the window.
        dilation (tuple[int]): spacing of the taps.
        rel_row, rel_col (Tensor, optional): relative embedding tables
            ``(kh, N, Dr)`` and ``(kw, N, Dc)``, ``Dr + Dc = D`` (each head's
            channels: its row part, then its column part); None drops the
            q.r term.
        impl (str): 'auto', 'cpp', 'triton' or 'torch' (module docstring).
        recompute_attention (bool): keep no attention map for the backward
            pass and recompute it there. Saves the map (``heads * k*k``
            float32 numbers per pixel: about 6x a 64-channel input at k = 7
            and 8 heads). The 'cpp' kernel and the 'torch' path recompute
            the logits and softmax in backward; the 'triton' kernels never
            keep the map (they keep one log-sum-exp per pixel and head and
            always recompute), so for them the option changes nothing.
            Default: False.

    Returns:
        Tensor: ``(B, N, Dv, H, W)``, in the dtype of ``value``.

    Example:
        >>> q = k = v = torch.rand(2, 4, 8, 9, 10)
        >>> local_attention(q, k, v, (7, 7)).shape
        torch.Size([2, 4, 8, 9, 10])
    """
    window, dilation = tuple(window), tuple(dilation)
    _check_inputs(query, key, value, rel_row, rel_col, window, dilation)
    if torch.onnx.is_in_onnx_export():
        # Standard operators, or one fused node: onnx_graph.export_graph().
        return onnx_graph.export_forward(query, key, value, rel_row, rel_col, window,
                                         dilation)
    backend = resolve_backend(impl, query.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, rel_row, rel_col))
    keep_attention = needs_grad and not recompute_attention and backend != 'triton'
    out, _ = torch.ops.sasa_mmdet.local_attention(query, key, value, rel_row, rel_col,
                                                  window, dilation, backend, keep_attention)
    return out
