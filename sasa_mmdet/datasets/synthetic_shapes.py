"""A small, deterministic synthetic detection dataset of coloured shapes.

It exists so that the training and test tools, the configs and the tests can
run end to end offline and in seconds, without COCO. Images show filled
axis-aligned rectangles and ellipses and freely drawn triangles of varied
size, aspect and colour on smooth, striped, noisy backgrounds; some images
hold no object. (Rotated rectangles and ellipses, version 1, are much slower
to learn: a small convolutional RetinaNet reached 0.29 mAP instead of 0.41
after the same 24 epochs.) Annotations
are written in COCO format, so mmdet's :class:`~mmdet.datasets.CocoDataset`
and :class:`~mmdet.evaluation.CocoMetric` (pycocotools) read them unchanged.

Layout written by :func:`generate_synthetic_shapes`::

    out_dir/
        annotations/train.json
        annotations/val.json
        train/000001.jpg ...
        val/000001.jpg ...
        manifest.json

Every image is drawn from its own random generator seeded with
``(seed, split, index)``, so the same arguments give the same bytes on every
run, and the validation images do not change when ``num_train`` does.
"""
import json
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

#: Bump when the drawing changes, so old folders are regenerated.
GENERATOR_VERSION = 2

SHAPE_CLASSES = ('rectangle', 'ellipse', 'triangle')
SHAPE_PALETTE = [(220, 20, 60), (0, 128, 255), (50, 205, 50)]

_SPLITS = ('train', 'val')
_MANIFEST = 'manifest.json'
_IMAGE_NAME = re.compile(r'\d{6}\.jpg')
_JPEG_QUALITY = 90
# Objects may overlap a little, never hide each other: at most this fraction
# of the smaller box may be covered by another box.
_MAX_OVERLAP = 0.2
_MAX_OBJECTS = 5
_EMPTY_PROB = 0.1


@DATASETS.register_module()
class SyntheticShapesDataset(CocoDataset):
    """COCO-format dataset of the synthetic shapes written by
    :func:`generate_synthetic_shapes`.

    Only the class names and palette differ from
    :class:`~mmdet.datasets.CocoDataset`; all arguments are the same.

    Examples:
        >>> from sasa_mmdet.datasets import generate_synthetic_shapes
        >>> generate_synthetic_shapes('/tmp/shapes', num_train=4, num_val=2)
        >>> dataset = SyntheticShapesDataset(
        ...     data_root='/tmp/shapes', ann_file='annotations/val.json',
        ...     data_prefix=dict(img='val/'), pipeline=[],
        ...     filter_cfg=None)
        >>> print(dataset.metainfo['classes'])
        ('rectangle', 'ellipse', 'triangle')
    """

    METAINFO = dict(classes=SHAPE_CLASSES, palette=SHAPE_PALETTE)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient with stripes and pixel noise (BGR uint8)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    corners = rng.uniform(40, 215, size=(4, 3)).astype(np.float32)
    # bilinear blend of four corner colours, shape (size, size, 3)
    img = (
        corners[0] * ((1 - yy) * (1 - xx))[..., None] + corners[1] *
        ((1 - yy) * xx)[..., None] + corners[2] * (yy * (1 - xx))[..., None] +
        corners[3] * (yy * xx)[..., None])
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 8)
    stripes = np.sin(2 * np.pi * freq *
                     (xx * np.cos(angle) + yy * np.sin(angle)))
    img += rng.uniform(5, 20) * stripes[..., None]
    img += rng.normal(0, rng.uniform(3, 8), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, label: int, size: int,
                   min_frac: float, max_frac: float) -> np.ndarray:
    """Vertices (N, 2) of a shape of class ``label``, centred at the
    origin, whose extent is between ``min_frac`` and ``max_frac`` of
    ``size``."""
    extent = rng.uniform(min_frac, max_frac) * size
    aspect = rng.uniform(0.5, 2.0)
    w, h = extent * min(1.0, aspect), extent * min(1.0, 1 / aspect)
    if label == 0:  # rectangle (squares included), axis-aligned
        pts = cv2.boxPoints(((0.0, 0.0), (w, h), 0.0))
    elif label == 1:  # ellipse (circles included), axis-aligned
        pts = cv2.ellipse2Poly((0, 0), (int(round(w / 2)), int(round(h / 2))),
                               0, 0, 360, 10).astype(np.float32)
    else:  # triangle: three points on a circle, far enough apart
        base = rng.uniform(0, 2 * np.pi)
        offsets = np.array([0.0, rng.uniform(1.6, 2.6), 0.0])
        offsets[2] = offsets[1] + rng.uniform(1.6, 2.6)
        theta = base + offsets
        pts = np.stack([np.cos(theta), np.sin(theta)], axis=1) * (extent / 2)
    return pts.astype(np.float32)


