import logging
import math

import pytest
import torch
import torch.nn as nn
from mmdet.models.backbones import ResNet
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck
from mmdet.registry import MODELS
from mmengine.logging import MMLogger
from torch.nn.modules.batchnorm import _BatchNorm

from sasa_mmdet.layers import AttentionStem, LocalSelfAttention2d
from sasa_mmdet.models import SASAResNet

TINY_ATTN = dict(window_size=3, num_heads=2)
TINY_STEM = dict(num_heads=2)


def tiny(**kwargs):
    """A SASAResNet with 8 base channels and 2-head 3x3 attention."""
    cfg = dict(depth=26, base_channels=8, attention_cfg=TINY_ATTN)
    if kwargs.get('stem_type') == 'attention':
        cfg['stem_cfg'] = TINY_STEM
    cfg.update(kwargs)
    return SASAResNet(**cfg)


def is_attention(module):
    return isinstance(module, LocalSelfAttention2d) and not module.pointwise


def is_pointwise(module):
    return isinstance(module, LocalSelfAttention2d) and module.pointwise


def check_norm_state(modules, train_state):
    """All norm layers in ``modules`` are in mode ``train_state``."""
    return all(mod.training == train_state for mod in modules
               if isinstance(mod, (_BatchNorm, nn.GroupNorm)))


@pytest.mark.parametrize('kwargs,name', [
    (dict(depth=42), 'depth'),
    (dict(stem_type='deep'), 'stem_type'),
    (dict(stage_with_attention=(True, True, True)), 'stage_with_attention'),
    (dict(stage_with_attention=(1, 1, 1, 1)), 'stage_with_attention'),
    (dict(stage_with_attention='TTTT'), 'stage_with_attention'),
    (dict(num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
          out_indices=(0, 1, 2), stage_with_attention=(True, ) * 4),
     'stage_with_attention'),
    (dict(attention_cfg='LocalSelfAttention2d'), 'attention_cfg'),
    (dict(stem_cfg=dict(num_heads=2)), 'stem_cfg'),
    (dict(stem_type='attention', stem_cfg=[2]), 'stem_cfg'),
    (dict(stem_type='attention', deep_stem=True), 'deep_stem'),
    (dict(
        dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)), 'stage_with_dcn'),
])
def test_sasa_resnet_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny(**kwargs)


@pytest.mark.parametrize('kwargs,name', [
    (dict(depht=26), 'depht'),
    (dict(attention_cfg=dict(windw_size=3)), 'windw_size'),
    (dict(stem_type='attention', stem_cfg=dict(num_head=2)), 'num_head'),
])
def test_sasa_resnet_unknown_keys_are_named(kwargs, name):
    with pytest.raises(
            TypeError, match=f"unexpected keyword argument '{name}'"):
        tiny(**kwargs)


def test_sasa_resnet_invalid_attention_options():
    # The layer validates its own options (here: 3 heads for 8 channels).
    with pytest.raises(ValueError, match='num_heads'):
        tiny(attention_cfg=dict(num_heads=3))
    with pytest.raises(ValueError, match='position_encoding'):
        tiny(attention_cfg=dict(position_encoding='learned'))


def test_sasa_resnet_arch_settings():
    assert SASAResNet.arch_settings[26] == (Bottleneck, (1, 2, 4, 1))
    assert SASAResNet.arch_settings[38] == (Bottleneck, (2, 3, 5, 2))
    for depth in (18, 34, 50, 101, 152):
        assert SASAResNet.arch_settings[depth] == ResNet.arch_settings[depth]
    # mmdet's own table is left alone.
    assert 26 not in ResNet.arch_settings
    model = tiny(depth=38)
    assert [len(getattr(model, name)) for name in model.res_layers] == \
        [2, 3, 5, 2]


