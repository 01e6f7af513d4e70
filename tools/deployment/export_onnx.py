"""Export a detector's network to ONNX (tensor mode) and check it in onnxruntime.

The exported graph is the network in MMDetection's ``mode='tensor'``:
input the preprocessed image batch (normalised and padded, what
``DetDataPreprocessor`` gives, ``(B, 3, H, W)``), outputs the dense head's
raw per-level maps before decoding and NMS -- for RetinaNet
``cls_score_0 .. cls_score_{L-1}`` ``(B, A * classes, H_l, W_l)`` then
``bbox_pred_0 .. bbox_pred_{L-1}`` ``(B, A * 4, H_l, W_l)``, the tensors
mmdeploy's RetinaNet graphs end with before their NMS. During export the
attention layers run a path made of standard ONNX operators (pad, shifted
slices, masked softmax); the tool refuses a graph that has a node outside
the standard ``ai.onnx`` domain.

It then runs the file in onnxruntime (CPU) on the same input, prints the
largest absolute difference from PyTorch for every output and fails if one
is above ``--rtol`` (1e-4) times that output's largest magnitude. With
``--dynamic`` (batch, height and width free) it checks a second input of
another batch size and shape as well.

Random weights: without a checkpoint the network keeps its modules' own
random initialisation, made well-conditioned first, as training makes a
network: every ResNet residual branch's last norm weight is scaled by
``--residual-scale`` (0.1) and the BatchNorm statistics are set from two
random batches (``--calibrate-bn``). Left raw, a random attention
ResNet-50 in eval mode is chaotic on some inputs (activations grow 1.5-4x
per block, to 1e2-1e5): float32 rounding differences are amplified until
PyTorch's own two attention backends (compiled kernel and PyTorch path)
differ by up to 12% of the output scale, so the comparison would measure
that rather than the export. Scaled, every attention layer still feeds the
outputs: an error in one of them moves the outputs by far more than 1e-4.
With a checkpoint neither is applied (scale 1, no calibration).

Examples::

    # the demo attention RetinaNet, trained (bash tools/run_demo.sh)
    python tools/deployment/export_onnx.py \
        configs/demo/retinanet_sasa-tiny_shapes.py \
        work_dirs/retinanet_sasa-tiny_shapes/epoch_36.pth --shape 160 160 \
        --out work_dirs/onnx/retinanet_sasa-tiny_shapes.onnx --dynamic
    # a Table 2 config at random initialisation
    python tools/deployment/export_onnx.py \
        configs/retinanet_sasa-attnstem_r50_sasa-fpn_sasa-head.py \
        --shape 128 128 --out work_dirs/onnx/attnstem.onnx
"""
import argparse
import collections
import os
import os.path as osp
import sys
import time
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import DictAction

#: ONNX domains of the standard operators ('' is ai.onnx's canonical name).
STANDARD_DOMAINS = ('', 'ai.onnx')
MIN_OPSET = 13  # Softmax over one axis (what the attention's masked softmax needs)


