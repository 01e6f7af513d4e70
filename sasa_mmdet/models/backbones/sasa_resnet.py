"""ResNet whose spatial convolutions are stand-alone local self-attention.

Ramachandran, Parmar, Vaswani, Bello, Levskaya, Shlens, "Stand-Alone
Self-Attention in Vision Models", NeurIPS 2019 (arXiv:1906.05909).

Only what changes is replaced: the chosen stages get
``conv_cfg=dict(type='LocalSelfAttention2d', ...)``. MMDetection's
``Bottleneck`` (and ``BasicBlock``) build every convolution with
``build_conv_layer(conv_cfg, ...)``, so the 3x3 ``conv2`` becomes local
attention (followed by an average pool where it had a stride, which is where
``style='pytorch'`` puts it) while the 1x1 convolutions become the layer's
pointwise mode, a plain 1x1 convolution with ``nn.Conv2d``'s ``weight``.
The optional attention stem replaces the 7x7 convolution and max pool.
"""
import copy
import logging
from typing import Optional, Sequence

import torch.nn as nn
from mmdet.models.backbones.resnet import Bottleneck, ResNet
from mmdet.registry import MODELS
from mmdet.utils import OptConfigType
from mmengine.logging import print_log

from sasa_mmdet.engine import CheckpointMismatchError
from sasa_mmdet.layers import AttentionStem

STEM_TYPES = ('conv', 'attention')


class ResNetArgumentError(ValueError, AssertionError):
    """A bad ``num_stages``, ``strides``, ``dilations`` or ``out_indices``.

    mmdet's ``ResNet`` rejects these with a bare ``assert``; this error says
    which argument, what value and what is allowed, and is still an
    ``AssertionError`` (and a ``ValueError``), so code written for ``ResNet``
    catches it.
    """


class UnknownDepthError(ValueError, KeyError):
    """A depth with no architecture; a ``KeyError`` as in mmdet's ``ResNet``
    (and a ``ValueError``)."""

    def __str__(self) -> str:
        # KeyError would print the message quoted, as a key.
        return str(self.args[0]) if self.args else ''


def _check_stage_arguments(num_stages, strides, dilations,
                           out_indices) -> None:
    """What ``ResNet.__init__`` asserts, checked first with clear messages."""
    if (not isinstance(num_stages, int) or isinstance(num_stages, bool)
            or not 1 <= num_stages <= 4):
        raise ResNetArgumentError(
            f'num_stages must be an int from 1 to 4, got {num_stages!r}')
    for name, value in (('strides', strides), ('dilations', dilations)):
        if len(value) != num_stages:
            raise ResNetArgumentError(
                f'{name} must have one entry per stage (num_stages='
                f'{num_stages}), got {name}={tuple(value)!r}')
    if max(out_indices) >= num_stages:
        raise ResNetArgumentError(
            f'out_indices must index the num_stages={num_stages} stages '
            f'(0 to {num_stages - 1}), got out_indices={tuple(out_indices)!r}')


