"""How often this CPU's bfloat16 convolution gets narrow maps wrong.

Under ``torch.autocast('cpu', dtype=torch.bfloat16)``, torch runs 2-D
convolutions through oneDNN on CPUs with AVX512 (BW, VL, DQ) or
AVX-NE-CONVERT. For an input narrower than the convolution's stride
(RetinaNet's P7 convolution on the 1x1 P6 of a small image), oneDNN's
bfloat16 convolution returns NaN or wrong weight gradients in a share of
the calls that varies from run to run. ``BF16AmpOptimWrapper`` runs those
convolutions, and only those, in float32 (``_TinyConvsInFloat32``).

This tool measures, per case, over ``--calls`` calls on seeded inputs, how
many weight gradients are NaN and how many are off their float64 value by
more than bfloat16 rounding, for the raw autocast convolution and for the
same convolution under the wrapper's autocast. A wider map is the control.
Run it after a torch upgrade: when every raw column reads 0 on a CPU where
oneDNN runs bfloat16 (the header says whether it does), the workaround may go.

Example::

    python tools/analysis_tools/check_onednn_bf16.py --calls 1000 \\
        --json work_dirs/onednn_bf16.json
"""
import argparse
import json
import platform
import sys

import torch
import torch.nn as nn

from sasa_mmdet.engine.optimizers.bf16_amp_optim_wrapper import bf16_autocast

# (input H x W, stride, kernel): inputs narrower than the stride, then a
# wider control that oneDNN gets right.
CASES = [((1, 1), 2, 3), ((2, 1), 2, 3), ((1, 1), 3, 5), ((2, 2), 3, 3), ((4, 4), 2, 3)]
CHANNELS = 16


def onednn_runs_bf16_convolutions() -> bool:
    """Whether torch runs oneDNN's bfloat16 convolution on this CPU (needs
    AVX512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere torch's own im2col path
    runs bfloat16 convolutions)."""
    if not torch.backends.mkldnn.is_available():
        return False
    x = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    w = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16)
    try:
        torch.ops.aten.mkldnn_convolution(x, w, None, [0, 0], [1, 1], [1, 1], 1)
    except RuntimeError:  # "bf16 path needs the cpu support avx_ne_convert or avx512..."
        return False
    return True


def gradient_is_right(grad: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within bfloat16 rounding (about 3 significant digits) of the float64
    gradient, relative to its largest entry."""
    tolerance = 2e-2 * expected.abs().max().item()
    return bool(torch.isfinite(grad).all()) and torch.allclose(
        grad, expected, rtol=2e-2, atol=tolerance)


def measure_case(size, stride, kernel, calls, workaround, seed=0) -> dict:
    """Counts of NaN, wrong and right weight gradients over ``calls``
    bfloat16-autocast convolutions of ``(2, 16, *size)`` inputs.

    Args:
        size (tuple[int]): input height and width.
        stride (int): the convolution's stride (padding ``kernel // 2``).
        kernel (int): kernel size.
        calls (int): convolutions to run (forward and backward).
        workaround (bool): run under ``bf16_autocast`` (the wrapper's
            autocast) instead of plain ``torch.autocast``.
        seed (int): seed of the weights and inputs.

    Returns:
        dict: ``calls``, ``nan``, ``wrong`` (finite but off) and ``bad``
        (their sum).
    """
    torch.manual_seed(seed)
    conv = nn.Conv2d(CHANNELS, CHANNELS, kernel, stride=stride, padding=kernel // 2)
    weight = conv.weight.detach().double().requires_grad_()
    autocast = bf16_autocast if workaround else (
        lambda: torch.autocast('cpu', dtype=torch.bfloat16))
    nan = wrong = 0
    for _ in range(calls):
        x = torch.randn(2, CHANNELS, *size)
        conv.zero_grad()
        with autocast():
            out = conv(x)
        out.float().sum().backward()
        expected, = torch.autograd.grad(
            nn.functional.conv2d(x.double(), weight, None, stride, kernel // 2).sum(), weight)
        grad = conv.weight.grad.double()
        if not torch.isfinite(grad).all():
            nan += 1
        elif not gradient_is_right(grad, expected):
            wrong += 1
    return dict(calls=calls, nan=nan, wrong=wrong, bad=nan + wrong)


def run(calls: int, cases=CASES) -> dict:
    """Every case, raw and with the workaround, plus what ran them."""
    rows = []
    for size, stride, kernel in cases:
        rows.append(dict(size=list(size), stride=stride, kernel=kernel,
                         raw=measure_case(size, stride, kernel, calls, workaround=False),
                         workaround=measure_case(size, stride, kernel, calls,
                                                 workaround=True)))
    return dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                onednn_bf16=onednn_runs_bf16_convolutions(),
                threads=torch.get_num_threads(), cases=rows)


def format_table(result: dict) -> str:
    lines = [
        f"torch {result['torch']}, CPU capability {result['cpu_capability']}, "
        f"oneDNN bfloat16 convolution: {'yes' if result['onednn_bf16'] else 'no'}, "
        f"{result['threads']} threads",
        '',
        '| input | stride | kernel | raw: NaN | raw: wrong | raw: bad share '
        '| with workaround: bad |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for row in result['cases']:
        raw = row['raw']
        lines.append(
            f"| {row['size'][0]}x{row['size'][1]} | {row['stride']} | {row['kernel']} "
            f"| {raw['nan']} | {raw['wrong']} | {raw['bad'] / raw['calls']:.1%} "
            f"| {row['workaround']['bad']} |")
    calls = result['cases'][0]['raw']['calls'] if result['cases'] else 0
    lines.append(f'\n{calls} calls per cell, seeded inputs; "bad" = NaN or off the '
                 'float64 gradient by more than bfloat16 rounding.')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Measure how often this CPU's bfloat16 autocast convolution returns "
        'NaN or wrong weight gradients for inputs narrower than the stride, with and '
        'without the BF16AmpOptimWrapper workaround')
    parser.add_argument('--calls', type=int, default=1000,
                        help='convolutions per case (default: 1000)')
    parser.add_argument('--json', default=None, metavar='OUT',
                        help='also write the counts to this JSON file')
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f'--calls must be at least 1, got {args.calls}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args.calls)
    print(format_table(result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
