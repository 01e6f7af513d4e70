import json
import os.path as osp
import runpy
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from sasa_mmdet.layers import AttentionStem, LocalSelfAttention2d
from sasa_mmdet.utils import (ImageClassifier, build_model_from_cfg,
                              count_multiply_adds, count_parameters,
                              format_complexity, get_model_complexity,
                              parse_shape)

ROOT = osp.join(osp.dirname(__file__), '..', '..')
CONFIGS = osp.join(ROOT, 'configs')
TOOL = osp.join(ROOT, 'tools', 'analysis_tools', 'get_flops.py')


def by_name(info):
    return {c['name']: c for c in info['components']}


def test_counts_conv_and_linear_by_hand():
    model = nn.Sequential()
    model.add_module('stem', nn.Conv2d(3, 8, 3, stride=2, padding=1))
    model.add_module('mix', nn.Conv2d(8, 8, 3, padding=1, groups=4))
    model.add_module('pool', nn.AdaptiveAvgPool2d(1))
    model.add_module('flat', nn.Flatten())
    model.add_module('fc', nn.Linear(8, 5))
    info = get_model_complexity(model, (9, 7))
    parts = by_name(info)
    # 9 x 7 -> 5 x 4 outputs, 8 channels, 3 * 3 * 3 taps each.
    assert parts['stem']['multiply_adds'] == 5 * 4 * 8 * 27
    # groups=4: 2 input channels per output channel.
    assert parts['mix']['multiply_adds'] == 5 * 4 * 8 * 2 * 9
    assert parts['fc']['multiply_adds'] == 8 * 5
    assert 'pool' not in parts  # no parameters, no multiply-adds
    total = parts['total']
    assert total['multiply_adds'] == 4320 + 2880 + 40
    assert total['flops'] == 2 * total['multiply_adds']
    assert total['params'] == count_parameters(model) == \
        (8 * 27 + 8) + (8 * 18 + 8) + (8 * 5 + 5)
    assert info['input_shape'] == (1, 3, 9, 7)


def test_attention_layers_counted_by_their_multiply_adds():
    attention = LocalSelfAttention2d(
        8, 16, 3, stride=2, padding=1, num_heads=2, window_size=5)
    pointwise = LocalSelfAttention2d(16, 4, 1)
    stem = AttentionStem(3, 8, num_heads=2)
    model = nn.Sequential(stem, attention, pointwise)
    macs = count_multiply_adds(model, lambda: model(torch.rand(1, 3, 41, 30)))
    # stem: full resolution; then 11 x 8 after its 4x4 pool.
    assert macs['0'] == stem.multiply_adds((1, 3, 41, 30)) > 0
    assert macs['1'] == attention.multiply_adds((1, 8, 11, 8))
    assert macs['2'] == pointwise.multiply_adds((1, 16, 6, 4)) == \
        6 * 4 * 16 * 4
    assert macs['total'] == macs['0'] + macs['1'] + macs['2']


