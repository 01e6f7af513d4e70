import math

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner import Runner
from toy_runner import toy_runner_cfg

from sasa_mmdet.engine import BF16AmpOptimWrapper, enable_amp


def _conv_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1))


def test_bf16_autocast_inside_optim_context():
    model = _conv_model()
    optim_wrapper = OPTIM_WRAPPERS.build(
        dict(
            type='BF16AmpOptimWrapper',
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    assert isinstance(optim_wrapper, BF16AmpOptimWrapper)
    before = [p.detach().clone() for p in model.parameters()]

    x = torch.randn(2, 3, 8, 8)
    with optim_wrapper.optim_context(model):
        assert torch.is_autocast_enabled('cpu')
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        out = model(x)
        loss = out.float().pow(2).mean()
    assert not torch.is_autocast_enabled('cpu')
    assert out.dtype == torch.bfloat16
    assert math.isfinite(loss.item())

    optim_wrapper.backward(loss)
    for param in model.parameters():
        # parameters and their gradients stay float32
        assert param.dtype == param.grad.dtype == torch.float32
        assert torch.isfinite(param.grad).all()
    optim_wrapper.step()
    for param, old in zip(model.parameters(), before):
        assert not torch.equal(param, old)


def test_enable_amp_selects_bf16_wrapper_on_cpu():
    cfg = Config(
        dict(
            optim_wrapper=dict(
                type='OptimWrapper',
                optimizer=dict(type='SGD', lr=0.01),
                clip_grad=dict(max_norm=1.0))))
    enable_amp(cfg)
    assert cfg.optim_wrapper.type == 'BF16AmpOptimWrapper'
    assert 'loss_scale' not in cfg.optim_wrapper
    # the rest of the wrapper config is kept
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', lr=0.01)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=1.0)


def test_runner_trains_with_bf16_amp(tmp_path):
    cfg = toy_runner_cfg(str(tmp_path), max_epochs=1)
    enable_amp(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert isinstance(runner.optim_wrapper, BF16AmpOptimWrapper)
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == runner.iter > 0
    assert all(math.isfinite(v) for v in losses)


def test_unknown_device_type_is_rejected():
    model = _conv_model()
    with pytest.raises((ValueError, RuntimeError)):
        BF16AmpOptimWrapper(
            device_type='not_a_device',
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
