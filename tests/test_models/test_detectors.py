"""The Table 2 RetinaNets, shrunk, in loss / predict / tensor modes."""
import copy
import math
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.registry import init_default_scope

from sasa_mmdet.engine import bf16_autocast
from sasa_mmdet.layers import LocalSelfAttention2d

CONFIG_DIR = osp.join(osp.dirname(__file__), '..', '..', 'configs')
TABLE2 = [
    'sasa/retinanet_r50_fpn_1x_coco.py',
    'sasa/retinanet_sasa-r50_fpn_1x_coco.py',
    'sasa/retinanet_sasa-attnstem-r50_fpn_1x_coco.py',
    'sasa/retinanet_sasa-r50_sasa-fpn-head_1x_coco.py',
    'sasa/retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py',
]
ODD_SHAPES = [[3, 128, 128], [3, 125, 130]]


def tiny_model_cfg(config):
    """The config's model with 8 base channels, 2 heads, 3x3 windows."""
    cfg = Config.fromfile(osp.join(CONFIG_DIR, config))
    model = copy.deepcopy(cfg.model)
    backbone, neck, head = model.backbone, model.neck, model.bbox_head
    backbone.update(base_channels=8, init_cfg=None)
    if backbone.type == 'SASAResNet':
        backbone.attention_cfg = dict(window_size=3, num_heads=2)
        if backbone.stem_type == 'attention':
            backbone.stem_cfg = dict(num_heads=2)
    neck.update(in_channels=[32, 64, 128, 256], out_channels=16)
    if neck.type == 'SASAFPN':
        neck.attention_cfg = dict(window_size=3, num_heads=2)
    head.update(in_channels=16, feat_channels=16, stacked_convs=2)
    if head.type == 'SASARetinaHead':
        head.attention_cfg = dict(window_size=3, num_heads=2)
    return model


def build(config):
    init_default_scope('mmdet')
    model = MODELS.build(tiny_model_cfg(config))
    model.init_weights()
    return model


@pytest.mark.parametrize('config', TABLE2)
def test_retinanet_variants_modes(config):
    model = build(config)
    num_attention = sum(
        isinstance(m, LocalSelfAttention2d) and not m.pointwise
        for m in model.modules())
    assert (num_attention > 0) == ('sasa' in osp.basename(config))

    packed = demo_mm_inputs(2, ODD_SHAPES, num_classes=80)
    model.train()
    data = model.data_preprocessor(packed, True)
    losses = model.forward(**data, mode='loss')
    loss_cls = sum(losses['loss_cls'])
    loss_bbox = sum(losses['loss_bbox'])
    assert loss_cls.item() > 0 and loss_bbox.item() > 0
    (loss_cls + loss_bbox).backward()
    missing = [
        name for name, p in model.named_parameters()
        if p.requires_grad and p.grad is None
    ]
    assert not missing

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(packed, False)
        results = model.forward(**data, mode='predict')
        assert len(results) == 2
        for result in results:
            assert isinstance(result, DetDataSample)
            assert result.pred_instances.bboxes.shape[1] == 4
            assert len(result.pred_instances.scores) == \
                len(result.pred_instances.labels)
        cls_scores, bbox_preds = model.forward(**data, mode='tensor')
    # Padded to 128 x 160 (pad_size_divisor 32): P3-P7 at strides 8-128.
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert [tuple(s.shape) for s in cls_scores] == \
        [(2, 9 * 80, h, w) for h, w in sizes]
    assert [tuple(b.shape) for b in bbox_preds] == \
        [(2, 9 * 4, h, w) for h, w in sizes]


@pytest.mark.parametrize('config', TABLE2)
def test_retinanet_variants_empty_gt(config):
    model = build(config)
    model.train()
    packed = demo_mm_inputs(2, ODD_SHAPES, num_items=[0, 0], num_classes=80)
    data = model.data_preprocessor(packed, True)
    losses = model.forward(**data, mode='loss')
    assert sum(losses['loss_cls']).item() > 0
    assert sum(losses['loss_bbox']).item() == 0


@pytest.mark.parametrize('config', TABLE2)
def test_retinanet_variants_bf16_autocast(config, softmax_dtypes):
    """Finite losses, gradients and outputs under CPU bfloat16 autocast
    (what --amp selects on CPU); every attention softmax in float32. Small
    images: P6 and P7 are 1x1 and smaller than the window."""
    model = build(config)
    model.bbox_head.test_cfg.score_thr = 0.0  # an untrained model scores low
    packed = demo_mm_inputs(2, [[3, 64, 64], [3, 61, 70]], num_classes=80)
    model.train()
    data = model.data_preprocessor(packed, True)
    with bf16_autocast('cpu'):
        losses = model.forward(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss) and log_vars['loss_cls'] > 0
    assert all(math.isfinite(value) for value in log_vars.values())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(packed, False)
        with bf16_autocast('cpu'):
            cls_scores, bbox_preds = model.forward(**data, mode='tensor')
        # mmcv's CPU NMS only takes float32 boxes (a predict pass wholly
        # under autocast fails there, whatever the model): the boxes of the
        # bfloat16 network outputs are decoded and filtered in float32.
        results = model.bbox_head.predict_by_feat(
            [t.float() for t in cls_scores], [t.float() for t in bbox_preds],
            batch_img_metas=[s.metainfo for s in data['data_samples']],
            rescale=True)
    # autocast was on: the network computed in bfloat16
    assert all(t.dtype == torch.bfloat16 for t in cls_scores + bbox_preds)
    assert all(torch.isfinite(t).all() for t in cls_scores + bbox_preds)
    assert len(results) == 2
    for result in results:
        assert len(result.scores) > 0
        assert torch.isfinite(result.bboxes).all()
        assert torch.isfinite(result.scores).all()

    assert (len(softmax_dtypes) > 0) == ('sasa' in osp.basename(config))
    assert all(dtype == torch.float32 for _, dtype in softmax_dtypes)


