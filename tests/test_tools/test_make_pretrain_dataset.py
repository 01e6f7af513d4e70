"""The pretraining demo's classification set (tools/misc/make_pretrain_dataset.py):
deterministic, in mmpretrain's CustomDataset folder layout, balanced."""
import json
import os
import os.path as osp
import runpy
import sys

import cv2
import numpy as np
import pytest

from sasa_mmdet.datasets import (SHAPE_CLASSES, SHAPE_CLASSIFICATION_CLASSES,
                                 generate_synthetic_shape_classes)

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SMALL = dict(num_train_per_class=3, num_val_per_class=2, size=32)
CLASSES = sorted(SHAPE_CLASSIFICATION_CLASSES)


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
    out = str(tmp_path_factory.mktemp('shape_classes'))
    assert generate_synthetic_shape_classes(out, **SMALL)
    return out


def test_classes_include_the_detection_classes():
    assert set(SHAPE_CLASSES) <= set(SHAPE_CLASSIFICATION_CLASSES)
    assert len(set(SHAPE_CLASSIFICATION_CLASSES)) == 8


def test_layout(dataset_dir):
    files = _read_tree(dataset_dir)
    for split, per_class in (('train', 3), ('val', 2)):
        assert sorted(os.listdir(osp.join(dataset_dir, split))) == CLASSES
        for name in CLASSES:
            assert sorted(os.listdir(osp.join(dataset_dir, split, name))) == [
                f'{name}_{i:06d}.jpg' for i in range(1, per_class + 1)
            ]
        with open(osp.join(dataset_dir, 'meta', f'{split}.txt')) as f:
            lines = f.read().splitlines()
        assert len(lines) == per_class * len(CLASSES)
        for line in lines:
            path, label = line.split(' ')
            assert path.split('/')[0] == CLASSES[int(label)]
            assert osp.join(split, path) in files
    with open(osp.join(dataset_dir, 'classes.txt')) as f:
        assert f.read().splitlines() == CLASSES
    image = cv2.imread(osp.join(dataset_dir, 'val', 'star', 'star_000001.jpg'))
    assert image.shape == (32, 32, 3)


def test_deterministic_and_val_independent_of_train_size(dataset_dir,
                                                         tmp_path):
    files = _read_tree(dataset_dir)
    again = str(tmp_path / 'again')
    assert generate_synthetic_shape_classes(again, **SMALL)
    assert _read_tree(again) == files  # same arguments, same bytes
    fewer = str(tmp_path / 'fewer')
    generate_synthetic_shape_classes(
        fewer, num_train_per_class=1, num_val_per_class=2, size=32)
    theirs = _read_tree(fewer)
    for path, data in files.items():
        if path.startswith('val' + os.sep) or path == osp.join(
                'meta', 'val.txt'):
            assert theirs[path] == data, path
    other_seed = str(tmp_path / 'seed1')
    generate_synthetic_shape_classes(other_seed, seed=1, **SMALL)
    ring = osp.join('train', 'ring', 'ring_000001.jpg')
    assert _read_tree(other_seed)[ring] != files[ring]


def test_images_differ_within_and_across_classes(dataset_dir):
    images = {}
    for name in CLASSES:
        for index in (1, 2, 3):
            path = osp.join(dataset_dir, 'train', name,
                            f'{name}_{index:06d}.jpg')
            images[name, index] = cv2.imread(path).astype(np.int32)
    keys = list(images)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.abs(images[a] - images[b]).mean() > 5, (a, b)


def test_skips_regeneration_only_when_up_to_date(tmp_path):
    out = str(tmp_path)
    args = dict(num_train_per_class=2, num_val_per_class=1, size=32)
    assert generate_synthetic_shape_classes(out, **args)
    image = osp.join(out, 'train', 'cross', 'cross_000002.jpg')
    mtime = os.stat(image).st_mtime_ns
    assert not generate_synthetic_shape_classes(out, **args)
    assert os.stat(image).st_mtime_ns == mtime
    # other arguments, a forced run or a missing manifest regenerate; images
    # of an earlier, larger set are removed
    assert generate_synthetic_shape_classes(
        out, num_train_per_class=1, num_val_per_class=1, size=32)
    assert not osp.exists(image)
    assert generate_synthetic_shape_classes(
        out, num_train_per_class=1, num_val_per_class=1, size=32, force=True)
    os.remove(osp.join(out, 'manifest.json'))
    assert generate_synthetic_shape_classes(
        out, num_train_per_class=1, num_val_per_class=1, size=32)


def test_loads_in_mmpretrain_custom_dataset(dataset_dir):
    from mmengine.registry import DefaultScope
    from mmpretrain.datasets import CustomDataset

    with DefaultScope.overwrite_default_scope('mmpretrain'):
        _check_custom_dataset(CustomDataset, dataset_dir)


def _check_custom_dataset(CustomDataset, dataset_dir):
    dataset = CustomDataset(
        data_root=dataset_dir,
        data_prefix='val',
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='PackInputs')])
    assert list(dataset.metainfo['classes']) == CLASSES
    assert len(dataset) == 2 * len(CLASSES)
    labels = [dataset.get_data_info(i)['gt_label'] for i in range(len(dataset))]
    assert sorted(labels) == sorted(list(range(len(CLASSES))) * 2)
    sample = dataset[0]
    assert tuple(sample['inputs'].shape) == (3, 32, 32)
    # the folder scan and meta/val.txt give the same labels
    listed = CustomDataset(
        data_root=dataset_dir,
        data_prefix='val',
        ann_file='meta/val.txt',
        classes=osp.join(dataset_dir, 'classes.txt'),
        pipeline=[])
    assert sorted((osp.relpath(d['img_path'], dataset_dir), d['gt_label'])
                  for d in listed) == sorted(
                      (osp.relpath(dataset.get_data_info(i)['img_path'],
                                   dataset_dir),
                       dataset.get_data_info(i)['gt_label'])
                      for i in range(len(dataset)))


@pytest.mark.parametrize('kwargs,name', [
    (dict(num_train_per_class=0), 'num_train_per_class'),
    (dict(num_val_per_class=-1), 'num_val_per_class'),
    (dict(num_train_per_class=2.5), 'num_train_per_class'),
    (dict(size=16), 'size'),
    (dict(min_frac=0.9, max_frac=0.5), 'min_frac'),
    (dict(max_frac=1.2), 'max_frac'),
])
def test_invalid_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_synthetic_shape_classes(str(tmp_path), **kwargs)


def _run_cli(argv, monkeypatch, capsys):
    """The tool run as a script (``__main__``), in this process (a fresh
    interpreter would only add its start-up): what it printed."""
    tool = osp.join(REPO_ROOT, 'tools', 'misc', 'make_pretrain_dataset.py')
    monkeypatch.setattr(sys, 'argv', [tool, *argv])
    runpy.run_path(tool, run_name='__main__')
    return capsys.readouterr().out


def test_cli(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'pretrain')
    argv = ['--out', out, '--num-train-per-class', '2',
            '--num-val-per-class', '1', '--size', '32', '--seed', '3']
    assert 'written to' in _run_cli(argv, monkeypatch, capsys)
    with open(osp.join(out, 'manifest.json')) as f:
        manifest = json.load(f)
    assert (manifest['num_train_per_class'], manifest['num_val_per_class'],
            manifest['size'], manifest['seed']) == (2, 1, 32, 3)
    assert manifest['classes'] == CLASSES
    assert len(os.listdir(osp.join(out, 'train', 'hexagon'))) == 2
    assert 'already up to date' in _run_cli(argv, monkeypatch, capsys)
