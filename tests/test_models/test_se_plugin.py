"""The Squeeze-and-Excitation plugin (``sasa_mmdet/models/plugins/se.py``)."""
import pytest
import torch
from mmdet.models.backbones import ResNet

from sasa_mmdet.models import SASAResNet, SEPlugin
from sasa_mmdet.utils.complexity import ImageClassifier, count_parameters

SE = [dict(cfg=dict(type='SEPlugin', ratio=16), position='after_conv3')]


def test_se_resnet50_has_mmpretrains_parameter_count():
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS

    ours = count_parameters(ImageClassifier(ResNet(50, plugins=SE), 1000))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        reference = PRETRAIN_MODELS.build(dict(
            type='ImageClassifier', backbone=dict(type='SEResNet', depth=50),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=1000, in_channels=2048)))
    assert ours == count_parameters(reference)
    assert round(ours / 1e6, 2) == 28.09


def test_applied_after_conv3_before_the_residual_addition():
    torch.manual_seed(0)
    model = ResNet(50, base_channels=8, plugins=SE, out_indices=(0, ))
    block = model.layer1[0]
    assert isinstance(block.se, SEPlugin) and block.after_conv3_plugin_names == ['se']
    assert block.se.in_channels == 32
    model.eval()
    x = torch.rand(1, 8, 9, 9)
    with torch.no_grad():
        # an excitation of 0 leaves only the (downsampled) identity
        block.se.conv2.conv.weight.zero_()
        block.se.conv2.conv.bias.fill_(-1e4)
        torch.testing.assert_close(block(x), torch.relu(block.downsample(x)))


def test_sasa_resnet_takes_the_plugin():
    model = SASAResNet(depth=26, base_channels=8, attention_cfg=dict(window_size=3, num_heads=2),
                       plugins=SE)
    assert sum(isinstance(m, SEPlugin) for m in model.modules()) == 8
    outs = model(torch.rand(2, 3, 64, 64))
    assert outs[-1].shape == (2, 256, 2, 2)


def test_bad_ratio():
    with pytest.raises(ValueError, match='ratio must be a positive int dividing'):
        SEPlugin(24, ratio=16)