@MODELS.register_module()
class SASAResNet(ResNet):
    """ResNet with local self-attention in place of spatial convolutions.

    Every argument of :class:`mmdet.models.backbones.ResNet` keeps its
    meaning (``out_indices``, ``frozen_stages``, ``norm_eval``, ``norm_cfg``,
    ``with_cp``, ``style``, ``plugins``, ``init_cfg``, ...); stages without
    attention are ordinary ResNet stages.

    How it plugs into ``ResNet``: ``ResNet.__init__`` calls
    :meth:`make_res_layer` once per stage, in order, and appends the stage's
    name to ``self.res_layers`` right after each call, so inside
    :meth:`make_res_layer` ``len(self.res_layers)`` is the index of the stage
    being built. The attention stem reuses ResNet's ``deep_stem`` path
    (``self.stem``, run by ``ResNet.forward`` and frozen by
    ``_freeze_stages``) with ``self.maxpool = nn.Identity()``, because
    :class:`AttentionStem` ends with its own 4x4 max pool.

    Loading an ordinary convolutional ResNet checkpoint
    (``init_cfg=dict(type='Pretrained', checkpoint=...)``, e.g.
    ``'torchvision://resnet50'``) goes through mmengine's non-strict
    loading: every tensor whose name and shape match is loaded (mmdet's
    ResNet already uses torchvision's names: ``conv1``, ``bn1``,
    ``layer1.0.conv2``, ``downsample.0/1``; ``norm1`` etc. are properties
    that point at ``bn1``), and this backbone logs, through the current
    ``MMLogger``, which of its tensors start fresh (the attention layers and
    stem) and which checkpoint tensors go unused (the replaced 3x3
    convolutions, the classifier).

    Starting from a classifier of the same architecture (an ImageNet run of
    ``configs/imagenet/``) is the paper's set-up: with
    ``init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint=...)``
    and ``strict_pretrained=True`` every backbone tensor must come from the
    checkpoint; the log then reads ``SASAResNet: all N tensors loaded from
    the checkpoint ...``, and a checkpoint whose backbone does not fit raises
    a :class:`PretrainedMismatchError` naming the tensors before anything is
    copied.

    Args:
        depth (int): 18, 26, 34, 38, 50, 101 or 152. 26 and 38 are the
            paper's bottleneck ResNets with (1, 2, 4, 1) and (2, 3, 5, 2)
            blocks per stage.
        stem_type (str): 'conv' (ResNet's 7x7 convolution and max pool) or
            'attention' (the paper's spatially-aware attention stem, output
            stride 4 as well). Default: 'conv'.
        stage_with_attention (Sequence[bool], optional): For each stage,
            whether its spatial convolutions become local attention; one
            entry per stage (``num_stages``). Default: None, every stage.
        attention_cfg (dict, optional): Options of
            :class:`~sasa_mmdet.layers.LocalSelfAttention2d` (``window_size``,
            ``num_heads``, ``position_encoding``, ``logits``, ``impl``, ...)
            for the attention stages; they update the defaults
            ``dict(window_size=7, num_heads=8)``. A ``type`` key selects
            another registered layer with the same signature.
        stem_cfg (dict, optional): Options of
            :class:`~sasa_mmdet.layers.AttentionStem` (``window_size``,
            ``num_heads``, ``num_value_mixtures``, ``pool_size``, ...) when
            ``stem_type='attention'``. ``norm_cfg`` defaults to the
            backbone's.
        **kwargs: :class:`mmdet.models.backbones.ResNet` arguments.
            ``deep_stem=True`` only goes with ``stem_type='conv'``, ``dcn``
            only in stages without attention. ``conv_cfg`` applies where
            ResNet applies it, outside the attention stages: the stem's 7x7
            convolution (with ``stem_type='conv'``) and the stages without
            attention.

    Raises:
        UnknownDepthError: ``depth`` is not in :attr:`arch_settings` (a
            ``KeyError``, as ResNet raises, and a ``ValueError``).
        ResNetArgumentError: ``num_stages``, ``strides``, ``dilations`` or
            ``out_indices`` do not fit together (an ``AssertionError``, as
            ResNet raises, and a ``ValueError``).
        ValueError: a bad argument of this class, or of the attention layer
            (e.g. ``num_heads`` that does not divide a stage's width).
        strict_pretrained (bool): Refuse a ``Pretrained`` ``init_cfg``
            checkpoint that does not fill every tensor of the backbone
            exactly (names and shapes; BatchNorm's ``num_batches_tracked``
            may be missing) or that holds backbone tensors this backbone
            does not have. Applies to ``init_weights`` only; loads through
            the runner are checked by ``SafeCheckpointHook``. Default:
            False (a convolutional ResNet checkpoint fills what fits).

    Example:
        >>> import torch
        >>> self = SASAResNet(
        ...     depth=26, base_channels=16, stem_type='attention',
        ...     attention_cfg=dict(window_size=3, num_heads=2))
        >>> outputs = self.forward(torch.rand(1, 3, 65, 50))
        >>> for out in outputs:
        ...     print(tuple(out.shape))
        (1, 64, 17, 13)
        (1, 128, 9, 7)
        (1, 256, 5, 4)
        (1, 512, 3, 2)
    """

    arch_settings = {
        **ResNet.arch_settings,
        26: (Bottleneck, (1, 2, 4, 1)),
        38: (Bottleneck, (2, 3, 5, 2)),
    }

    def __init__(self,
                 depth: int,
                 stem_type: str = 'conv',
                 stage_with_attention: Optional[Sequence[bool]] = None,
                 attention_cfg: OptConfigType = None,
                 stem_cfg: OptConfigType = None,
                 strict_pretrained: bool = False,
                 **kwargs) -> None:
        if not isinstance(strict_pretrained, bool):
            raise ValueError('strict_pretrained must be a bool, got '
                             f'{strict_pretrained!r}')
        if depth not in self.arch_settings:
            raise UnknownDepthError(
                f'depth must be one of {tuple(sorted(self.arch_settings))}, '
                f'got {depth!r}')
        if stem_type not in STEM_TYPES:
            raise ValueError(
                f'stem_type must be one of {STEM_TYPES}, got {stem_type!r}')
        num_stages = kwargs.get('num_stages', 4)
        _check_stage_arguments(num_stages,
                               kwargs.get('strides', (1, 2, 2, 2)),
                               kwargs.get('dilations', (1, 1, 1, 1)),
                               kwargs.get('out_indices', (0, 1, 2, 3)))
        if stage_with_attention is None:
            stage_with_attention = (True, ) * num_stages
        if (not isinstance(stage_with_attention, (tuple, list))
                or len(stage_with_attention) != num_stages
                or not all(isinstance(flag, bool)
                           for flag in stage_with_attention)):
            raise ValueError(
                f'stage_with_attention must be a tuple of num_stages='
                f'{num_stages} bools, got {stage_with_attention!r}')
        if attention_cfg is not None and not isinstance(attention_cfg, dict):
            raise ValueError(f'attention_cfg must be a dict or None, got '
                             f'{attention_cfg!r}')
        if stem_cfg is not None:
            if not isinstance(stem_cfg, dict):
                raise ValueError(
                    f'stem_cfg must be a dict or None, got {stem_cfg!r}')
            if stem_type != 'attention':
                raise ValueError(
                    "stem_cfg configures the attention stem: it needs "
                    f"stem_type='attention', got stem_type={stem_type!r}")
        if stem_type == 'attention':
            if kwargs.get('deep_stem', False):
                raise ValueError(
                    "deep_stem=True builds a convolutional stem: it cannot go "
                    "with stem_type='attention'")
            # ResNet's forward and _freeze_stages then use ``self.stem``.
            kwargs['deep_stem'] = True
        stage_with_dcn = kwargs.get('stage_with_dcn', (False, ) * num_stages)
        if kwargs.get('dcn') is not None:
            both = [
                i for i, (dcn, attn) in enumerate(
                    zip(stage_with_dcn, stage_with_attention)) if dcn and attn
            ]
            if both:
                raise ValueError(
                    f'dcn and attention cannot share a stage: stages {both} '
                    f'have both stage_with_dcn={tuple(stage_with_dcn)} and '
                    f'stage_with_attention={tuple(stage_with_attention)}')

        # Read by the overrides below, which ResNet.__init__ calls.
        self.stem_type = stem_type
        self.stage_with_attention = tuple(stage_with_attention)
        self.attention_cfg = dict(
            type='LocalSelfAttention2d', window_size=7, num_heads=8)
        self.attention_cfg.update(copy.deepcopy(attention_cfg or {}))
        self.stem_cfg = copy.deepcopy(stem_cfg or {})
        self.strict_pretrained = strict_pretrained
        # True while init_weights runs (a Pretrained init_cfg loads then)
        self._initialising = False
        super().__init__(depth, **kwargs)
        self.register_load_state_dict_pre_hook(_log_checkpoint_coverage)

    def init_weights(self) -> None:
        """ResNet's initialisation; a ``Pretrained`` ``init_cfg`` is loaded
        last (mmengine) and checked with ``strict_pretrained``."""
        self._initialising = True
        try:
            super().init_weights()
        finally:
            self._initialising = False

    def _pretrained_source(self) -> str:
        """'file (prefix ...)' of the Pretrained init_cfg, for messages."""
        init_cfgs = self.init_cfg if isinstance(self.init_cfg,
                                                list) else [self.init_cfg]
        for cfg in init_cfgs:
            if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
                prefix = cfg.get('prefix')
                return f'{cfg.get("checkpoint")}' + (
                    f' (prefix {prefix!r})' if prefix else '')
        return 'the checkpoint'

    def make_res_layer(self, **kwargs) -> nn.Module:
        """Build a stage; attention stages get the attention ``conv_cfg``."""
        # ResNet.__init__ appends each stage to self.res_layers after
        # building it, so this is the index of the stage being built.
        stage_idx = len(self.res_layers)
        if self.stage_with_attention[stage_idx]:
            num_heads = self.attention_cfg.get('num_heads')
            width = kwargs['planes']
            if isinstance(num_heads, int) and num_heads > 0 and width % num_heads:
                raise ValueError(
                    f'attention_cfg num_heads={num_heads} must divide the width '
                    f'of every attention stage: stage {stage_idx} (layer'
                    f'{stage_idx + 1}) has {width} channels in its spatial '
                    f'layers (base_channels={self.base_channels}); choose '
                    'num_heads dividing it, a wider base_channels, or no '
                    'attention in that stage (stage_with_attention)')
            kwargs['conv_cfg'] = copy.deepcopy(self.attention_cfg)
        return super().make_res_layer(**kwargs)

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        if self.stem_type == 'conv':
            super()._make_stem_layer(in_channels, stem_channels)
            return
        stem_cfg = dict(norm_cfg=self.norm_cfg)
        stem_cfg.update(self.stem_cfg)
        self.stem = AttentionStem(in_channels, stem_channels, **stem_cfg)
        # AttentionStem ends with its own max pool (output stride 4).
        self.maxpool = nn.Identity()


