"""Detect objects in images with a trained sasa_mmdet (or any mmdet) model.

MMDetection's ``DetInferencer`` runs the config's test pipeline and model on
each image, draws the boxes above ``--pred-score-thr`` to
``OUT_DIR/vis/<image>.jpg`` and writes every prediction (labels, scores,
boxes in input-image pixels) to ``OUT_DIR/preds/<image>.json``. Checkpoints
load with ``torch.load(weights_only=True)`` (``import sasa_mmdet``).

Examples::

    # the bundled demo model (bash tools/run_demo.sh trains it)
    python demo/image_demo.py data/sasa_demo/val/000001.jpg \\
        configs/demo/retinanet_sasa-tiny_shapes.py \\
        --weights work_dirs/retinanet_sasa-tiny_shapes/epoch_36.pth
    # a folder of images, CPU, every box above 0.5
    python demo/image_demo.py path/to/images/ \\
        configs/sasa/retinanet_sasa-r50_fpn_1x_coco.py \\
        --weights work_dirs/retinanet_sasa-r50_fpn_1x_coco/epoch_12.pth \\
        --device cpu --pred-score-thr 0.5 --out-dir outputs
"""
import argparse
import os.path as osp
import sys

from mmengine.logging import print_log

import sasa_mmdet  # noqa: F401  (registers the modules, weights-only loading)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Detect objects in an image, a folder of images or a URL '
        "with MMDetection's DetInferencer")
    parser.add_argument('inputs', help='an image file or a folder of images')
    parser.add_argument('model', help='config file')
    parser.add_argument(
        '--weights', default=None,
        help='checkpoint file (without one the model keeps its random '
        'initialisation, which is only good for a smoke test)')
    parser.add_argument(
        '--out-dir', default='outputs',
        help='where vis/ and preds/ are written (default: outputs)')
    parser.add_argument(
        '--device', default=None,
        help="'cpu', 'cuda' or 'cuda:N' (default: cuda if available, else cpu)")
    parser.add_argument(
        '--pred-score-thr', type=float, default=0.3,
        help='draw boxes with at least this score (default: 0.3)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument(
        '--palette', default='none',
        choices=['coco', 'voc', 'citys', 'random', 'none'],
        help="box colours (default: the config's dataset palette)")
    parser.add_argument('--show', action='store_true',
                        help='show each result in a window')
    parser.add_argument('--no-save-vis', action='store_true',
                        help='do not write the drawn images')
    parser.add_argument('--no-save-pred', action='store_true',
                        help='do not write the predictions as JSON')
    parser.add_argument('--print-result', action='store_true',
                        help='print the predictions')
    args = parser.parse_args(argv)
    if not 0 <= args.pred_score_thr <= 1:
        parser.error(f'--pred-score-thr must be in [0, 1], got '
                     f'{args.pred_score_thr}')
    if args.batch_size < 1:
        parser.error(f'--batch-size must be positive, got {args.batch_size}')
    if not osp.exists(args.inputs):
        parser.error(f'inputs: no such file or folder: {args.inputs}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(
        model=args.model,
        weights=args.weights,
        device=args.device,
        palette=args.palette,
        show_progress=False)
    results = inferencer(
        args.inputs,
        batch_size=args.batch_size,
        out_dir=args.out_dir,
        pred_score_thr=args.pred_score_thr,
        show=args.show,
        no_save_vis=args.no_save_vis,
        no_save_pred=args.no_save_pred,
        print_result=args.print_result)
    if not (args.no_save_vis and args.no_save_pred):
        print_log(f'results written to {osp.abspath(args.out_dir)}',
                  logger='current')
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
