"""The bundled demo configs (configs/demo/) build and train end to end.

Each config trains one short epoch on a tiny generated shapes dataset and is
evaluated with its own COCO metric; ``tools/run_demo.sh`` itself (minutes)
is not run here.
"""
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from sasa_mmdet.datasets import generate_synthetic_shapes
from sasa_mmdet.layers import LocalSelfAttention2d

CONFIG_DIR = osp.join(osp.dirname(osp.dirname(__file__)), 'configs', 'demo')
ATTENTION = osp.join(CONFIG_DIR, 'retinanet_sasa-tiny_shapes.py')
CONV = osp.join(CONFIG_DIR, 'retinanet_r-tiny_shapes.py')
ATTENTION_ALL = osp.join(CONFIG_DIR,
                         'retinanet_sasa-tiny_shapes_sasa-fpn_sasa-head.py')


@pytest.fixture(scope='module')
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    generate_synthetic_shapes(str(root), num_train=6, num_val=2, size=96)
    return str(root)


def _load(path, data_root, monkeypatch):
    # the configs read the dataset folder from this variable when parsed
    monkeypatch.setenv('SASA_DEMO_DATA_ROOT', data_root)
    return Config.fromfile(path)


def test_data_root_follows_the_environment(tiny_shapes, monkeypatch):
    for path in (ATTENTION, CONV, ATTENTION_ALL):
        cfg = _load(path, tiny_shapes, monkeypatch)
        assert cfg.train_dataloader.dataset.data_root == tiny_shapes + '/'
        assert cfg.val_evaluator.ann_file == osp.join(
            tiny_shapes, 'annotations', 'val.json')
        assert cfg.custom_imports.imports == ['sasa_mmdet']
        # weights-only checkpoints and exact resume also through mmdet's own
        # tools/train.py
        assert dict(type='SafeCheckpointHook') in cfg.custom_hooks
        assert dict(type='EpochSeedHook') in cfg.custom_hooks


@pytest.mark.parametrize(
    'path,types',
    [(ATTENTION, ('SASAResNet', 'FPN', 'RetinaHead')),
     (ATTENTION_ALL, ('SASAResNet', 'SASAFPN', 'SASARetinaHead'))],
    ids=['attention-backbone', 'attention-all'])
def test_twins_differ_only_in_the_module_types(path, types, tiny_shapes,
                                               monkeypatch):
    attn = _load(path, tiny_shapes, monkeypatch)
    conv = _load(CONV, tiny_shapes, monkeypatch)
    assert (attn.model.backbone.type, attn.model.neck.type,
            attn.model.bbox_head.type) == types
    assert (conv.model.backbone.type, conv.model.neck.type,
            conv.model.bbox_head.type) == ('ResNet', 'FPN', 'RetinaHead')
    for part, keys in [('backbone', ('depth', 'base_channels')),
                       ('neck', ('in_channels', 'out_channels',
                                 'add_extra_convs', 'num_outs')),
                       ('bbox_head', ('num_classes', 'stacked_convs',
                                      'feat_channels', 'norm_cfg',
                                      'anchor_generator'))]:
        for key in keys:
            assert attn.model[part][key] == conv.model[part][key], (part, key)
    for key in ('train_cfg', 'optim_wrapper', 'param_scheduler',
                'train_dataloader', 'val_dataloader', 'test_cfg'):
        assert attn[key] == conv[key], key


@pytest.mark.parametrize(
    'path,expect_attention', [(ATTENTION, True), (CONV, False),
                              (ATTENTION_ALL, True)],
    ids=['attention', 'conv', 'attention-all'])
def test_demo_config_trains_and_evaluates(path, expect_attention, tiny_shapes,
                                          tmp_path, monkeypatch):
    cfg = _load(path, tiny_shapes, monkeypatch)
    cfg.work_dir = str(tmp_path)
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 1
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.batch_size = 2
        loader.num_workers = 0
        loader.persistent_workers = False
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 1
    cfg.default_hooks.visualization.draw = False

    runner = Runner.from_cfg(cfg)
    has_attention = any(
        isinstance(m, LocalSelfAttention2d) for m in runner.model.modules())
    assert has_attention == expect_attention

    before = {k: v.detach().clone()
              for k, v in runner.model.named_parameters()}
    runner.train()
    ckpt = osp.join(str(tmp_path), 'epoch_1.pth')
    assert 'state_dict' in torch.load(ckpt, weights_only=True)
    # every parameter moved: the whole network receives gradients
    frozen = [k for k, v in runner.model.named_parameters()
              if torch.equal(v.detach(), before[k])]
    assert not frozen, frozen

    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert all(math.isfinite(x) for x in losses) and len(losses) >= 2

    metrics = runner.val_loop.run()
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
