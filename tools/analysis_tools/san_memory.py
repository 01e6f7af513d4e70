"""What SAN's attention layers keep for backward, and what ``with_cp`` saves.

For one layer of each kind at a SAN stage's size (default: stage 2 of SAN10,
512 -> 128 channels, 28x28, batch 8, 7x7 window) and, beside them, the
3x3 convolution and the SASA layer (8 heads) they replace, it measures on
CPU, float32:

- ``kept``: heap memory still allocated after the forward pass, minus the
  input and the output (glibc's ``mallinfo2``: every CPU tensor's bytes):
  what the autograd graph keeps for backward;
- ``saved tensors``: the same, itemised by ``torch.autograd.graph.
  saved_tensors_hooks`` (without ``with_cp``; parameters left out);
- ``fwd+bwd``: median time of forward + backward (3 runs after a warm-up).

Usage::

    python tools/analysis_tools/san_memory.py [--batch 8] [--json out.json]
"""
import argparse
import ctypes
import json
import os.path as osp
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from sasa_mmdet.layers import (LocalSelfAttention2d, PairwiseSelfAttention2d,  # noqa: E402
                               PatchwiseSelfAttention2d)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


_LIBC = ctypes.CDLL('libc.so.6')
_LIBC.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    """Bytes allocated through malloc (small blocks and mmapped ones)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def saved_tensor_bytes(layer: nn.Module, x: torch.Tensor) -> tuple:
    """Bytes and shapes of the distinct tensors autograd saves in a forward pass."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen, shapes = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            shapes.append((tuple(t.shape), str(t.dtype).replace('torch.', '')))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    del out
    return sum(seen.values()), shapes


def measure(name: str, layer: nn.Module, x: torch.Tensor, runs: int = 3) -> dict:
    layer(x).sum().backward()  # warm-up: kernels, lazy allocations
    before = heap_in_use()
    out = layer(x)
    kept = heap_in_use() - before - out.untyped_storage().nbytes()
    out.sum().backward()
    del out
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        layer(x).sum().backward()
        times.append(time.perf_counter() - start)
    saved, shapes = saved_tensor_bytes(layer, x)
    return dict(layer=name, kept_bytes=kept, saved_tensor_bytes=saved,
                saved_tensors=shapes, fwd_bwd_s=statistics.median(times),
                input_bytes=x.untyped_storage().nbytes())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--in-channels', type=int, default=512)
    parser.add_argument('--out-channels', type=int, default=128)
    parser.add_argument('--size', type=int, default=28)
    parser.add_argument('--window', type=int, default=7)
    parser.add_argument('--json', help='also write the rows to this JSON file')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cin, cout, k = args.in_channels, args.out_channels, args.window
    x = torch.randn(args.batch, cin, args.size, args.size, requires_grad=True)
    san = dict(kernel_size=k, rel_channels=cin // 16)
    layers = [
        ('Conv2d 3x3', nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
        (f'LocalSelfAttention2d (SASA) k={k}', LocalSelfAttention2d(cin, cout, k, num_heads=8)),
        (f'LocalSelfAttention2d (SASA) k={k} with_cp',
         LocalSelfAttention2d(cin, cout, k, num_heads=8, with_cp=True)),
        (f'PairwiseSelfAttention2d k={k}', PairwiseSelfAttention2d(cin, cout, **san)),
        (f'PairwiseSelfAttention2d k={k} with_cp',
         PairwiseSelfAttention2d(cin, cout, with_cp=True, **san)),
        (f'PatchwiseSelfAttention2d k={k}', PatchwiseSelfAttention2d(cin, cout, **san)),
        (f'PatchwiseSelfAttention2d k={k} with_cp',
         PatchwiseSelfAttention2d(cin, cout, with_cp=True, **san)),
    ]
    rows = [measure(name, layer, x) for name, layer in layers]
    mib = 2**20
    print(f'input {tuple(x.shape)} float32 = {x.untyped_storage().nbytes() / mib:.1f} MiB, '
          f'{torch.get_num_threads()} threads')
    print('| layer | kept for backward (MiB) | x input | saved tensors (MiB) | fwd+bwd (s) |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["layer"]} | {r["kept_bytes"] / mib:.1f} | '
              f'{r["kept_bytes"] / r["input_bytes"]:.1f} | '
              f'{r["saved_tensor_bytes"] / mib:.1f} | {r["fwd_bwd_s"]:.3f} |')
    for r in rows:
        if 'with_cp' not in r['layer']:
            print(f'{r["layer"]} saves: {r["saved_tensors"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == '__main__':
    main()
