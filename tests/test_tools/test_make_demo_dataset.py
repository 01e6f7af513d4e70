import json
import os
import os.path as osp
import runpy
import sys

import cv2
import pytest
from pycocotools.coco import COCO

from sasa_mmdet.datasets import (SHAPE_CLASSES, SyntheticShapesDataset,
                                 generate_synthetic_shapes)

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SMALL = dict(num_train=40, num_val=6, size=64)


def _read_tree(root):
    """{relative path: bytes} of every file below ``root``."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = osp.join(folder, name)
            with open(path, 'rb') as f:
                files[osp.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope='module')
def dataset_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('shapes'))
    assert generate_synthetic_shapes(out, **SMALL)
    return out


def test_layout_and_determinism(dataset_dir, tmp_path):
    files = _read_tree(dataset_dir)
    assert {'annotations/train.json', 'annotations/val.json',
            'manifest.json'} <= set(files)
    assert sum(p.startswith('train/') for p in files) == SMALL['num_train']
    assert sum(p.startswith('val/') for p in files) == SMALL['num_val']
    # same arguments, same bytes
    assert generate_synthetic_shapes(str(tmp_path), **SMALL)
    assert _read_tree(str(tmp_path)) == files


def test_val_split_does_not_depend_on_num_train(dataset_dir, tmp_path):
    generate_synthetic_shapes(
        str(tmp_path), num_train=3, num_val=SMALL['num_val'], size=64)
    theirs, ours = _read_tree(dataset_dir), _read_tree(str(tmp_path))
    for path, data in ours.items():
        if path.startswith('val') or path == 'annotations/val.json':
            assert theirs[path] == data, path


def test_skips_regeneration_only_when_up_to_date(tmp_path):
    out = str(tmp_path)
    assert generate_synthetic_shapes(out, num_train=2, num_val=1, size=64)
    image = osp.join(out, 'train', '000001.jpg')
    mtime = os.stat(image).st_mtime_ns
    assert not generate_synthetic_shapes(out, num_train=2, num_val=1, size=64)
    assert os.stat(image).st_mtime_ns == mtime
    # other arguments, a forced run or a missing manifest regenerate
    assert generate_synthetic_shapes(out, num_train=1, num_val=1, size=64)
    assert not osp.exists(image.replace('000001', '000002'))
    assert generate_synthetic_shapes(
        out, num_train=1, num_val=1, size=64, force=True)
    os.remove(osp.join(out, 'manifest.json'))
    assert generate_synthetic_shapes(out, num_train=1, num_val=1, size=64)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_valid_coco(dataset_dir, split):
    coco = COCO(osp.join(dataset_dir, 'annotations', f'{split}.json'))
    assert [c['name']
            for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    num_images = SMALL[f'num_{split}']
    assert len(coco.getImgIds()) == num_images
    for img in coco.loadImgs(coco.getImgIds()):
        data = cv2.imread(osp.join(dataset_dir, split, img['file_name']))
        assert data.shape == (img['height'], img['width'], 3) == (64, 64, 3)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns
    for ann in anns:
        x, y, w, h = ann['bbox']
        assert w > 0 and h > 0 and ann['area'] > 0
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert ann['iscrowd'] == 0
    if split == 'train':
        with_objects = {ann['image_id'] for ann in anns}
        assert len(with_objects) < num_images, 'no image without objects'
        assert {ann['category_id'] for ann in anns} == set(coco.getCatIds())


def test_loads_in_mmdet(dataset_dir):
    dataset = SyntheticShapesDataset(
        data_root=dataset_dir,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True)
        ])
    assert dataset.metainfo['classes'] == SHAPE_CLASSES
    with open(osp.join(dataset_dir, 'annotations', 'train.json')) as f:
        coco = json.load(f)
    # empty images are filtered for training, as for COCO
    assert len(dataset) == len({a['image_id'] for a in coco['annotations']})
    sample = dataset[0]
    img_id = sample['img_id']
    anns = [a for a in coco['annotations'] if a['image_id'] == img_id]
    assert sample['img'].shape == (64, 64, 3)
    assert len(sample['gt_bboxes']) == len(anns)
    assert sorted(sample['gt_bboxes_labels'].tolist()) == sorted(
        a['category_id'] - 1 for a in anns)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_synthetic_shapes(str(tmp_path), num_train=-1)
    with pytest.raises(ValueError):
        generate_synthetic_shapes(str(tmp_path), size=8)
    with pytest.raises(ValueError):
        generate_synthetic_shapes(str(tmp_path), min_frac=0.5, max_frac=0.2)


def test_cli(tmp_path, monkeypatch, capsys):
    # run as a script (``__main__``), in this process: a fresh interpreter
    # would only add its start-up
    out = str(tmp_path / 'demo')
    tool = osp.join(REPO_ROOT, 'tools', 'misc', 'make_demo_dataset.py')
    monkeypatch.setattr(sys, 'argv', [
        tool, '--out', out, '--num-train', '3', '--num-val', '2', '--size',
        '64', '--seed', '1'
    ])
    runpy.run_path(tool, run_name='__main__')
    assert 'written to' in capsys.readouterr().out
    with open(osp.join(out, 'manifest.json')) as f:
        manifest = json.load(f)
    assert (manifest['num_train'], manifest['num_val'], manifest['size'],
            manifest['seed']) == (3, 2, 64, 1)
    assert len(os.listdir(osp.join(out, 'train'))) == 3
