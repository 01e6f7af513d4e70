"""tools/analysis_tools/san_{complexity,memory,demo_comparison}.py."""
import importlib.util
import os.path as osp

import pytest
import torch

from sasa_mmdet.layers import PairwiseSelfAttention2d
from sasa_mmdet.models import SAN
from sasa_mmdet.utils.complexity import ImageClassifier, get_model_complexity

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(ROOT, 'tools', 'analysis_tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_san10_pairwise_multiply_adds_beside_the_official_figure():
    tool = _tool('san_complexity')
    model = ImageClassifier(SAN(10, 'pairwise', out_indices=(4, )), 1000).eval()
    ours = get_model_complexity(model, (224, 224), detector=False)['components'][-1]
    assert ours['multiply_adds'] == 2_043_668_868
    # the official counter's rules (norms, activations, pooling, biases and
    # subtractions counted too) give the official table's 2.2G
    official = tool.official_convention_count(model, 224)
    assert official == 2_155_268_622
    assert round(official / 1e9, 1) == tool.OFFICIAL[10, 'pairwise'][1] == 2.2


def test_memory_tool_measures_what_with_cp_saves():
    tool = _tool('san_memory')
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 9, requires_grad=True)
    plain = tool.measure('plain', PairwiseSelfAttention2d(32, 16, 3, window_size=5), x, runs=1)
    checkpointed = tool.measure('cp', PairwiseSelfAttention2d(32, 16, 3, window_size=5,
                                                              with_cp=True), x, runs=1)
    # the relation (rel + 2 = 6 channels per tap) is what pairwise keeps
    assert ((2, 6, 25, 81), 'float32') in plain['saved_tensors']
    assert plain['saved_tensor_bytes'] > 10 * x.untyped_storage().nbytes()
    assert checkpointed['saved_tensor_bytes'] < plain['saved_tensor_bytes']


def test_demo_comparison_counts_the_four_detectors():
    tool = _tool('san_demo_comparison')
    counts = {name: tool.complexity(osp.join(ROOT, config))
              for name, config in tool.MODELS.items()}
    assert set(counts) == {'conv (ResNet-18/4)', 'SASA', 'SAN pairwise', 'SAN patchwise'}
    assert all(c['backbone_params'] < c['params'] for c in counts.values())
    assert counts['SAN pairwise']['backbone_params'] < counts['SAN patchwise']['backbone_params']


def test_step_times_of_the_demo_detectors():
    tool = _tool('san_demo_comparison')
    # one small image: the same training step as the demo's batch of 8 at 160x160
    times = tool.step_times({'SAN pairwise': osp.join(ROOT, tool.MODELS['SAN pairwise'])},
                            steps=1, images=1, size=64)
    assert list(times) == ['SAN pairwise'] and times['SAN pairwise'] > 0


def test_official_checkpoint_converter(tmp_path):
    spec = importlib.util.spec_from_file_location(
        'san_official_to_mmdet',
        osp.join(ROOT, 'tools', 'model_converters', 'san_official_to_mmdet.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    official = {'module.conv_in.weight': torch.ones(64, 3, 1, 1),
                'module.layer1.0.sam.conv_p.bias': torch.ones(2),
                'module.fc.weight': torch.ones(1000, 2048)}
    torch.save(dict(state_dict=official, epoch=100), tmp_path / 'official.pth')
    tool.main([str(tmp_path / 'official.pth'), str(tmp_path / 'ours.pth')])
    converted = torch.load(tmp_path / 'ours.pth', weights_only=True)['state_dict']
    assert list(converted) == ['stem.conv.weight', 'layer1.blocks.0.sam.position.bias']
