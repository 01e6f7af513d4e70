from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.device import get_device
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode


class _TinyConvsInFloat32(TorchFunctionMode):
    """Run in float32 the 2-D convolutions whose input is narrower than
    their stride (e.g. RetinaNet's P7 convolution on a 1x1 P6).

    Measured with torch 2.13 on CPU: under bfloat16 autocast the oneDNN
    convolution returns gradients with NaNs or garbage for such inputs in
    about 1 call of 3 (a 3x3 stride-2 convolution of a 1x1 map; also 2x1
    maps, stride 3 of 2x2 maps); with ``torch.backends.mkldnn`` off, or in
    float32, they are right. These convolutions cost next to nothing.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            x = args[0]
            stride = _pair(args[3] if len(args) > 3 else kwargs.get('stride', 1))
            if x.dim() >= 3 and (x.shape[-2] < stride[0] or x.shape[-1] < stride[1]):
                with torch.autocast(x.device.type, enabled=False):
                    args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point()
                                 else a for a in args)
                    return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def bf16_autocast(device_type: str = 'cpu'):
    """:func:`torch.autocast` to bfloat16, with the CPU workaround of
    :class:`_TinyConvsInFloat32`.

    Args:
        device_type (str): ``'cpu'`` or ``'cuda'``. Default: 'cpu'.
    """
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        if device_type != 'cpu':
            yield
            return
        with _TinyConvsInFloat32():
            yield


@OPTIM_WRAPPERS.register_module()
class BF16AmpOptimWrapper(OptimWrapper):
    """Mixed precision training with bfloat16 autocast, on CPU too.

    mmengine's :class:`~mmengine.optim.AmpOptimWrapper` needs a GPU (it
    builds a CUDA ``GradScaler``). bfloat16 has the exponent range of
    float32, so no loss scaling is needed: this wrapper only runs the
    forward pass (and loss) under :func:`torch.autocast` with
    ``dtype=torch.bfloat16``; gradients and the optimizer step stay in
    float32. On CPU, convolutions of inputs narrower than their stride run
    in float32 (a oneDNN bfloat16 bug, see :func:`bf16_autocast`). All
    :class:`~mmengine.optim.OptimWrapper` arguments (gradient
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
        with super().optim_context(model), bf16_autocast(self.device_type):
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