def test_sasa_resnet_replaces_spatial_convs_only():
    model = tiny(depth=50, stage_with_attention=(False, True, False, True))
    # Conv stem untouched.
    assert type(model.conv1) is nn.Conv2d
    assert isinstance(model.maxpool, nn.MaxPool2d)
    for stage, name in enumerate(model.res_layers):
        attention = model.stage_with_attention[stage]
        for block in getattr(model, name):
            if attention:
                assert is_attention(block.conv2)
                assert block.conv2.window_size == (3, 3)
                assert block.conv2.num_heads == 2
                for conv in (block.conv1, block.conv3):
                    assert is_pointwise(conv)
                if block.downsample is not None:
                    assert is_pointwise(block.downsample[0])
            else:
                for conv in (block.conv1, block.conv2, block.conv3):
                    assert type(conv) is nn.Conv2d
    # The stride sits on the attention layer (style='pytorch').
    first = model.layer2[0]
    assert first.conv2.stride == (2, 2) and first.conv1.stride == (1, 1)
    # style='caffe' moves it to conv1, a strided pointwise convolution.
    first = tiny(style='caffe').layer2[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)


def test_sasa_resnet_dcn_in_convolution_stages():
    # DCN stays available where a stage keeps its convolutions. (Build only:
    # mmcv 2.1's CPU deform_conv fails here for mmdet's plain ResNet too.)
    model = tiny(
        stage_with_attention=(True, True, True, False),
        dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, False, False, True))
    assert type(model.layer4[0].conv2).__name__ == 'DeformConv2dPack'
    assert is_attention(model.layer3[0].conv2)


def test_sasa_resnet_basic_block():
    model = tiny(depth=18)
    assert isinstance(model.layer1[0], BasicBlock)
    assert is_attention(model.layer1[0].conv1)
    assert is_attention(model.layer1[0].conv2)
    outs = model(torch.rand(1, 3, 45, 38))
    assert [tuple(out.shape) for out in outs] == [(1, 8, 12, 10),
                                                  (1, 16, 6, 5),
                                                  (1, 32, 3, 3),
                                                  (1, 64, 2, 2)]


@pytest.mark.parametrize('stem_type', ['conv', 'attention'])
@pytest.mark.parametrize('size', [(64, 64), (65, 50), (33, 47)])
def test_sasa_resnet_output_shapes_match_resnet(stem_type, size):
    model = tiny(depth=50, stem_type=stem_type)
    reference = ResNet(depth=50, base_channels=8)
    image = torch.rand(2, 3, *size)
    outs = model(image)
    expected = reference(image)
    assert len(outs) == 4
    assert [out.shape for out in outs] == [out.shape for out in expected]
    # Output stride 4 after either stem: ceil(H / 4).
    assert tuple(outs[0].shape[2:]) == tuple(math.ceil(s / 4) for s in size)


def test_sasa_resnet_attention_stem():
    model = tiny(
        stem_type='attention',
        stem_cfg=dict(window_size=4, num_heads=2, num_value_mixtures=3))
    assert model.deep_stem
    assert isinstance(model.stem, AttentionStem)
    assert isinstance(model.maxpool, nn.Identity)
    assert not hasattr(model, 'conv1')
    assert model.stem.attention.num_value_mixtures == 3
    assert model.stem.attention.window_size == (4, 4)
    # The stem's norm follows the backbone's norm_cfg by default.
    model = tiny(stem_type='attention', norm_cfg=dict(type='GN', num_groups=2))
    assert isinstance(model.stem.norm, nn.GroupNorm)


def test_sasa_resnet_registered_and_attention_cfg_merged():
    model = MODELS.build(
        dict(
            type='SASAResNet',
            depth=26,
            base_channels=8,
            attention_cfg=dict(num_heads=2)))
    assert isinstance(model, SASAResNet)
    # Keys given update the defaults: window 7, not the 3x3 kernel.
    assert model.layer1[0].conv2.window_size == (7, 7)
    assert model.layer1[0].conv2.num_heads == 2


def test_sasa_resnet_out_indices_and_plugins():
    model = tiny(out_indices=(1, 3))
    outs = model(torch.rand(1, 3, 64, 64))
    assert [out.shape[1] for out in outs] == [64, 256]
    plugins = [
        dict(
            cfg=dict(type='ContextBlock', ratio=1. / 4),
            stages=(False, True, True, True),
            position='after_conv3')
    ]
    model = tiny(plugins=plugins)
    assert not hasattr(model.layer1[0], 'context_block')
    assert hasattr(model.layer2[0], 'context_block')
    outs = model(torch.rand(1, 3, 64, 64))
    assert outs[3].shape == (1, 256, 2, 2)


