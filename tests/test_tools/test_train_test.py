"""End-to-end runs of tools/train.py and tools/test.py on CPU with a tiny
RetinaNet on the synthetic shapes dataset (64x64 images)."""
import glob
import json
import math
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from sasa_mmdet.datasets import generate_synthetic_shapes

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(
    osp.dirname(osp.abspath(__file__)), 'data',
    'retinanet_r18_tiny_synthetic.py')
TRAIN = osp.join(REPO_ROOT, 'tools', 'train.py')
TEST = osp.join(REPO_ROOT, 'tools', 'test.py')
NUM_VAL = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    data_root = str(tmp_path_factory.mktemp('sasa_demo'))
    generate_synthetic_shapes(data_root, num_train=8, num_val=NUM_VAL, size=64)
    env = dict(os.environ, SASA_DEMO_DATA_ROOT=data_root, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
    return env


def _run(args, env, launcher=None):
    cmd = [sys.executable]
    if launcher:
        cmd += launcher
    proc = subprocess.run(
        cmd + args, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def _train_losses(work_dir):
    """Losses logged in ``work_dir/*/vis_data/scalars.json``."""
    losses = []
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')):
        with open(path) as f:
            losses += [
                json.loads(line)['loss'] for line in f if '"loss"' in line
            ]
    return losses


def test_train_resume_and_test(env, tmp_path):
    work_dir = str(tmp_path / 'work_dir')
    _run([TRAIN, CONFIG, '--work-dir', work_dir], env)
    ckpt1 = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt1)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt1) == []

    out = _run([
        TRAIN, CONFIG, '--work-dir', work_dir, '--resume', '--cfg-options',
        'train_cfg.max_epochs=2'
    ], env)
    assert 'resumed epoch: 1' in out
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
    # resuming from an explicit path works as well
    out = _run([
        TRAIN, CONFIG, '--work-dir', work_dir, '--resume', ckpt1,
        '--cfg-options', 'train_cfg.max_epochs=2'
    ], env)
    assert 'resumed epoch: 1' in out

    results = str(tmp_path / 'results.pkl')
    show_dir = 'painted'
    out = _run([
        TEST, CONFIG,
        osp.join(work_dir, 'epoch_2.pth'), '--work-dir', work_dir, '--out',
        results, '--show-dir', show_dir
    ], env)
    assert 'coco/bbox_mAP:' in out
    assert 'Average Precision' in out  # pycocotools' summary
    with open(results, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == NUM_VAL
    assert all('pred_instances' in p for p in predictions)
    painted = glob.glob(
        osp.join(work_dir, '*', show_dir, '**', '*.jpg'), recursive=True)
    assert len(painted) == NUM_VAL


def test_train_amp_on_cpu(env, tmp_path):
    work_dir = str(tmp_path / 'work_dir')
    out = _run([
        TRAIN, CONFIG, '--work-dir', work_dir, '--amp', '--cfg-options',
        'train_cfg.val_interval=2'
    ], env)
    assert 'BF16AmpOptimWrapper' in out
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    losses = _train_losses(work_dir)
    assert losses and all(math.isfinite(v) for v in losses)


def test_torchrun_two_processes(env, tmp_path):
    work_dir = str(tmp_path / 'work_dir')
    torchrun = [
        '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'
    ]
    out = _run(
        [TRAIN, CONFIG, '--work-dir', work_dir, '--launcher', 'pytorch'],
        env,
        launcher=torchrun)
    assert 'Distributed launcher: pytorch' in out
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)

    out = _run([TEST, CONFIG, ckpt, '--launcher', 'pytorch'],
               env,
               launcher=torchrun)
    assert 'coco/bbox_mAP:' in out
