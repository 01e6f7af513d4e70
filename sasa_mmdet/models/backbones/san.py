"""SAN: the self-attention networks of Zhao, Jia, Koltun (CVPR 2020).

"Exploring Self-attention for Image Recognition" (arXiv:2004.13621); the
official code is hszhao/SAN (``model/san.py``), classification only. Here
the same networks are an MMDetection backbone with ResNet's interface
(``out_indices``, ``frozen_stages``, ``norm_eval``, ``norm_cfg``,
``with_cp``), built from :class:`~sasa_mmdet.layers.PairwiseSelfAttention2d`
or :class:`~sasa_mmdet.layers.PatchwiseSelfAttention2d`.

The network: a 1x1 conv stem (3 -> 64) with BN and ReLU; five stages, each
a 2x2 max pool, a 1x1 conv to the stage width, its blocks, then BN and
ReLU. Widths 64/256/512/1024/2048, windows 3/7/7/7/7. A block is
pre-activation: BN, ReLU, attention (width -> width / 4), BN, ReLU, 1x1 conv
(width / 4 -> width, with bias), plus the identity. Stage ``i`` has stride
``2 ** (i + 1)``: stages 1-4 give the strides 4/8/16/32 and 256/512/1024/
2048 channels of a ResNet's C2-C5.
"""
from collections import OrderedDict
from typing import Optional, Sequence

import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, OptConfigType, OptMultiConfig
from mmengine.model import BaseModule
from mmengine.registry import MODELS as ROOT_MODELS
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

SA_TYPES = {'pairwise': 'PairwiseSelfAttention2d', 'patchwise': 'PatchwiseSelfAttention2d'}


class SANBottleneck(BaseModule):
    """SAN's pre-activation block: ``x + conv(relu(bn2(sa(relu(bn1(x))))))``.

    Args:
        channels (int): Input and output channels (``planes``).
        sa_type (str): 'pairwise' or 'patchwise'.
        kernel_size (int): The attention window.
        share_planes (int): Channels sharing one attention weight.
            Default: 8.
        attention_cfg (dict, optional): More arguments of the attention
            layer (e.g. ``border``, ``impl``).
        norm_cfg (dict): Norm layers (the attention's ``gamma`` too).
        with_cp (bool): Checkpoint the block's activations. Default: False.
    """

    def __init__(self,
                 channels: int,
                 sa_type: str,
                 kernel_size: int,
                 share_planes: int = 8,
                 attention_cfg: OptConfigType = None,
                 norm_cfg: ConfigType = dict(type='BN', requires_grad=True),
                 with_cp: bool = False,
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        mid = channels // 4
        self.with_cp = with_cp
        self.bn1 = build_norm_layer(norm_cfg, channels)[1]
        self.sam = ROOT_MODELS.build(
            dict(type=SA_TYPES[sa_type], in_channels=channels, out_channels=mid,
                 kernel_size=kernel_size, bias=True, rel_channels=channels // 16,
                 share_planes=share_planes, norm_cfg=norm_cfg, **(attention_cfg or {})))
        self.bn2 = build_norm_layer(norm_cfg, mid)[1]
        self.conv = nn.Conv2d(mid, channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def _residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.sam(out)))
        return self.conv(out)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad:
            return x + checkpoint(self._residual, x, use_reentrant=False)
        return x + self._residual(x)


@MODELS.register_module()
class SAN(BaseModule):
    """SAN10/15/19 with pairwise or patchwise self-attention.

    Args:
        depth (int): 10, 15 or 19 (blocks per stage (2, 1, 2, 4, 1),
            (3, 2, 3, 5, 2), (3, 3, 4, 6, 3)).
        sa_type (str): 'pairwise' or 'patchwise'. Default: 'patchwise'.
        in_channels (int): Image channels. Default: 3.
        stem_channels (int): Stem width. Default: 64.
        stage_channels (Sequence[int]): The five stage widths.
            Default: (64, 256, 512, 1024, 2048).
        kernels (Sequence[int]): The five stages' windows.
            Default: (3, 7, 7, 7, 7).
        stage_blocks (Sequence[int], optional): Blocks per stage instead of
            ``depth``'s (a demo-sized network).
        share_planes (int): Channels sharing one attention weight.
            Default: 8.
        attention_cfg (dict, optional): More arguments of every attention
            layer, e.g. ``dict(border='mask')`` or ``dict(impl='torch')``.
        out_indices (Sequence[int]): Stages (0-4) whose outputs are returned.
            Default: (1, 2, 3, 4), strides 4/8/16/32.
        frozen_stages (int): -1: nothing frozen; 0: the stem; ``n``: the
            stem and stages ``0 .. n - 1``. Default: -1.
        norm_cfg (dict): Norm layers. Default: BN with ``requires_grad``.
        norm_eval (bool): Keep BN layers in eval mode while training.
            Default: False.
        with_cp (bool): Checkpoint each block's activations. Default: False.
        init_cfg (dict or list[dict], optional): mmengine init config.

    Example:
        >>> import torch
        >>> model = SAN(10, 'pairwise', stage_channels=(16, 32, 64, 128, 256))
        >>> outs = model(torch.rand(1, 3, 64, 64))
        >>> [tuple(o.shape) for o in outs]
        [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
    """

    arch_settings = {10: (2, 1, 2, 4, 1), 15: (3, 2, 3, 5, 2), 19: (3, 3, 4, 6, 3)}

    def __init__(self,
                 depth: int,
                 sa_type: str = 'patchwise',
                 in_channels: int = 3,
                 stem_channels: int = 64,
                 stage_channels: Sequence[int] = (64, 256, 512, 1024, 2048),
                 kernels: Sequence[int] = (3, 7, 7, 7, 7),
                 stage_blocks: Optional[Sequence[int]] = None,
                 share_planes: int = 8,
                 attention_cfg: OptConfigType = None,
                 out_indices: Sequence[int] = (1, 2, 3, 4),
                 frozen_stages: int = -1,
                 norm_cfg: ConfigType = dict(type='BN', requires_grad=True),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth!r} for SAN, allowed: '
                           f'{tuple(self.arch_settings)}')
        if sa_type not in SA_TYPES:
            raise ValueError(f'sa_type must be one of {tuple(SA_TYPES)}, got {sa_type!r}')
        stage_blocks = tuple(self.arch_settings[depth] if stage_blocks is None
                             else stage_blocks)
        for name, value in (('stage_channels', stage_channels), ('kernels', kernels),
                            ('stage_blocks', stage_blocks)):
            if len(value) != 5:
                raise ValueError(f'{name} must have 5 entries (one per stage), got {value!r}')
        if any(c % 16 or c <= 0 for c in stage_channels):
            raise ValueError(f'stage_channels must be positive multiples of 16 (attention '
                             f'relation channels are width / 16), got {stage_channels!r}')
        if not out_indices or any(i not in range(5) for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in 0..4, got {out_indices!r}')
        if frozen_stages not in range(-1, 6):
            raise ValueError(f'frozen_stages must be in -1..5, got {frozen_stages!r}')
        self.depth = depth
        self.sa_type = sa_type
        self.stage_blocks = stage_blocks
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, stem_channels, 1, bias=False),
            bn=build_norm_layer(norm_cfg, stem_channels)[1],
            relu=nn.ReLU(inplace=True)))
        self.stage_names = []
        width = stem_channels
        for i, (channels, kernel, blocks) in enumerate(zip(stage_channels, kernels,
                                                           stage_blocks)):
            stage = nn.Sequential(OrderedDict(
                pool=nn.MaxPool2d(2, 2, ceil_mode=True),
                conv=nn.Conv2d(width, channels, 1, bias=False),
                blocks=nn.Sequential(*[
                    SANBottleneck(channels, sa_type, kernel, share_planes, attention_cfg,
                                  norm_cfg, with_cp) for _ in range(blocks)]),
                bn=build_norm_layer(norm_cfg, channels)[1],
                relu=nn.ReLU(inplace=True)))
            name = f'layer{i}'
            self.add_module(name, stage)
            self.stage_names.append(name)
            width = channels
        self.feat_dim = width
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        frozen = ([self.stem] if self.frozen_stages >= 0 else []) + \
            [getattr(self, name) for name in self.stage_names[:max(self.frozen_stages, 0)]]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def forward(self, x: Tensor) -> tuple:
        x = self.stem(x)
        outs = []
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def train(self, mode: bool = True) -> 'SAN':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self
