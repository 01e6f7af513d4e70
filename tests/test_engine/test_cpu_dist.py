import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
from mmengine.config import Config

from sasa_mmdet.engine import setup_cpu_distributed

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
WORKER = osp.join(osp.dirname(osp.abspath(__file__)), 'toy_runner.py')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _detector_cfg(launcher):
    return Config(
        dict(
            launcher=launcher,
            model=dict(
                type='RetinaNet',
                backbone=dict(type='ResNet', norm_cfg=dict(type='SyncBN')),
                neck=dict(
                    type='FPN', norm_cfg=dict(type='MMSyncBN', eps=1e-3))),
            env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60)),
            find_unused_parameters=True))


def test_setup_cpu_distributed_without_launcher_changes_nothing():
    cfg = _detector_cfg('none')
    before = cfg.to_dict()
    setup_cpu_distributed(cfg)
    assert cfg.to_dict() == before
    assert not torch_dist.is_initialized()


def test_setup_cpu_distributed_single_process(monkeypatch):
    for key, value in dict(
            RANK='0',
            LOCAL_RANK='0',
            WORLD_SIZE='1',
            MASTER_ADDR='127.0.0.1',
            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    cfg = _detector_cfg('pytorch')
    try:
        setup_cpu_distributed(cfg)
        assert torch_dist.is_initialized()
        assert torch_dist.get_backend() == 'gloo'
        assert torch_dist.get_world_size() == 1
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.find_unused_parameters is True
    assert cfg.model.backbone.norm_cfg == dict(type='BN')
    assert cfg.model.neck.norm_cfg == dict(type='BN', eps=1e-3)


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--standalone',
        '--nproc_per_node=2', WORKER,
        str(tmp_path)
    ]
    proc = subprocess.run(
        cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert [r['rank'] for r in ranks] == [0, 1]
    assert all(r['world_size'] == 2 for r in ranks)
    assert all(r['wrapper'] == 'MMDistributedDataParallel' for r in ranks)
    # the sampler split the data: each rank trained on other samples
    for epoch in range(2):
        seen = [
            set(r['seen_indices'][epoch * 4:(epoch + 1) * 4]) for r in ranks
        ]
        assert seen[0].isdisjoint(seen[1])
        assert seen[0] | seen[1] == set(range(8))
    # DDP averaged the gradients: both ranks ended with the same weights
    assert torch.equal(ranks[0]['weight'], ranks[1]['weight'])
    assert osp.isfile(tmp_path / 'work_dir' / 'epoch_2.pth')
