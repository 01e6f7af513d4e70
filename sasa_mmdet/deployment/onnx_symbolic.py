"""The fused ``sasa_mmdet::LocalAttention`` ONNX node and its onnxruntime library.

:func:`register_onnx_symbolic` teaches the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``) to record the registered operator
``torch.ops.sasa_mmdet.local_attention`` as one node of the custom domain
``sasa_mmdet`` (op ``LocalAttention``, opset 1 of that domain):

- inputs: query ``(B, N, D, H, W)``, key (same shape; an empty tensor when
  the logits are q.r only), value ``(B, N, Dv, H, W)``, and with q.r logits
  rel_row ``(kh, N, Dr)``, rel_col ``(kw, N, Dc)``; float32;
- output: ``(B, N, Dv, H, W)``;
- attributes: ``window`` (kh, kw), ``dilation`` (dh, dw), ``heads`` (N),
  ``logits`` ('qk+qr', 'qk' or 'qr').

:func:`onnxruntime_ops_path` is the library that runs it
(``csrc/onnxruntime_local_attention.cpp``: the CPU backend's forward kernel,
compiled from the same source, on onnxruntime's thread pool).
"""
import glob
import os.path as osp

import torch

#: The ONNX domain of the fused node.
CUSTOM_DOMAIN = 'sasa_mmdet'
_OP = 'sasa_mmdet::local_attention'
_REGISTERED = []


def onnxruntime_ops_path() -> str:
    """Path of the onnxruntime custom-op library that runs ``sasa_mmdet::LocalAttention``.

    Raises:
        FileNotFoundError: If the library was not built (onnxruntime's C/C++
            headers were not found when the package was built).

    Example:
        >>> import onnxruntime as ort
        >>> options = ort.SessionOptions()
        >>> options.register_custom_ops_library(onnxruntime_ops_path())
    """
    here = osp.dirname(osp.abspath(__file__))
    found = sorted(glob.glob(osp.join(here, '_onnxruntime_ops*.so')))
    if not found:
        raise FileNotFoundError(
            'the sasa_mmdet onnxruntime custom-op library is not built: it needs '
            "onnxruntime's C/C++ headers at build time (bash "
            'tools/deployment/install_onnxruntime_headers.sh, or set '
            'ONNXRUNTIME_INCLUDE_DIR), then rebuild the package (python setup.py '
            'build_ext --inplace, or pip install -e . --no-build-isolation)')
    return found[0]


def onnxruntime_ops_available() -> bool:
    """Whether :func:`onnxruntime_ops_path` finds a built library."""
    try:
        onnxruntime_ops_path()
    except FileNotFoundError:
        return False
    return True


def _local_attention_symbolic(g, query, key, value, rel_row, rel_col, window, dilation,
                              backend, keep_attention):
    from torch.onnx import symbolic_helper

    window = symbolic_helper._get_const(window, 'is', 'window')
    dilation = symbolic_helper._get_const(dilation, 'is', 'dilation')
    with_key = not symbolic_helper._is_none(key)
    with_rel = not symbolic_helper._is_none(rel_row)
    logits = 'qk+qr' if with_key and with_rel else 'qk' if with_key else 'qr'
    heads = symbolic_helper._get_tensor_dim_size(query, 1)
    if heads is None:
        raise ValueError('sasa_mmdet::LocalAttention export: the number of heads (dim 1 '
                         'of the query) must be static')
    if not with_key:
        key = g.op('Constant', value_t=torch.zeros(0))
    inputs = [query, key, value] + ([rel_row, rel_col] if with_rel else [])
    out = g.op(f'{CUSTOM_DOMAIN}::LocalAttention', *inputs, window_i=list(window),
               dilation_i=list(dilation), heads_i=heads, logits_s=logits)
    out.setType(value.type())
    # The op's second output (what a backward would need) has no use in a graph.
    return out, g.op('Constant', value_t=torch.zeros(0))


def register_onnx_symbolic(opset_version: int = 13) -> None:
    """Record ``torch.ops.sasa_mmdet.local_attention`` as one
    ``sasa_mmdet::LocalAttention`` node in TorchScript-exporter graphs of
    opset ``opset_version`` and later (idempotent)."""
    if opset_version in _REGISTERED:
        return
    torch.onnx.register_custom_op_symbolic(_OP, _local_attention_symbolic, opset_version)
    _REGISTERED.append(opset_version)
