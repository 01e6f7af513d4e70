"""tools/deployment/export_onnx.py and onnx_inference.py: both attention
graphs (standard operators; fused sasa_mmdet::LocalAttention nodes with the
package's onnxruntime library), tensor mode and end to end, and onnxruntime
gives PyTorch's outputs and detections (tiny inputs, seeded random weights)."""
import os.path as osp
import runpy

import numpy as np
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
    # --backend onnxruntime allows our domain, and only ours
    assert tool['check_standard_ops'](str(custom), ('sasa_mmdet', )) == {'LocalAttention': 1}
    with pytest.raises(ValueError, match='outside the standard ONNX domain and other'):
        tool['check_standard_ops'](str(custom), ('other', ))


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
                   '--backend', 'onnx', '--tensor-only', '--cfg-options',
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
                     '--backend', 'onnx', '--tensor-only',
                     '--cfg-options', 'model.backbone.stem_type=attention',
                     'model.backbone.stage_with_attention=(False,False,False,True)')
    _assert_matches(result)
    assert [c['input_shape'] for c in result['checks']] == [(1, 3, 64, 64), (2, 3, 96, 32)]


def test_bad_arguments(tool):
    with pytest.raises(SystemExit):
        tool['parse_args']([DEMO, '--opset', '11'])
    with pytest.raises(SystemExit):
        tool['parse_args']([DEMO, '--backend', 'tensorrt'])
    with pytest.raises(SystemExit):
        tool['parse_args']([DEMO, '--box-rtol', '0'])
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


# --------------------------------------------------------------------------
# The fused attention node and end-to-end detection.

def _library_built():
    from sasa_mmdet.deployment import onnxruntime_ops_available
    return onnxruntime_ops_available()


needs_library = pytest.mark.skipif(
    not _library_built(),
    reason='the onnxruntime custom-op library is not built (no onnxruntime headers)')

# attention in the last two stages and the stem: every kind of attention
# layer, a short export
SMALL = ['--cfg-options', 'model.backbone.stem_type=attention',
         'model.backbone.stage_with_attention=(False,False,True,True)']


def _demo_detector(checkpoint=None):
    """The small attention RetinaNet, seeded, its classifier spread so that
    random weights give well-separated scores (detections above the
    threshold, few near-ties for NMS to break differently)."""
    from mmengine.config import Config

    from sasa_mmdet.utils.inference import load_detector
    cfg = Config.fromfile(DEMO)
    cfg.merge_from_dict({'model.backbone.stem_type': 'attention',
                         'model.backbone.stage_with_attention': (False, False, True, True),
                         'model.test_cfg.score_thr': 0.2})
    torch.manual_seed(0)
    detector = load_detector(cfg, checkpoint)
    if checkpoint is None:
        with torch.no_grad():
            head = detector.bbox_head
            head.retina_cls.weight.mul_(8)
            head.retina_reg.weight.mul_(10)
    return detector


@needs_library
def test_fused_backend_tensor_mode_matches(tool, tmp_path):
    result = _export(tool, tmp_path, DEMO, '--shape', '64', '64', '--dynamic',
                     '--backend', 'onnxruntime', '--tensor-only', *SMALL)
    _assert_matches_fused(result)


def _assert_matches_fused(result):
    assert result['backend'] == 'onnxruntime'
    # the stem and 2 stages x 2 blocks x 2 layers, one node each; the only
    # Softmax left is the stem's value-mixture weights
    assert result['ops']['LocalAttention'] == 9 and result['ops'].get('Softmax', 0) <= 1
    for check in result['checks']:
        for row in check['outputs']:
            assert row['ok'] and row['relative'] <= 1e-4, row


@pytest.mark.parametrize('backend', [
    'onnx', pytest.param('onnxruntime', marks=needs_library)])
def test_end_to_end_detections_match_mmdet_predict(tool, tmp_path, backend):
    detector = _demo_detector()
    out = str(tmp_path / 'end2end.onnx')
    result = tool['main']([DEMO, '--shape', '64', '64', '--dynamic', '--backend', backend,
                           '--out', out], detector=detector)
    assert result['end2end'] and result['outputs'] == ['dets', 'labels']
    assert result['ops']['NonMaxSuppression'] == 1
    assert ('LocalAttention' in result['ops']) == (backend == 'onnxruntime')
    checks = [image for check in result['checks'] for image in check['detections']]
    assert len(checks) == 3  # 1 image at 64x64, 2 at 96x32
    assert sum(row['count'][1] for row in checks) >= 5  # detections to compare
    for row in checks:
        assert row['ok'] and row['labels_equal'] and row['relative'] <= 1e-3, row
    # padding rows: score 0, label -1; max_per_img rows (the demo's 20)
    import onnxruntime as ort
    options = ort.SessionOptions()
    if backend == 'onnxruntime':
        options.register_custom_ops_library(__import__('sasa_mmdet').onnxruntime_ops_path())
    session = ort.InferenceSession(out, options, providers=['CPUExecutionProvider'])
    dets, labels = session.run(None, {'input': torch.randn(3, 3, 64, 96).numpy()})
    assert dets.shape == (3, 20, 5) and labels.shape == (3, 20)
    assert ((labels == -1) == (dets[..., 4] == 0)).all()


