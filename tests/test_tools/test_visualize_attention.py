"""tools/analysis_tools/visualize_attention.py: pictures of the attention weights,
drawn where the layer looks (tiny random model, generated image)."""
import math
import os.path as osp
import runpy

import mmcv
import numpy as np
import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'tools', 'analysis_tools', 'visualize_attention.py')
DEMO = osp.join(ROOT, 'configs', 'demo', 'retinanet_sasa-tiny_shapes.py')
DEMO_ALL = osp.join(ROOT, 'configs', 'demo', 'retinanet_sasa-tiny_shapes_sasa-fpn_sasa-head.py')


@pytest.fixture(scope='module')
def tool():
    return runpy.run_path(TOOL)


@pytest.fixture(scope='module')
def demo_files(tmp_path_factory):
    """A checkpoint of the demo model (random weights) and a 120 x 100 image."""
    from sasa_mmdet.utils.inference import load_detector

    root = tmp_path_factory.mktemp('vis')
    torch.manual_seed(0)
    model = load_detector(DEMO)
    ckpt = str(root / 'model.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    image = np.full((100, 120, 3), 40, np.uint8)
    image[20:60, 30:90] = (220, 60, 60)
    path = str(root / 'image.png')
    mmcv.imwrite(image, path)
    return ckpt, path


def test_writes_the_pictures(tool, demo_files, tmp_path):
    ckpt, image = demo_files
    out = str(tmp_path / 'out')
    written = tool['main']([DEMO, ckpt, image, '--points', '60,40', '10,90', '--out-dir', out])
    # one layer per backbone stage by default
    assert list(written) == ['backbone.layer1.1.conv2', 'backbone.layer2.1.conv2',
                             'backbone.layer3.1.conv2', 'backbone.layer4.1.conv2']
    for files in written.values():
        assert [osp.basename(f).split('_', 1)[1] for f in files] == [
            'p0_window.png', 'p1_window.png', 'entropy.png', 'offsets.png']
        for f in files:
            picture = mmcv.imread(f)
            assert picture is not None and picture.shape[0] > 100 and picture.std() > 0


def test_default_points_and_chosen_layers(tool, demo_files, tmp_path):
    ckpt, image = demo_files
    written = tool['main']([DEMO, ckpt, image, '--layers', 'backbone.layer2.0.conv1',
                            '--num-points', '2', '--score-thr', '0', '--out-dir',
                            str(tmp_path)])
    assert list(written) == ['backbone.layer2.0.conv1']
    assert len(written['backbone.layer2.0.conv1']) == 2 + 2


def test_default_layers_include_stem_and_fpn(tool):
    from sasa_mmdet.utils.inference import load_detector

    model = load_detector(DEMO_ALL, cfg_options={'model.backbone.stem_type': 'attention'})
    assert tool['default_layers'](model) == [
        'backbone.stem', 'backbone.layer1.1.conv2', 'backbone.layer2.1.conv2',
        'backbone.layer3.1.conv2', 'backbone.layer4.1.conv2', 'neck.fpn_convs.0.conv']
    # the shared head runs once per level: NAME@k picks the level
    assert tool['resolve_layers'](model, ['bbox_head.cls_convs.0.conv@3']) == [
        ('bbox_head.cls_convs.0.conv@3', 'bbox_head.cls_convs.0.conv', 3)]


def test_taps_are_placed_at_the_layers_stride_and_dilation(tool):
    # a 10 x 10 layer input of a 40 x 40 network input (stride 4) of an image
    # resized by 0.5: one layer pixel is 8 image pixels
    geometry = tool['LayerGeometry']((10, 10), (40, 40), (0.5, 0.5))
    assert geometry.to_feature(29.0, 21.0) == (2, 3)
    taps = tool['tap_positions'](geometry, 2, 3, (3, 3), (2, 2))
    assert taps.shape == (9, 2)
    assert taps[4].tolist() == [28.0, 20.0]  # the centre tap: pixel (2, 3)'s centre
    assert taps[0].tolist() == [28.0 - 16, 20.0 - 16]  # 2 layer pixels up-left
    assert taps[5].tolist() == [28.0 + 16, 20.0]  # row-major: (ty, tx) = (1, 2)


def test_entropy_and_mean_offsets(tool):
    from sasa_mmdet.layers.attention_weights import tap_offsets

    offsets = tap_offsets((3, 3))
    uniform = torch.full((1, 9, 2, 2), 1 / 9)
    torch.testing.assert_close(tool['entropy'](uniform), torch.full((1, 2, 2), math.log(9)))
    one_hot = torch.zeros(1, 9, 2, 2)
    one_hot[:, 7] = 1  # the tap below
    assert (tool['entropy'](one_hot) == 0).all()
    mean = tool['mean_offsets'](one_hot, offsets)
    assert mean[0, :, 0, 0].tolist() == [1.0, 0.0]


def test_bad_arguments_say_what_is_wrong(tool, demo_files, tmp_path):
    ckpt, image = demo_files
    with pytest.raises(ValueError, match=r"'backbone.conv1' is not an attention layer "
                       r'\(a Conv2d\); attention layers: backbone.layer1.0.conv1'):
        tool['main']([DEMO, ckpt, image, '--layers', 'backbone.conv1'])
    with pytest.raises(ValueError, match="'nope' is not a module of this model"):
        tool['main']([DEMO, ckpt, image, '--layers', 'nope'])
    with pytest.raises(SystemExit, match=r'lie outside the 120x100 image'):
        tool['main']([DEMO, ckpt, image, '--points', '130,10', '--out-dir', str(tmp_path)])
    with pytest.raises(SystemExit):
        tool['parse_args']([DEMO, ckpt, image, '--points', '1;2'])
    conv_twin = osp.join(ROOT, 'configs', 'demo', 'retinanet_r-tiny_shapes.py')
    from sasa_mmdet.utils.inference import load_detector
    model = load_detector(conv_twin)
    torch.save(dict(state_dict=model.state_dict()), str(tmp_path / 'conv.pth'))
    with pytest.raises(SystemExit, match='has no attention layers'):
        tool['main']([conv_twin, str(tmp_path / 'conv.pth'), image])
