"""tools/benchmark.py: its table, JSON and plot, and its argument errors.

Times are not asserted (no wall-clock thresholds in tests); the structure
and the ratios' arithmetic are.
"""
import importlib.util
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch

from sasa_mmdet.layers import local_attention_reference

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BENCHMARK = osp.join(ROOT, 'tools', 'benchmark.py')


def _run(*args):
    return subprocess.run([sys.executable, BENCHMARK, *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.slow
def test_layers_and_models_beside_the_convolution(tmp_path):
    config = 'configs/sasa/retinanet_sasa-r50_sasa-fpn-head_1x_coco.py'
    proc = _run('--shapes', '16,9,11', '--impls', 'cpp', 'cpp-recompute', 'torch',
                '--levers', '--configs', config, '--image-size', '64', '--repeats', '1',
                '--out', str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / 'benchmark.json').read_text())
    assert (tmp_path / 'benchmark.png').stat().st_size > 0
    rows = result['rows']
    assert [r['label'] for r in rows] == [
        'cpp (16, 9, 11)', 'cpp-recompute (16, 9, 11)', 'torch (16, 9, 11)',
        'train conv baseline, nothing frozen (reference)',
        'train conv baseline as configured (stem, stage 1 frozen)',
        'train attn all (conv stem)',
        'train attn all (conv stem), with_cp', 'train attn all (conv stem), recompute_attention',
        'infer conv baseline, nothing frozen (reference)', 'infer attn all (conv stem)'
    ]
    for r in rows:
        assert r['time_s'] > 0 and r['extra_mb'] >= 0
        assert r['time_ratio'] == pytest.approx(r['time_s'] / r['conv_time_s'])
        if r['kind'] == 'model':
            assert r['peak_ratio'] == pytest.approx(r['peak_mb'] / r['conv_peak_mb'])
    # the baseline is every model row's reference, in the same run
    train = [r for r in rows if r.get('mode') == 'train']
    assert all(r['conv_time_s'] == train[0]['time_s'] for r in train)
    assert train[0]['cfg_options'] == {'model.backbone.frozen_stages': -1,
                                       'model.backbone.norm_eval': False}
    assert train[3]['cfg_options']['model.neck.attention_cfg.with_cp'] is True
    for r in rows:
        assert r['label'] in proc.stdout


def _benchmark_module():
    spec = importlib.util.spec_from_file_location('benchmark', BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('window,dilation,size', [
    ((3, 3), (1, 1), (5, 7)), ((4, 5), (2, 1), (6, 9)), ((7, 7), (1, 1), (3, 4))])
def test_flex_attention_peer_is_exactly_the_sasa_layer(window, dilation, size):
    """The GPU benchmark's FlexAttention peer (block mask of the window,
    q.r as a score_mod) computes the reference's attention (eager, CPU)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, *size) for _ in range(3))
    rel_row, rel_col = torch.randn(window[0], 2, 2), torch.randn(window[1], 2, 2)
    out = _benchmark_module().flex_local_attention(q, k, v, window, dilation, rel_row, rel_col)
    torch.testing.assert_close(
        out, local_attention_reference(q, k, v, window, dilation, rel_row, rel_col))


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message without a GPU')
def test_cuda_benchmark_without_a_gpu_says_so():
    proc = _run('--device', 'cuda')
    assert proc.returncode == 2 and 'sees no CUDA device' in proc.stderr


@pytest.mark.parametrize('args,message', [
    (['--shapes', '16,9'], 'C,H,W'),
    (['--shapes', '16,0,4'], 'C,H,W'),
    (['--shapes', '16,8,8', '--preset', 'quick'], 'exclude'),
    (['--models', '--configs', 'configs/nope.py'], 'not among the Table 2 configs'),
    (['--dtypes', 'bfloat16'], 'CUDA only'),
])
def test_bad_arguments_are_named(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr
