"""sasa_mmdet: Stand-Alone Self-Attention in Vision Models for MMDetection.

Importing the package registers its layers with mmengine's root ``MODELS``
registry (so ``build_conv_layer`` finds them from any scope), its
backbones, necks and heads with MMDetection's ``MODELS`` registry, and
teaches mmengine's FLOP counter (``get_model_complexity_info``, which
MMDetection's ``tools/analysis_tools/get_flops.py`` uses) the attention
layers' multiply-adds (:mod:`sasa_mmdet.utils.mmengine_flops`).

The public classes and functions import from here::

    from sasa_mmdet import (AttentionStem, LocalSelfAttention2d, SASAFPN,
                            SASAResNet, SASARetinaHead, local_attention,
                            local_attention_reference, onnxruntime_ops_path)

``onnxruntime_ops_path()`` is the onnxruntime custom-op library that runs
the exported ``sasa_mmdet::LocalAttention`` nodes (:mod:`sasa_mmdet.deployment`).

The attention layer itself needs only torch and mmengine: without mmdet
and mmcv installed (a bare GPU machine, ``tools/gpu_check.sh``), importing
the package gives the layers (``LocalSelfAttention2d``, ``local_attention``,
...) and skips the detection parts. mmdet installed without mmcv (pip
installs mmdet but not mmcv, which needs a build for your torch) gives the
layers and a warning saying what is missing.
"""
import importlib.util
import warnings

from . import layers  # noqa: F401  (registers the attention layers)
from .layers import (AttentionStem, LocalSelfAttention2d,
                     SpatiallyAwareAttention2d, local_attention,
                     local_attention_reference)
from .deployment import onnxruntime_ops_path
from .layers import PairwiseSelfAttention2d, PatchwiseSelfAttention2d
from .layers.attention_weights import local_attention_weights

__version__ = '0.1.0'

__all__ = [
    'AttentionStem', 'LocalSelfAttention2d', 'SpatiallyAwareAttention2d',
    'local_attention', 'local_attention_reference', 'local_attention_weights',
    'onnxruntime_ops_path', 'PairwiseSelfAttention2d', 'PatchwiseSelfAttention2d'
]


def _register_detection_modules() -> bool:
    """Import (and so register) the detection modules; False, with a warning,
    where mmdet is installed but mmcv or its compiled ops are not."""
    try:
        from . import datasets, engine, models, utils  # noqa: F401
    except ImportError as error:
        if not (error.name or '').startswith('mmcv'):
            raise
        warnings.warn(
            f'sasa_mmdet: only the attention layers are available: mmdet is '
            f'installed but {error.name} cannot be imported ({error}). '
            'SASAResNet, SASAFPN and SASARetinaHead need mmcv>=2.0.0rc4,<2.2.0 '
            'with its compiled ops, built for your torch; see docs/install.md.')
        return False
    return True


if importlib.util.find_spec('mmdet') is not None and _register_detection_modules():
    from .models import SAN, SASAFPN, SASARetinaHead, SASAResNet
    from .utils.mmengine_flops import register_mmengine_flop_counting

    register_mmengine_flop_counting()
    __all__ += ['SAN', 'SASAFPN', 'SASAResNet', 'SASARetinaHead']