def _box_overlap(a: List[float], b: List[float]) -> float:
    """Intersection of two ``[x1, y1, x2, y2]`` boxes over the area of the
    smaller one."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _draw_image(rng: np.random.Generator, size: int, min_frac: float,
                max_frac: float) -> Tuple[np.ndarray, List[Dict]]:
    """Draw one image; return it (BGR) and its objects (label, polygon,
    box)."""
    img = _background(rng, size)
    num_objects = 0 if rng.random() < _EMPTY_PROB else int(
        rng.integers(1, _MAX_OBJECTS + 1))
    objects: List[Dict] = []
    for _ in range(num_objects):
        for _attempt in range(20):
            label = int(rng.integers(len(SHAPE_CLASSES)))
            pts = _shape_polygon(rng, label, size, min_frac, max_frac)
            lo, hi = pts.min(0), pts.max(0)
            if np.any(hi - lo >= size - 2):
                continue
            centre = rng.uniform(-lo + 1, size - 1 - hi)
            pts = (pts + centre).astype(np.float32)
            box = [*pts.min(0).tolist(), *pts.max(0).tolist()]
            if all(
                    _box_overlap(box, o['box']) <= _MAX_OVERLAP
                    for o in objects):
                break
        else:
            continue
        # a colour that stands out from the background under the shape
        x1, y1, x2, y2 = (int(v) for v in box)
        under = img[y1:y2 + 1, x1:x2 + 1].reshape(-1, 3).mean(0)
        for _attempt in range(10):
            color = rng.integers(0, 256, size=3)
            if np.abs(color - under).sum() > 150:
                break
        cv2.fillPoly(
            img, [np.round(pts).astype(np.int32)],
            tuple(int(c) for c in color),
            lineType=cv2.LINE_AA)
        objects.append(dict(label=label, polygon=pts, box=box))
    return img, objects


def _write_split(out_dir: str, split: str, split_id: int, num_images: int,
                 size: int, seed: int, min_frac: float,
                 max_frac: float) -> Dict:
    """Write the images of one split and return its COCO dict."""
    img_dir = osp.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    # drop images of an earlier, larger generation (only our own names)
    for name in os.listdir(img_dir):
        if _IMAGE_NAME.fullmatch(name):
            os.remove(osp.join(img_dir, name))
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_id, index])
        img, objects = _draw_image(rng, size, min_frac, max_frac)
        image_id = index + 1
        file_name = f'{image_id:06d}.jpg'
        ok, buf = cv2.imencode('.jpg', img,
                               [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        assert ok, f'JPEG encoding failed for {file_name}'
        with open(osp.join(img_dir, file_name), 'wb') as f:
            f.write(buf.tobytes())
        images.append(
            dict(id=image_id, file_name=file_name, width=size, height=size))
        for obj in objects:
            x1, y1, x2, y2 = (round(v, 2) for v in obj['box'])
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=obj['label'] + 1,
                    bbox=[x1, y1, round(x2 - x1, 2),
                          round(y2 - y1, 2)],
                    area=round(float(cv2.contourArea(obj['polygon'])), 2),
                    segmentation=[
                        np.round(obj['polygon'], 2).reshape(-1).tolist()
                    ],
                    iscrowd=0))
    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(SHAPE_CLASSES)
    ]
    return dict(
        info=dict(description=f'sasa_mmdet synthetic shapes ({split})'),
        images=images,
        annotations=annotations,
        categories=categories)


def generate_synthetic_shapes(out_dir: str = 'data/sasa_demo',
                              num_train: int = 400,
                              num_val: int = 100,
                              size: int = 160,
                              seed: int = 0,
                              min_frac: float = 0.1,
                              max_frac: float = 0.45,
                              force: bool = False) -> bool:
    """Write the synthetic shapes dataset to ``out_dir``.

    Args:
        out_dir (str): Target folder. Defaults to ``'data/sasa_demo'``.
        num_train (int): Number of training images. Defaults to 400.
        num_val (int): Number of held-out validation images. Defaults to 100.
        size (int): Side of the square images in pixels. Defaults to 160.
        seed (int): Random seed. Defaults to 0.
        min_frac (float): Smallest object extent, as a fraction of ``size``.
            Defaults to 0.1.
        max_frac (float): Largest object extent, as a fraction of ``size``.
            Defaults to 0.45.
        force (bool): Regenerate even if ``out_dir`` already holds this
            dataset. Defaults to False.

    Returns:
        bool: True if files were written, False if ``out_dir`` already held
        the same version of the dataset (read from its ``manifest.json``).
    """
    if num_train < 0 or num_val < 0:
        raise ValueError('num_train and num_val must be >= 0, got '
                         f'{num_train} and {num_val}')
    if size < 32:
        raise ValueError(f'size must be >= 32 pixels, got {size}')
    if not 0 < min_frac <= max_frac < 1:
        raise ValueError('expected 0 < min_frac <= max_frac < 1, got '
                         f'min_frac={min_frac}, max_frac={max_frac}')
    manifest = dict(
        generator='sasa_mmdet.datasets.synthetic_shapes',
        version=GENERATOR_VERSION,
        num_train=num_train,
        num_val=num_val,
        size=size,
        seed=seed,
        min_frac=min_frac,
        max_frac=max_frac)
    manifest_path = osp.join(out_dir, _MANIFEST)
    if not force and _read_manifest(manifest_path) == manifest and all(
            osp.isfile(osp.join(out_dir, 'annotations', f'{split}.json'))
            for split in _SPLITS):
        return False

    # The manifest is removed first and written last: an interrupted run
    # never looks complete.
    if osp.exists(manifest_path):
        os.remove(manifest_path)
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    for split_id, (split,
                   num) in enumerate(zip(_SPLITS, (num_train, num_val))):
        coco = _write_split(out_dir, split, split_id, num, size, seed,
                            min_frac, max_frac)
        with open(osp.join(out_dir, 'annotations', f'{split}.json'), 'w') as f:
            json.dump(coco, f)
    with open(manifest_path, 'w') as f:
        json.dump(manifest, f, indent=2)
    return True


def _read_manifest(path: str) -> Optional[Dict]:
    """The manifest at ``path``, or None if missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Classification set for pretraining (tools/misc/make_pretrain_dataset.py)
