from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.device import get_device
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class BF16AmpOptimWrapper(OptimWrapper):
    """Mixed precision training with bfloat16 autocast, on CPU too.

    mmengine's :class:`~mmengine.optim.AmpOptimWrapper` needs a GPU (it
    builds a CUDA ``GradScaler``). bfloat16 has the exponent range of
    float32, so no loss scaling is needed: this wrapper only runs the
    forward pass (and loss) under :func:`torch.autocast` with
    ``dtype=torch.bfloat16``; gradients and the optimizer step stay in
    float32. All :class:`~mmengine.optim.OptimWrapper` arguments (gradient
    clipping, accumulation) work as usual.

    Args:
        device_type (str, optional): Autocast device type, ``'cpu'`` or
            ``'cuda'``. Defaults to None, the device mmengine trains on.
        **kwargs: Arguments of :class:`~mmengine.optim.OptimWrapper`
            (``optimizer``, ``accumulative_counts``, ``clip_grad``).

    Examples:
        >>> optim_wrapper = dict(
        ...     type='BF16AmpOptimWrapper',
        ...     optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
    """

    def __init__(self, device_type: Optional[str] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.device_type = device_type or get_device()
        if not torch.amp.is_autocast_available(self.device_type):
            raise ValueError(
                f'bfloat16 autocast is not available on "{self.device_type}"')

    @contextmanager
    def optim_context(self, model: nn.Module):
        """Gradient-accumulation context of
        :class:`~mmengine.optim.OptimWrapper` plus bfloat16 autocast.

        Args:
            model (nn.Module): The training model.
        """
        with super().optim_context(model), torch.autocast(
                device_type=self.device_type, dtype=torch.bfloat16):
            yield


def enable_amp(cfg: Config) -> Config:
    """Switch a config's optimizer wrapper to mixed precision training.

    On a GPU (or another accelerator mmengine supports) this does what
    mmdet's ``tools/train.py --amp`` does: mmengine's ``AmpOptimWrapper``
    with dynamic loss scaling (float16). On CPU, where that wrapper refuses
    to run, it selects :class:`BF16AmpOptimWrapper` (bfloat16 autocast).
    Other ``optim_wrapper`` keys (optimizer, clipping...) are kept.

    Args:
        cfg (Config): A runner config with ``optim_wrapper``; changed in
            place.

    Returns:
        Config: ``cfg``.
    """
    optim_wrapper = cfg.optim_wrapper
    if get_device() != 'cpu':
        optim_wrapper.type = 'AmpOptimWrapper'
        optim_wrapper.loss_scale = 'dynamic'
        return cfg
    # options of AmpOptimWrapper (float16 loss scaling) do not apply
    for key in ('loss_scale', 'dtype', 'use_fsdp'):
        optim_wrapper.pop(key, None)
    optim_wrapper.type = 'BF16AmpOptimWrapper'
    print_log(
        'AmpOptimWrapper needs a GPU: training with BF16AmpOptimWrapper '
        '(bfloat16 autocast) on CPU',
        logger='current')
    return cfg
