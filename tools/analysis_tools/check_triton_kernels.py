"""Compile every Triton kernel the attention layers launch, for NVIDIA
GPUs, on a machine without one, and report registers, spills and shared
memory.

    python tools/analysis_tools/check_triton_kernels.py [--layers sasa san]
        [--arch 80 90] [--dtypes tf32 bfloat16 float16 float32] [--sizes 20x32 20x36]
        [--head-dims 8 16 32 64 128] [--logits qk+qr qr qk]     # SASA's
        [--memory-formats channels_last planar contiguous]
        [--san-layers pairwise patchwise] [--borders reflect mask]  # SAN's
        [--json FILE]

Why: ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors for the tests,
but the interpreter accepts programs that a GPU build rejects (e.g.
``tl.dot`` shapes under 16), and it says nothing of registers or spills.

How: for each configuration (head width x logits x input dtype x map size x
the input's memory format: channels_last gives channels-last q/k/v, which
the kernels read with vector loads; planar a contiguous input with the
layer's planar projection forced, planar q/k/v read element by element, as
head widths that are not multiples of 8 run; contiguous the layer's own
choice for a contiguous input: channels-last q/k/v at head widths that are
multiples of 8, the same kernel variants as channels_last) the layer
(:class:`~sasa_mmdet.layers.LocalSelfAttention2d`, 8 heads, window 7, batch
2, packed q/k/v as its projection writes them) runs one forward and
backward pass on CPU tensors with every Triton launch intercepted; each
launch is specialised as Triton would specialise it on a GPU (16-byte-
aligned pointers, ints divisible by 16, ints equal to 1) and compiled for
each arch with ``triton.compile``: the code the layer would really run,
whatever the kernels are called and whatever they take. That part is shared
with ``gpu_cost_model.py`` (same folder), which also counts the
instructions. The default sizes give one width divisible by 16 and one not,
because Triton builds another kernel for each. Registers and spills come
from the cubin (``cuobjdump -res-usage``: the stack frame a Triton kernel
has is its spill space).

SAN (``--layers san``): :class:`~sasa_mmdet.layers.PairwiseSelfAttention2d`
and :class:`~sasa_mmdet.layers.PatchwiseSelfAttention2d` with
``impl='triton'`` (``SAN_CHANNELS`` channels in and out, window 7,
``share_planes=8``, batch 2), in each border mode, run one forward and
backward pass the same way (the same interception, with SAN's backend
resolver lifted); every kernel of ``backends/san_triton.py`` they launch
(aggregation forward and its two backward kernels, gather/subtraction
forward and backward, including the position relation's launch on a
one-image, two-channel map) is compiled as launched. Their rows also give
the widths of the global loads in the SASS (128: ``LDG.E.128``, 64, 32,
16 bits): the elementwise kernels are memory-bound, so the load width is
what decides their speed.

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
# Input dtypes. 'tf32': float32 inputs with torch.set_float32_matmul_precision('high')
# (one tf32 product per float32 product); 'float32': with the default 'highest'
# (three tf32 products: float32 accuracy, and register spills at every head width).
DTYPES = ('tf32', 'bfloat16', 'float16', 'float32')
SASA_DTYPES = ('tf32', 'bfloat16', 'float16')  # the default: the fast modes
SAN_DTYPES = ('float32', 'bfloat16', 'float16')  # SAN's kernels have no products
SIZES = ('20x32', '20x36')
MEMORY_FORMATS = ('channels_last', 'planar')  # the default: both kernel layouts
BATCH = 2
LAYERS = ('sasa', 'san')
SAN_LAYERS = ('pairwise', 'patchwise')
BORDERS = ('reflect', 'mask')
SAN_CHANNELS = 64
SAN_WINDOW = 7


def parse_size(text: str) -> tuple:
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'sizes are HxW, got {text!r}')
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f'sizes must be positive, got {text!r}')
    return height, width


def check(package, archs, head_dim: int, logits: str, dtype: str, size: tuple,
          memory_format: str = 'contiguous') -> list:
    """One row per launch of this configuration."""
    import torch
    channels = head_dim * model.HEADS
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('high' if dtype == 'tf32' else 'highest')
    try:
        records, _ = model.layer_launches(package, channels, *size, batch=BATCH,
                                          dtype='float32' if dtype == 'tf32' else dtype,
                                          archs=archs, layer_options=LOGITS[logits],
                                          memory_format=memory_format)
    finally:
        torch.set_float32_matmul_precision(precision)
    return compile_rows(records, archs, _load_details, layer='sasa', dtype=dtype,
                        head_dim=head_dim, logits=logits, size=list(size),
                        memory_format=memory_format)


def _load_details(record, compiled) -> dict:
    return {} if 'error' in compiled else dict(load_bits=load_widths(compiled['sass']))


def compile_rows(records, archs, details=None, **fields) -> list:
    """One row per arch and launch of ``records``: ``fields``, the launch's
    options and what compiling it gives (registers, spills, shared memory,
    or the error), plus ``details(record, compiled)``."""
    rows = []
    for arch, record in itertools.product(archs, records):
        spec = record['compile'][arch]
        compiled = model.compile_variant(record['fn'], arch, spec)
        row = dict(fields, arch=f'sm_{arch}', kernel=record['kernel'], phase=record['phase'],
                   variant=compiled['key'], num_warps=spec['options'].num_warps,
                   num_stages=spec['options'].num_stages, maxnreg=spec['options'].maxnreg,
                   divisible_by_16=model.specialised_names(record['fn'], spec),
                   **(details(record, compiled) if details else {}))
        if 'error' in compiled:
            rows.append(dict(row, error=compiled['error']))
        else:
            rows.append(dict(row, registers=compiled['registers'],
                             spill_bytes=compiled['stack_bytes'],
                             shared_bytes=compiled['shared_bytes'],
                             compile_s=compiled['compile_s']))
    return rows


def load_widths(sass: str) -> list:
    """Bits per thread of the global loads in ``sass``, widest first
    (128: ``LDG.E.128``, 64, 32: ``LDG.E``, 16: ``LDG.E.U16``)."""
    return sorted({8 * model.load_bytes(ins['op']) for ins in model.parse_sass(sass)
                   if ins['op'].startswith('LDG')}, reverse=True)


def check_san(package, archs, layer_name: str, border: str, dtype: str, size: tuple) -> list:
    """One row per launch of a SAN layer's forward and backward pass."""
    import importlib

    import torch
    san_ops = importlib.import_module(package.__name__ + '.layers.san_ops')
    backend = importlib.import_module(package.__name__ + '.layers.backends.san_triton')
    cls = getattr(package.layers, f'{layer_name.capitalize()}SelfAttention2d')
    layer = cls(SAN_CHANNELS, SAN_CHANNELS, 3, window_size=SAN_WINDOW, border=border,
                impl='triton')
    x = torch.zeros(BATCH, SAN_CHANNELS, *size, requires_grad=True)
    records, _ = model.record_launches(layer, x, backend, {san_ops: 'resolve_san_backend'},
                                       dtype=dtype, archs=archs)

    def details(record, compiled):
        launch_dtypes = sorted({a['dtype'] for a in record['args'].values() if 'dtype' in a})
        return dict(launch_dtypes=launch_dtypes, **_load_details(record, compiled))

    return compile_rows(records, archs, details, layer='san', dtype=dtype,
                        san_layer=layer_name, border=border, size=list(size))


def print_row(row: dict, seen: set) -> None:
    """Print ``row`` unless its kernel variant was printed already."""
    if (row['arch'], row['variant']) in seen:
        return  # the same kernel variant as an earlier configuration
    seen.add((row['arch'], row['variant']))
    size_text = '{}x{}'.format(*row['size'])
    if row['layer'] == 'sasa':
        prefix = (f'{row["arch"]:6} {row["kernel"][:24]:24} {row["dtype"]:9} '
                  f'{row["head_dim"]:>4} {row["logits"]:6} {size_text:>7} '
                  f'{row["memory_format"][:8]:8} {row["num_warps"]:>5}')
    else:
        prefix = (f'{row["arch"]:6} {row["kernel"][:24]:24} {row["dtype"]:9} '
                  f'{row["san_layer"][:5]:>5} {row["border"]:7} {size_text:>7} '
                  f'{row["num_warps"]:>5}')
    if 'error' in row:
        print(f'{prefix} COMPILE ERROR: {row["error"]}', flush=True)
        return
    line = f'{prefix} {row["registers"]:>5} {row["spill_bytes"]:>7} {row["shared_bytes"]:>7}'
    line += ' {:>10}'.format('/'.join(str(b) for b in row['load_bits']) or '-')
    print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', nargs='+', default=list(LAYERS), choices=LAYERS,
                        help="whose kernels: 'sasa' (LocalSelfAttention2d), 'san' (SAN's "
                        "pairwise and patchwise layers); default: both")
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90],
                        choices=sorted(model.GPUS),
                        help='compute capabilities to compile for (default: 80 90)')
    parser.add_argument('--head-dims', type=int, nargs='+', default=list(HEAD_DIMS),
                        help="SASA's head widths")
    parser.add_argument('--logits', nargs='+', default=list(LOGITS), choices=list(LOGITS),
                        help="SASA's logits")
    parser.add_argument('--san-layers', nargs='+', default=list(SAN_LAYERS), choices=SAN_LAYERS,
                        help="SAN's layers (default: both)")
    parser.add_argument('--borders', nargs='+', default=list(BORDERS), choices=BORDERS,
                        help="SAN's border modes (default: both)")
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES),
                        help=f"input dtypes (default: SASA {' '.join(SASA_DTYPES)}; SAN "
                        f"{' '.join(SAN_DTYPES)}); tf32: float32 inputs with "
                        "torch.set_float32_matmul_precision('high'), float32: with 'highest' "
                        "(float32 accuracy; SASA's kernels then spill registers)")
    parser.add_argument('--sizes', nargs='+', default=list(SIZES), metavar='HxW',
                        help='map sizes (default: 20x32 20x36, a width divisible by 16 and '
                        'one not)')
    parser.add_argument('--memory-formats', nargs='+', default=list(MEMORY_FORMATS),
                        choices=list(model.MEMORY_FORMATS),
                        help="the SASA layer's input: " + '; '.join(
                            f'{name}: {what}' for name, what in model.MEMORY_FORMATS.items())
                        + f"; default: {' '.join(MEMORY_FORMATS)}")
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
    rows, seen, start = [], set(), time.time()
    if 'sasa' in args.layers:
        dtypes = args.dtypes or SASA_DTYPES
        configs = list(itertools.product(args.head_dims, args.logits, dtypes, sizes,
                                         args.memory_formats))
        print(f'triton {triton.__version__}: the SASA layer\'s launches in {len(configs)} '
              f'configurations, compiled for sm_{args.arch}', flush=True)
        print(f'{"arch":6} {"kernel":24} {"dtype":9} {"D":>4} {"logits":6} {"size":>7} '
              f'{"memory":8} {"warps":>5} {"regs":>5} {"spills":>7} {"shared":>7} '
              f'{"loads":>10}')
        for head_dim, logits, dtype, size, memory_format in configs:
            for row in check(package, args.arch, head_dim, logits, dtype, size, memory_format):
                rows.append(row)
                print_row(row, seen)
    if 'san' in args.layers:
        dtypes = [d for d in args.dtypes or SAN_DTYPES if d != 'tf32']  # same as float32
        configs = list(itertools.product(args.san_layers, args.borders, dtypes, sizes))
        print(f'triton {triton.__version__}: the SAN layers\' launches in {len(configs)} '
              f'configurations ({SAN_CHANNELS} channels, window {SAN_WINDOW}), compiled for '
              f'sm_{args.arch}; loads: the global load widths in bits', flush=True)
        print(f'{"arch":6} {"kernel":24} {"dtype":9} {"layer":>5} {"border":7} {"size":>7} '
              f'{"warps":>5} {"regs":>5} {"spills":>7} {"shared":>7} {"loads":>10}')
        for layer_name, border, dtype, size in configs:
            for row in check_san(package, args.arch, layer_name, border, dtype, size):
                rows.append(row)
                print_row(row, seen)
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
