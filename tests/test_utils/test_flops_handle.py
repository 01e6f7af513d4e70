"""mmengine's FLOP counter (what MMDetection's get_flops.py uses) counts the
attention layers' multiply-adds once sasa_mmdet is imported."""
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer, get_model_complexity_info
from mmengine.config import Config

from sasa_mmdet import AttentionStem, LocalSelfAttention2d
from sasa_mmdet.utils import build_model_from_cfg, get_model_complexity
from sasa_mmdet.utils.mmengine_flops import register_mmengine_flop_counting

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(ROOT, 'configs', 'demo', 'retinanet_sasa-tiny_shapes.py')


def _unpatched(model, inputs):
    """mmengine's own count, without the module handle."""
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return sum(FlopAnalyzer._analyze.__wrapped__(analyzer).counts[''].values())


def _mmengine_flops(model, inputs):
    info = get_model_complexity_info(model, inputs=inputs, show_table=False,
                                     show_arch=False)
    return info['flops']


def _ours(model, shape):
    return next(c for c in get_model_complexity(model, shape)['components']
                if c['name'] == 'total')['multiply_adds']


def test_registered_on_import_and_only_once():
    import sasa_mmdet  # noqa: F401

    assert getattr(FlopAnalyzer._analyze, '_sasa_mmdet_module_handles', False)
    assert register_mmengine_flop_counting() is False


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(stride=2, window_size=(5, 3), dilation=(1, 2)),
    dict(position_encoding='absolute', logits='qr'),
    dict(position_encoding='none'),
])
def test_layer_counts_its_multiply_adds(kwargs):
    layer = LocalSelfAttention2d(8, 16, 3, num_heads=2, **kwargs).eval()
    x = torch.randn(1, 8, 9, 11)
    assert _mmengine_flops(layer, (x, )) == layer.multiply_adds(tuple(x.shape))
    # what mmengine counted before: the projections' bmm and the q.r einsum
    # only, not the window products
    assert _unpatched(layer, (x, )) < 0.8 * layer.multiply_adds(tuple(x.shape))


def test_per_module_counts_and_shared_modules():
    """Each call of a shared layer counts (a head over pyramid levels), ops
    inside the layer are not counted twice, other ops are left alone."""

    class Net(nn.Module):

        def __init__(self):
            super().__init__()
            self.stem = AttentionStem(3, 8, num_heads=2)
            self.attn = LocalSelfAttention2d(8, 8, 3, num_heads=2)
            self.conv = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.conv(self.attn(self.attn(x)))

    net = Net().eval()
    x = torch.randn(1, 3, 16, 12)
    analyzer = FlopAnalyzer(net, (x, ))
    by_module = analyzer.by_module()
    stem = net.stem.multiply_adds((1, 3, 16, 12))
    attn = net.attn.multiply_adds((1, 8, 4, 3))
    assert by_module['stem'] == by_module['stem.attention'] == stem
    # inside a counted module: not counted again
    assert by_module[f'stem.{net.stem.norm_name}'] == 0
    assert by_module['attn'] == 2 * attn
    assert by_module['conv'] == 4 * 3 * 8 * 4
    assert by_module[''] == stem + 2 * attn + 4 * 3 * 8 * 4
    assert analyzer.by_operator()['LocalSelfAttention2d'] == 2 * attn
    assert analyzer.unsupported_ops() == {}


@pytest.mark.parametrize('config,shape', [
    ('demo/retinanet_sasa-tiny_shapes.py', (160, 160)),
    # attention stem, backbone, FPN and shared heads
    ('sasa/retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py', (64, 64)),
    ('sasa/retinanet_r50_fpn_1x_coco.py', (64, 64)),
])
def test_detector_count_agrees_with_ours(config, shape):
    model = build_model_from_cfg(Config.fromfile(osp.join(ROOT, 'configs', config))).eval()
    ours = _ours(model, shape)
    x = torch.zeros(1, 3, *shape)
    analyzer = FlopAnalyzer(model, (x, ))  # what get_model_complexity_info reports
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    theirs = analyzer.total()
    # mmengine also counts norms and upsampling, which we (the paper) do not
    assert ours <= theirs <= 1.02 * ours, (ours, theirs)
    if config.startswith('demo'):  # without the handle the attention is missed
        assert _unpatched(model, (x, )) < 0.9 * ours


@pytest.mark.slow
def test_mmdet_get_flops_tool_on_the_demo_config(tmp_path):
    """MMDetection's own tools/analysis_tools/get_flops.py, as shipped."""
    import mmdet

    from sasa_mmdet.datasets import generate_synthetic_shapes

    tool = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'analysis_tools',
                    'get_flops.py')
    generate_synthetic_shapes(str(tmp_path), num_train=1, num_val=1, size=160)
    env = dict(os.environ, SASA_DEMO_DATA_ROOT=str(tmp_path))
    result = subprocess.run(
        [sys.executable, tool, DEMO, '--num-images', '1', '--cfg-options',
         'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False'],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r'Flops: ([\d.]+)([KMG])', result.stdout)
    assert match, result.stdout
    flops = float(match.group(1)) * {'K': 1e3, 'M': 1e6, 'G': 1e9}[match.group(2)]
    assert 'Input shape: (160, 160)' in result.stdout
    ours = _ours(build_model_from_cfg(Config.fromfile(DEMO)), (160, 160))
    assert abs(flops - ours) <= 0.02 * ours, (flops, ours)
