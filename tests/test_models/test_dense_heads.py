import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmengine.config import ConfigDict
from mmengine.model import bias_init_with_prob
from mmengine.structures import InstanceData

from sasa_mmdet.layers import LocalSelfAttention2d
from sasa_mmdet.models import SASARetinaHead

TINY_ATTN = dict(window_size=3, num_heads=2)
TRAIN_CFG = ConfigDict(
    assigner=dict(
        type='MaxIoUAssigner',
        pos_iou_thr=0.5,
        neg_iou_thr=0.4,
        min_pos_iou=0,
        ignore_iof_thr=-1),
    sampler=dict(type='PseudoSampler'),
    allowed_border=-1,
    pos_weight=-1,
    debug=False)
IMG_METAS = [{
    'img_shape': (125, 130, 3),
    'pad_shape': (128, 160, 3),
    'scale_factor': 1,
}]
# Pyramid levels of a 128 x 160 padded image at strides 8 to 128.
LEVEL_SIZES = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]


def tiny(**kwargs):
    cfg = dict(
        num_classes=4,
        in_channels=8,
        feat_channels=8,
        stacked_convs=2,
        attention_cfg=TINY_ATTN,
        train_cfg=TRAIN_CFG)
    cfg.update(kwargs)
    return SASARetinaHead(**cfg)


def level_feats(channels=8):
    return [torch.rand(1, channels, h, w) for h, w in LEVEL_SIZES]


@pytest.mark.parametrize('kwargs', [
    dict(conv_cfg=dict(type='LocalSelfAttention2d')),
    dict(conv_cfg=None),
    dict(attention_cfg=(3, 2)),
    dict(mix_heads=1),
])
def test_sasa_retina_head_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        tiny(**kwargs)


def test_sasa_retina_head_invalid_attention_options():
    with pytest.raises(ValueError, match='num_heads'):
        tiny(attention_cfg=dict(num_heads=3))
    with pytest.raises(ValueError, match='value_init_std'):
        tiny(attention_cfg=dict(TINY_ATTN, value_init_std=-1.0))


@pytest.mark.parametrize('kwargs,name', [
    (dict(stacked_conv=2), 'stacked_conv'),
    (dict(attention_cfg=dict(windw_size=3)), 'windw_size'),
])
def test_sasa_retina_head_unknown_keys_are_named(kwargs, name):
    with pytest.raises(
            TypeError, match=f"unexpected keyword argument '{name}'"):
        tiny(**kwargs)


def test_sasa_retina_head_layers():
    head = tiny()
    for tower in (head.cls_convs, head.reg_convs):
        # stacked_convs attention layers, then the head-mixing 1x1 conv.
        assert len(tower) == 3
        for module in tower[:2]:
            assert isinstance(module.conv, LocalSelfAttention2d)
            assert not module.conv.pointwise
            assert module.conv.value_init_std == 0.01
            assert module.with_activation
        mix = tower[2]
        assert isinstance(mix, ConvModule)
        assert type(mix.conv) is nn.Conv2d
        assert mix.conv.kernel_size == (1, 1) and mix.with_activation
    assert type(head.retina_cls) is nn.Conv2d
    assert head.retina_cls.kernel_size == (3, 3)
    assert head.retina_cls.out_channels == 9 * 4
    assert head.retina_reg.out_channels == 9 * 4

    head = tiny(mix_heads=False)
    assert len(head.cls_convs) == 2 and len(head.reg_convs) == 2
    head = tiny(stacked_convs=0)
    assert len(head.cls_convs) == 0
    cls_score, bbox_pred = head.forward_single(torch.rand(1, 8, 5, 7))
    assert cls_score.shape == (1, 36, 5, 7)
    # Keys given update the defaults (window 7, 8 heads, W_V std 0.01).
    head = tiny(feat_channels=16, attention_cfg=dict(num_heads=2))
    layer = head.cls_convs[0].conv
    assert layer.window_size == (7, 7) and layer.value_init_std == 0.01


