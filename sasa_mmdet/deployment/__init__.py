"""Deployment: ONNX export of the attention and onnxruntime's custom op.

- :func:`onnxruntime_ops_path`: the package's onnxruntime custom-op library
  (``csrc/onnxruntime_local_attention.cpp``, built by ``setup.py`` from the
  CPU backend's kernel source when onnxruntime's C/C++ headers are found:
  ``tools/deployment/install_onnxruntime_headers.sh``). It runs the
  ``sasa_mmdet::LocalAttention`` node; load it with
  ``SessionOptions.register_custom_ops_library(onnxruntime_ops_path())``.
- :func:`register_onnx_symbolic`: makes ``torch.onnx.export`` (TorchScript
  exporter) record the registered operator ``torch.ops.sasa_mmdet.
  local_attention`` as that one node; the layers record the operator during
  export inside ``export_graph('onnxruntime')``
  (``sasa_mmdet.layers.backends.onnx_graph``).
- :func:`pack_attention_inputs`: rewrites an exported graph so that each
  fused node reads its layer's q/k/v projection in place (no ``Split``);
  :func:`fuse_attention_epilogues` folds the stride's ``AveragePool``, a
  ``BatchNormalization`` and a ``Relu`` after a fused node into it;
  :func:`deduplicate_constants` merges the exporter's equal ``Constant``
  nodes (every export).
- :class:`End2EndDetector`: a detector's network with box decoding and NMS
  (``NonMaxSuppression``) in the graph, outputs ``dets (B, N, 5)`` and
  ``labels (B, N)`` as mmdeploy's detectors.

Example:
    >>> import onnxruntime as ort
    >>> options = ort.SessionOptions()
    >>> options.register_custom_ops_library(onnxruntime_ops_path())
"""
from .end2end import END2END_OUTPUTS, End2EndDetector, detections_from_outputs
from .onnx_passes import (deduplicate_constants, fuse_attention_epilogues,
                          pack_attention_inputs)
from .onnx_symbolic import (CUSTOM_DOMAIN, onnxruntime_ops_available,
                            onnxruntime_ops_path, register_onnx_symbolic)

__all__ = [
    'CUSTOM_DOMAIN', 'END2END_OUTPUTS', 'End2EndDetector', 'deduplicate_constants',
    'detections_from_outputs', 'fuse_attention_epilogues', 'onnxruntime_ops_available',
    'onnxruntime_ops_path', 'pack_attention_inputs', 'register_onnx_symbolic'
]
