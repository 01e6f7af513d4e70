"""Build a detector from a config for inspection and export (CPU, eval mode)."""
import copy
import os.path as osp
from typing import Optional, Union

import torch.nn as nn


def load_detector(config: Union[str, 'Config'],  # noqa: F821
                  checkpoint: Optional[str] = None,
                  cfg_options: Optional[dict] = None) -> nn.Module:
    """The config's detector on CPU in eval mode, with a checkpoint's weights.

    The checkpoint is read with ``torch.load(weights_only=True)`` and must
    fit the model exactly (every tensor, every shape; see
    :func:`sasa_mmdet.engine.check_checkpoint_fits`): a partial load would
    export or show a model that was never trained. Without a checkpoint the
    modules keep their own random initialisation (``init_weights`` is not
    called, so no ``Pretrained`` file is read or downloaded).

    Args:
        config (str | Config): Config file or object (copied, not changed).
        checkpoint (str, optional): A checkpoint written by our runs or
            mmdet's (``state_dict`` entry, or a bare state dict).
        cfg_options (dict, optional): Overrides merged into the config.

    Returns:
        nn.Module: The detector, with ``cfg`` (the config) and, when the
        checkpoint has them, ``dataset_meta`` attributes.
    """
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    import sasa_mmdet  # noqa: F401  (registers the modules)
    from sasa_mmdet.engine import (check_checkpoint_fits, decode_checkpoint,
                                   load_weights_only)

    if isinstance(config, str):
        if not osp.isfile(config):
            raise FileNotFoundError(f'config file not found: {config}')
        cfg = Config.fromfile(config)
    else:
        cfg = copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint file not found: {checkpoint}')
        ckpt = load_weights_only(checkpoint, map_location='cpu')
        if not isinstance(ckpt, dict):
            raise ValueError(f'{checkpoint} holds a {type(ckpt).__name__}, not a '
                             'checkpoint dict')
        decode_checkpoint(ckpt)
        check_checkpoint_fits(model, ckpt)
        model.load_state_dict(ckpt.get('state_dict', ckpt))
        meta = ckpt.get('meta', {}).get('dataset_meta')
        if meta:
            model.dataset_meta = {key.lower(): value for key, value in meta.items()}
    model.cfg = cfg
    return model.eval()


__all__ = ['load_detector']
