"""tools/run_pretrain_demo.sh end to end at smoke size: tiny datasets, one
epoch per training; the result line and file, the complete hand-off."""
import os
import os.path as osp
import re
import subprocess

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO_ROOT, 'tools', 'run_pretrain_demo.sh')
SMOKE = ('train_cfg.max_epochs=1 train_dataloader.batch_size=4 '
         'train_dataloader.num_workers=0 val_dataloader.num_workers=0 '
         'test_dataloader.num_workers=0')
# mmdet's bases keep data-loader workers alive, which needs workers
DET_SMOKE = SMOKE + (' train_dataloader.persistent_workers=False '
                     'val_dataloader.persistent_workers=False '
                     'test_dataloader.persistent_workers=False')

pytestmark = pytest.mark.slow


def test_smoke_run_prints_and_writes_the_result_line(tmp_path):
    work_dir = tmp_path / 'work'
    env = dict(
        os.environ,
        SASA_PRETRAIN_DEMO_SKIP_SETUP='1',
        SASA_PRETRAIN_DATA_ROOT=str(tmp_path / 'pretrain'),
        SASA_DEMO_DATA_ROOT=str(tmp_path / 'demo'),
        SASA_PRETRAIN_DEMO_WORK_DIR=str(work_dir),
        SASA_PRETRAIN_DEMO_CLS_OPTIONS=SMOKE,
        SASA_PRETRAIN_DEMO_DET_OPTIONS=DET_SMOKE,
        SASA_PRETRAIN_DEMO_CLS_DATA_ARGS='--num-train-per-class 2 '
        '--num-val-per-class 1 --size 32',
        SASA_PRETRAIN_DEMO_DET_DATA_ARGS='--num-train 4 --num-val 2 '
        '--size 64',
        OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', SCRIPT],
                          env=env,
                          cwd=REPO_ROOT,
                          capture_output=True,
                          text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    pattern = (r'PRETRAIN DEMO RESULT: top-1 = [0-9.]+ \| detection mAP from '
               r'scratch = -?[0-9.]+, from pretrained = -?[0-9.]+')
    line = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(pattern, line), line
    with open(work_dir / 'pretrain_demo_result.txt') as f:
        assert f.read().strip() == line
    assert re.search(r'SASAResNet: all \d+ tensors loaded from \S+epoch_1\.pth',
                     output)
    for name in ('sasa-tiny_1xb32-6e_shape-classes',
                 'retinanet_sasa-tiny_12e_shapes',
                 'retinanet_sasa-tiny-shapes-pre_12e_shapes'):
        assert osp.isfile(work_dir / name / 'epoch_1.pth'), name


def test_arguments_are_refused():
    proc = subprocess.run(['bash', SCRIPT, 'configs/demo/x.py'],
                          cwd=REPO_ROOT,
                          capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert 'no arguments expected' in proc.stderr
