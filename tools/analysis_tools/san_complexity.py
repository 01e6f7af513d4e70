"""SAN's parameters and multiply-adds at 224x224 beside the official table.

For the six ImageNet models (backbone + global pool + 1000-class linear
classifier) it prints three counts of one forward pass:

- ``ours``: :func:`sasa_mmdet.utils.get_model_complexity`, the project's
  convention (multiply-adds of convolutions, linear and attention layers;
  the attention layers by their ``multiply_adds``);
- ``mmengine``: mmengine's ``get_model_complexity_info`` with the module
  handle ``import sasa_mmdet`` installs (it also counts norms and pooling);
- ``official convention``: the rules of hszhao/SAN's ``util/complexity.py``
  (forward hooks): convolutions and linear layers with their bias additions,
  2 per element for BatchNorm, 1 per element for ReLU and pooling, 1 per
  output element of the subtraction operators and ``k*k`` per output
  element of the aggregation,

and the official README's figures. Usage::

    python tools/analysis_tools/san_complexity.py [--json out.json]
"""
import argparse
import json
import os.path as osp
import sys

import numpy as np
import torch
import torch.nn as nn
from mmengine.analysis import get_model_complexity_info

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
import sasa_mmdet  # noqa: E402,F401  (this checkout's; registers the models, FLOP handle)
from sasa_mmdet.layers import PairwiseSelfAttention2d, PatchwiseSelfAttention2d  # noqa: E402
from sasa_mmdet.models import SAN  # noqa: E402
from sasa_mmdet.utils.complexity import (ImageClassifier, count_parameters,  # noqa: E402
                                         get_model_complexity)

# hszhao/SAN README: params (M), multiply-adds (G), top-1 (%).
OFFICIAL = {(10, 'pairwise'): (10.5, 2.2, 74.9), (10, 'patchwise'): (11.8, 1.9, 77.1),
            (15, 'pairwise'): (14.1, 3.0, 76.6), (15, 'patchwise'): (16.2, 2.6, 78.0),
            (19, 'pairwise'): (17.6, 3.8, 76.9), (19, 'patchwise'): (20.5, 3.3, 78.2)}


@torch.no_grad()
def official_convention_count(model: nn.Module, size: int) -> int:
    """Operations of one 1x3xSxS forward pass under hszhao/SAN's counter rules."""
    total = [0]

    def conv(module, inputs, output):
        per_position = module.in_channels // module.groups * int(np.prod(module.kernel_size))
        total[0] += output.numel() * per_position
        if module.bias is not None:
            total[0] += output.numel()

    def linear(module, inputs, output):
        total[0] += inputs[0].shape[0] * module.in_features * module.out_features

    def norm(module, inputs, output):
        total[0] += inputs[0].numel() * (2 if module.affine else 1)

    def elementwise(module, inputs, output):
        total[0] += output.numel()

    def pool(module, inputs, output):
        total[0] += inputs[0].numel()

    def attention(module, inputs, output):
        if module.pointwise:
            return
        batch, _, height, width = inputs[0].shape
        taps, pixels = module.taps, height * width
        if isinstance(module, PairwiseSelfAttention2d):
            # Subtraction2 on phi/psi and Subtraction on the 2 position maps
            total[0] += (batch * module.rel_channels + 2) * taps * pixels
        total[0] += batch * module.out_channels * pixels * taps  # aggregation

    hooks = {nn.Conv2d: conv, nn.Linear: linear, nn.BatchNorm2d: norm, nn.ReLU: elementwise,
             nn.MaxPool2d: pool, nn.AdaptiveAvgPool2d: pool,
             PairwiseSelfAttention2d: attention, PatchwiseSelfAttention2d: attention}
    handles = [m.register_forward_hook(hooks[type(m)]) for m in model.modules()
               if type(m) in hooks]
    try:
        model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def san_complexity(size: int = 224) -> list:
    rows = []
    for (depth, sa_type), (params_ref, macs_ref, top1) in OFFICIAL.items():
        torch.manual_seed(0)
        model = ImageClassifier(SAN(depth, sa_type, out_indices=(4, )), 1000).eval()
        ours = get_model_complexity(model, (size, size), detector=False)
        macs = ours['components'][-1]['multiply_adds']
        mmengine = get_model_complexity_info(model, (3, size, size), show_table=False,
                                             show_arch=False)['flops']
        official = official_convention_count(model, size)
        rows.append(dict(model=f'SAN{depth} {sa_type}', params=count_parameters(model),
                         multiply_adds=macs, mmengine=int(mmengine),
                         official_convention=official, official_params_m=params_ref,
                         official_multiply_adds_g=macs_ref, official_top1=top1))
    return rows


def format_rows(rows: list) -> str:
    header = ('model', 'params (M)', 'official', 'ours (G)', 'mmengine (G)',
              'official conv. (G)', 'official (G)', 'ours vs official')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        lines.append('| ' + ' | '.join([
            r['model'], f'{r["params"] / 1e6:.3f}', f'{r["official_params_m"]}',
            f'{r["multiply_adds"] / 1e9:.3f}', f'{r["mmengine"] / 1e9:.3f}',
            f'{r["official_convention"] / 1e9:.3f}', f'{r["official_multiply_adds_g"]}',
            f'{100 * (r["multiply_adds"] / 1e9 / r["official_multiply_adds_g"] - 1):+.1f}%'
        ]) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=224, help='input side (default 224)')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    args = parser.parse_args(argv)
    rows = san_complexity(args.size)
    print(format_rows(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == '__main__':
    main()