class PretrainedMismatchError(CheckpointMismatchError):
    """A ``Pretrained`` checkpoint does not fit a backbone built with
    ``strict_pretrained=True``; nothing was loaded.

    Args:
        backbone (str): The backbone's class name.
        source (str): The checkpoint (and prefix) it was loaded from.
        mismatched (list[tuple]): ``(key, checkpoint shape, model shape)``.
        missing (list[str]): Backbone tensors the checkpoint does not hold.
        unexpected (list[str]): Checkpoint tensors (under the prefix) the
            backbone does not have.
    """

    def __init__(self, backbone: str, source: str, mismatched, missing,
                 unexpected) -> None:
        super().__init__(mismatched, missing, unexpected)
        lines = [
            f'{backbone}(strict_pretrained=True): the checkpoint {source} '
            'does not fit this backbone; nothing was loaded.'
        ]
        if mismatched:
            lines.append(f'Shapes differ ({len(mismatched)}): ' + ', '.join(
                f'{key}: checkpoint {ckpt} vs backbone {own}'
                for key, ckpt, own in mismatched))
        if missing:
            lines.append(f'Not in the checkpoint ({len(missing)}): ' +
                         ', '.join(missing))
        if unexpected:
            lines.append(f'Not in the backbone ({len(unexpected)}): ' +
                         ', '.join(unexpected))
        lines.append(
            'Pretrain the same backbone (depth, stem_type, '
            'stage_with_attention, attention_cfg, stem_cfg, base_channels) '
            "or, to start from part of a checkpoint on purpose (e.g. a "
            "convolutional ResNet), set strict_pretrained=False.")
        self.args = ('\n'.join(lines), )


