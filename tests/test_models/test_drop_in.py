"""The subclasses behave as their mmdet parents on the same arguments.

A user who swaps ``type='ResNet'`` for ``type='SASAResNet'`` (or ``FPN`` for
``SASAFPN``, ``RetinaHead`` for ``SASARetinaHead``) in a config of their own
gets the parent's defaults and behaviour: the same frozen parameters, norm
modes, checkpointing, plugins, residual initialisation, stems and
downsampling, extra levels, output shapes, and the parent's exception types
for the parent's argument errors. Only the spatial layers change.
"""
import pytest
import torch
import torch.nn as nn
from mmdet.models.backbones import ResNet
from mmdet.models.dense_heads import RetinaHead
from mmdet.models.necks import FPN
from torch.nn.modules.batchnorm import _BatchNorm

from sasa_mmdet.models import SASAFPN, SASARetinaHead, SASAResNet
from sasa_mmdet.models.backbones import ResNetArgumentError, UnknownDepthError

TINY_ATTN = dict(window_size=3, num_heads=2)
WIDTH = dict(depth=50, base_channels=8)


def resnet_pair(**kwargs):
    """ResNet and SASAResNet (attention in every stage) on the same args."""
    torch.manual_seed(0)
    parent = ResNet(**WIDTH, **kwargs)
    child = SASAResNet(**WIDTH, attention_cfg=TINY_ATTN, **kwargs)
    return parent, child


def module_key(name):
    """A parameter's owner, down to a block's layer (``layer1.0.conv2``):
    the attention layer's own parameters fold into the conv they replace."""
    return '.'.join(name.split('.')[:3])


def trainable_by_module(model):
    keys = {}
    for name, param in model.named_parameters():
        keys.setdefault(module_key(name), []).append(param.requires_grad)
    return {key: all(flags) for key, flags in keys.items()}


def norm_modes(model):
    return {
        name: module.training
        for name, module in model.named_modules()
        if isinstance(module, (_BatchNorm, nn.GroupNorm))
    }


def structure(model):
    """Module names, without what lives inside a replaced spatial layer."""
    names = set()
    for name, _ in model.named_modules():
        parts = name.split('.')
        if len(parts) > 3 and parts[0].startswith('layer') and \
                parts[2].startswith('conv'):
            continue
        names.add(name)
    return names


def output_shapes(model, size=(45, 38)):
    model.eval()
    with torch.no_grad():
        return [tuple(out.shape) for out in model(torch.rand(1, 3, *size))]


@pytest.mark.parametrize('kwargs,error', [
    (dict(depth=42), KeyError),
    (dict(num_stages=0), AssertionError),
    (dict(num_stages=5), AssertionError),
    (dict(strides=(1, 2, 2)), AssertionError),
    (dict(dilations=(1, 1, 1)), AssertionError),
    (dict(num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1)),
     AssertionError),  # out_indices (0, 1, 2, 3) names a fourth stage
])
def test_argument_errors_have_the_parents_types(kwargs, error):
    args = dict(WIDTH, **kwargs)
    with pytest.raises(error):
        ResNet(**args)
    with pytest.raises(error) as info:
        SASAResNet(**args, attention_cfg=TINY_ATTN)
    # ... and are ValueErrors that say which argument and value
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, (UnknownDepthError, ResNetArgumentError))
    named = [key for key in kwargs if key in str(info.value)] or \
        ['out_indices']
    assert named[0] in str(info.value), str(info.value)


def test_unknown_depth_message_is_not_quoted_like_a_key():
    with pytest.raises(KeyError) as info:
        SASAResNet(depth=42)
    assert str(info.value) == \
        'depth must be one of (18, 26, 34, 38, 50, 101, 152), got 42'


def test_c4_backbone_with_three_stages_builds():
    """mmdet's Faster R-CNN C4 backbone: three stages, output C4."""
    c4 = dict(num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
              out_indices=(2, ), frozen_stages=1, norm_eval=True)
    parent, child = resnet_pair(**c4)
    assert child.stage_with_attention == (True, True, True)
    assert len(child.res_layers) == 3
    assert output_shapes(child) == output_shapes(parent) == [(1, 32 * 4, 3, 3)]
    assert trainable_by_module(child) == trainable_by_module(parent)


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(frozen_stages=2),
    dict(frozen_stages=4, norm_eval=False),
    dict(norm_eval=False),
    dict(with_cp=True),
    dict(zero_init_residual=False),
    dict(deep_stem=True, avg_down=True),
    dict(style='caffe'),
    dict(out_indices=(1, 3)),
    dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)),
    dict(plugins=[
        dict(cfg=dict(type='ContextBlock', ratio=1. / 4), stages=(False, True,
                                                                  True, True),
             position='after_conv3')
    ]),
], ids=lambda kwargs: ','.join(kwargs) or 'defaults')
def test_resnet_arguments_mean_the_same(kwargs):
    parent, child = resnet_pair(**kwargs)
    assert structure(child) == structure(parent)
    assert trainable_by_module(child) == trainable_by_module(parent)
    parent.train()
    child.train()
    assert norm_modes(child) == norm_modes(parent)
    for stage in child.res_layers:
        for block, ref in zip(getattr(child, stage), getattr(parent, stage)):
            assert (block.with_cp, block.conv1_stride, block.conv2_stride) \
                == (ref.with_cp, ref.conv1_stride, ref.conv2_stride)
    parent.init_weights()
    child.init_weights()
    residual = [(name, bool(module.weight.abs().sum() == 0))
                for name, module in parent.named_modules()
                if name.endswith('bn3')]
    assert residual == [(name, bool(module.weight.abs().sum() == 0))
                        for name, module in child.named_modules()
                        if name.endswith('bn3')]
    assert output_shapes(child) == output_shapes(parent)


