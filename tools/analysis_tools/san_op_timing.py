"""Time SAN's operators on a CUDA GPU: the Triton kernels beside the PyTorch path.

    python tools/analysis_tools/san_op_timing.py [--shape 8,256,80,80] [--window 7]
        [--share-planes 8] [--rel-channels 64] [--dtype bfloat16] [--repeats 20]
        [--out DIR]

At one detection shape (default: batch 8, 256 channels, 80x80, the stride-8
level of a 640x640 input, bfloat16), each of SAN's operators
(:mod:`sasa_mmdet.layers.san_ops`) runs with ``impl='triton'`` and
``impl='torch'`` in both border modes, as the layers call them:

- aggregation: the values ``(B, C, H, W)`` and one weight per tap for each
  of ``C / share_planes`` channel groups;
- subtraction (pairwise) and gather (patchwise) of the ``rel_channels``
  projections (default ``C / 4``, the layers').

Forward, and forward + backward (the gradients of every input), are timed
with CUDA events after warm-up (compilation included there, not in the
times): the median of ``--repeats``. The Triton outputs are compared with
the PyTorch ones (largest error relative to the largest value). Writes
``san_ops.json`` and ``san_ops.md`` to ``--out``; tools/gpu_check.sh runs it.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
IMPLS = ('torch', 'triton')
BORDERS = ('reflect', 'mask')


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(v) for v in text.split(','))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f'--shape is B,C,H,W (positive ints), got {text!r}')
    return shape


def median_ms(fn, repeats: int) -> float:
    import torch
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def op_cases(args, dtype):
    """name -> (function of impl and border, its inputs)."""
    import torch
    from sasa_mmdet.layers.san_ops import san_aggregation, san_gather, san_subtraction
    batch, channels, height, width = args.shape
    rel = args.rel_channels or max(channels // 4, 1)
    window = (args.window, args.window)
    taps = args.window**2
    g = torch.Generator(device='cuda').manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device='cuda').to(dtype).requires_grad_()

    value = rand(batch, channels, height, width)
    weight = rand(batch, channels // args.share_planes, taps, height, width)
    x1, x2 = rand(batch, rel, height, width), rand(batch, rel, height, width)
    return {
        'aggregation': (lambda impl, border: san_aggregation(value, weight, window, (1, 1),
                                                             border, impl), (value, weight)),
        'subtraction': (lambda impl, border: san_subtraction(x1, x2, window, (1, 1), border,
                                                             impl), (x1, x2)),
        'gather': (lambda impl, border: san_gather(x2, window, (1, 1), border, impl), (x2, )),
    }


def time_ops(args) -> list:
    import torch
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, (op, inputs) in op_cases(args, dtype).items():
        for border in BORDERS:
            outputs = {}
            for impl in IMPLS:
                out = op(impl, border)
                grad = torch.randn_like(out)

                def forward():
                    with torch.no_grad():
                        op(impl, border)

                def forward_backward():
                    torch.autograd.grad(op(impl, border), inputs, grad)

                for fn in (forward, forward_backward):  # warm-up: compiles the kernels
                    fn()
                torch.cuda.synchronize()
                outputs[impl] = out.detach().float()
                for phase, fn in (('forward', forward), ('forward+backward', forward_backward)):
                    rows.append(dict(op=name, border=border, impl=impl, phase=phase,
                                     ms=round(median_ms(fn, args.repeats), 4)))
                del out, grad
                torch.cuda.empty_cache()
            error = (outputs['triton'] - outputs['torch']).abs().max().item()
            scale = outputs['torch'].abs().max().item()
            for row in rows[-4:]:
                row['relative_error'] = error / max(scale, 1e-30)
            print(f'{name:12} {border:8} ' + '  '.join(
                f'{r["impl"]} {r["phase"]} {r["ms"]:.3f} ms' for r in rows[-4:]), flush=True)
    return rows


def markdown(rows: list, args, device: str) -> str:
    batch, channels, height, width = args.shape
    lines = [f'SAN operators on {device}, {args.dtype}, batch {batch}, {channels} channels, '
             f'{height}x{width}, window {args.window}x{args.window}, share_planes '
             f'{args.share_planes}, rel_channels {args.rel_channels or max(channels // 4, 1)} '
             f'(median of {args.repeats}, ms)', '',
             '| op | border | pass | PyTorch | Triton | PyTorch / Triton | Triton error |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        if r['impl'] != 'triton':
            continue
        peer = next(p for p in rows if p['impl'] == 'torch' and
                    (p['op'], p['border'], p['phase']) == (r['op'], r['border'], r['phase']))
        lines.append(f'| {r["op"]} | {r["border"]} | {r["phase"]} | {peer["ms"]:.3f} | '
                     f'{r["ms"]:.3f} | {peer["ms"] / r["ms"]:.2f} | '
                     f'{r["relative_error"]:.1e} |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shape', type=parse_shape, default=(8, 256, 80, 80), metavar='B,C,H,W')
    parser.add_argument('--window', type=int, default=7)
    parser.add_argument('--share-planes', type=int, default=8)
    parser.add_argument('--rel-channels', type=int, default=None,
                        help='channels of the subtraction and gather (default: C / 4)')
    parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16', 'float16'))
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--out', default='work_dirs/san_op_timing')
    args = parser.parse_args(argv)
    if args.window < 1 or args.repeats < 1 or args.share_planes < 1 or \
            args.shape[1] % args.share_planes or (args.rel_channels or 1) < 1:
        parser.error('--window, --repeats and --rel-channels must be positive, and '
                     '--share-planes must divide the channels')
    import torch
    if not torch.cuda.is_available() or os.environ.get('TRITON_INTERPRET', '0') == '1':
        print('san_op_timing: needs a CUDA GPU (and TRITON_INTERPRET unset)', file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    rows = time_ops(args)
    device = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    with open(osp.join(args.out, 'san_ops.json'), 'w') as f:
        json.dump(dict(device=device, shape=list(args.shape), window=args.window,
                       share_planes=args.share_planes, rel_channels=args.rel_channels,
                       dtype=args.dtype, repeats=args.repeats, rows=rows), f, indent=1)
    table = markdown(rows, args, device)
    with open(osp.join(args.out, 'san_ops.md'), 'w') as f:
        f.write(table)
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
