"""MMDetection's own tools/train.py (as ``mim train`` runs it) trains a
config of this repository with its checkpoint-safety and seed hooks: they
come from configs/_base_/sasa_runtime.py, not from our tools/train.py."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from sasa_mmdet.datasets import generate_synthetic_shapes

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'retinanet_r-tiny_shapes.py')

pytestmark = pytest.mark.slow


def mmdet_train_tool():
    """mmdet's tools/train.py as the mmdet package ships it (for mim)."""
    import mmdet
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    if not osp.isfile(path):
        pytest.fail(f"mmdet's tools/train.py is not at {path}")
    return path


def test_mmdet_train_tool_runs_the_configs_hooks(tmp_path):
    data_root = str(tmp_path / 'data')
    generate_synthetic_shapes(data_root, num_train=4, num_val=2, size=64)
    env = dict(os.environ, SASA_DEMO_DATA_ROOT=data_root, OMP_NUM_THREADS='1')
    # this checkout's sasa_mmdet, whichever one is installed
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
    work_dir = str(tmp_path / 'work')
    proc = subprocess.run(
        [sys.executable, mmdet_train_tool(), CONFIG, '--work-dir', work_dir,
         '--cfg-options', 'train_cfg.max_epochs=1',
         'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False',
         'default_hooks.checkpoint.interval=1'],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    # mmengine lists the hooks it runs when the runner starts
    assert 'SafeCheckpointHook' in output and 'EpochSeedHook' in output, \
        output[-5000:]
    # SafeCheckpointHook wrote it: only allow-listed types (mmengine's own
    # checkpoints do not load this way on this torch, see test_checkpoint.py)
    checkpoint = torch.load(
        osp.join(work_dir, 'epoch_1.pth'), map_location='cpu',
        weights_only=True)
    assert checkpoint['meta']['epoch'] == 1
    assert 'bbox_head.retina_cls.weight' in checkpoint['state_dict']
