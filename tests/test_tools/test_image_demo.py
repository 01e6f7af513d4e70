"""demo/image_demo.py: MMDetection's DetInferencer on one image, with a
checkpoint of the demo attention RetinaNet (tiny, generated image)."""
import json
import os.path as osp
import runpy

import mmcv
import numpy as np
import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'demo', 'image_demo.py')
DEMO = osp.join(ROOT, 'configs', 'demo', 'retinanet_sasa-tiny_shapes.py')
CLASSES = ('rectangle', 'ellipse', 'triangle')


@pytest.fixture(scope='module')
def tool():
    return runpy.run_path(TOOL)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A checkpoint whose class logits are pushed up (so every anchor scores
    about 0.99: only loaded weights give that) and a 120 x 100 image."""
    from sasa_mmdet.utils.inference import load_detector

    root = tmp_path_factory.mktemp('image_demo')
    torch.manual_seed(0)
    model = load_detector(DEMO)
    state = model.state_dict()
    state['bbox_head.retina_cls.bias'] = torch.full_like(
        state['bbox_head.retina_cls.bias'], 5.0)
    ckpt = str(root / 'model.pth')
    torch.save(
        dict(state_dict=state, meta=dict(dataset_meta=dict(classes=CLASSES))),
        ckpt)
    image = np.full((100, 120, 3), 40, np.uint8)
    image[20:60, 30:90] = (220, 60, 60)
    path = str(root / 'shapes.png')
    mmcv.imwrite(image, path)
    return ckpt, path


def test_detects_and_writes_boxes_and_picture(tool, files, tmp_path):
    ckpt, image = files
    out = tmp_path / 'out'
    results = tool['main']([
        image, DEMO, '--weights', ckpt, '--device', 'cpu', '--out-dir',
        str(out), '--pred-score-thr', '0.5'
    ])
    (pred, ) = results['predictions']
    assert osp.isfile(out / 'vis' / 'shapes.png')
    with open(out / 'preds' / 'shapes.json') as f:
        written = json.load(f)
    assert written['labels'] == pred['labels']
    # the checkpoint's weights reached the model: every score near sigmoid(5)
    assert 0 < len(written['scores']) <= 20  # the config's max_per_img
    assert min(written['scores']) > 0.9
    boxes = np.array(written['bboxes'])
    assert boxes.shape[1] == 4
    # boxes in the input image's pixels (120 x 100), not the resized 160 x 133
    assert boxes[:, [0, 2]].min() >= 0 and boxes[:, [0, 2]].max() <= 120
    assert boxes[:, [1, 3]].min() >= 0 and boxes[:, [1, 3]].max() <= 100
    assert set(written['labels']) <= {0, 1, 2}


@pytest.mark.parametrize('argv,message', [
    (['missing.jpg', DEMO], 'no such file'),
    (['{image}', DEMO, '--pred-score-thr', '1.5'], '--pred-score-thr'),
    (['{image}', DEMO, '--batch-size', '0'], '--batch-size'),
])
def test_bad_arguments_are_named(tool, files, argv, message, capsys):
    argv = [arg.format(image=files[1]) for arg in argv]
    with pytest.raises(SystemExit):
        tool['main'](argv)
    assert message in capsys.readouterr().err
