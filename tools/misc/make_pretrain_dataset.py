"""Write the synthetic shape classification set for the pretraining demo, in
mmpretrain's ``CustomDataset`` folder layout (``train/<class>/*.jpg``,
``val/<class>/*.jpg``).

Example:
    python tools/misc/make_pretrain_dataset.py --out data/sasa_pretrain
"""
import argparse

from sasa_mmdet.datasets import (SHAPE_CLASSIFICATION_CLASSES,
                                 generate_synthetic_shape_classes)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Generate the synthetic shape classification set '
        f'({len(SHAPE_CLASSIFICATION_CLASSES)} classes: '
        f'{", ".join(sorted(SHAPE_CLASSIFICATION_CLASSES))})')
    parser.add_argument(
        '--out', default='data/sasa_pretrain', help='output folder')
    parser.add_argument(
        '--num-train-per-class',
        type=int,
        default=400,
        help='training images per class')
    parser.add_argument(
        '--num-val-per-class',
        type=int,
        default=25,
        help='held-out images per class')
    parser.add_argument(
        '--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument(
        '--force',
        action='store_true',
        help='regenerate even if the folder already holds this set')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    written = generate_synthetic_shape_classes(
        args.out,
        num_train_per_class=args.num_train_per_class,
        num_val_per_class=args.num_val_per_class,
        size=args.size,
        seed=args.seed,
        force=args.force)
    state = 'written to' if written else 'already up to date in'
    print(f'synthetic shape classification set {state} {args.out}')


if __name__ == '__main__':
    main()
