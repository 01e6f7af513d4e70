import random
from types import SimpleNamespace

import numpy as np
import torch
from mmengine.config import Config

from sasa_mmdet.engine import EpochSeedHook, add_epoch_seed_hook


def _draws():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_draws_depend_on_seed_and_epoch_only():
    hook = EpochSeedHook()
    runner = SimpleNamespace(seed=3, epoch=1)
    hook.before_train_epoch(runner)
    first = _draws()
    # whatever was drawn or seeded in between (validation, another epoch)
    _draws()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    hook.before_train_epoch(runner)
    assert _draws() == first

    draws = set()
    for seed, epoch in [(3, 1), (3, 2), (4, 1), (4, 2)]:
        hook.before_train_epoch(SimpleNamespace(seed=seed, epoch=epoch))
        draws.add(_draws())
    assert len(draws) == 4


def test_add_epoch_seed_hook_once():
    cfg = Config(dict(custom_hooks=[dict(type='SafeCheckpointHook')]))
    add_epoch_seed_hook(add_epoch_seed_hook(cfg))
    assert cfg.custom_hooks == [
        dict(type='SafeCheckpointHook'),
        dict(type='EpochSeedHook')
    ]
