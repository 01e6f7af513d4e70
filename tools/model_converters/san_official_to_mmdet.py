"""Convert an official SAN ImageNet checkpoint (hszhao/SAN) for ``SAN``.

    python tools/model_converters/san_official_to_mmdet.py \
        san10_pairwise.pth san10_pairwise_mmdet.pth

writes ``{'state_dict': ...}`` under :class:`sasa_mmdet.models.SAN`'s
names, the classifier dropped (``--keep-classifier`` keeps it), for a
detector's backbone::

    backbone=dict(type='SAN', depth=10, sa_type='pairwise',
                  init_cfg=dict(type='Pretrained',
                                checkpoint='san10_pairwise_mmdet.pth'))
"""
import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from sasa_mmdet.models.backbones.san_checkpoint import convert_official_san  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='converted checkpoint to write')
    parser.add_argument('--keep-classifier', action='store_true',
                        help='keep fc.weight / fc.bias')
    args = parser.parse_args(argv)
    checkpoint = torch.load(args.src, map_location='cpu', weights_only=True)
    state_dict = checkpoint.get('state_dict', checkpoint)
    converted = convert_official_san(state_dict, keep_classifier=args.keep_classifier)
    torch.save(dict(state_dict=converted), args.dst)
    print(f'{len(converted)} tensors written to {args.dst}')


if __name__ == '__main__':
    main()