def log(message: str) -> None:
    print(f'[export_onnx] {message}', flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a detector (tensor mode: per-level class scores '
        'and box deltas, before NMS) to ONNX with standard operators only, '
        'and check it in onnxruntime against PyTorch')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        'checkpoint', nargs='?', default=None,
        help='checkpoint file (weights-only); without it the model keeps its '
        'random initialisation')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=[640, 640], metavar='SIZE',
        help='input size H W (or S for S x S) of the exported (and checked) '
        'input; default 640 640')
    parser.add_argument(
        '--out', default=None,
        help='output .onnx file; default work_dirs/onnx/<config name>.onnx')
    parser.add_argument(
        '--dynamic', action='store_true',
        help='export with dynamic batch size, height and width')
    parser.add_argument(
        '--opset', type=int, default=17, help='ONNX opset version; default 17')
    parser.add_argument(
        '--rtol', type=float, default=1e-4,
        help='largest allowed |onnxruntime - PyTorch|, relative to the '
        'largest |PyTorch| value of each output; default 1e-4')
    parser.add_argument(
        '--seed', type=int, default=0,
        help='seed of the random input and of the random initialisation')
    parser.add_argument(
        '--calibrate-bn', type=int, default=None, metavar='N',
        help='set the BatchNorm statistics from N random input batches before '
        'exporting (default: 2 without a checkpoint, 0 with one)')
    parser.add_argument(
        '--residual-scale', type=float, default=None, metavar='S',
        help="multiply the last norm's weight of every ResNet residual branch "
        'by S before exporting (default: 0.1 without a checkpoint, 1 with one); '
        'see "random weights" in the module docstring')
    parser.add_argument(
        '--skip-check', action='store_true',
        help='export only: no onnxruntime check (the domain check still runs)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, xxx=yyy format')
    args = parser.parse_args(argv)
    from sasa_mmdet.utils import parse_shape
    try:
        args.shape = parse_shape(args.shape)
    except ValueError as error:
        parser.error(f'--shape: {error}')
    if args.opset < MIN_OPSET:
        parser.error(f'--opset must be >= {MIN_OPSET}, got {args.opset}')
    if args.residual_scale is not None and not args.residual_scale > 0:
        parser.error(f'--residual-scale must be positive, got {args.residual_scale}')
    if args.calibrate_bn is not None and args.calibrate_bn < 0:
        parser.error(f'--calibrate-bn must be >= 0, got {args.calibrate_bn}')
    if not args.rtol > 0:
        parser.error(f'--rtol must be positive, got {args.rtol}')
    if args.out is None:
        name = osp.splitext(osp.basename(args.config))[0]
        args.out = osp.join('work_dirs', 'onnx', name + '.onnx')
    return args


class TensorModeNetwork(nn.Module):
    """A detector's ``mode='tensor'`` forward with flat tensor outputs.

    Args:
        detector (nn.Module): An MMDetection detector.

    Example:
        >>> net = TensorModeNetwork(detector)  # a RetinaNet, 5 levels
        >>> net.output_names[:2], len(net(torch.rand(1, 3, 64, 64)))
        (['cls_score_0', 'cls_score_1'], 10)
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.output_names: List[str] = []

    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = self.detector(inputs, None, mode='tensor')
        flat, names = _flatten(outputs)
        self.output_names = names
        return tuple(flat)


def _flatten(outputs) -> Tuple[List[torch.Tensor], List[str]]:
    """Flatten (nested) tuples of tensors; a dense head's ``(cls_scores,
    bbox_preds)`` pair gets RetinaNet's names."""
    if torch.is_tensor(outputs):
        return [outputs], ['output']
    outputs = tuple(outputs)
    if (len(outputs) == 2 and all(isinstance(o, (list, tuple)) for o in outputs)
            and len(outputs[0]) == len(outputs[1])
            and all(torch.is_tensor(t) for o in outputs for t in o)):
        names = [f'cls_score_{i}' for i in range(len(outputs[0]))]
        names += [f'bbox_pred_{i}' for i in range(len(outputs[1]))]
        return [*outputs[0], *outputs[1]], names
    flat, names = [], []

    def walk(value, prefix):
        if torch.is_tensor(value):
            flat.append(value)
            names.append(prefix)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f'{prefix}_{i}')
        else:
            raise TypeError(f'tensor-mode output {prefix} is a {type(value).__name__}, '
                            'not a tensor: cannot export it')

    walk(outputs, 'output')
    return flat, names


def scale_residual_branches(detector: nn.Module, scale: float) -> int:
    """Multiply the last norm's weight of every ResNet block's residual
    branch (``Bottleneck.norm3``, ``BasicBlock.norm2``) by ``scale``.

    Returns the number of blocks scaled.
    """
    from mmdet.models.backbones.resnet import BasicBlock, Bottleneck

    blocks = 0
    for module in detector.modules():
        norm = module.norm3 if isinstance(module, Bottleneck) else \
            module.norm2 if isinstance(module, BasicBlock) else None
        if norm is not None and getattr(norm, 'weight', None) is not None:
            with torch.no_grad():
                norm.weight.mul_(scale)
            blocks += 1
    return blocks


