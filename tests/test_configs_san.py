"""SAN's configs (configs/san/): the RetinaNet family and the SE variant
(each also builds and trains one iteration in tests/test_configs.py), the
demo-sized detectors, and the six mmpretrain ImageNet classifiers with the
official recipe and parameter counts."""
import glob
import math
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

from sasa_mmdet.models import SAN, SASAResNet, SEPlugin
from sasa_mmdet.utils.complexity import count_parameters

CONFIG_DIR = osp.join(osp.dirname(__file__), '..', 'configs', 'san')
IMAGENET = sorted(glob.glob(osp.join(CONFIG_DIR, 'imagenet', '*.py')))
RETINANET = re.compile(r'retinanet_san(10|15|19)-(pairwise|patchwise)_fpn_1x_coco\.py')
CLASSIFIER = re.compile(r'san(10|15|19)-(pairwise|patchwise)_8xb32_in1k\.py')
OFFICIAL_PARAMS = {('10', 'pairwise'): 10.5, ('10', 'patchwise'): 11.8,
                   ('15', 'pairwise'): 14.1, ('15', 'patchwise'): 16.2,
                   ('19', 'pairwise'): 17.6, ('19', 'patchwise'): 20.5}


def _load(*parts):
    return Config.fromfile(osp.join(CONFIG_DIR, *parts))


def test_one_retinanet_config_per_san_model():
    names = [osp.basename(p) for p in glob.glob(osp.join(CONFIG_DIR, 'retinanet_san1*.py'))]
    assert sorted(RETINANET.fullmatch(n).groups() for n in names) == sorted(OFFICIAL_PARAMS)
    for name in names:
        depth, sa_type = RETINANET.fullmatch(name).groups()
        cfg = _load(name)
        assert cfg.custom_imports == dict(imports=['sasa_mmdet'], allow_failed_imports=False)
        backbone = cfg.model.backbone
        assert (backbone.type, backbone.depth, backbone.sa_type) == ('SAN', int(depth), sa_type)
        assert backbone.out_indices == (1, 2, 3, 4)
        assert cfg.model.neck.in_channels == [256, 512, 1024, 2048]
        # _delete_: none of ResNet's arguments left over
        assert not {'num_stages', 'style', 'norm_cfg'} & set(backbone)


def test_sasa_r50_se_config():
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    cfg = _load('retinanet_sasa-r50-se_fpn_1x_coco.py')
    init_default_scope('mmdet')
    backbone = MODELS.build(cfg.model.backbone)
    assert isinstance(backbone, SASAResNet)
    assert sum(isinstance(m, SEPlugin) for m in backbone.modules()) == 16


@pytest.mark.parametrize('name', ['retinanet_san-tiny-pairwise_shapes.py',
                                  'retinanet_san-tiny-patchwise_shapes.py'])
def test_demo_configs_share_the_twins_data_and_schedule(name):
    cfg = _load(name)
    twin = Config.fromfile(osp.join(CONFIG_DIR, '..', 'demo', 'retinanet_r-tiny_shapes.py'))
    assert cfg.model.backbone.type == 'SAN'
    for key in ('train_dataloader', 'val_dataloader', 'param_scheduler', 'optim_wrapper',
                'train_cfg'):
        assert cfg[key] == twin[key], key
    assert cfg.model.bbox_head == twin.model.bbox_head


def _classifier_key(path):
    match = CLASSIFIER.fullmatch(osp.basename(path))
    assert match, f'{osp.basename(path)} does not follow mmpretrain names'
    return match.groups()


def _build_classifier(cfg):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model)


def test_one_imagenet_config_per_san_model():
    assert sorted(map(_classifier_key, IMAGENET)) == sorted(OFFICIAL_PARAMS)


@pytest.mark.parametrize('path', IMAGENET, ids=osp.basename)
def test_imagenet_config_official_recipe_and_parameters(path):
    depth, sa_type = _classifier_key(path)
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmpretrain'
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.depth, backbone.sa_type) == ('mmdet.SAN', int(depth), sa_type)
    # hszhao/SAN config/imagenet/*.yaml: batch 256 on 8 GPUs, lr 0.1,
    # momentum 0.9, wd 1e-4, cosine over 100 epochs, label smoothing 0.1
    assert cfg.train_dataloader.batch_size * 8 == 256 == cfg.auto_scale_lr.base_batch_size
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.momentum,
            optimizer.weight_decay) == ('SGD', 0.1, 0.9, 1e-4)
    assert cfg.param_scheduler.type == 'CosineAnnealingLR'
    assert cfg.param_scheduler.end == cfg.train_cfg.max_epochs == 100
    loss = cfg.model.head.loss
    assert (loss.type, loss.label_smooth_val, loss.mode) == ('LabelSmoothLoss', 0.1, 'original')
    model = _build_classifier(cfg)
    assert isinstance(model.backbone, SAN)
    assert round(count_parameters(model) / 1e6, 1) == OFFICIAL_PARAMS[depth, sa_type]


def test_imagenet_config_trains_one_step():
    from mmpretrain.structures import DataSample

    cfg = Config.fromfile(IMAGENET[0])
    torch.manual_seed(0)
    model = _build_classifier(cfg)
    model.init_weights()
    model.train()
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    data = dict(inputs=[torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
                        for _ in range(2)],
                data_samples=[DataSample().set_gt_label(label) for label in (3, 999)])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    log_vars = model.train_step(data, optim_wrapper)
    assert math.isfinite(log_vars['loss'].item())
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith('head.fc.') for k in changed)
    assert any(k.startswith('backbone.layer0.blocks.0.sam.') for k in changed)