# ---------------------------------------------------------------------------

#: Bump when the drawing of the classification set changes.
CLASSIFICATION_GENERATOR_VERSION = 2

#: Classes of the classification set: the detection set's three and five
#: more, so that pretraining has to tell apart more than the detector sees
#: (ImageNet holds COCO's classes and many more). Folder names, as
#: mmpretrain's ``CustomDataset`` reads them (it sorts them).
SHAPE_CLASSIFICATION_CLASSES = ('rectangle', 'ellipse', 'triangle', 'diamond',
                                'cross', 'star', 'hexagon', 'ring')

_CLS_MANIFEST = 'manifest.json'
# '<class>_000001.jpg': unique across classes (mmpretrain's visualiser names
# its drawings after the file name)
_CLS_IMAGE_NAME = re.compile(r'[a-z]+_\d{6}\.jpg')


def _regular_polygon(num_vertices: int, radii: Tuple[float, ...],
                     angle: float, w: float, h: float) -> np.ndarray:
    """Vertices of a star-like polygon: ``num_vertices`` points at angles
    ``angle + 2 pi i / n`` and radius ``radii[i % len(radii)]``, scaled to a
    ``w`` x ``h`` extent."""
    theta = angle + 2 * np.pi * np.arange(num_vertices) / num_vertices
    radius = np.asarray([radii[i % len(radii)] for i in range(num_vertices)])
    return np.stack([np.cos(theta) * radius * w / 2,
                     np.sin(theta) * radius * h / 2], axis=1)


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return pts @ np.array([[cos, sin], [-sin, cos]])


