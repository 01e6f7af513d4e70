"""Both FLOP counters count SAN's attention layers: the project's
``get_model_complexity`` and mmengine's ``get_model_complexity_info`` (with
the module handle ``import sasa_mmdet`` installs)."""
import pytest
import torch
import torch.nn as nn
from mmengine.analysis import get_model_complexity_info

from sasa_mmdet.layers import PairwiseSelfAttention2d, PatchwiseSelfAttention2d
from sasa_mmdet.utils.complexity import get_model_complexity
from sasa_mmdet.utils.mmengine_flops import register_mmengine_flop_counting

register_mmengine_flop_counting()  # what `import sasa_mmdet` does when mmdet is installed

LAYERS = [PairwiseSelfAttention2d, PatchwiseSelfAttention2d]


def _ours(model, shape):
    return get_model_complexity(model, shape, detector=False)['components'][-1]['multiply_adds']


@pytest.mark.parametrize('cls', LAYERS)
def test_mmengine_counts_the_layer_by_its_multiply_adds(cls):
    layer = cls(8, 16, 3, window_size=5, stride=2)
    info = get_model_complexity_info(layer, (8, 9, 7), show_table=False, show_arch=False)
    assert info['flops'] == layer.multiply_adds((1, 8, 9, 7)) > 0


@pytest.mark.parametrize('cls', LAYERS)
def test_both_counters_agree_inside_a_network(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1, bias=False), cls(16, 32, 3, window_size=5),
                          nn.Conv2d(32, 8, 3, padding=1, bias=False))
    expected = 16 * 3 * 64 + model[1].multiply_adds((1, 16, 8, 8)) + 8 * 32 * 9 * 64
    assert _ours(model, (8, 8)) == expected
    info = get_model_complexity_info(model, (3, 8, 8), show_table=False, show_arch=False)
    assert info['flops'] == expected