@pytest.mark.parametrize('stem_type', ['conv', 'attention'])
def test_sasa_resnet_frozen_stages(stem_type):
    frozen_stages = 1
    model = tiny(stem_type=stem_type, frozen_stages=frozen_stages,
                 norm_eval=False)
    model.init_weights()
    model.train()
    stem = [model.stem] if stem_type == 'attention' else \
        [model.conv1, model.norm1]
    for module in stem:
        assert check_norm_state(module.modules(), False)
        assert all(not p.requires_grad for p in module.parameters())
    for i in range(1, frozen_stages + 1):
        layer = getattr(model, f'layer{i}')
        assert check_norm_state(layer.modules(), False)
        assert all(not p.requires_grad for p in layer.parameters())
    for i in range(frozen_stages + 1, 5):
        layer = getattr(model, f'layer{i}')
        assert check_norm_state(layer.modules(), True)
        assert all(p.requires_grad for p in layer.parameters())
    outs = model(torch.rand(1, 3, 64, 64))
    sum(out.sum() for out in outs).backward()
    assert model.layer1[0].conv2.qkv_weight.grad is None
    assert model.layer2[0].conv2.qkv_weight.grad is not None


def test_sasa_resnet_freezes_what_resnet_freezes():
    kwargs = dict(depth=50, base_channels=8, frozen_stages=2)
    model = SASAResNet(attention_cfg=TINY_ATTN, **kwargs)
    reference = ResNet(**kwargs)

    def frozen(module):
        # Attention layers hold other tensors than conv2.weight: compare
        # the modules owning frozen parameters.
        return {
            name.rsplit('.', 1)[0]
            for name, p in module.named_parameters() if not p.requires_grad
        }

    assert frozen(model) == frozen(reference)


def test_sasa_resnet_norm_eval():
    model = tiny(stem_type='attention', norm_eval=True)
    model.init_weights()
    model.train()
    assert check_norm_state(model.modules(), False)
    model = tiny(norm_eval=False)
    model.train()
    assert check_norm_state(model.modules(), True)


