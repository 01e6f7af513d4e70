"""The hand-off from an mmpretrain classifier to detection: a classifier
checkpoint fills every backbone tensor of the detection demo's pretrained
config and of every Table 2 pretrained variant (configs/sasa/*-in1k-pre_*), checked
tensor by tensor, and a classifier whose backbone does not fit is refused
with the tensors named."""
import glob
import logging
import os.path as osp
import re

import pytest
import torch
from mmdet.registry import MODELS as DET_MODELS
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope

from sasa_mmdet.engine import CheckpointMismatchError
from sasa_mmdet.models import PretrainedMismatchError, SASAResNet

ROOT = osp.join(osp.dirname(__file__), '..', '..')
DEMO_CLS = osp.join(ROOT, 'configs', 'demo',
                    'sasa-tiny_1xb32-6e_shape-classes.py')
DEMO_DET = osp.join(ROOT, 'configs', 'demo', 'retinanet_sasa-tiny_shapes.py')
DEMO_PRE = osp.join(ROOT, 'configs', 'demo',
                    'retinanet_sasa-tiny-shapes-pre_12e_shapes.py')
DEMO_SCRATCH = osp.join(ROOT, 'configs', 'demo',
                        'retinanet_sasa-tiny_12e_shapes.py')
PRETRAINED = sorted(
    glob.glob(osp.join(ROOT, 'configs', 'sasa', '*-in1k-pre_*.py')))
TABLE_2 = [
    'sasa/retinanet_r50_fpn_1x_coco.py', 'sasa/retinanet_sasa-r50_fpn_1x_coco.py',
    'sasa/retinanet_sasa-attnstem-r50_fpn_1x_coco.py',
    'sasa/retinanet_sasa-r50_sasa-fpn-head_1x_coco.py',
    'sasa/retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py'
]


class _Records(logging.Handler):

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _classifier(cfg):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model)


def _classifier_checkpoint(cfg, path, seed=0):
    """Save the classifier of ``cfg`` with every tensor (weights, BN
    statistics and counters) set to distinct random values, as a runner
    checkpoint; return its state dict."""
    model = _classifier(cfg)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randint(
                1, 1000, value.shape, generator=generator, dtype=value.dtype)
    torch.save(dict(meta=dict(epoch=1), state_dict=state), path)
    return state


def _detector(path, checkpoint, **backbone):
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg.checkpoint = str(checkpoint)
    cfg.model.backbone.update(backbone)
    with DefaultScope.overwrite_default_scope('mmdet'):
        return DET_MODELS.build(cfg.model)


def _init_and_log(model):
    records = _Records()
    logger = MMLogger.get_current_instance()
    logger.addHandler(records)
    try:
        model.init_weights()
    finally:
        logger.removeHandler(records)
    return records.messages


def _check_every_tensor_filled(detector, state, messages):
    own = detector.backbone.state_dict()
    given = {
        key[len('backbone.'):]: value
        for key, value in state.items() if key.startswith('backbone.')
    }
    assert set(own) == set(given)
    for key, value in own.items():
        assert torch.equal(value, given[key]), key
    assert any(
        re.search(rf'SASAResNet: all {len(own) - n_counters(own)} tensors '
                  r'loaded from \S+ \(prefix .backbone\..\)', m)
        for m in messages), messages


def n_counters(state):
    return sum(key.endswith('num_batches_tracked') for key in state)


def test_demo_classifier_backbone_is_the_detection_demo_backbone():
    cls = Config.fromfile(DEMO_CLS).model.backbone
    det = Config.fromfile(DEMO_DET).model.backbone
    for key in ('depth', 'base_channels', 'stem_type', 'stage_with_attention',
                'attention_cfg', 'norm_cfg', 'style', 'num_stages'):
        assert cls.get(key, det[key]) == det[key], key
    assert (cls.type, det.type) == ('mmdet.SASAResNet', 'SASAResNet')
    assert (cls.out_indices, cls.norm_eval, cls.frozen_stages) == ((3, ),
                                                                   False, -1)


def test_demo_pretrained_and_scratch_configs_differ_only_in_the_start():
    pre, scratch = Config.fromfile(DEMO_PRE), Config.fromfile(DEMO_SCRATCH)
    for key in ('train_cfg', 'param_scheduler', 'optim_wrapper',
                'train_dataloader', 'val_dataloader', 'test_cfg'):
        assert pre[key] == scratch[key], key
    assert pre.train_cfg.max_epochs == 12
    scratch_model, pre_model = scratch.model.to_dict(), pre.model.to_dict()
    pre_backbone = pre_model.pop('backbone')
    scratch_backbone = scratch_model.pop('backbone')
    assert pre_model == scratch_model
    assert scratch_backbone['init_cfg'] is None
    assert (scratch_backbone['frozen_stages'],
            scratch_backbone['norm_eval']) == (-1, False)
    assert pre_backbone['init_cfg'] == dict(
        type='Pretrained',
        prefix='backbone.',
        checkpoint='work_dirs/pretrain_demo/'
        'sasa-tiny_1xb32-6e_shape-classes/epoch_6.pth')
    assert (pre_backbone['frozen_stages'], pre_backbone['norm_eval'],
            pre_backbone['strict_pretrained']) == (1, True, True)