def test_multiply_adds_owner_is_a_leaf():

    class Counted(nn.Module):
        """Owns a conv but counts itself."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(x)

        def multiply_adds(self, input_shape):
            return 7

    model = nn.Sequential(Counted(), nn.Conv2d(2, 3, 1))
    macs = count_multiply_adds(model, lambda: model(torch.rand(1, 2, 2, 2)))
    assert macs['0'] == 7  # the inner conv is not counted again
    assert macs['1'] == 4 * 3 * 2
    # hooks are removed afterwards
    assert all(not m._forward_hooks for m in model.modules())


def test_calls_counted_each_time():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)

    class Twice(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Twice()
    macs = count_multiply_adds(model, lambda: model(torch.rand(1, 1, 4, 4)))
    assert macs['conv'] == 2 * 16 * 9


@pytest.mark.parametrize('shape', [[], [1, 2, 3], [0], [-4, 4], [2.5]])
def test_parse_shape_invalid(shape):
    with pytest.raises(ValueError):
        parse_shape(shape)


def test_parse_shape():
    assert parse_shape([224]) == (224, 224)
    assert parse_shape([640, 480]) == (640, 480)


def test_detector_components_and_table(tmp_path):
    cfg = Config.fromfile(osp.join(CONFIGS, 'sasa/retinanet_sasa-r50_fpn_1x_coco.py'))
    cfg.model.backbone.update(
        depth=26, base_channels=8, attention_cfg=dict(num_heads=2))
    cfg.model.neck.update(in_channels=[32, 64, 128, 256], out_channels=16)
    cfg.model.bbox_head.update(in_channels=16, feat_channels=16)
    model = build_model_from_cfg(cfg)
    info = get_model_complexity(model, (96, 64))
    parts = by_name(info)
    assert list(parts) == ['backbone', 'neck', 'bbox_head', 'total']
    assert sum(parts[n]['params'] for n in ('backbone', 'neck', 'bbox_head')) \
        == parts['total']['params'] == count_parameters(model)
    assert sum(parts[n]['multiply_adds']
               for n in ('backbone', 'neck', 'bbox_head')) == \
        parts['total']['multiply_adds']
    # The backbone's attention is counted: its 3x3-free stages differ from
    # a conv count only by the attention layers' own multiply-adds.
    attention = [
        m for m in model.backbone.modules()
        if isinstance(m, LocalSelfAttention2d) and not m.pointwise
    ]
    assert attention and parts['backbone']['multiply_adds'] > 0
    table = format_complexity(info, 'demo')
    for name in ('backbone', 'neck', 'bbox_head', 'total', '1x3x96x64'):
        assert name in table


def test_image_classifier():
    from mmdet.models.backbones import ResNet
    model = ImageClassifier(ResNet(18, base_channels=8), 10)
    assert model.fc.in_features == 64
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)

    class NoFeatDim(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2)

        def forward(self, x):
            return (x, self.conv(x))

    model = ImageClassifier(NoFeatDim(), 3)
    assert model.fc.in_features == 6


# (config, paper params in M, paper GFLOPs) for ResNet-50 + 1000-way fc at
# 224 x 224 (the paper's Table 1; FLOPs = 2 x multiply-adds).
RESNET50 = [
    ('sasa/retinanet_r50_fpn_1x_coco.py', 25.6, 8.2),
    ('sasa/retinanet_sasa-r50_fpn_1x_coco.py', 18.0, 7.0),
    ('sasa/retinanet_sasa-attnstem-r50_fpn_1x_coco.py', 18.0, 7.2),
]


@pytest.mark.parametrize('config,params,gflops', RESNET50)
def test_resnet50_classifier_matches_paper(config, params, gflops):
    cfg = Config.fromfile(osp.join(CONFIGS, config))
    model = build_model_from_cfg(cfg, classifier=1000)
    info = get_model_complexity(model, (224, 224))
    total = by_name(info)['total']
    assert abs(total['params'] / 1e6 - params) < 0.1
    assert abs(total['flops'] / 1e9 - gflops) < 0.05 * gflops


@pytest.mark.slow
def test_retinanet_baseline_flops_and_the_paper():
    """mmdet's conv RetinaNet (P6 from P5) against Table 2's 182 B / 33.4M.

    At 640 x 640 it counts 189.87 GFLOPs and 33.84M parameters. Both gaps
    close together if the paper's prediction layers (3x3 convs, 256 in)
    had 6 anchors x 90 classes (TensorFlow's COCO label ids) where mmdet
    has 9 x 80: 442,368 fewer weights per position, over the 8,525 anchor
    positions of P3-P7 at 640 x 640.
    """
    cfg = Config.fromfile(
        osp.join(CONFIGS, 'sasa/retinanet_r50_fpn_1x_coco.py'))
    info = get_model_complexity(build_model_from_cfg(cfg), (640, 640))
    total = by_name(info)['total']
    assert total['params'] == 33_839_924
    assert total['flops'] == 189_871_360_000
    per_position = (256 * 9 * 9 * 84) - (256 * 9 * 6 * 94)
    positions = sum((640 // s)**2 for s in (8, 16, 32, 64)) + 5 * 5
    assert (per_position, positions) == (442_368, 8_525)
    paper_flops = total['flops'] - 2 * per_position * positions
    assert abs(paper_flops / 1e9 - 182) < 0.5
    paper_params = total['params'] - per_position - (9 * 84 - 6 * 94)
    assert round(paper_params / 1e5) == 334


def test_tool_cli_classifier(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'complexity.json'
    config = osp.join(CONFIGS, 'sasa/retinanet_r50_fpn_1x_coco.py')
    monkeypatch.setattr(sys, 'argv', [
        TOOL, config, '--classifier', '1000', '--json',
        str(out), '--cfg-options', 'model.backbone.depth=18'
    ])
    runpy.run_path(TOOL, run_name='__main__')
    printed = capsys.readouterr().out
    # --classifier defaults to ImageNet's 224 x 224.
    assert '1000-way classifier' in printed and '1x3x224x224' in printed
    info = json.loads(out.read_text())
    parts = by_name(info)
    # ResNet-18 + 1000-way fc: torchvision's 11,689,512 parameters.
    assert parts['total']['params'] == 11_689_512
    assert list(parts) == ['backbone', 'fc', 'total']
    # ResNet-18's well-known 1.81 G multiply-adds.
    assert abs(parts['total']['multiply_adds'] / 1e9 - 1.814) < 0.001
    assert parts['fc']['multiply_adds'] == 512 * 1000


def test_tool_cli_invalid(capsys, monkeypatch):
    config = osp.join(CONFIGS, 'sasa/retinanet_r50_fpn_1x_coco.py')
    monkeypatch.setattr(sys, 'argv', [TOOL, config, '--shape', '1', '2', '3'])
    with pytest.raises(ValueError):
        runpy.run_path(TOOL, run_name='__main__')
