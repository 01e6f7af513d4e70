"""Squeeze-and-Excitation as a ResNet plugin.

Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018
(arXiv:1709.01507). MMDetection has the layer (``mmdet.models.layers.
SELayer(channels, ratio, ...)``) but does not register it, and
``ResNet(plugins=...)`` builds plugins with ``in_channels=``; this
subclass takes that argument and is registered in mmengine's root
``MODELS`` (where mmcv's ``build_plugin_layer`` finds it from any scope):

    backbone=dict(type='ResNet', depth=50, plugins=[
        dict(cfg=dict(type='SEPlugin', ratio=16), position='after_conv3')])

In a Bottleneck, 'after_conv3' is after ``conv3`` and its norm, before the
residual addition: SE-ResNet's place. ``SASAResNet`` takes the same
``plugins``.
"""
from mmdet.models.layers import SELayer
from mmdet.utils import MultiConfig, OptConfigType, OptMultiConfig
from mmengine.registry import MODELS


@MODELS.register_module()
class SEPlugin(SELayer):
    """Squeeze-and-Excitation, built by ``ResNet(plugins=...)``.

    ``x * sigmoid(conv(relu(conv(avgpool(x)))))``: two 1x1 convolutions
    with biases, ``in_channels -> in_channels / ratio -> in_channels``.

    Args:
        in_channels (int): Channels of the feature map (ResNet passes it).
        ratio (int): Squeeze ratio. Default: 16.
        conv_cfg (dict, optional): Config of the two convolutions.
        act_cfg (dict or Sequence[dict]): The two activations.
            Default: (ReLU, Sigmoid).
        init_cfg (dict or list[dict], optional): mmengine init config.

    Example:
        >>> import torch
        >>> se = SEPlugin(64)
        >>> se(torch.rand(2, 64, 5, 5)).shape
        torch.Size([2, 64, 5, 5])
    """

    _abbr_ = 'se'

    def __init__(self,
                 in_channels: int,
                 ratio: int = 16,
                 conv_cfg: OptConfigType = None,
                 act_cfg: MultiConfig = (dict(type='ReLU'), dict(type='Sigmoid')),
                 init_cfg: OptMultiConfig = None) -> None:
        if not isinstance(ratio, int) or ratio <= 0 or in_channels % ratio:
            raise ValueError(f'ratio must be a positive int dividing in_channels='
                             f'{in_channels}, got {ratio!r}')
        super().__init__(in_channels, ratio=ratio, conv_cfg=conv_cfg, act_cfg=act_cfg,
                         init_cfg=init_cfg)
        self.in_channels = in_channels
        self.ratio = ratio
