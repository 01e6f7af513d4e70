"""The Table 1 ImageNet configs (configs/imagenet/): mmpretrain classifiers
around mmdet.SASAResNet with the paper's parameter counts and recipe; each
builds and trains one step on a tiny synthetic batch."""
import glob
import math
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

from sasa_mmdet.layers import AttentionStem, LocalSelfAttention2d
from sasa_mmdet.models import SASAResNet
from sasa_mmdet.utils import get_model_complexity

CONFIG_DIR = osp.join(osp.dirname(__file__), '..', 'configs', 'imagenet')
CONFIGS = sorted(glob.glob(osp.join(CONFIG_DIR, '*.py')))
NAME = re.compile(r'(resnet|sasa-resnet|sasa-attnstem-resnet)(26|38|50)'
                  r'_128xb32-warmup-coslr-130e_in1k\.py')

# Ramachandran et al. 2019, Table 1 (ImageNet, 224x224): params (M) with the
# 1000-way classifier, FLOPs (B), top-1 (%).
PAPER = {
    ('resnet', 26): (13.7, 4.7, 74.5),
    ('sasa-resnet', 26): (10.3, 4.5, 75.8),
    ('sasa-attnstem-resnet', 26): (10.3, 4.7, 74.8),
    ('resnet', 38): (19.6, 6.5, 76.2),
    ('sasa-resnet', 38): (14.1, 5.7, 77.1),
    ('sasa-attnstem-resnet', 38): (14.1, 6.1, 76.9),
    ('resnet', 50): (25.6, 8.2, 76.9),
    ('sasa-resnet', 50): (18.0, 7.0, 77.4),
    ('sasa-attnstem-resnet', 50): (18.0, 7.2, 77.6),
}
# Ours (README table): params (M), GFLOPs at 224x224.
OURS = {
    ('resnet', 26): (13.697, 4.685),
    ('sasa-resnet', 26): (10.343, 4.387),
    ('sasa-attnstem-resnet', 26): (10.335, 4.524),
    ('resnet', 38): (19.627, 6.431),
    ('sasa-resnet', 38): (14.191, 5.597),
    ('sasa-attnstem-resnet', 38): (14.183, 5.733),
    ('resnet', 50): (25.557, 8.178),
    ('sasa-resnet', 50): (18.039, 6.806),
    ('sasa-attnstem-resnet', 50): (18.031, 6.943),
}


def _key(path):
    match = NAME.fullmatch(osp.basename(path))
    assert match, f'{osp.basename(path)} does not follow mmpretrain names'
    return match.group(1), int(match.group(2))


def _build(cfg):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model)


def test_one_config_per_table_1_row():
    assert sorted(map(_key, CONFIGS)) == sorted(PAPER)


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_is_an_mmpretrain_classifier_with_the_paper_recipe(path):
    cfg = Config.fromfile(path)
    kind, depth = _key(path)
    assert cfg.default_scope == 'mmpretrain'
    assert cfg.custom_imports.imports == ['sasa_mmdet']
    backbone = cfg.model.backbone
    assert cfg.model.type == 'ImageClassifier'
    assert backbone.type == 'mmdet.SASAResNet'
    assert backbone.depth == depth
    assert backbone.out_indices == (3, )
    assert backbone.norm_eval is False and backbone.frozen_stages == -1
    assert backbone.stem_type == ('attention' if 'attnstem' in kind else
                                  'conv')
    assert backbone.stage_with_attention == (kind != 'resnet', ) * 4
    assert cfg.model.neck.type == 'GlobalAveragePooling'
    assert cfg.model.head.type == 'LinearClsHead'
    assert cfg.model.head.num_classes == 1000
    # the paper's appendix: batch 4096, Nesterov at 1.6, 10 warm-up epochs,
    # cosine to 130 epochs, weight EMA 0.9999
    assert cfg.train_dataloader.batch_size * 128 == 4096
    assert cfg.auto_scale_lr.base_batch_size == 4096
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.nesterov) == ('SGD', 1.6,
                                                                  True)
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end) == ('LinearLR', 0, 10)
    assert (cosine.type, cosine.begin, cosine.end,
            cosine.eta_min) == ('CosineAnnealingLR', 10, 130, 0.0)
    assert cfg.train_cfg.max_epochs == 130
    hooks = {hook.type: hook for hook in cfg.custom_hooks}
    assert hooks['EMAHook'].momentum == pytest.approx(1e-4)
    assert {'SafeCheckpointHook', 'EpochSeedHook'} <= set(hooks)
    # mmpretrain's ImageNet data pipeline (224 crops)
    assert cfg.train_dataloader.dataset.type == 'ImageNet'
    assert cfg.train_dataloader.dataset.pipeline[1] == dict(
        type='RandomResizedCrop', scale=224)


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_parameters_and_flops_match_table_1(path):
    kind, depth = _key(path)
    model = _build(Config.fromfile(path))
    assert isinstance(model.backbone, SASAResNet)
    assert type(model.head).__name__ == 'LinearClsHead'
    attention = [
        m for m in model.modules()
        if isinstance(m, LocalSelfAttention2d) and not m.pointwise
    ]
    assert bool(attention) == (kind != 'resnet')
    assert any(isinstance(m, AttentionStem)
               for m in model.modules()) == ('attnstem' in kind)
    info = get_model_complexity(model, (224, 224), detector=False)
    total = info['components'][-1]
    params, flops = total['params'] / 1e6, total['flops'] / 1e9
    paper_params, paper_flops, _ = PAPER[kind, depth]
    # the paper's one-decimal figures; ResNet-38 with attention is 14.19M
    # here against its 14.1 (the same layers match at depth 26 and 50)
    assert abs(params - paper_params) < 0.1
    assert params == pytest.approx(OURS[kind, depth][0], abs=5e-4)
    assert flops == pytest.approx(OURS[kind, depth][1], abs=1e-3)
    # below the paper where attention is counted (see README), never above
    assert flops <= paper_flops + 0.05


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_trains_one_step_on_a_tiny_batch(path):
    from mmpretrain.structures import DataSample

    cfg = Config.fromfile(path)
    torch.manual_seed(0)
    model = _build(cfg)
    model.init_weights()
    model.train()
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    # the config's lr is for 4096 images; a small one keeps the step sane
    for group in optim_wrapper.param_groups:
        group['lr'] = 0.01
    data = dict(
        inputs=[
            torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
            for _ in range(2)
        ],
        data_samples=[DataSample().set_gt_label(label) for label in (3, 999)])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    # what model.train_step does, with a look at the gradients in between
    batch = model.data_preprocessor(data, True)
    losses = model(**batch, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert math.isfinite(loss.item())
    optim_wrapper.backward(loss)
    params = dict(model.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in params.values())
    # gradients reach the classifier, the stem and the last stage (whose
    # blocks start as identities: zero-initialised last BN gamma)
    stem = 'backbone.stem.' if 'attnstem' in path else 'backbone.conv1.'
    for prefix in ('head.fc.', stem, 'backbone.layer4.2.bn3.'
                   if '50' in path else 'backbone.layer4.0.bn3.'):
        assert any(
            p.grad.abs().sum() > 0 for k, p in params.items()
            if k.startswith(prefix)), prefix
    optim_wrapper.step()
    assert all(not torch.equal(before[k], params[k]) for k in params
               if k.startswith(('head.fc.', stem)))
