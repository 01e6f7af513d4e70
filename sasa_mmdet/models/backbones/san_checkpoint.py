"""Official SAN checkpoints (hszhao/SAN) under this backbone's names.

The official ImageNet models save ``model/san.py``'s names, usually with
DataParallel's ``module.`` prefix; :class:`~sasa_mmdet.models.SAN` names
its stem, stages and attention layers differently (``stem.conv`` for
``conv_in``, ``layer{i}.blocks.{j}`` for ``layer{i}.{j}``, ``sam.phi`` for
``sam.conv1``, ...). :func:`convert_official_san` renames every tensor
(and drops the classifier unless asked to keep it), so that the result
loads into ``SAN(depth, sa_type)`` with ``strict=True``: as
``init_cfg=dict(type='Pretrained', checkpoint=<converted file>,
prefix=...)`` or with ``tools/model_converters``-style scripts.
"""
import re
from collections import OrderedDict
from typing import Dict

# official name inside a SAM module -> ours
_SAM = {'conv1': 'phi', 'conv2': 'psi', 'conv3': 'beta', 'conv_w': 'gamma',
        'conv_p': 'position'}


def official_san_key(key: str) -> str:
    """This backbone's name for an official SAN tensor name (``fc.*`` kept)."""
    key = key[len('module.'):] if key.startswith('module.') else key
    stem = re.fullmatch(r'(conv|bn)_in\.(.+)', key)
    if stem:
        return f'stem.{stem.group(1)}.{stem.group(2)}'
    entry = re.fullmatch(r'(conv|bn)([0-4])\.(.+)', key)
    if entry:
        return f'layer{entry.group(2)}.{entry.group(1)}.{entry.group(3)}'
    block = re.fullmatch(r'layer([0-4])\.(\d+)\.(.+)', key)
    if block:
        stage, index, rest = block.groups()
        sam = re.fullmatch(r'sam\.(conv1|conv2|conv3|conv_w|conv_p)\.(.+)', rest)
        if sam:
            rest = f'sam.{_SAM[sam.group(1)]}.{sam.group(2)}'
        return f'layer{stage}.blocks.{index}.{rest}'
    return key


def convert_official_san(state_dict: Dict, keep_classifier: bool = False) -> 'OrderedDict':
    """Rename an official SAN state dict to :class:`SAN`'s names.

    Args:
        state_dict (dict): The official checkpoint's ``state_dict``
            (``module.``-prefixed or not).
        keep_classifier (bool): Keep ``fc.weight`` / ``fc.bias`` (the
            1000-class classifier). Default: False.

    Returns:
        OrderedDict: Tensors under this backbone's names.
    """
    converted = OrderedDict()
    for key, value in state_dict.items():
        name = official_san_key(key)
        if name.startswith('fc.') and not keep_classifier:
            continue
        converted[name] = value
    return converted


__all__ = ['convert_official_san', 'official_san_key']