def _log_checkpoint_coverage(module: nn.Module, state_dict: dict, prefix: str,
                             *args) -> None:
    """Log which tensors a state dict will not fill (load pre-hook).

    Runs inside ``load_state_dict`` (torch's or mmengine's, whichever loads a
    ``Pretrained`` ``init_cfg``, ``load_from`` or a resumed checkpoint),
    before the tensors are copied, with the state dict under ``prefix``.
    While ``init_weights`` loads a ``Pretrained`` checkpoint into a backbone
    with ``strict_pretrained=True``, anything short of a complete fit raises
    :class:`PretrainedMismatchError` instead.
    """
    own = {
        key: value
        for key, value in module.state_dict().items()
        if not key.endswith('num_batches_tracked')
    }
    given = {
        key[len(prefix):]: value
        for key, value in state_dict.items() if key.startswith(prefix)
        and not key.endswith('num_batches_tracked')
    }
    missing = [key for key in own if key not in given]
    mismatched = [
        key for key in own if key in given
        and tuple(given[key].shape) != tuple(own[key].shape)
    ]
    unused = [key for key in given if key not in own]
    loaded = len(own) - len(missing) - len(mismatched)
    name = type(module).__name__
    pretrained = getattr(module, '_initialising', False)
    source = module._pretrained_source() if pretrained else 'the checkpoint'
    if not (missing or mismatched or unused):
        print_log(
            f'{name}: all {len(own)} tensors loaded from {source}',
            logger='current')
        return
    if pretrained and module.strict_pretrained:
        raise PretrainedMismatchError(
            name, source,
            [(key, tuple(given[key].shape), tuple(own[key].shape))
             for key in mismatched], missing, unused)
    lines = [
        f'{name}: {loaded} of {len(own)} tensors loaded from the checkpoint; '
        f'{len(missing) + len(mismatched)} start fresh '
        f'(their own initialisation)'
    ]
    if missing:
        lines.append(f'  start fresh, not in the checkpoint ({len(missing)}): '
                     + ', '.join(missing))
    if mismatched:
        lines.append(f'  start fresh, shape differs ({len(mismatched)}): ' +
                     ', '.join(f'{key} {tuple(given[key].shape)} -> '
                               f'{tuple(own[key].shape)}'
                               for key in mismatched))
    if unused:
        lines.append(f'  checkpoint tensors not used ({len(unused)}): ' +
                     ', '.join(unused))
    print_log('\n'.join(lines), logger='current', level=logging.WARNING)


__all__ = [
    'PretrainedMismatchError', 'ResNetArgumentError', 'SASAResNet',
    'UnknownDepthError'
]