@pytest.mark.parametrize('part,changes,error,message', [
    ('backbone', dict(depth=42), ValueError, 'depth must be one of'),
    ('backbone', dict(stage_with_attention=(True, True, True)), ValueError,
     'stage_with_attention must be a tuple of num_stages=4'),
    ('backbone', dict(attention_cfg=dict(window_size=3, num_heads=3)),
     ValueError, r'attention_cfg num_heads=3 must divide the width of every '
     r'attention stage: stage 0 \(layer1\) has 8 channels'),
    ('neck', dict(attention_cfg=dict(num_heads=3)), ValueError,
     'num_heads must be a positive int dividing out_channels=16'),
    ('bbox_head', dict(attention_cfg=dict(num_heads=5)), ValueError,
     'num_heads must be a positive int dividing out_channels=16'),
    ('backbone', dict(attention_cfg=dict(windw_size=3)), TypeError,
     "unexpected keyword argument 'windw_size'"),
    ('neck', dict(num_out=5), TypeError,
     "unexpected keyword argument 'num_out'"),
])
def test_bad_configs_name_what_is_wrong(part, changes, error, message):
    """Building a Table 2 config (tiny) with a mistake in one part stops
    with an error that names the argument and the value."""
    init_default_scope('mmdet')
    cfg = tiny_model_cfg('sasa/retinanet_sasa-r50_sasa-fpn-head_1x_coco.py')
    cfg[part].update(changes)
    with pytest.raises(error, match=message):
        MODELS.build(cfg)


def test_retinanet_attention_head_init_through_detector():
    """model.init_weights() leaves the head's W_V ~ N(0, 0.01)."""
    init_default_scope('mmdet')
    cfg = tiny_model_cfg('sasa/retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py')
    cfg.neck.out_channels = 64
    cfg.bbox_head.update(in_channels=64, feat_channels=64)
    model = MODELS.build(cfg)
    model.init_weights()
    head = model.bbox_head
    for tower in (head.cls_convs, head.reg_convs):
        for module in tower[:-1]:
            layer = module.conv
            w_v = layer.qkv_weight[2 * layer.out_channels:]
            assert abs(w_v.std().item() - 0.01) < 0.001
    # ... while the backbone's attention layers keep their default W_V.
    layer = model.backbone.layer3[0].conv2
    w_v = layer.qkv_weight[2 * layer.out_channels:]
    assert w_v.std().item() > 0.1


def test_memory_levers_reach_every_attention_layer():
    """``with_cp`` / ``recompute_attention`` in the attention configs reach
    every attention layer of the full-attention RetinaNet, stem included,
    and leave its losses and gradients unchanged."""
    config = 'sasa/retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py'
    plain = build(config).double()
    levers = tiny_model_cfg(config)
    for part in (levers.backbone, levers.neck, levers.bbox_head):
        part.attention_cfg.update(with_cp=True, recompute_attention=True)
    levers.backbone.stem_cfg.attention_cfg = dict(with_cp=True, recompute_attention=True)
    init_default_scope('mmdet')
    checkpointed = MODELS.build(levers).double()
    checkpointed.load_state_dict(plain.state_dict())
    layers = [m for m in checkpointed.modules()
              if isinstance(m, LocalSelfAttention2d) and not m.pointwise]
    assert len(layers) > 10
    assert all(m.with_cp and m.recompute_attention for m in layers)

    packed = demo_mm_inputs(2, [[3, 64, 64], [3, 61, 50]], num_items=[3, 0])
    results = []
    for model in (plain, checkpointed):
        model.train()
        data = model.data_preprocessor(packed, training=True)
        losses = model(data['inputs'].double(), data['data_samples'], mode='loss')
        total = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
        results.append((total, torch.autograd.grad(total, list(model.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0])
    for g_cp, g in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_cp, g)


@pytest.mark.parametrize('config', TABLE2)
def test_retinanet_variants_extreme_aspect_ratios(config):
    """A wide strip and a tall one in one batch (padded to each other):
    finite losses and gradients, boxes inside each image."""
    model = build(config)
    model.bbox_head.test_cfg.score_thr = 0.0
    packed = demo_mm_inputs(2, [[3, 24, 300], [3, 280, 20]], num_items=[2, 1],
                            num_classes=80)
    model.train()
    data = model.data_preprocessor(packed, True)
    loss, log_vars = model.parse_losses(model.forward(**data, mode='loss'))
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in log_vars.values())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    model.eval()
    with torch.no_grad():
        results = model.forward(**model.data_preprocessor(packed, False), mode='predict')
    for result, (height, width) in zip(results, [(24, 300), (280, 20)]):
        boxes = result.pred_instances.bboxes
        assert len(boxes) > 0 and torch.isfinite(boxes).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
