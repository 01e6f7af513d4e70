"""tools/train.py and tools/test.py on mmpretrain classifier configs (the
pretraining demo's and a Table 1 config on tiny synthetic shape classes):
weights-only checkpoints, exact resume, evaluation, --out / --tta, refusal of
a checkpoint that does not fit; mmpretrain's own tools/train.py too."""
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from sasa_mmdet.datasets import generate_synthetic_shape_classes

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DATA = osp.join(osp.dirname(osp.abspath(__file__)), 'data')
DEMO_CLS = osp.join(REPO_ROOT, 'configs', 'demo',
                    'sasa-tiny_1xb32-6e_shape-classes.py')
TABLE_1 = osp.join(DATA, 'sasa-resnet26_in1k-recipe_tiny-shape-classes.py')
TRAIN = osp.join(REPO_ROOT, 'tools', 'train.py')
TEST = osp.join(REPO_ROOT, 'tools', 'test.py')
NUM_VAL = 8  # one per class
TINY = [
    'train_dataloader.batch_size=4', 'train_dataloader.num_workers=0',
    'val_dataloader.batch_size=4', 'val_dataloader.num_workers=0',
    'test_dataloader.batch_size=4', 'test_dataloader.num_workers=0',
    'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=1',
    'default_hooks.checkpoint.max_keep_ckpts=3',
    'randomness.seed=0', 'randomness.deterministic=True'
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    data_root = str(tmp_path_factory.mktemp('sasa_pretrain'))
    generate_synthetic_shape_classes(
        data_root, num_train_per_class=2, num_val_per_class=1, size=32)
    env = dict(
        os.environ, SASA_PRETRAIN_DATA_ROOT=data_root, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
    return env


def _run(args, env, check=True):
    proc = subprocess.run([sys.executable] + args,
                          env=env,
                          cwd=REPO_ROOT,
                          capture_output=True,
                          text=True)
    output = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, output[-5000:]
    return proc.returncode, output


def _train(work_dir, env, epochs, *extra):
    return _run([
        TRAIN, DEMO_CLS, '--work-dir', work_dir, '--cfg-options', *TINY,
        f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}'
    ] + list(extra), env)[1]


def _checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def two_epochs(env, tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('two_epochs'))
    output = _train(work_dir, env, 2)
    return work_dir, output


def test_trains_and_validates_with_weights_only_checkpoints(two_epochs):
    work_dir, output = two_epochs
    assert 'accuracy/top1' in output
    for epoch in (1, 2):
        checkpoint = _checkpoint(osp.join(work_dir, f'epoch_{epoch}.pth'))
        assert checkpoint['meta']['epoch'] == epoch
        keys = set(checkpoint['state_dict'])
        assert 'head.fc.weight' in keys
        assert 'backbone.layer1.0.conv1.qkv_weight' in keys


def test_resume_equals_an_uninterrupted_run(env, two_epochs, tmp_path):
    work_dir = str(tmp_path)
    _train(work_dir, env, 1)
    output = _train(work_dir, env, 2, '--resume')
    assert 'resumed epoch: 1' in output
    resumed = _checkpoint(osp.join(work_dir, 'epoch_2.pth'))['state_dict']
    straight = _checkpoint(osp.join(two_epochs[0],
                                    'epoch_2.pth'))['state_dict']
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_test_tool_evaluates_dumps_and_runs_tta(env, two_epochs, tmp_path):
    ckpt = osp.join(two_epochs[0], 'epoch_2.pth')
    out = str(tmp_path / 'preds.pkl')
    _, output = _run([
        TEST, DEMO_CLS, ckpt, '--work-dir',
        str(tmp_path), '--out', out, '--show-dir', 'vis', '--interval', '4',
        '--cfg-options'
    ] + TINY, env)
    assert 'accuracy/top1' in output
    # every 4th image drawn, below the work dir (file names are unique)
    assert len(os.listdir(tmp_path / 'vis')) == NUM_VAL // 4
    with open(out, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == NUM_VAL
    assert {'pred_label', 'pred_score', 'gt_label'} <= set(predictions[0])
    _, output = _run([
        TEST, DEMO_CLS, ckpt, '--work-dir',
        str(tmp_path / 'tta'), '--tta', '--cfg-options'
    ] + TINY, env)
    assert 'accuracy/top1' in output
    code, output = _run(
        [TEST, DEMO_CLS, ckpt, '--out',
         str(tmp_path / 'preds.json')], env,
        check=False)
    assert code != 0 and '--out must name a .pkl' in output


def test_test_tool_refuses_a_checkpoint_that_does_not_fit(
        env, two_epochs, tmp_path):
    ckpt = osp.join(two_epochs[0], 'epoch_2.pth')
    code, output = _run([
        TEST, DEMO_CLS, ckpt, '--work-dir',
        str(tmp_path), '--cfg-options', 'model.head.num_classes=4',
        'model.data_preprocessor.num_classes=4'
    ] + TINY, env, check=False)
    assert code != 0
    assert 'CheckpointMismatchError' in output
    assert 'head.fc.weight: checkpoint (8, 128) vs model (4, 128)' in output


def test_table_1_config_trains_and_tests(env, tmp_path):
    work_dir = str(tmp_path)
    _, output = _run([TRAIN, TABLE_1, '--work-dir', work_dir], env)
    assert 'accuracy/top1' in output
    checkpoint = _checkpoint(osp.join(work_dir, 'epoch_1.pth'))
    # the EMA weights are the checkpoint's state_dict (what detection
    # loads); the raw ones are kept beside them
    assert 'ema_state_dict' in checkpoint
    state, raw = checkpoint['state_dict'], checkpoint['ema_state_dict']
    assert any(not torch.equal(state[k], raw['module.' + k]) for k in state
               if k.endswith('qkv_weight'))
    optimizer = checkpoint['optimizer']['param_groups'][0]
    assert optimizer['nesterov'] is True
    _, output = _run([
        TEST, TABLE_1,
        osp.join(work_dir, 'epoch_1.pth'), '--work-dir', work_dir
    ], env)
    assert 'accuracy/top1' in output


def test_mmpretrain_own_train_tool_writes_weights_only_checkpoints(
        env, tmp_path):
    import mmpretrain
    tool = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools',
                    'train.py')
    if not osp.isfile(tool):
        pytest.fail(f'mmpretrain ships no {tool}')
    work_dir = str(tmp_path)
    _run([
        tool, DEMO_CLS, '--work-dir', work_dir, '--no-persistent-workers',
        '--cfg-options', *TINY,
        'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'
    ], env)
    checkpoint = _checkpoint(osp.join(work_dir, 'epoch_1.pth'))
    assert 'head.fc.weight' in checkpoint['state_dict']
