"""Compile every Triton kernel the attention layer launches, for NVIDIA
GPUs, on a machine without one, and report registers, spills and shared
memory.

    python tools/analysis_tools/check_triton_kernels.py [--arch 80 90]
        [--head-dims 8 16 32 64 128] [--dtypes float32 bfloat16 float16]
        [--logits qk+qr qr qk] [--sizes 20x32 20x36] [--json FILE]

Why: ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors for the tests,
but the interpreter accepts programs that a GPU build rejects (e.g.
``tl.dot`` shapes under 16), and it says nothing of registers or spills.

How: for each configuration (head width x logits x input dtype x map size)
the layer (:class:`~sasa_mmdet.layers.LocalSelfAttention2d`, 8 heads,
window 7, batch 2, packed q/k/v as its projection writes them) runs one
forward and backward pass on CPU tensors with every Triton launch
intercepted; each launch is specialised as Triton would specialise it on a
GPU (16-byte-aligned pointers, ints divisible by 16, ints equal to 1) and
compiled for each arch with ``triton.compile``: the code the layer would
really run, whatever the kernels are called and whatever they take. That
part is shared with ``gpu_cost_model.py`` (same folder), which also counts
the instructions. The default sizes give one width divisible by 16 and one
not, because Triton builds another kernel for each. Registers and spills
come from the cubin (``cuobjdump -res-usage``: the stack frame a Triton
kernel has is its spill space).

Exits non-zero on a compile error, or when a kernel spills registers.
"""
import argparse
import itertools
import json
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import gpu_cost_model as model  # noqa: E402

HEAD_DIMS = (8, 16, 32, 64, 128)
# logits -> LocalSelfAttention2d options
LOGITS = {'qk+qr': dict(position_encoding='relative', logits='qk+qr'),
          'qr': dict(position_encoding='relative', logits='qr'),
          'qk': dict(position_encoding='none', logits='qk+qr')}
DTYPES = ('float32', 'bfloat16', 'float16')
SIZES = ('20x32', '20x36')
BATCH = 2


def parse_size(text: str) -> tuple:
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'sizes are HxW, got {text!r}')
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f'sizes must be positive, got {text!r}')
    return height, width


def check(package, archs, head_dim: int, logits: str, dtype: str, size: tuple) -> list:
    """One row per distinct compiled kernel variant of this configuration."""
    channels = head_dim * model.HEADS
    records, _ = model.layer_launches(package, channels, *size, batch=BATCH, dtype=dtype,
                                      archs=archs, layer_options=LOGITS[logits])
    rows = []
    for arch, record in itertools.product(archs, records):
        compiled = model.compile_variant(record['fn'], arch, record['compile'][arch])
        row = dict(arch=f'sm_{arch}', kernel=record['kernel'], phase=record['phase'],
                   dtype=dtype, head_dim=head_dim, logits=logits, size=list(size),
                   variant=compiled['key'],
                   num_warps=record['compile'][arch]['options'].num_warps,
                   num_stages=record['compile'][arch]['options'].num_stages,
                   maxnreg=record['compile'][arch]['options'].maxnreg,
                   divisible_by_16=model.specialised_names(record['fn'],
                                                           record['compile'][arch]))
        if 'error' in compiled:
            rows.append(dict(row, error=compiled['error']))
        else:
            rows.append(dict(row, registers=compiled['registers'],
                             spill_bytes=compiled['stack_bytes'],
                             shared_bytes=compiled['shared_bytes'],
                             compile_s=compiled['compile_s']))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90],
                        choices=sorted(model.GPUS),
                        help='compute capabilities to compile for (default: 80 90)')
    parser.add_argument('--head-dims', type=int, nargs='+', default=list(HEAD_DIMS))
    parser.add_argument('--logits', nargs='+', default=list(LOGITS), choices=list(LOGITS))
    parser.add_argument('--dtypes', nargs='+', default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument('--sizes', nargs='+', default=list(SIZES), metavar='HxW',
                        help='map sizes (default: 20x32 20x36, a width divisible by 16 and '
                        'one not)')
    parser.add_argument('--json', help='also write the table as JSON to this file')
    parser.add_argument('--source-root', help='the checkout whose sasa_mmdet is checked '
                        '(default: this one)')
    args = parser.parse_args(argv)
    for dim in args.head_dims:
        if dim < 1 or dim > 128:
            parser.error(f'--head-dims must be between 1 and 128, got {dim}')
    try:
        sizes = [parse_size(s) for s in args.sizes]
    except argparse.ArgumentTypeError as error:
        parser.error(f'--sizes: {error}')

    import triton
    package = model.import_package(args.source_root)
    configs = list(itertools.product(args.head_dims, args.logits, args.dtypes, sizes))
    print(f'triton {triton.__version__}: the layer\'s launches in {len(configs)} '
          f'configurations, compiled for sm_{args.arch}', flush=True)
    header = (f'{"arch":6} {"kernel":24} {"dtype":9} {"D":>4} {"logits":6} {"size":>7} '
              f'{"warps":>5} {"regs":>5} {"spills":>7} {"shared":>7}')
    print(header)
    rows, seen, start = [], set(), time.time()
    for head_dim, logits, dtype, size in configs:
        for row in check(package, args.arch, head_dim, logits, dtype, size):
            rows.append(row)
            if (row['arch'], row['variant']) in seen:
                continue  # the same kernel variant as an earlier configuration
            seen.add((row['arch'], row['variant']))
            size_text = '{}x{}'.format(*row['size'])
            prefix = (f'{row["arch"]:6} {row["kernel"][:24]:24} {dtype:9} {head_dim:>4} '
                      f'{logits:6} {size_text:>7} {row["num_warps"]:>5}')
            if 'error' in row:
                print(f'{prefix} COMPILE ERROR: {row["error"]}', flush=True)
            else:
                print(f'{prefix} {row["registers"]:>5} {row["spill_bytes"]:>7} '
                      f'{row["shared_bytes"]:>7}', flush=True)
    errors = [r for r in rows if 'error' in r]
    spills = [r for r in rows if r.get('spill_bytes', 0)]
    print(f'{len(seen)} kernel variants ({len(rows)} launches) in {time.time() - start:.0f} s: '
          f'{len(errors)} compile errors, {len(spills)} with register spills, at most '
          f'{max((r.get("registers", 0) for r in rows), default=0)} registers')
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    return 1 if errors or spills else 0


if __name__ == '__main__':
    os.environ.pop('TRITON_INTERPRET', None)  # compile for GPUs, never interpret
    sys.exit(main())