def _class_polygons(rng: np.random.Generator, name: str, size: int,
                    min_frac: float, max_frac: float) -> List[np.ndarray]:
    """Polygons (centred at the origin) of one shape of class ``name``: one,
    or an outer and an inner (hole) one for the ring."""
    if name in ('rectangle', 'ellipse', 'triangle'):
        # drawn exactly as in the detection set
        label = SHAPE_CLASSES.index(name)
        return [_shape_polygon(rng, label, size, min_frac, max_frac)]
    extent = rng.uniform(min_frac, max_frac) * size
    aspect = rng.uniform(0.6, 1.6)
    w, h = extent * min(1.0, aspect), extent * min(1.0, 1 / aspect)
    if name == 'diamond':  # axis-aligned rhombus (a rotated one is a square)
        pts = np.array([[0, -h / 2], [w / 2, 0], [0, h / 2], [-w / 2, 0]])
    elif name == 'cross':  # plus sign, any rotation (an x is a cross too)
        t = rng.uniform(0.18, 0.35) / 2
        unit = np.array([[-t, -.5], [t, -.5], [t, -t], [.5, -t], [.5, t],
                         [t, t], [t, .5], [-t, .5], [-t, t], [-.5, t],
                         [-.5, -t], [-t, -t]])
        pts = _rotate(unit * [w, h], rng.uniform(0, np.pi / 2))
    elif name == 'star':  # five points
        pts = _regular_polygon(10, (1.0, rng.uniform(0.38, 0.5)),
                               rng.uniform(0, 2 * np.pi), w, h)
    elif name == 'hexagon':
        pts = _regular_polygon(6, (1.0, ), rng.uniform(0, np.pi / 3), w, h)
    elif name == 'ring':  # an ellipse with an elliptic hole
        outer = cv2.ellipse2Poly((0, 0), (int(round(w / 2)),
                                          int(round(h / 2))), 0, 0, 360,
                                 10).astype(np.float32)
        return [outer, outer * rng.uniform(0.45, 0.62)]
    else:
        raise ValueError(f'unknown shape class {name!r}; expected one of '
                         f'{SHAPE_CLASSIFICATION_CLASSES}')
    return [pts.astype(np.float32)]


