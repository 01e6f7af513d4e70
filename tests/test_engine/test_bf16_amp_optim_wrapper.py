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


@pytest.mark.parametrize('size,stride,kernel', [((1, 1), 2, 3), ((2, 1), 2, 3),
                                                ((1, 1), 3, 5), ((2, 2), 3, 3)])
def test_convolutions_of_maps_narrower_than_their_stride_get_right_gradients(
        size, stride, kernel):
    """RetinaNet's P7 convolution on a 1x1 P6 (small images): torch 2.13's
    oneDNN bfloat16 convolution gave NaN or garbage gradients in about one
    call of three; the wrapper runs such convolutions in float32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, kernel, stride=stride, padding=kernel // 2)
    optim_wrapper = BF16AmpOptimWrapper(
        optimizer=torch.optim.SGD(conv.parameters(), lr=0.1))
    weight = conv.weight.detach().double().requires_grad_()
    for _ in range(20):
        x = torch.randn(2, 16, *size)
        conv.zero_grad()
        with optim_wrapper.optim_context(conv):
            out = conv(x)
        out.float().sum().backward()
        expected, = torch.autograd.grad(
            nn.functional.conv2d(x.double(), weight, None, stride, kernel // 2).sum(), weight)
        torch.testing.assert_close(conv.weight.grad.double(), expected, atol=1e-4, rtol=1e-4)
    # wider maps keep running in bfloat16
    with optim_wrapper.optim_context(conv):
        assert conv(torch.randn(1, 16, 8, 8)).dtype == torch.bfloat16
