"""tools/deployment/export_onnx.py: standard ONNX operators only, and
onnxruntime gives PyTorch's outputs (tiny inputs, random weights)."""
import os.path as osp
import runpy

import onnx
import pytest
import torch
from onnx import TensorProto, helper

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'tools', 'deployment', 'export_onnx.py')
DEMO = osp.join(ROOT, 'configs', 'demo', 'retinanet_sasa-tiny_shapes.py')


@pytest.fixture(scope='module')
def tool():
    return runpy.run_path(TOOL)


def _graph_with(domain):
    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 4])
    node = helper.make_node('LocalAttention' if domain else 'Relu', ['x'], ['y'],
                            domain=domain, name='attn')
    opsets = [helper.make_opsetid('', 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(helper.make_graph([node], 'g', [x], [y]), opset_imports=opsets)


def test_custom_domain_nodes_are_refused(tool, tmp_path):
    standard, custom = tmp_path / 'standard.onnx', tmp_path / 'custom.onnx'
    onnx.save(_graph_with(''), str(standard))
    onnx.save(_graph_with('sasa_mmdet'), str(custom))
    assert tool['check_standard_ops'](str(standard)) == {'Relu': 1}
    assert tool['non_standard_nodes'](onnx.load(str(custom))) == [
        'sasa_mmdet::LocalAttention (attn)']
    with pytest.raises(ValueError, match=r'outside the standard ONNX domain: '
                       r'sasa_mmdet::LocalAttention \(attn\)'):
        tool['check_standard_ops'](str(custom))


def _export(tool, tmp_path, *args):
    out = str(tmp_path / 'model.onnx')
    result = tool['main']([*args, '--out', out])
    assert osp.isfile(out)
    return result


def _assert_matches(result, levels=5):
    assert result['outputs'] == ([f'cls_score_{i}' for i in range(levels)] +
                                 [f'bbox_pred_{i}' for i in range(levels)])
    assert result['checks'], 'onnxruntime did not run'
    for check in result['checks']:
        for row in check['outputs']:
            assert row['ok'] and row['relative'] <= 1e-4, row
    assert result['ops'].get('Softmax', 0) > 0  # the attention is in the graph


@pytest.fixture(scope='module')
def exported_backbone(tool, tmp_path_factory):
    # the demo attention RetinaNet with attention in its last two stages (the
    # export time grows with the number of attention layers; the full demo
    # and Table 2 configs are exported in the README's sweep)
    return _export(tool, tmp_path_factory.mktemp('onnx'), DEMO, '--shape', '64', '64',
                   '--cfg-options',
                   'model.backbone.stage_with_attention=(False,False,True,True)')


def test_attention_backbone_exports_and_matches(exported_backbone):
    _assert_matches(exported_backbone)
    shapes = [row['shape'] for row in exported_backbone['checks'][0]['outputs']]
    assert shapes[0] == (1, 9 * 3, 8, 8) and shapes[5] == (1, 9 * 4, 8, 8)


def test_an_error_in_one_attention_layer_is_caught(tool, exported_backbone):
    """The check sees a wrong attention layer, also in the conditioned random
    network (residual branches scaled by 0.1): PyTorch with one layer's
    relative embeddings changed is not the exported graph."""
    network = exported_backbone['network']
    layer = network.detector.backbone.layer4[1].conv2
    inputs = torch.randn(1, 3, 64, 64)
    names = exported_backbone['outputs']
    rows = tool['compare_with_onnxruntime'](exported_backbone['out'], network, inputs, names,
                                            1e-4)
    assert all(row['ok'] for row in rows)
    # one row offset (+1: inside the 2 x 2 map) gets another embedding (a
    # change of every row embedding alike would not change the softmax)
    offset = layer.window_size[0] // 2 + 1
    with torch.no_grad():
        layer.rel_row[offset].add_(2.0)
    try:
        rows = tool['compare_with_onnxruntime'](exported_backbone['out'], network, inputs,
                                                names, 1e-4)
    finally:
        with torch.no_grad():
            layer.rel_row[offset].sub_(2.0)
    assert max(row['relative'] for row in rows) > 1e-3


def test_attention_stem_exports_with_dynamic_shapes(tool, tmp_path):
    result = _export(tool, tmp_path, DEMO, '--shape', '64', '64', '--dynamic',
                     '--cfg-options', 'model.backbone.stem_type=attention',
                     'model.backbone.stage_with_attention=(False,False,False,True)')
    _assert_matches(result)
    assert [c['input_shape'] for c in result['checks']] == [(1, 3, 64, 64), (2, 3, 96, 32)]


def test_bad_arguments(tool):
    with pytest.raises(SystemExit):
        tool['parse_args']([DEMO, '--opset', '11'])
    with pytest.raises(SystemExit):
        tool['parse_args']([DEMO, '--shape', '64', '0'])
    with pytest.raises(FileNotFoundError, match='config file not found'):
        tool['main'](['nope.py', '--out', 'x.onnx'])


def test_latency_tool_times_files_side_by_side(tmp_path):
    latency = runpy.run_path(osp.join(ROOT, 'tools', 'deployment', 'onnx_latency.py'))
    files = []
    for channels in (4, 8):
        path = str(tmp_path / f'conv{channels}.onnx')
        with torch.no_grad():
            torch.onnx.export(torch.nn.Conv2d(3, channels, 3, padding=1),
                              (torch.rand(1, 3, 16, 16), ), path, input_names=['input'],
                              opset_version=17, dynamo=False)
        files.append(path)
    results = latency['main']([*files, '--repeats', '3', '--warmup', '1',
                               '--json', str(tmp_path / 'latency.json')])
    assert [r['file'] for r in results] == files
    assert results[0]['ratio'] == 1.0 and results[1]['median_s'] > 0
    assert results[0]['input_shape'] == '1x3x16x16'
    assert osp.isfile(tmp_path / 'latency.json')
    with pytest.raises(SystemExit):
        latency['parse_args']([str(tmp_path / 'missing.onnx')])
