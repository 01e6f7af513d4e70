"""The SAN backbone (``sasa_mmdet/models/backbones/san.py``)."""
import re

import pytest
import torch
from mmdet.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from sasa_mmdet.layers import PairwiseSelfAttention2d, PatchwiseSelfAttention2d
from sasa_mmdet.models import SAN
from sasa_mmdet.utils.complexity import ImageClassifier, count_parameters

# hszhao/SAN README: parameters (M) with the 1000-class classifier.
OFFICIAL_PARAMS = {(10, 'pairwise'): 10.5, (10, 'patchwise'): 11.8,
                   (15, 'pairwise'): 14.1, (15, 'patchwise'): 16.2,
                   (19, 'pairwise'): 17.6, (19, 'patchwise'): 20.5}
# Ours, exactly (the same layers as the official code, biases included).
OURS_PARAMS = {(10, 'pairwise'): 10_531_848, (10, 'patchwise'): 11_841_124,
               (15, 'pairwise'): 14_065_436, (15, 'patchwise'): 16_181_310,
               (19, 'pairwise'): 17_596_156, (19, 'patchwise'): 20_518_470}
TINY = dict(stem_channels=16, stage_channels=(32, 32, 64, 64, 128), kernels=(3, 3, 3, 3, 3),
            stage_blocks=(1, 1, 1, 1, 1))


@pytest.mark.parametrize('depth,sa_type', sorted(OFFICIAL_PARAMS))
def test_parameters_match_the_official_table(depth, sa_type):
    model = ImageClassifier(SAN(depth, sa_type, out_indices=(4, )), 1000)
    params = count_parameters(model)
    assert round(params / 1e6, 1) == OFFICIAL_PARAMS[depth, sa_type]
    assert params == OURS_PARAMS[depth, sa_type]
    blocks = [m for m in model.modules() if type(m).__name__ == 'SANBottleneck']
    assert len(blocks) == sum(SAN.arch_settings[depth])


@pytest.mark.parametrize('sa_type,layer', [('pairwise', PairwiseSelfAttention2d),
                                           ('patchwise', PatchwiseSelfAttention2d)])
def test_outputs_have_resnet_strides_and_widths(sa_type, layer):
    model = MODELS.build(dict(type='SAN', depth=10, sa_type=sa_type, out_indices=(0, 2, 4),
                              **TINY))
    assert all(isinstance(m.sam, layer) for m in model.modules()
               if type(m).__name__ == 'SANBottleneck')
    outs = model(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 32, 32), (2, 64, 8, 8), (2, 128, 2, 2)]
    # odd sizes: max pools in ceil mode, like a strided convolution's output
    outs = model(torch.rand(1, 3, 45, 37))
    assert [tuple(o.shape[2:]) for o in outs] == [(23, 19), (6, 5), (2, 2)]


def test_full_size_outputs_feed_an_fpn():
    model = SAN(10, 'patchwise', attention_cfg=dict(impl='torch'))
    model.eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 16), (1, 512, 8, 8),
                                              (1, 1024, 4, 4), (1, 2048, 2, 2)]


def test_every_parameter_gets_a_gradient():
    model = SAN(10, 'pairwise', **TINY)
    # 64 pixels: a 2x2 last stage (on a 1x1 map every tap mirrors onto the
    # pixel itself, and the position relation is 0)
    outs = model(torch.rand(2, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    params = dict(model.named_parameters())
    # the position conv's bias cancels in p_i - p_j (the official layer has
    # it too: 2 parameters whose gradient is 0 up to rounding)
    params = {n: p for n, p in params.items() if not n.endswith('position.bias')}
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_frozen_stages_and_norm_eval():
    model = SAN(10, 'patchwise', frozen_stages=2, norm_eval=True, **TINY)
    model.train()
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(('stem.', 'layer0.', 'layer1.'))), name
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    model = SAN(10, 'patchwise', frozen_stages=0, **TINY)
    model.train()
    assert not model.stem.training and model.layer0.training
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.layer0.parameters())


def test_with_cp_and_attention_cfg():
    torch.manual_seed(0)
    model = SAN(10, 'pairwise', attention_cfg=dict(border='mask', impl='torch'), **TINY)
    checkpointed = SAN(10, 'pairwise', attention_cfg=dict(border='mask', impl='torch'),
                       with_cp=True, **TINY)
    checkpointed.load_state_dict(model.state_dict())
    assert all(m.sam.border == 'mask' for m in model.modules()
               if type(m).__name__ == 'SANBottleneck')
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    grads = [torch.autograd.grad(m(x)[-1].sum(), x)[0] for m in (model, checkpointed)]
    torch.testing.assert_close(*grads)


@pytest.mark.parametrize('kwargs,message', [
    (dict(depth=18), 'invalid depth'),
    (dict(sa_type='axial'), 'sa_type must be one of'),
    (dict(out_indices=(1, 5)), 'out_indices must be stage indices'),
    (dict(frozen_stages=6), 'frozen_stages must be in'),
    (dict(stage_channels=(32, 32, 64, 64)), 'stage_channels must have 5 entries'),
    (dict(stage_channels=(8, 32, 64, 64, 128)), 'multiples of 16'),
])
def test_invalid_arguments(kwargs, message):
    cfg = dict(depth=10, **TINY)
    cfg.update(kwargs)
    with pytest.raises((ValueError, KeyError), match=message):
        SAN(**cfg)


def _official_name(ours: str) -> str:
    """Our name -> model/san.py's (the inverse of official_san_key), written
    out independently for the test."""
    ours = ours.replace('stem.conv.', 'conv_in.').replace('stem.bn.', 'bn_in.')
    ours = re.sub(r'layer(\d)\.(conv|bn)\.', r'\2\1.', ours)
    ours = re.sub(r'layer(\d)\.blocks\.(\d+)\.', r'layer\1.\2.', ours)
    for official, mine in (('conv1', 'phi'), ('conv2', 'psi'), ('conv3', 'beta'),
                           ('conv_w', 'gamma'), ('conv_p', 'position')):
        ours = ours.replace(f'.sam.{mine}.', f'.sam.{official}.')
    return ours


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
def test_official_checkpoint_names_convert(sa_type):
    from sasa_mmdet.models.backbones.san_checkpoint import convert_official_san

    torch.manual_seed(0)
    source = SAN(10, sa_type, **TINY)
    official = {'module.' + _official_name(k): v for k, v in source.state_dict().items()}
    assert 'module.layer0.0.sam.conv_w.2.weight' in official
    assert 'module.conv_in.weight' in official and 'module.bn4.running_mean' in official
    official['module.fc.weight'] = torch.zeros(1000, 128)
    converted = convert_official_san(official)
    assert 'fc.weight' not in converted
    target = SAN(10, sa_type, **TINY)
    target.load_state_dict(converted, strict=True)
    x = torch.rand(1, 3, 32, 32)
    source.eval(), target.eval()
    torch.testing.assert_close(target(x), source(x))
    assert 'fc.weight' in convert_official_san(official, keep_classifier=True)
