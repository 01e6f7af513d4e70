"""A toy mmengine model, dataset and runner for the engine tests.

Run as a script under torchrun it is the worker of the 2-process CPU test:
each rank trains with ``setup_cpu_distributed`` and writes what it saw and
its final weights to ``OUT_DIR/rank{RANK}.pt``.
"""
import itertools
import os
import os.path as osp
import sys
from typing import Optional

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from mmengine.runner import Runner
from torch.utils.data import Dataset

from sasa_mmdet.engine import (add_safe_checkpoint_hook, finish_cpu_distributed,
                               setup_cpu_distributed)

_RUN_IDS = itertools.count()


@DATASETS.register_module(force=True)
class ToyDataset(Dataset):
    """``length`` samples ``(x, y)`` with ``y = x @ [1, -2] + 0.5``."""

    def __init__(self, length: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(length, 2, generator=gen)
        self.targets = self.inputs @ torch.tensor([[1.0], [-2.0]]) + 0.5

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict:
        return dict(
            inputs=self.inputs[index],
            targets=self.targets[index],
            index=index)


@MODELS.register_module(force=True)
class ToyModel(BaseModel):
    """A linear regressor with a norm layer; records the indices of the
    samples it trained on."""

    def __init__(self, norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.norm = build_norm_layer(norm_cfg or dict(type='BN'), 1)[1]
        self.seen_indices = []

    def forward(self, inputs, targets, index=None, mode='tensor'):
        out = self.linear(inputs)
        if mode == 'loss':
            if index is not None:
                self.seen_indices.extend(index.tolist())
            # the (2D) norm layer only has to run
            normed = self.norm(out[:, :, None, None])
            loss = (out - targets).pow(2).mean() + 0 * normed.sum()
            return dict(loss=loss)
        return out


def toy_runner_cfg(work_dir: str, max_epochs: int = 1, **kwargs) -> Config:
    """A runner config for :class:`ToyModel`.

    Each config gets its own experiment name, hence its own message hub:
    runners of one process started in the same second would share one.
    """
    cfg = dict(
        experiment_name=f'toy_{next(_RUN_IDS)}',
        model=dict(type='ToyModel'),
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=dict(type='ToyDataset', length=8),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=2,
            num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1]),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1),
            logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        launcher='none')
    cfg.update(kwargs)
    return Config(cfg)


def _dist_worker(out_dir: str) -> None:
    """Train the toy model in one torchrun process, save what it saw."""
    # SyncBN has no CPU kernel: setup_cpu_distributed must replace it
    cfg = toy_runner_cfg(
        osp.join(out_dir, 'work_dir'),
        max_epochs=2,
        launcher='pytorch',
        model=dict(type='ToyModel', norm_cfg=dict(type='SyncBN')))
    add_safe_checkpoint_hook(cfg)
    setup_cpu_distributed(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model.module
    torch.save(
        dict(
            rank=runner.rank,
            world_size=runner.world_size,
            wrapper=type(runner.model).__name__,
            seen_indices=model.seen_indices,
            weight=model.linear.weight.detach().clone()),
        osp.join(out_dir, f'rank{os.environ["RANK"]}.pt'))
    finish_cpu_distributed()


if __name__ == '__main__':
    _dist_worker(sys.argv[1])
