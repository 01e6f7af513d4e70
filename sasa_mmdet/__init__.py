"""sasa_mmdet: Stand-Alone Self-Attention in Vision Models for MMDetection.

Importing the package registers its layers with mmengine's root ``MODELS``
registry (so ``build_conv_layer`` finds them from any scope) and its
backbones, necks and heads with MMDetection's ``MODELS`` registry.
"""
from . import datasets, engine, layers, models, utils  # noqa: F401  (registers modules)

__version__ = '0.1.0'
