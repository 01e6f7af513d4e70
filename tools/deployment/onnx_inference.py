"""Run an end-to-end ONNX detector (``export_onnx.py``) on an image with
onnxruntime, and draw its detections.

The graph has no pre-processing, so the tool does it as MMDetection's test
does: the config's test pipeline (load, resize, ...) and its
``data_preprocessor`` (normalise, pad). It runs the file in onnxruntime (CPU;
files with ``sasa_mmdet::LocalAttention`` nodes get the package's custom-op
library), clips the boxes to the resized image and scales them back to the
original image (as ``predict(rescale=True)`` does), prints them and draws
those above ``--score-thr`` into ``--out``.

With ``--checkpoint`` it also runs the PyTorch detector on the same image
(``test_step``: MMDetection's own pre- and post-processing) and compares:
the same number of detections, the same labels, boxes within ``--box-rtol``
(1e-3) of the box scale; it fails otherwise.

Example::

    python tools/deployment/export_onnx.py configs/demo/retinanet_sasa-tiny_shapes.py \\
        work_dirs/retinanet_sasa-tiny_shapes/epoch_36.pth --shape 160 160 \\
        --out work_dirs/onnx/demo.onnx
    python tools/deployment/onnx_inference.py configs/demo/retinanet_sasa-tiny_shapes.py \\
        work_dirs/onnx/demo.onnx data/sasa_demo/val/000000.png --out demo_dets.png \\
        --checkpoint work_dirs/retinanet_sasa-tiny_shapes/epoch_36.pth
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

import numpy as np


def log(message: str) -> None:
    print(f'[onnx_inference] {message}', flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Run an end-to-end ONNX detector on an image with onnxruntime and '
        'draw its detections')
    parser.add_argument('config', help='the config the model was exported from (its test '
                        'pipeline and data preprocessor do the pre-processing)')
    parser.add_argument('model', help='end-to-end ONNX file (outputs dets, labels)')
    parser.add_argument('image', help='image file')
    parser.add_argument('--out', default=None,
                        help='write the image with the detections drawn here')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw and print detections above this score; default 0.3')
    parser.add_argument('--checkpoint', default=None,
                        help='also run this checkpoint in PyTorch and compare')
    parser.add_argument('--box-rtol', type=float, default=1e-3,
                        help='with --checkpoint: largest allowed box difference, relative '
                        'to the largest box coordinate; default 1e-3')
    parser.add_argument('--threads', type=int, default=0,
                        help='onnxruntime intra-op threads (0: its default)')
    args = parser.parse_args(argv)
    for name in ('config', 'model', 'image'):
        if not osp.isfile(getattr(args, name)):
            parser.error(f'{name}: no such file: {getattr(args, name)}')
    if args.checkpoint and not osp.isfile(args.checkpoint):
        parser.error(f'--checkpoint: no such file: {args.checkpoint}')
    return args


def preprocess(cfg, image: str):
    """The config's test pipeline and data preprocessor on one image:
    ``(batch dict with 'inputs' (1, 3, H, W) and 'data_samples', the
    pipeline's output)``."""
    from mmcv.transforms import Compose
    from mmdet.registry import MODELS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    import sasa_mmdet  # noqa: F401  (registers the modules)

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    pipeline = [t for t in cfg.test_dataloader.dataset.pipeline
                if t['type'] not in ('LoadAnnotations', 'mmdet.LoadAnnotations')]
    data = Compose(pipeline)(dict(img_path=image, img_id=0))
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    return preprocessor(pseudo_collate([data]), False), data


def class_names(cfg) -> Optional[List[str]]:
    """The class names: the config's ``metainfo``, else its test dataset
    class's ``METAINFO``; None if neither has them."""
    from mmdet.registry import DATASETS

    dataset = cfg.test_dataloader.dataset
    meta = cfg.get('metainfo') or dataset.get('metainfo') or {}
    if meta.get('classes'):
        return list(meta['classes'])
    dataset_class = DATASETS.get(dataset.type)
    classes = getattr(dataset_class, 'METAINFO', {}).get('classes')
    return list(classes) if classes else None


def run_onnxruntime(path: str, inputs: np.ndarray, threads: int = 0):
    """``(dets, labels)`` of an end-to-end file on a preprocessed batch."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path, load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    if outputs != ['dets', 'labels']:
        raise ValueError(f'{path} is not an end-to-end export (outputs {outputs}, not '
                         "['dets', 'labels']): export it without --tensor-only")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if any(imp.domain == 'sasa_mmdet' for imp in model.opset_import):
        from sasa_mmdet.deployment import onnxruntime_ops_path
        options.register_custom_ops_library(onnxruntime_ops_path())
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: inputs})


def to_image_space(dets: np.ndarray, labels: np.ndarray, meta: dict) -> dict:
    """One image's graph outputs -> ``bboxes``, ``scores``, ``labels`` of
    its detections (padding dropped) in original image pixels: clipped to
    the resized image (``img_shape``), divided by ``scale_factor``."""
    from sasa_mmdet.deployment import detections_from_outputs

    result = detections_from_outputs(dets[None], labels[None])[0]
    height, width = meta['img_shape'][:2]
    boxes = result['bboxes'].copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    scale_x, scale_y = meta.get('scale_factor', (1.0, 1.0))
    boxes /= np.array([scale_x, scale_y, scale_x, scale_y], dtype=boxes.dtype)
    return dict(bboxes=boxes, scores=result['scores'], labels=result['labels'])


def draw(image_path: str, result: dict, classes: Optional[List[str]], score_thr: float,
         out: str) -> int:
    """Draw the detections above ``score_thr``; returns how many."""
    import cv2
    import mmcv

    image = mmcv.imread(image_path)
    keep = result['scores'] > score_thr
    for box, score, label in zip(result['bboxes'][keep], result['scores'][keep],
                                 result['labels'][keep]):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        colour = tuple(int(c) for c in np.random.default_rng(int(label)).integers(64, 256, 3))
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, 1)
        name = classes[label] if classes and label < len(classes) else str(int(label))
        cv2.putText(image, f'{name} {score:.2f}', (x1, max(y1 - 2, 8)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    mmcv.imwrite(image, out)
    return int(keep.sum())


def _best_first(detections: dict) -> np.ndarray:
    """The order best score first; equal scores (to 1e-5) by label, then
    by box (to 0.01 px), so that ties sort alike in both runs."""
    boxes = np.round(np.asarray(detections['bboxes'], np.float64).reshape(-1, 4), 2)
    keys = [boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], detections['labels'],
            -np.round(np.asarray(detections['scores'], np.float64), 5)]
    return np.lexsort(keys)


def compare(got: dict, want: dict, rtol: float) -> dict:
    """``got`` against ``want`` (both in image space), best first (ties by
    label): ``count``, ``labels_equal``, ``max_box_diff``, ``relative``, ``ok``."""
    order_g = _best_first(got)
    order_w = _best_first(want)
    count = (len(order_g), len(order_w))
    same = count[0] == count[1]
    labels_equal = same and bool(np.array_equal(got['labels'][order_g],
                                                want['labels'][order_w]))
    diff = float(np.abs(got['bboxes'][order_g] - want['bboxes'][order_w]).max()) \
        if same and count[0] else 0.0
    scale = float(np.abs(want['bboxes']).max()) if count[1] else 1.0
    return dict(count=count, labels_equal=labels_equal, max_box_diff=diff,
                relative=diff / scale, ok=bool(same and labels_equal and diff / scale <= rtol))


def main(argv=None) -> dict:
    """Returns ``detections`` (image space) and, with ``--checkpoint``,
    ``pytorch`` and ``comparison``."""
    args = parse_args(argv)
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    batch, data = preprocess(cfg, args.image)
    inputs = batch['inputs'].float()
    meta = batch['data_samples'][0].metainfo
    log(f'{args.image}: {meta["ori_shape"][1]}x{meta["ori_shape"][0]} -> network input '
        f'{inputs.shape[3]}x{inputs.shape[2]}')
    dets, labels = run_onnxruntime(args.model, inputs.numpy(), args.threads)
    result = to_image_space(dets[0], labels[0], meta)
    classes = class_names(cfg)
    shown = result['scores'] > args.score_thr
    log(f'{len(result["scores"])} detections, {int(shown.sum())} above {args.score_thr:g}:')
    for box, score, label in zip(result['bboxes'][shown], result['scores'][shown],
                                 result['labels'][shown]):
        name = classes[label] if classes and label < len(classes) else str(int(label))
        log(f'  {name:<12} {score:.3f}  [{", ".join(f"{v:.1f}" for v in box)}]')
    output = dict(detections=result)
    if args.out:
        drawn = draw(args.image, result, classes, args.score_thr, args.out)
        log(f'drew {drawn} detections into {args.out}')
    if args.checkpoint:
        import torch
        from mmengine.dataset import pseudo_collate

        from sasa_mmdet.utils.inference import load_detector
        detector = load_detector(args.config, args.checkpoint)
        with torch.no_grad():
            sample = detector.test_step(pseudo_collate([data]))[0]
        pred = sample.pred_instances
        want = dict(bboxes=pred.bboxes.numpy(), scores=pred.scores.numpy(),
                    labels=pred.labels.numpy())
        row = compare(result, want, args.box_rtol)
        log(f'PyTorch ({args.checkpoint}): {row["count"][1]} detections; onnxruntime '
            f'{row["count"][0]}; labels {"equal" if row["labels_equal"] else "DIFFER"}; '
            f'max |box diff| {row["max_box_diff"]:.3g} px (relative {row["relative"]:.3g}, '
            f'allowed {args.box_rtol:g})')
        output.update(pytorch=want, comparison=row)
        if not row['ok']:
            raise SystemExit('[onnx_inference] FAILED: the ONNX detections differ from '
                             "PyTorch's")
    return output


if __name__ == '__main__':
    main(sys.argv[1:])
