import math

import pytest
import torch
from mmdet.models.necks import FPN
from mmdet.registry import MODELS

from sasa_mmdet.layers import LocalSelfAttention2d
from sasa_mmdet.models import SASAFPN

TINY_ATTN = dict(window_size=3, num_heads=2)
IN_CHANNELS = [4, 8, 16, 32]


def feats(size=(33, 47), batch=1):
    """Backbone-like features at strides 4, 8, 16, 32 of an odd image."""
    height, width = size
    return [
        torch.rand(batch, c, math.ceil(height / 2**(i + 2)),
                   math.ceil(width / 2**(i + 2)))
        for i, c in enumerate(IN_CHANNELS)
    ]


def tiny(**kwargs):
    cfg = dict(
        in_channels=IN_CHANNELS,
        out_channels=8,
        num_outs=5,
        start_level=1,
        add_extra_convs='on_output',
        attention_cfg=TINY_ATTN)
    cfg.update(kwargs)
    return SASAFPN(**cfg)


@pytest.mark.parametrize('kwargs', [
    dict(conv_cfg=dict(type='LocalSelfAttention2d')),
    dict(conv_cfg=None),
    dict(attention_cfg=[3]),
])
def test_sasa_fpn_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        tiny(**kwargs)


def test_sasa_fpn_invalid_attention_options():
    with pytest.raises(ValueError, match='num_heads'):
        tiny(attention_cfg=dict(num_heads=3))
    with pytest.raises(ValueError, match='logits'):
        tiny(attention_cfg=dict(logits='qk'))


@pytest.mark.parametrize('kwargs,name', [
    (dict(num_out=5), 'num_out'),
    (dict(attention_cfg=dict(windw_size=3)), 'windw_size'),
])
def test_sasa_fpn_unknown_keys_are_named(kwargs, name):
    with pytest.raises(
            TypeError, match=f"unexpected keyword argument '{name}'"):
        tiny(**kwargs)


def test_sasa_fpn_layers():
    neck = tiny()
    assert neck.add_extra_convs == 'on_output'
    assert len(neck.lateral_convs) == 3 and len(neck.fpn_convs) == 5
    for module in neck.lateral_convs:
        assert isinstance(module.conv, LocalSelfAttention2d)
        assert module.conv.pointwise
    for i, module in enumerate(neck.fpn_convs):
        layer = module.conv
        assert isinstance(layer, LocalSelfAttention2d)
        assert not layer.pointwise
        assert layer.window_size == (3, 3) and layer.num_heads == 2
        # P6, P7: attention then a 2x2 stride-2 average pool, from P5 / P6.
        assert layer.stride == ((2, 2) if i >= 3 else (1, 1))
        assert layer.in_channels == 8
    # Keys given update the defaults (window 7, 8 heads).
    neck = tiny(out_channels=16, attention_cfg=dict(num_heads=2))
    assert neck.fpn_convs[0].conv.window_size == (7, 7)


@pytest.mark.parametrize('size', [(64, 64), (33, 47), (125, 130)])
@pytest.mark.parametrize('add_extra_convs', ['on_output', 'on_input'])
def test_sasa_fpn_output_shapes_match_fpn(size, add_extra_convs):
    inputs = feats(size, batch=2)
    neck = tiny(add_extra_convs=add_extra_convs)
    reference = FPN(
        IN_CHANNELS, 8, 5, start_level=1, add_extra_convs=add_extra_convs)
    outs = neck(inputs)
    expected = reference(inputs)
    assert len(outs) == 5
    assert [out.shape for out in outs] == [out.shape for out in expected]


def test_sasa_fpn_init_weights():
    neck = tiny(out_channels=64, attention_cfg=dict(num_heads=2))
    qkv = [m.conv.qkv_weight.detach().clone() for m in neck.fpn_convs]
    neck.init_weights()
    # FPN's Xavier-uniform init reaches the pointwise laterals.
    for module in neck.lateral_convs:
        weight = module.conv.weight
        bound = math.sqrt(6 / (weight.shape[0] + weight.shape[1]))
        assert weight.abs().max() <= bound
        assert weight.abs().max() > 0.5 * bound
        assert torch.all(module.conv.bias == 0)
    # ... and leaves the attention projections as the layer drew them.
    for module, before in zip(neck.fpn_convs, qkv):
        assert torch.equal(module.conv.qkv_weight, before)


def test_sasa_fpn_parameter_count():
    # RetinaNet-R50's FPN: 3 laterals (512, 1024, 2048 -> 256, with bias)
    # and 5 attention layers of 3 * 256 * 256 + 7 * 256 (tables) + 256.
    neck = SASAFPN([256, 512, 1024, 2048], 256, 5, start_level=1,
                   add_extra_convs='on_output')
    laterals = (512 + 1024 + 2048) * 256 + 3 * 256
    attention = 3 * 256 * 256 + 7 * 256 + 256
    assert sum(p.numel() for p in neck.parameters()) == \
        laterals + 5 * attention == 1_911_552


def test_sasa_fpn_registered_and_backward():
    neck = MODELS.build(
        dict(
            type='SASAFPN',
            in_channels=IN_CHANNELS,
            out_channels=8,
            num_outs=5,
            start_level=1,
            attention_cfg=TINY_ATTN))
    outs = neck(feats())
    sum(out.sum() for out in outs).backward()
    for name, param in neck.named_parameters():
        assert param.grad is not None, name


def test_mmdet_fpn_drop_in_conv_cfg():
    neck = MODELS.build(
        dict(
            type='FPN',
            in_channels=IN_CHANNELS,
            out_channels=8,
            num_outs=5,
            start_level=1,
            add_extra_convs='on_output',
            conv_cfg=dict(
                type='LocalSelfAttention2d', window_size=7, num_heads=2)))
    assert all(not m.conv.pointwise for m in neck.fpn_convs)
    assert neck.fpn_convs[0].conv.window_size == (7, 7)
    outs = neck(feats((65, 50)))
    assert [tuple(out.shape[2:]) for out in outs] == [(9, 7), (5, 4), (3, 2),
                                                      (2, 1), (1, 1)]