def test_a_wrong_detection_is_caught(tool):
    want = [dict(bboxes=np.array([[1., 2., 30., 40.]], np.float32),
                 scores=np.array([0.9], np.float32), labels=np.array([1]))]
    ok = tool['compare_detections'](want, want, 1e-3)[0]
    assert ok['ok'] and ok['count'] == (1, 1)
    moved = [dict(want[0], bboxes=want[0]['bboxes'] + np.array([0, 0, 0.1, 0], np.float32))]
    assert not tool['compare_detections'](moved, want, 1e-3)[0]['ok']
    relabelled = [dict(want[0], labels=np.array([2]))]
    assert not tool['compare_detections'](relabelled, want, 1e-3)[0]['labels_equal']
    none = [dict(bboxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32),
                 labels=np.zeros(0, np.int64))]
    assert tool['compare_detections'](none, want, 1e-3)[0]['count'] == (0, 1)


def test_onnx_inference_draws_pytorchs_detections(tool, tmp_path):
    """An image through the config's pipeline, the end-to-end file in
    onnxruntime, boxes back in image pixels: PyTorch's test_step detections."""
    import mmcv
    detector = _demo_detector()
    checkpoint = str(tmp_path / 'seeded.pth')
    torch.save({'state_dict': detector.state_dict()}, checkpoint)
    model = str(tmp_path / 'demo.onnx')
    tool['main']([DEMO, '--shape', '160', '160', '--backend', 'onnx', '--skip-check',
                  '--dynamic', '--out', model], detector=detector)
    rng = np.random.default_rng(0)
    image = np.full((120, 150, 3), 30, np.uint8)  # resized to 160 x 128 by the pipeline
    image[20:70, 30:90] = rng.integers(100, 255, 3, dtype=np.uint8)
    image_path = str(tmp_path / 'shapes.png')
    mmcv.imwrite(image, image_path)
    inference = runpy.run_path(osp.join(ROOT, 'tools', 'deployment', 'onnx_inference.py'))
    # the checkpoint's config change (stem, stages, threshold) as cfg-options
    # are not an argument of onnx_inference: write the config it came from
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO)
    cfg.merge_from_dict({'model.backbone.stem_type': 'attention',
                         'model.backbone.stage_with_attention': (False, False, True, True),
                         'model.test_cfg.score_thr': 0.2})
    config = str(tmp_path / 'demo_small.py')
    cfg.dump(config)
    drawn = str(tmp_path / 'drawn.png')
    result = inference['main']([config, model, image_path, '--out', drawn,
                                '--checkpoint', checkpoint, '--score-thr', '0.2'])
    row = result['comparison']
    assert row['ok'] and row['count'][0] == row['count'][1] >= 1, row
    assert row['relative'] <= 1e-3
    # boxes in the original image (150 x 120)
    assert result['detections']['bboxes'][:, 2].max() <= 150 + 1e-3
    assert mmcv.imread(drawn).shape == image.shape
    with pytest.raises(SystemExit):
        inference['parse_args']([config, str(tmp_path / 'missing.onnx'), image_path])


def test_backend_choice(tool, monkeypatch):
    """The default is the fused graph when the library is built, else the
    standard one; asking for the fused graph without it says how to build it."""
    import sasa_mmdet.deployment.onnx_symbolic as symbolic
    backend, why = tool['resolve_backend'](None)
    assert backend == ('onnxruntime' if _library_built() else 'onnx') and why
    assert tool['resolve_backend']('onnx-per-tap')[0] == 'onnx-per-tap'
    monkeypatch.setattr(symbolic.glob, 'glob', lambda pattern: [])
    assert tool['resolve_backend'](None)[0] == 'onnx'
    with pytest.raises(FileNotFoundError, match='install_onnxruntime_headers.sh'):
        tool['resolve_backend']('onnxruntime')
