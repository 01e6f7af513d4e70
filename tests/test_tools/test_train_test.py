"""End-to-end runs of tools/train.py and tools/test.py on CPU with a tiny
RetinaNet on the synthetic shapes dataset (64x64 images)."""
import glob
import json
import math
import os
import os.path as osp
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from sasa_mmdet.datasets import generate_synthetic_shapes

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DATA = osp.join(osp.dirname(osp.abspath(__file__)), 'data')
CONFIG = osp.join(DATA, 'retinanet_r18_tiny_synthetic.py')
# one image per process and per step, no random flip: see the file
CONFIG_B1 = osp.join(DATA, 'retinanet_r18_tiny_synthetic_b1.py')
TRAIN = osp.join(REPO_ROOT, 'tools', 'train.py')
TEST = osp.join(REPO_ROOT, 'tools', 'test.py')
NUM_VAL = 4
TORCHRUN = [
    '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'
]
# fixed seed, deterministic algorithms, 3 epochs (a checkpoint after each)
SEEDED = [
    '--cfg-options', 'randomness.seed=0', 'randomness.deterministic=True',
    'train_cfg.max_epochs=3'
]

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


def _logged_losses(work_dir, last_run_only=False):
    """``(iter, {loss name: value})`` of every training step logged in
    ``work_dir/<timestamp>/vis_data/scalars.json``, runs in time order."""
    paths = sorted(
        glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    steps = []
    for path in paths[-1:] if last_run_only else paths:
        with open(path) as f:
            for line in map(json.loads, f):
                if 'loss' in line:
                    steps.append((line['iter'], {
                        key: value
                        for key, value in line.items()
                        if key.startswith('loss')
                    }))
    return steps


def _checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _parameters(state_dict):
    """The learned tensors: BatchNorm's running statistics left out."""
    return {
        key: value
        for key, value in state_dict.items()
        if not key.endswith(('running_mean', 'running_var',
                             'num_batches_tracked'))
    }


@pytest.fixture(scope='module')
def seeded_run(env, tmp_path_factory):
    """An uninterrupted seeded, deterministic 3-epoch training."""
    work_dir = str(tmp_path_factory.mktemp('seeded_run'))
    _run([TRAIN, CONFIG, '--work-dir', work_dir] + SEEDED, env)
    return work_dir


def test_same_seed_gives_identical_losses(env, seeded_run, tmp_path):
    work_dir = str(tmp_path / 'work_dir')
    _run([TRAIN, CONFIG, '--work-dir', work_dir] + SEEDED, env)
    first, second = _logged_losses(seeded_run), _logged_losses(work_dir)
    assert len(first) > 3 and all(math.isfinite(v)
                                  for _, step in first
                                  for v in step.values())
    assert second == first  # exactly, every step and every loss term


def test_resume_after_sigkill_equals_uninterrupted_run(env, seeded_run,
                                                        tmp_path):
    work_dir = str(tmp_path / 'work_dir')
    pointer = osp.join(work_dir, 'last_checkpoint')
    proc = subprocess.Popen(
        [sys.executable, TRAIN, CONFIG, '--work-dir', work_dir] + SEEDED,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        # mmengine writes last_checkpoint once epoch_N.pth is complete
        while proc.poll() is None and not (osp.isfile(pointer)
                                           and osp.getsize(pointer) > 0):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended on its own'
    assert not osp.exists(osp.join(work_dir, 'epoch_3.pth'))

    out = _run([TRAIN, CONFIG, '--work-dir', work_dir, '--resume'] + SEEDED,
               env)
    assert re.search(r'resumed epoch: [12],', out)
    expected = _checkpoint(osp.join(seeded_run, 'epoch_3.pth'))
    resumed = _checkpoint(osp.join(work_dir, 'epoch_3.pth'))
    assert resumed['meta']['iter'] == expected['meta']['iter']
    assert resumed['state_dict'].keys() == expected['state_dict'].keys()
    differ = [
        key for key, value in expected['state_dict'].items()
        if not torch.equal(resumed['state_dict'][key], value)
    ]
    assert not differ
    for index, state in expected['optimizer']['state'].items():
        assert torch.equal(
            resumed['optimizer']['state'][index]['momentum_buffer'],
            state['momentum_buffer'])
    # every step after the resume logged the uninterrupted run's losses
    expected_losses = dict(_logged_losses(seeded_run))
    resumed_losses = _logged_losses(work_dir, last_run_only=True)
    assert resumed_losses
    assert all(step == expected_losses[it] for it, step in resumed_losses)


@pytest.fixture(scope='module')
def torchrun_run(env, tmp_path_factory):
    """2 torchrun processes training CONFIG_B1 (one image per process and
    step, 2 epochs): ``(work_dir, output)``."""
    work_dir = str(tmp_path_factory.mktemp('torchrun_run'))
    output = _run(
        [TRAIN, CONFIG_B1, '--work-dir', work_dir, '--launcher', 'pytorch'],
        env,
        launcher=TORCHRUN)
    return work_dir, output


def test_two_processes_equal_one_process_with_the_same_total_batch(
        env, torchrun_run, tmp_path):
    """2 torchrun processes with one image each per step against 1 process
    that accumulates the gradients of 2 one-image steps (the conditions are
    in CONFIG_B1 and the README)."""
    single, dist = str(tmp_path / 'single'), torchrun_run[0]
    _run([
        TRAIN, CONFIG_B1, '--work-dir', single, '--cfg-options',
        'optim_wrapper.accumulative_counts=2'
    ], env)

    # 2 epochs of 4 images. Rank 0 logs the losses of its own image: the
    # single process's steps 0, 2, 4, 6 (rank 1 trains on 1, 3, 5, 7).
    single_losses = [step for _, step in _logged_losses(single)]
    rank0_losses = [step for _, step in _logged_losses(dist)]
    assert len(single_losses) == 2 * len(rank0_losses) == 8
    for rank0, single_step in zip(rank0_losses, single_losses[0::2]):
        assert rank0.keys() == single_step.keys()
        for key, value in single_step.items():
            assert rank0[key] == pytest.approx(value, rel=1e-5, abs=1e-6)
    # the weights after 4 updates, which depend on both ranks' gradients
    expected = _parameters(
        _checkpoint(osp.join(single, 'epoch_2.pth'))['state_dict'])
    trained = _parameters(
        _checkpoint(osp.join(dist, 'epoch_2.pth'))['state_dict'])
    assert trained.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(
            trained[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_test_tool_refuses_a_checkpoint_that_does_not_fit(
        env, seeded_run, tmp_path):
    checkpoint = _checkpoint(osp.join(seeded_run, 'epoch_3.pth'))
    # a head trained for 4 classes instead of 3 (9 anchors per position)
    state_dict = checkpoint['state_dict']
    state_dict['bbox_head.retina_cls.weight'] = torch.zeros(36, 16, 3, 3)
    state_dict['bbox_head.retina_cls.bias'] = torch.zeros(36)
    ckpt = str(tmp_path / 'four_classes.pth')
    torch.save(checkpoint, ckpt)
    proc = subprocess.run([sys.executable, TEST, CONFIG, ckpt],
                          env=env,
                          cwd=REPO_ROOT,
                          capture_output=True,
                          text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'CheckpointMismatchError' in output
    assert ('bbox_head.retina_cls.weight: checkpoint (36, 16, 3, 3) vs '
            'model (27, 16, 3, 3)') in output
    assert 'bbox_head.retina_cls.bias: checkpoint (36,) vs model (27,)' \
        in output
    assert 'coco/bbox_mAP' not in output


def test_train_resume_and_test(env, seeded_run, tmp_path):
    # the training from scratch is the seeded run's; resuming from the
    # latest checkpoint of a work dir (--resume alone) is
    # test_resume_after_sigkill_equals_uninterrupted_run's
    ckpt1 = osp.join(seeded_run, 'epoch_1.pth')
    assert osp.isfile(ckpt1)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt1) == []

    # resuming from an explicit path, into another work dir
    work_dir = str(tmp_path / 'work_dir')
    out = _run([
        TRAIN, CONFIG, '--work-dir', work_dir, '--resume', ckpt1,
        '--cfg-options', 'train_cfg.max_epochs=2'
    ], env)
    assert 'resumed epoch: 1' in out
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))

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


def test_torchrun_two_processes(env, torchrun_run, tmp_path):
    work_dir, out = torchrun_run
    assert 'Distributed launcher: pytorch' in out
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)

    # CONFIG_B1 differs from CONFIG only in its training data and schedule
    out = _run([TEST, CONFIG, ckpt, '--work-dir', str(tmp_path),
                '--launcher', 'pytorch'],
               env,
               launcher=TORCHRUN)
    assert 'coco/bbox_mAP:' in out