def test_sasa_retina_head_forward_shapes():
    head = tiny()
    cls_scores, bbox_preds = head.forward(level_feats())
    assert len(cls_scores) == len(bbox_preds) == 5
    for cls_score, bbox_pred, (h, w) in zip(cls_scores, bbox_preds,
                                            LEVEL_SIZES):
        assert cls_score.shape == (1, 36, h, w)
        assert bbox_pred.shape == (1, 36, h, w)


def test_sasa_retina_head_loss():
    head = tiny()
    cls_scores, bbox_preds = head.forward(level_feats())

    # No gt: only negatives, so a classification loss and no box loss.
    empty = InstanceData(
        bboxes=torch.empty((0, 4)), labels=torch.LongTensor([]))
    losses = head.loss_by_feat(cls_scores, bbox_preds, [empty], IMG_METAS)
    empty_cls = sum(loss.sum() for loss in losses['loss_cls'])
    empty_box = sum(loss.sum() for loss in losses['loss_bbox'])
    assert empty_cls.item() > 0
    assert empty_box.item() == 0

    gt = InstanceData(
        bboxes=torch.Tensor([[23.6667, 23.8757, 78.6326, 66.3352]]),
        labels=torch.LongTensor([2]))
    losses = head.loss_by_feat(cls_scores, bbox_preds, [gt], IMG_METAS)
    cls_loss = sum(loss.sum() for loss in losses['loss_cls'])
    box_loss = sum(loss.sum() for loss in losses['loss_bbox'])
    assert cls_loss.item() > 0 and box_loss.item() > 0
    (cls_loss + box_loss).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name


def test_sasa_retina_head_init_weights():
    # 64 channels: 4096 W_V entries per layer, std estimated within ~2%.
    head = tiny(in_channels=64, feat_channels=64)
    head.init_weights()
    for tower in (head.cls_convs, head.reg_convs):
        for module in tower[:-1]:
            layer = module.conv
            w_v = layer.qkv_weight[2 * layer.out_channels:]
            assert abs(w_v.std().item() - 0.01) < 0.001
            assert abs(w_v.mean().item()) < 0.001
        # RetinaHead's N(0, 0.01) init reaches the mixing conv.
        assert abs(tower[-1].conv.weight.std().item() - 0.01) < 0.001
    # RetinaHead's classification prior (0.01) is kept.
    torch.testing.assert_close(
        head.retina_cls.bias,
        torch.full_like(head.retina_cls.bias, bias_init_with_prob(0.01)))


def test_sasa_retina_head_parameter_count():
    # RetinaNet's head, 80 classes, 9 anchors, 256 channels.
    head = SASARetinaHead(80, 256)
    attention = 3 * 256 * 256 + 7 * 256 + 256  # W_Q, W_K, W_V, tables, bias
    mix = 256 * 256 + 256
    retina_cls = 256 * 9 * 80 * 9 + 9 * 80
    retina_reg = 256 * 9 * 4 * 9 + 9 * 4
    expected = 8 * attention + 2 * mix + retina_cls + retina_reg
    assert sum(p.numel() for p in head.parameters()) == expected == 3_463_412


def test_mmdet_retina_head_drop_in_conv_cfg():
    head = MODELS.build(
        dict(
            type='RetinaHead',
            num_classes=4,
            in_channels=8,
            feat_channels=8,
            stacked_convs=2,
            conv_cfg=dict(
                type='LocalSelfAttention2d', window_size=7, num_heads=2),
            train_cfg=TRAIN_CFG))
    assert all(not m.conv.pointwise for m in head.cls_convs)
    cls_scores, bbox_preds = head.forward(level_feats())
    gt = InstanceData(
        bboxes=torch.Tensor([[23.6667, 23.8757, 78.6326, 66.3352]]),
        labels=torch.LongTensor([2]))
    losses = head.loss_by_feat(cls_scores, bbox_preds, [gt], IMG_METAS)
    assert sum(loss.sum() for loss in losses['loss_bbox']).item() > 0