def test_conv_cfg_reaches_the_stem_and_the_convolution_stages_as_in_resnet():
    """conv_cfg goes where ResNet sends it; attention stages keep theirs."""
    conv_cfg = dict(type='Conv')  # mmcv's Conv2d wrapper, not nn.Conv2d
    parent = ResNet(**WIDTH, conv_cfg=conv_cfg)
    child = SASAResNet(**WIDTH, attention_cfg=TINY_ATTN, conv_cfg=conv_cfg,
                       stage_with_attention=(False, False, True, True))
    assert type(parent.conv1) is not nn.Conv2d
    convs = {
        name: type(module)
        for name, module in parent.named_modules()
        if isinstance(module, nn.Conv2d)
    }
    for name, module in child.named_modules():
        if name.startswith(('layer3', 'layer4')) or name not in convs:
            continue
        assert type(module) is convs[name], name
    assert type(child.conv1) is convs['conv1']
    assert type(child.layer3[0].conv2).__name__ == 'LocalSelfAttention2d'


@pytest.mark.parametrize('heads,stage,width', [(16, 0, 8), (3, 0, 8)])
def test_heads_must_divide_every_attention_stage(heads, stage, width):
    with pytest.raises(ValueError) as info:
        SASAResNet(**WIDTH, attention_cfg=dict(window_size=3,
                                               num_heads=heads))
    message = str(info.value)
    assert f'num_heads={heads}' in message
    assert f'stage {stage} (layer{stage + 1}) has {width} channels' in message
    # 8 heads fail stage 0 (one channel per head, no room for the row and
    # column embeddings) and fit the wider stages
    with pytest.raises(ValueError, match='out_channels / num_heads must be'):
        SASAResNet(**WIDTH, attention_cfg=dict(window_size=3, num_heads=8))
    SASAResNet(**WIDTH, attention_cfg=dict(window_size=3, num_heads=8),
               stage_with_attention=(False, True, True, True))


IN_CHANNELS = [8, 16, 32, 64]


def feats(size=(33, 47)):
    height, width = size
    return [
        torch.rand(1, c, -(-height // 2**(i + 2)), -(-width // 2**(i + 2)))
        for i, c in enumerate(IN_CHANNELS)
    ]


def test_fpn_default_extra_levels_are_fpns():
    """No add_extra_convs: a max-pooled P6, as FPN, no attention there."""
    parent = FPN(IN_CHANNELS, 8, 5, start_level=1)
    child = SASAFPN(IN_CHANNELS, 8, 5, start_level=1, attention_cfg=TINY_ATTN)
    assert child.add_extra_convs is parent.add_extra_convs is False
    assert len(child.fpn_convs) == len(parent.fpn_convs) == 3
    inputs = feats()
    assert [o.shape for o in child(inputs)] == [o.shape for o in parent(inputs)]


@pytest.mark.parametrize('add_extra_convs', [
    False, True, 'on_input', 'on_lateral', 'on_output'
])
@pytest.mark.parametrize('relu_before_extra_convs', [False, True])
def test_fpn_extra_conv_modes_mean_the_same(add_extra_convs,
                                            relu_before_extra_convs):
    args = dict(start_level=1, add_extra_convs=add_extra_convs,
                relu_before_extra_convs=relu_before_extra_convs)
    parent = FPN(IN_CHANNELS, 8, 5, **args)
    child = SASAFPN(IN_CHANNELS, 8, 5, attention_cfg=TINY_ATTN, **args)
    assert child.add_extra_convs == parent.add_extra_convs
    assert child.relu_before_extra_convs == parent.relu_before_extra_convs
    assert [name for name, _ in child.named_children()] == \
        [name for name, _ in parent.named_children()]
    assert len(child.fpn_convs) == len(parent.fpn_convs)
    inputs = feats()
    assert [o.shape for o in child(inputs)] == [o.shape for o in parent(inputs)]


def test_fpn_heads_must_divide_the_channels():
    with pytest.raises(ValueError, match='num_heads must be a positive int '
                       'dividing out_channels=8, got num_heads=3'):
        SASAFPN(IN_CHANNELS, 8, 5, attention_cfg=dict(num_heads=3))


def test_retina_head_defaults_are_retina_heads():
    parent = RetinaHead(3, 8, feat_channels=8)
    child = SASARetinaHead(3, 8, feat_channels=8, attention_cfg=TINY_ATTN)
    for key in ('stacked_convs', 'num_base_priors', 'cls_out_channels',
                'use_sigmoid_cls', 'feat_channels'):
        assert getattr(child, key) == getattr(parent, key), key
    assert type(child.loss_cls) is type(parent.loss_cls)
    assert type(child.prior_generator) is type(parent.prior_generator)
    x = torch.rand(1, 8, 11, 9)
    assert [t.shape for t in child.forward_single(x)] == \
        [t.shape for t in parent.forward_single(x)]


def test_retina_head_heads_must_divide_the_channels():
    with pytest.raises(ValueError, match='dividing out_channels=12'):
        SASARetinaHead(3, 8, feat_channels=12,
                       attention_cfg=dict(window_size=3, num_heads=8))
