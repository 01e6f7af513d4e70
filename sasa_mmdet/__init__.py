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
                            local_attention_reference)

The attention layer itself needs only torch and mmengine: without mmdet
and mmcv installed (a bare GPU machine, ``tools/gpu_check.sh``), importing
the package gives the layers (``LocalSelfAttention2d``, ``local_attention``,
...) and skips the detection parts.
"""
import importlib.util

from . import layers  # noqa: F401  (registers the attention layers)
from .layers import (AttentionStem, LocalSelfAttention2d,
                     SpatiallyAwareAttention2d, local_attention,
                     local_attention_reference)
from .layers import PairwiseSelfAttention2d, PatchwiseSelfAttention2d
from .layers.attention_weights import local_attention_weights

__version__ = '0.1.0'

__all__ = [
    'AttentionStem', 'LocalSelfAttention2d', 'SpatiallyAwareAttention2d',
    'local_attention', 'local_attention_reference', 'local_attention_weights',
    'PairwiseSelfAttention2d', 'PatchwiseSelfAttention2d'
]

if importlib.util.find_spec('mmdet') is not None:
    from . import datasets, engine, models, utils  # noqa: F401  (registers modules)
    from .models import SAN, SASAFPN, SASARetinaHead, SASAResNet
    from .utils.mmengine_flops import register_mmengine_flop_counting

    register_mmengine_flop_counting()
    __all__ += ['SAN', 'SASAFPN', 'SASAResNet', 'SASARetinaHead']
