"""Parameters and FLOPs per component of a model config, paper convention.

FLOPs = 2 x multiply-adds of convolutions, linear layers and the attention
layers (counted by their own ``multiply_adds``; generic counters skip them),
as in Ramachandran et al. (2019), Tables 1 and 2. MMDetection's own
``tools/analysis_tools/get_flops.py`` prints multiply-adds under the name
"Flops" (1 x) and also counts norms and upsampling; with ``sasa_mmdet``
imported it counts the attention layers too (docs/analysis_tools.md).

Examples::

    # A detector at 640x640: backbone, neck, bbox_head and total.
    python tools/analysis_tools/get_flops.py \
        configs/sasa/retinanet_sasa-r50_sasa-fpn-head_1x_coco.py --shape 640 640
    # The config's backbone with a 1000-way classifier at 224x224 (Table 1).
    python tools/analysis_tools/get_flops.py \
        configs/sasa/retinanet_sasa-r50_fpn_1x_coco.py --classifier 1000 --json out.json
"""
import argparse
import json
import sys

from mmengine.config import Config, DictAction

from sasa_mmdet.utils import (build_model_from_cfg, format_complexity,
                              get_model_complexity, parse_shape)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Count parameters and FLOPs (2 x multiply-adds) of a '
        'model config, per component')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=None,
        help='input size H W (or S for S x S); default 640 640, or 224 224 '
        'with --classifier')
    parser.add_argument(
        '--classifier',
        type=int,
        default=None,
        metavar='NUM_CLASSES',
        help='count the config\'s backbone with global average pooling and a '
        'NUM_CLASSES-way linear classifier (ImageNet style) instead of the '
        'detector')
    parser.add_argument(
        '--json', default=None, metavar='OUT', help='also write the counts '
        'to this JSON file')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in the config, xxx=yyy format')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    default = (224, 224) if args.classifier else (640, 640)
    shape = parse_shape(args.shape) if args.shape else default
    if args.classifier is not None and args.classifier <= 0:
        raise SystemExit(f'--classifier must be positive, got '
                         f'{args.classifier}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    model = build_model_from_cfg(cfg, classifier=args.classifier)
    info = get_model_complexity(model, shape)
    info['config'] = args.config
    info['classifier'] = args.classifier
    title = args.config + (f' (backbone + {args.classifier}-way classifier)'
                           if args.classifier else '')
    print(format_complexity(info, title))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(info, f, indent=2)
    return info


if __name__ == '__main__':
    main(sys.argv[1:])