def test_demo_classifier_fills_every_tensor_of_the_demo_detector(tmp_path):
    ckpt = tmp_path / 'classifier.pth'
    state = _classifier_checkpoint(Config.fromfile(DEMO_CLS), ckpt)
    detector = _detector(DEMO_PRE, ckpt)
    messages = _init_and_log(detector)
    _check_every_tensor_filled(detector, state, messages)
    # as a pretrained mmdet ResNet: stem and stage 1 frozen, BN frozen
    detector.train()
    backbone = detector.backbone
    frozen = [backbone.conv1, backbone.bn1, backbone.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert not any(m.training for m in backbone.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize('path', PRETRAINED, ids=osp.basename)
def test_table_2_variant_is_filled_by_its_imagenet_classifier(
        path, tmp_path):
    cfg = Config.fromfile(path)
    backbone = cfg.model.backbone
    assert backbone.type == 'SASAResNet'
    assert (backbone.frozen_stages, backbone.norm_eval,
            backbone.strict_pretrained) == (1, True, True)
    init_cfg = backbone.init_cfg
    assert (init_cfg.type, init_cfg.prefix) == ('Pretrained', 'backbone.')
    # the checkpoint path names the configs/imagenet config that writes it
    match = re.fullmatch(r'work_dirs/(.+)/epoch_130\.pth', init_cfg.checkpoint)
    assert match, init_cfg.checkpoint
    imagenet = osp.join(ROOT, 'configs', 'imagenet', match.group(1) + '.py')
    assert osp.isfile(imagenet)

    ckpt = tmp_path / 'classifier.pth'
    state = _classifier_checkpoint(Config.fromfile(imagenet), ckpt)
    detector = _detector(path, ckpt)
    messages = _init_and_log(detector)
    _check_every_tensor_filled(detector, state, messages)


def test_every_table_2_config_has_a_pretrained_variant():
    bases = set()
    for path in PRETRAINED:
        with open(path) as f:
            bases |= set(re.findall(r"_base_ = '\./([^']+)'", f.read()))
    assert {osp.basename(name) for name in TABLE_2} <= bases


def test_pretrained_variant_differs_from_its_base_only_in_the_start():
    for path in PRETRAINED:
        with open(path) as f:
            base = re.search(r"_base_ = '(\./[^']+)'", f.read()).group(1)
        pre = Config.fromfile(path).model.to_dict()
        ref = Config.fromfile(osp.join(osp.dirname(path), base)).model.to_dict()
        pre_backbone, ref_backbone = pre.pop('backbone'), ref.pop('backbone')
        assert pre == ref, path
        for key in ('init_cfg', 'frozen_stages', 'norm_eval',
                    'strict_pretrained', 'type', 'stem_type',
                    'stage_with_attention'):
            pre_backbone.pop(key, None)
            ref_backbone.pop(key, None)
        assert pre_backbone == ref_backbone, path


@pytest.mark.parametrize(
    'classifier,backbone,named',
    [
        # a conv-stem classifier into an attention-stem detector
        (dict(), dict(stem_type='attention', stem_cfg=dict(num_heads=2)),
         ('stem.attention', 'conv1.weight')),
        # another window size: the position tables differ in shape
        (dict(attention_cfg=dict(window_size=3, num_heads=4)), dict(),
         ('layer1.0.conv1.rel_',)),
        # a classifier without attention into the attention detector
        (dict(stage_with_attention=(False, ) * 4), dict(),
         ('layer1.0.conv1.qkv_weight', 'layer1.0.conv1.weight')),
    ],
    ids=['stem', 'window', 'conv-classifier'])
def test_a_classifier_that_does_not_fit_is_refused(tmp_path, classifier,
                                                   backbone, named):
    cfg = Config.fromfile(DEMO_CLS)
    cfg.model.backbone.update(classifier)
    ckpt = tmp_path / 'classifier.pth'
    state = _classifier_checkpoint(cfg, ckpt)
    detector = _detector(DEMO_PRE, ckpt, **backbone)
    with pytest.raises(PretrainedMismatchError) as error:
        detector.init_weights()
    message = str(error.value)
    assert 'strict_pretrained=True' in message and str(ckpt) in message
    for name in named:
        assert name in message, (name, message)
    assert isinstance(error.value, CheckpointMismatchError)
    assert error.value.missing or error.value.mismatched
    # refused before anything was copied: no tensor holds the checkpoint's
    # values, also where names and shapes agree
    shared = [(value, state['backbone.' + key])
              for key, value in detector.backbone.state_dict().items()
              if 'backbone.' + key in state
              and state['backbone.' + key].shape == value.shape
              and not key.endswith('num_batches_tracked')]
    assert shared
    assert not any(torch.equal(own, given) for own, given in shared)


def test_a_checkpoint_without_the_backbone_prefix_is_refused(tmp_path):
    ckpt = tmp_path / 'backbone_only.pth'
    model = SASAResNet(depth=18, base_channels=16)
    torch.save(model.state_dict(), ckpt)
    detector = _detector(DEMO_PRE, ckpt)
    with pytest.raises(AssertionError, match='backbone. is not in'):
        detector.init_weights()


def test_partial_load_stays_possible_without_strict_pretrained(tmp_path):
    cfg = Config.fromfile(DEMO_CLS)
    cfg.model.backbone.stage_with_attention = (False, ) * 4
    ckpt = tmp_path / 'conv_classifier.pth'
    state = _classifier_checkpoint(cfg, ckpt)
    detector = _detector(DEMO_PRE, ckpt, strict_pretrained=False)
    messages = _init_and_log(detector)
    assert any('start fresh' in m for m in messages)
    torch.testing.assert_close(detector.backbone.conv1.weight,
                               state['backbone.conv1.weight'])


def test_strict_pretrained_must_be_a_bool():
    with pytest.raises(ValueError, match='strict_pretrained'):
        SASAResNet(depth=18, base_channels=8, strict_pretrained='yes')
