"""Write the synthetic shapes demo dataset (COCO format).

Example:
    python tools/misc/make_demo_dataset.py --out data/sasa_demo
"""
import argparse

from sasa_mmdet.datasets import generate_synthetic_shapes


def parse_args():
    parser = argparse.ArgumentParser(
        description='Generate the synthetic shapes detection dataset')
    parser.add_argument(
        '--out', default='data/sasa_demo', help='output folder')
    parser.add_argument(
        '--num-train', type=int, default=400, help='training images')
    parser.add_argument(
        '--num-val', type=int, default=100, help='validation images')
    parser.add_argument(
        '--size', type=int, default=160, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument(
        '--force',
        action='store_true',
        help='regenerate even if the folder already holds this dataset')
    return parser.parse_args()


def main():
    args = parse_args()
    written = generate_synthetic_shapes(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        size=args.size,
        seed=args.seed,
        force=args.force)
    state = 'written to' if written else 'already up to date in'
    print(f'synthetic shapes dataset {state} {args.out}')


if __name__ == '__main__':
    main()