def _draw_class_image(rng: np.random.Generator, name: str, size: int,
                      min_frac: float, max_frac: float) -> np.ndarray:
    """One image (BGR) with one shape of class ``name`` somewhere on the
    detection set's backgrounds, in a colour that stands out."""
    img = _background(rng, size)
    polygons = _class_polygons(rng, name, size, min_frac, max_frac)
    lo, hi = polygons[0].min(0), polygons[0].max(0)
    # shapes larger than the image are shrunk to fit
    scale = min(1.0, (size - 3) / float(np.max(hi - lo)))
    polygons = [p * scale for p in polygons]
    lo, hi = lo * scale, hi * scale
    centre = rng.uniform(-lo + 1, size - 1 - hi)
    polygons = [np.round(p + centre).astype(np.int32) for p in polygons]
    x1, y1 = polygons[0].min(0)
    x2, y2 = polygons[0].max(0)
    under = img[y1:y2 + 1, x1:x2 + 1].reshape(-1, 3).mean(0)
    for _attempt in range(10):
        color = rng.integers(0, 256, size=3)
        if np.abs(color - under).sum() > 150:
            break
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, polygons[:1], 255, lineType=cv2.LINE_AA)
    if len(polygons) > 1:  # the ring's hole shows the background
        cv2.fillPoly(mask, polygons[1:], 0, lineType=cv2.LINE_AA)
    alpha = mask.astype(np.float32)[..., None] / 255
    img = img * (1 - alpha) + color.astype(np.float32) * alpha
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def generate_synthetic_shape_classes(out_dir: str = 'data/sasa_pretrain',
                                     num_train_per_class: int = 400,
                                     num_val_per_class: int = 25,
                                     size: int = 64,
                                     seed: int = 0,
                                     min_frac: float = 0.3,
                                     max_frac: float = 0.8,
                                     force: bool = False) -> bool:
    """Write a synthetic shape classification set in the folder layout of
    mmpretrain's ``CustomDataset``.

    One shape per image, of one of :data:`SHAPE_CLASSIFICATION_CLASSES`, on
    the detection set's backgrounds (gradients, stripes, noise). The three
    detection classes are drawn exactly as in
    :func:`generate_synthetic_shapes`. Layout::

        out_dir/
            train/<class>/<class>_000001.jpg ...  (num_train_per_class each)
            val/<class>/<class>_000001.jpg ...    (num_val_per_class each)
            meta/train.txt, meta/val.txt   ("<class>/<file> <label>" lines)
            classes.txt
            manifest.json

    ``CustomDataset(data_root=out_dir, data_prefix='train')`` reads the
    folders (label = index of the class in sorted order, as in
    ``meta/*.txt`` and ``classes.txt``). Every image is drawn from its own
    generator seeded with ``(seed, split, index)``: the same arguments give
    the same bytes on every run, and the validation images do not depend on
    ``num_train_per_class``.

    Args:
        out_dir (str): Target folder. Defaults to ``'data/sasa_pretrain'``.
        num_train_per_class (int): Training images per class. Defaults to
            400.
        num_val_per_class (int): Held-out images per class. Defaults to 25.
        size (int): Side of the square images in pixels. Defaults to 64.
        seed (int): Random seed. Defaults to 0.
        min_frac (float): Smallest shape extent, as a fraction of ``size``.
            Defaults to 0.3.
        max_frac (float): Largest shape extent, as a fraction of ``size``.
            Defaults to 0.8.
        force (bool): Regenerate even if ``out_dir`` already holds this
            set. Defaults to False.

    Returns:
        bool: True if files were written, False if ``out_dir`` already held
        the same set (read from its ``manifest.json``).
    """
    for arg, value in (('num_train_per_class', num_train_per_class),
                       ('num_val_per_class', num_val_per_class)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{arg} must be an int >= 1, got {value!r}')
    if not isinstance(size, int) or size < 32:
        raise ValueError(f'size must be an int >= 32 (pixels), got {size!r}')
    if not 0 < min_frac <= max_frac < 1:
        raise ValueError('expected 0 < min_frac <= max_frac < 1, got '
                         f'min_frac={min_frac}, max_frac={max_frac}')
    classes = sorted(SHAPE_CLASSIFICATION_CLASSES)
    manifest = dict(
        generator='sasa_mmdet.datasets.synthetic_shapes:'
        'generate_synthetic_shape_classes',
        version=CLASSIFICATION_GENERATOR_VERSION,
        classes=classes,
        num_train_per_class=num_train_per_class,
        num_val_per_class=num_val_per_class,
        size=size,
        seed=seed,
        min_frac=min_frac,
        max_frac=max_frac)
    manifest_path = osp.join(out_dir, _CLS_MANIFEST)
    if not force and _read_manifest(manifest_path) == manifest:
        return False
    if osp.exists(manifest_path):
        os.remove(manifest_path)
    os.makedirs(osp.join(out_dir, 'meta'), exist_ok=True)
    for split_id, (split, per_class) in enumerate(
            zip(_SPLITS, (num_train_per_class, num_val_per_class))):
        for name in classes:
            folder = osp.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for file_name in os.listdir(folder):  # an earlier, larger set
                if _CLS_IMAGE_NAME.fullmatch(file_name):
                    os.remove(osp.join(folder, file_name))
        lines = []
        # classes interleaved: image i is of class i % num_classes
        for index in range(per_class * len(classes)):
            label = index % len(classes)
            name = classes[label]
            rng = np.random.default_rng([seed, split_id, index])
            img = _draw_class_image(rng, name, size, min_frac, max_frac)
            file_name = f'{name}_{index // len(classes) + 1:06d}.jpg'
            ok, buf = cv2.imencode('.jpg', img,
                                   [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
            assert ok, f'JPEG encoding failed for {name}/{file_name}'
            with open(osp.join(out_dir, split, name, file_name), 'wb') as f:
                f.write(buf.tobytes())
            lines.append(f'{name}/{file_name} {label}\n')
        with open(osp.join(out_dir, 'meta', f'{split}.txt'), 'w') as f:
            f.writelines(sorted(lines))
    with open(osp.join(out_dir, 'classes.txt'), 'w') as f:
        f.writelines(f'{name}\n' for name in classes)
    with open(manifest_path, 'w') as f:
        json.dump(manifest, f, indent=2)
    return True