def test_sasa_resnet_with_cp_same_outputs():
    torch.manual_seed(0)
    plain = tiny(stem_type='attention', norm_eval=False)
    checkpointed = tiny(stem_type='attention', norm_eval=False, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    for layer in checkpointed.modules():
        if isinstance(layer, Bottleneck):
            assert layer.with_cp
    image = torch.rand(2, 3, 40, 52)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        x = image.clone().requires_grad_(True)
        outs = model(x)
        sum(out.square().sum() for out in outs).backward()
        grads.append((outs, x.grad,
                      model.layer3[0].conv2.qkv_weight.grad.clone()))
    (outs0, xgrad0, wgrad0), (outs1, xgrad1, wgrad1) = grads
    for a, b in zip(outs0, outs1):
        torch.testing.assert_close(a, b)
    # Recomputation reorders float sums (mmdet's ResNet alike): compare up to
    # float32 rounding relative to the largest gradient.
    for a, b in ((xgrad0, xgrad1), (wgrad0, wgrad1)):
        torch.testing.assert_close(
            a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_sasa_resnet_init_weights():
    model = tiny(depth=50, stem_type='attention')
    model.init_weights()
    for name in model.res_layers:
        for block in getattr(model, name):
            # zero_init_residual, as in ResNet
            assert torch.all(block.norm3.weight == 0)
    assert torch.all(model.stem.norm.weight == 1)


class _Records(logging.Handler):

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize('stem_type', ['conv', 'attention'])
def test_sasa_resnet_loads_conv_resnet_checkpoint(tmp_path, stem_type):
    # An ordinary convolutional ResNet checkpoint: mmdet's ResNet uses
    # torchvision's names (conv1, bn1, layerX.Y.convZ / bnZ, downsample.0/1),
    # plus a 1000-way classifier as in torchvision's files.
    conv = ResNet(depth=50, base_channels=8)
    conv.init_weights()
    state = dict(conv.state_dict())
    assert 'bn1.weight' in state and 'layer1.0.bn3.weight' in state
    assert 'layer1.0.downsample.1.running_var' in state
    state['fc.weight'] = torch.rand(1000, 256)
    state['fc.bias'] = torch.rand(1000)
    checkpoint = tmp_path / 'resnet.pth'
    torch.save(state, checkpoint)

    model = tiny(
        depth=50,
        stem_type=stem_type,
        init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    records = _Records()
    logger = MMLogger.get_current_instance()
    logger.addHandler(records)
    try:
        model.init_weights()
    finally:
        logger.removeHandler(records)

    own = {
        key: value
        for key, value in model.state_dict().items()
        if not key.endswith('num_batches_tracked')
    }
    loaded = [key for key in own if key in state]
    fresh = [key for key in own if key not in state]
    for key in loaded:
        torch.testing.assert_close(own[key], state[key], msg=key)
    assert 'layer1.0.conv1.weight' in loaded  # 1x1 convs keep their weights
    assert 'layer4.0.downsample.0.weight' in loaded
    assert all(('conv2' in key) or key.startswith('stem.') for key in fresh)
    assert 'layer1.0.conv2.qkv_weight' in fresh
    if stem_type == 'conv':
        assert 'conv1.weight' in loaded and 'bn1.running_mean' in loaded
    else:
        assert 'stem.attention.qkv_weight' in fresh
        assert 'stem.bn.weight' in fresh

    report = [m for m in records.messages if 'start fresh' in m]
    assert len(report) == 1
    report = report[0]
    assert f'{len(loaded)} of {len(loaded) + len(fresh)} tensors loaded' \
        in report
    for key in fresh:
        assert key in report
    for key in ('layer1.0.conv2.weight', 'fc.weight'):
        assert key in report.split('not used')[1]


def torchvision_resnet50_keys():
    """The tensor names of torchvision's resnet50 state dict."""
    bn = ('weight', 'bias', 'running_mean', 'running_var',
          'num_batches_tracked')
    keys = ['conv1.weight'] + [f'bn1.{t}' for t in bn]
    for stage, blocks in enumerate((3, 4, 6, 3), 1):
        for block in range(blocks):
            prefix = f'layer{stage}.{block}.'
            for i in (1, 2, 3):
                keys.append(f'{prefix}conv{i}.weight')
                keys += [f'{prefix}bn{i}.{t}' for t in bn]
            if block == 0:
                keys.append(f'{prefix}downsample.0.weight')
                keys += [f'{prefix}downsample.1.{t}' for t in bn]
    return set(keys + ['fc.weight', 'fc.bias'])


def test_resnet50_names_are_torchvision_names():
    # Why a torchvision checkpoint needs no key mapping: mmdet's ResNet
    # names its BN layers bn1 / bn2 / bn3 (build_norm_layer's 'bn' + postfix;
    # norm1 / norm2 / norm3 are properties), like torchvision.
    keys = set(ResNet(depth=50).state_dict()) | {'fc.weight', 'fc.bias'}
    assert keys == torchvision_resnet50_keys()
    # The attention model keeps every name except the replaced conv2s.
    model = SASAResNet(depth=50)
    ours = set(model.state_dict())
    shared = keys & ours
    assert keys - shared == {
        name
        for name in keys if name.endswith('conv2.weight') or 'fc.' in name
    }
    state = ResNet(depth=50).state_dict()
    assert all(state[k].shape == model.state_dict()[k].shape for k in shared)


def test_sasa_resnet_logs_complete_load():
    model = tiny()
    records = _Records()
    logger = MMLogger.get_current_instance()
    logger.addHandler(records)
    try:
        model.load_state_dict(tiny().state_dict())
    finally:
        logger.removeHandler(records)
    assert any('all' in m and 'tensors loaded' in m for m in records.messages)
    assert not any('start fresh' in m for m in records.messages)
