"""tools/benchmark.py: its table, JSON and plot, and its argument errors.

Times are not asserted (no wall-clock thresholds in tests); the structure
and the ratios' arithmetic are.
"""
import json
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BENCHMARK = osp.join(ROOT, 'tools', 'benchmark.py')


def _run(*args):
    return subprocess.run([sys.executable, BENCHMARK, *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.slow
def test_layers_and_models_beside_the_convolution(tmp_path):
    config = 'configs/retinanet_sasa_r50_sasa-fpn_sasa-head.py'
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


@pytest.mark.parametrize('args,message', [
    (['--shapes', '16,9'], 'C,H,W'),
    (['--shapes', '16,0,4'], 'C,H,W'),
    (['--shapes', '16,8,8', '--preset', 'issue'], 'exclude'),
    (['--models', '--configs', 'configs/nope.py'], 'not among the Table 2 configs'),
])
def test_bad_arguments_are_named(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr
