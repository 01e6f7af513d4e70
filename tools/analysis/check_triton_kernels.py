"""Compile every Triton kernel configuration the attention layer can launch,
for NVIDIA GPUs, on a machine without one, and report registers, spills and
shared memory.

    python tools/analysis/check_triton_kernels.py [--arch 80 90] [--json FILE]

Why: ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors for the tests,
but the interpreter accepts programs that a GPU build rejects (e.g. ``tl.dot``
shapes under 16). ``triton.compile`` for a ``GPUTarget`` runs the whole GPU
pipeline to a cubin with no GPU present; ``ptxas -v`` (the one Triton ships)
(Triton runs it on the way to the cubin; its log is kept here) gives the
registers and spills, which ``CompiledKernel.n_regs`` leaves empty without a
GPU.

Configurations: the three kernels (forward, backward for queries, backward
for keys) x head widths 8 to 128 (the tile sizes of
``sasa_mmdet.layers.backends.triton.block_config``) x logits (q.k + q.r,
q.r only, q.k only) x input dtypes (float32, bfloat16, float16), with the
unit column stride of the projection's planar layout. Window, dilation and
map size are runtime arguments and need no compile of their own.

Exits non-zero on a compile error, or when a configuration spills registers.
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import time

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from sasa_mmdet.layers.backends import triton as kernels  # noqa: E402

KERNELS = {
    'forward': kernels._forward_kernel,
    'backward_query': kernels._backward_query_kernel,
    'backward_key': kernels._backward_key_kernel,
}
HEAD_DIMS = (8, 16, 32, 64, 128)
LOGITS = {'qk+qr': (True, True), 'qr': (False, True), 'qk': (True, False)}
DTYPES = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}
# Pointers the kernels keep in float32 whatever the input dtype: the
# log-sum-exp, delta, the tables' partial sums; the tables are parameters.
FLOAT32_POINTERS = ('LSE', 'DELTA', 'DREL', 'RR', 'RC')
INT_ARGS = ('H', 'W', 'N', 'D', 'DV', 'DR', 'KH', 'KW', 'DH', 'DW')


def signature(fn, dtype: str, head_dim: int, has_key: bool, has_rel: bool):
    """Triton signature and constants of one launch configuration."""
    config = kernels.block_config(head_dim, head_dim)
    flags = dict(HAS_KEY=has_key, HAS_REL=has_rel, **config)
    sig, constants = {}, {}
    for name in fn.arg_names:
        if name in flags:
            sig[name], constants[name] = 'constexpr', flags[name]
        elif name in INT_ARGS:
            sig[name] = 'i32'
        elif name.startswith('s') and name.endswith('w'):
            # Unit column stride (planar layout): Triton specialises a 1.
            sig[name], constants[name] = 'constexpr', 1
        elif name.startswith('s'):
            sig[name] = 'i32'
        else:
            sig[name] = '*fp32' if name in FLOAT32_POINTERS else f'*{dtype}'
    return sig, constants


def ptxas_info(log: str) -> dict:
    """Registers and spill bytes from the ``ptxas -v`` log of Triton's own
    cubin build (its flags, e.g. ``--regAllocOptLevel=2``, change them)."""
    return dict(registers=int(re.search(r'Used (\d+) registers', log).group(1)),
                spill_stores=int(re.search(r'(\d+) bytes spill stores', log).group(1)),
                spill_loads=int(re.search(r'(\d+) bytes spill loads', log).group(1)))


def check(arch: int, name: str, dtype: str, head_dim: int, logits: str) -> dict:
    fn = KERNELS[name]
    has_key, has_rel = LOGITS[logits]
    sig, constants = signature(fn, DTYPES[dtype], head_dim, has_key, has_rel)
    row = dict(arch=f'sm_{arch}', kernel=name, dtype=dtype, head_dim=head_dim, logits=logits,
               **kernels.block_config(head_dim, head_dim), **kernels.LAUNCH_OPTIONS)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # Triton prints ptxas's log there
            compiled = triton.compile(ASTSource(fn, sig, constants),
                                      target=GPUTarget('cuda', arch, 32),
                                      options=kernels.LAUNCH_OPTIONS)
    except Exception as error:  # noqa: BLE001  (report every failing configuration)
        return dict(row, error=f'{type(error).__name__}: {error}'.splitlines()[0])
    return dict(row, shared_bytes=compiled.metadata.shared, **ptxas_info(log.getvalue()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90],
                        help='compute capabilities to compile for (default: 80 90)')
    parser.add_argument('--head-dims', type=int, nargs='+', default=list(HEAD_DIMS))
    parser.add_argument('--json', help='also write the table as JSON to this file')
    args = parser.parse_args(argv)
    for dim in args.head_dims:
        if dim < 1 or dim > 128:
            parser.error(f'--head-dims must be between 1 and 128, got {dim}')

    # Build every kernel (no cache hits) and keep ptxas's log of each.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    rows, start = [], time.time()
    header = (f'{"arch":6} {"kernel":15} {"dtype":9} {"D":>4} {"logits":6} {"tile":>6} '
              f'{"regs":>5} {"spills":>7} {"shared":>7}')
    print(f'triton {triton.__version__}: compiling '
          f'{len(args.arch) * len(KERNELS) * len(DTYPES) * len(args.head_dims) * len(LOGITS)} '
          'kernel configurations')
    print(header)
    for arch, name, dtype, dim, logits in itertools.product(
            args.arch, KERNELS, DTYPES, args.head_dims, LOGITS):
        row = check(arch, name, dtype, dim, logits)
        rows.append(row)
        tile = f'{row["BLOCK_H"]}x{row["BLOCK_W"]}'
        if 'error' in row:
            print(f'{row["arch"]:6} {name:15} {dtype:9} {dim:>4} {logits:6} {tile:>6} '
                  f'COMPILE ERROR: {row["error"]}')
            continue
        print(f'{row["arch"]:6} {name:15} {dtype:9} {dim:>4} {logits:6} {tile:>6} '
              f'{row["registers"]:>5} {row["spill_stores"]:>7} {row["shared_bytes"]:>7}')
    errors = [r for r in rows if 'error' in r]
    spills = [r for r in rows if r.get('spill_stores', 0) or r.get('spill_loads', 0)]
    print(f'{len(rows)} configurations in {time.time() - start:.0f} s: {len(errors)} compile '
          f'errors, {len(spills)} with register spills, at most '
          f'{max((r.get("registers", 0) for r in rows), default=0)} registers')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    return 1 if errors or spills else 0


if __name__ == '__main__':
    sys.exit(main())