def calibrate_batchnorm(detector: nn.Module, shape: Tuple[int, int], batches: int,
                        seed: int = 0) -> int:
    """Set every BatchNorm's running statistics from random input batches.

    Each BatchNorm (frozen or not) averages the statistics of ``batches``
    forward passes of ``(4, 3, H, W)`` standard-normal inputs (what the
    preprocessor's normalisation gives) in ``mode='tensor'``; the weights do
    not change. Returns the number of BatchNorm layers calibrated.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    norms = [m for m in detector.modules() if isinstance(m, _BatchNorm)]
    if not norms or batches <= 0:
        return 0
    generator = torch.Generator().manual_seed(seed + 1)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    with torch.no_grad():
        for _ in range(batches):
            detector(torch.randn(4, 3, *shape, generator=generator), None, mode='tensor')
    detector.eval()
    return len(norms)


def non_standard_nodes(model) -> List[str]:
    """Nodes of an ``onnx.ModelProto`` (subgraphs included) outside the
    standard ONNX domain, as ``'domain::OpType (node name)'``."""
    found = []

    def visit(graph):
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                found.append(f'{node.domain}::{node.op_type} ({node.name or "unnamed"})')
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return found


def check_standard_ops(path: str) -> Dict[str, int]:
    """Check an ONNX file and return its operator counts.

    Raises:
        ValueError: If a node is outside the standard ``ai.onnx`` domain
            (a custom operator, e.g. an attention op that had no export
            path), or the model imports another operator set.
    """
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(model)
    custom = non_standard_nodes(model)
    if custom:
        raise ValueError(f'{path} has {len(custom)} node(s) outside the standard ONNX '
                         f'domain: {", ".join(custom[:10])}'
                         + (' ...' if len(custom) > 10 else ''))
    domains = [imp.domain for imp in model.opset_import if imp.domain not in STANDARD_DOMAINS]
    if domains:
        raise ValueError(f'{path} imports non-standard operator sets {domains}')
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def export(network: TensorModeNetwork, inputs: torch.Tensor, out: str, opset: int = 17,
           dynamic: bool = False) -> List[str]:
    """``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``).

    Returns:
        list[str]: The output names.
    """
    with torch.no_grad():
        network(inputs)  # sets the output names
    names = list(network.output_names)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        dynamic_axes.update({name: {0: 'batch', 2: f'{name}_height', 3: f'{name}_width'}
                             for name in names})
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks read as constants under tracing; the static window
        # loops are meant to be unrolled
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='Constant folding - Only steps=1')
        torch.onnx.export(
            network, (inputs, ), out, input_names=['input'], output_names=names,
            opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
            dynamo=False)
    return names


def compare_with_onnxruntime(path: str, network: nn.Module, inputs: torch.Tensor,
                             names: Sequence[str], rtol: float) -> List[dict]:
    """Run ``path`` in onnxruntime (CPU) and PyTorch on ``inputs``.

    Returns:
        list[dict]: Per output: ``name``, ``shape``, ``max_abs_diff``,
        ``scale`` (largest |PyTorch| value), ``relative`` and ``ok``
        (``relative <= rtol``).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = session.run(None, {'input': inputs.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in network(inputs)]
    if len(got) != len(want):
        raise ValueError(f'onnxruntime returned {len(got)} outputs, PyTorch {len(want)}')
    rows = []
    for name, g, w in zip(names, got, want):
        if g.shape != w.shape:
            raise ValueError(f'output {name}: onnxruntime shape {g.shape}, PyTorch {w.shape}')
        diff = float(np.abs(g - w).max()) if w.size else 0.0
        scale = float(np.abs(w).max()) if w.size else 0.0
        relative = diff / scale if scale > 0 else diff
        rows.append(dict(name=name, shape=tuple(w.shape), max_abs_diff=diff, scale=scale,
                         relative=relative, ok=bool(relative <= rtol)))
    return rows


def main(argv=None) -> dict:
    """Export and check; returns what was done (``checks``: per input, the
    rows of :func:`compare_with_onnxruntime`; ``network``: the exported
    :class:`TensorModeNetwork`)."""
    args = parse_args(argv)
    from sasa_mmdet.utils.inference import load_detector

    start = time.perf_counter()
    log(f'building {args.config}' + (f' with {args.checkpoint}' if args.checkpoint
                                     else ' (random initialisation, no checkpoint)'))
    torch.manual_seed(args.seed)  # the random initialisation, when no checkpoint
    detector = load_detector(args.config, args.checkpoint, args.cfg_options)
    height, width = args.shape
    scale = args.residual_scale or (1.0 if args.checkpoint else 0.1)
    batches = args.calibrate_bn if args.calibrate_bn is not None else \
        (0 if args.checkpoint else 2)
    if scale != 1.0:
        blocks = scale_residual_branches(detector, scale)
        log(f'scaled the residual branches of {blocks} ResNet blocks by {scale:g} '
            '(--residual-scale)')
    calibrated = calibrate_batchnorm(detector, args.shape, batches, args.seed)
    if calibrated:
        log(f'set the statistics of {calibrated} BatchNorm layers from {batches} random '
            'batches of 4 (--calibrate-bn)')
    network = TensorModeNetwork(detector).eval()
    generator = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(1, 3, height, width, generator=generator)

    log(f'exporting to {args.out} (opset {args.opset}, input 1x3x{height}x{width}'
        f'{", dynamic batch/height/width" if args.dynamic else ""})')
    names = export(network, inputs, args.out, args.opset, args.dynamic)
    ops = check_standard_ops(args.out)
    size_mb = osp.getsize(args.out) / 2**20
    log(f'wrote {args.out} ({size_mb:.1f} MB, {sum(ops.values())} nodes, standard ONNX '
        f'operators only: {", ".join(f"{k} {v}" for k, v in sorted(ops.items()))})')
    result = dict(config=args.config, checkpoint=args.checkpoint, out=args.out,
                  opset=args.opset, dynamic=args.dynamic, outputs=names, ops=ops,
                  checks=[], network=network)
    if args.skip_check:
        log(f'done in {time.perf_counter() - start:.1f} s (onnxruntime check skipped)')
        return result

    checks = [inputs]
    if args.dynamic:  # another batch size and shape through the same graph
        checks.append(torch.randn(2, 3, height + 32, max(width - 32, 32), generator=generator))
    failed = []
    for x in checks:
        rows = compare_with_onnxruntime(args.out, network, x, names, args.rtol)
        worst = max(rows, key=lambda r: r['relative'])
        shape = 'x'.join(map(str, x.shape))
        log(f'onnxruntime vs PyTorch on {shape}: largest |difference| '
            f'{max(r["max_abs_diff"] for r in rows):.3g} (worst relative '
            f'{worst["relative"]:.3g} at {worst["name"]}, allowed {args.rtol:g})')
        for row in rows:
            log(f'  {row["name"]:<14} {"x".join(map(str, row["shape"])):<16} '
                f'max |diff| {row["max_abs_diff"]:.3g}  scale {row["scale"]:.3g}  '
                f'relative {row["relative"]:.3g}{"" if row["ok"] else "  FAIL"}')
        result['checks'].append(dict(input_shape=tuple(x.shape), outputs=rows))
        failed += [f'{r["name"]} on {shape} ({r["relative"]:.3g})' for r in rows if not r['ok']]
    if failed:
        raise SystemExit(f'[export_onnx] FAILED: onnxruntime differs from PyTorch by more '
                         f'than {args.rtol:g} of the output scale: {", ".join(failed)}')
    log(f'done in {time.perf_counter() - start:.1f} s: {args.out} matches PyTorch')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
