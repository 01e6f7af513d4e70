"""Export a detector to ONNX and check it in onnxruntime against PyTorch.

What the graph returns:

- end to end (default): detections, ``dets (B, N, 5)`` (x1, y1, x2, y2,
  score) and ``labels (B, N)``, mmdeploy's layout, N = the head's
  ``max_per_img`` (rows past an image's detections: score 0, label -1):
  box decoding and ONNX ``NonMaxSuppression`` are in the graph
  (``sasa_mmdet.deployment.End2EndDetector``; RetinaNet-style heads);
- ``--tensor-only``: the network in MMDetection's ``mode='tensor'``, the
  dense head's raw per-level maps before decoding and NMS -- for RetinaNet
  ``cls_score_0 .. cls_score_{L-1}`` ``(B, A * classes, H_l, W_l)`` then
  ``bbox_pred_0 .. bbox_pred_{L-1}`` ``(B, A * 4, H_l, W_l)``.

Either way the input is the preprocessed image batch (normalised and
padded, what ``DetDataPreprocessor`` gives, ``(B, 3, H, W)``); boxes are in
its coordinates (``tools/deployment/onnx_inference.py`` does the
pre-processing and the rescaling for an image).

How the attention layers are exported (``--backend``):

- ``onnxruntime``: one ``sasa_mmdet::LocalAttention`` node per layer, run by
  the package's onnxruntime custom-op library (the CPU kernel; load it with
  ``SessionOptions.register_custom_ops_library(
  sasa_mmdet.onnxruntime_ops_path())``). The default when the library is built;
- ``onnx``: standard ONNX operators only, runs in any ONNX runtime (a few
  Gathers and MatMuls and one Softmax per layer); the default otherwise;
- ``onnx-per-tap``: standard operators, one Slice/Mul/ReduceSum chain per
  window tap: the standard graph of earlier versions, for comparison.

The tool says which it uses, and refuses a graph with a node outside the
standard ``ai.onnx`` domain (``onnx``, ``onnx-per-tap``) or outside it and
``sasa_mmdet`` (``onnxruntime``).

It then runs the file in onnxruntime (CPU) on the same input. Tensor mode:
it prints the largest absolute difference from PyTorch for every output and
fails if one is above ``--rtol`` (1e-4) times that output's largest
magnitude. End to end: it compares the detections with MMDetection's own
``predict`` on the same batch and fails unless they are the same number of
boxes with the same labels, and boxes and scores within ``--box-rtol``
(1e-3) of the box scale. With ``--dynamic`` (batch, height and width free) it
checks a second input of another batch size and shape as well.

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

    # the demo attention RetinaNet, trained (bash tools/run_demo.sh), end
    # to end, fused attention nodes
    python tools/deployment/export_onnx.py \
        configs/demo/retinanet_sasa-tiny_shapes.py \
        work_dirs/retinanet_sasa-tiny_shapes/epoch_36.pth --shape 160 160 \
        --out work_dirs/onnx/retinanet_sasa-tiny_shapes.onnx
    # standard operators only, tensor outputs, dynamic shapes
    python tools/deployment/export_onnx.py \
        configs/demo/retinanet_sasa-tiny_shapes.py \
        work_dirs/retinanet_sasa-tiny_shapes/epoch_36.pth --shape 160 160 \
        --backend onnx --tensor-only --dynamic
    # a Table 2 config at random initialisation
    python tools/deployment/export_onnx.py \
        configs/sasa/retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py \
        --shape 128 128 --out work_dirs/onnx/attnstem.onnx
"""
import argparse
import collections
import os
import os.path as osp
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import DictAction

#: ONNX domains of the standard operators ('' is ai.onnx's canonical name).
STANDARD_DOMAINS = ('', 'ai.onnx')
#: --backend choices (sasa_mmdet.layers.backends.onnx_graph.GRAPHS).
BACKENDS = ('onnxruntime', 'onnx', 'onnx-per-tap')
MIN_OPSET = 13  # Softmax over one axis (what the attention's masked softmax needs)


def log(message: str) -> None:
    print(f'[export_onnx] {message}', flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a detector to ONNX (end to end: boxes, scores and '
        'labels after NMS; or tensor mode) and check it in onnxruntime against '
        'PyTorch')
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
        '--backend', choices=BACKENDS, default=None,
        help="how the attention layers are exported: 'onnxruntime' (one fused "
        "sasa_mmdet::LocalAttention node per layer, needs the package's "
        "onnxruntime custom-op library), 'onnx' (standard operators only), "
        "'onnx-per-tap' (standard operators, the older per-tap graph); default: "
        "'onnxruntime' when the library is built, else 'onnx'")
    parser.add_argument(
        '--tensor-only', action='store_true',
        help='export the network in tensor mode (per-level class scores and box '
        'deltas, before decoding and NMS) instead of end-to-end detections')
    parser.add_argument(
        '--box-rtol', type=float, default=1e-3,
        help='end to end: largest allowed |onnxruntime - PyTorch| of boxes and '
        'scores, relative to the largest box coordinate; default 1e-3')
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
    if not args.box_rtol > 0:
        parser.error(f'--box-rtol must be positive, got {args.box_rtol}')
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


def non_standard_nodes(model, allowed: Sequence[str] = ()) -> List[str]:
    """Nodes of an ``onnx.ModelProto`` (subgraphs included) outside the
    standard ONNX domain and the ``allowed`` ones, as
    ``'domain::OpType (node name)'``."""
    found = []

    def visit(graph):
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS and node.domain not in allowed:
                found.append(f'{node.domain}::{node.op_type} ({node.name or "unnamed"})')
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return found


def check_standard_ops(path: str, allowed: Sequence[str] = ()) -> Dict[str, int]:
    """Check an ONNX file and return its operator counts.

    Args:
        path (str): The ONNX file.
        allowed (Sequence[str]): Custom domains allowed besides the standard
            one (``('sasa_mmdet',)`` for ``--backend onnxruntime``).

    Raises:
        ValueError: If a node is outside the standard ``ai.onnx`` domain and
            ``allowed`` (a custom operator, e.g. an attention op that had no
            export path), or the model imports another operator set.
    """
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(model)
    custom = non_standard_nodes(model, allowed)
    if custom:
        where = 'the standard ONNX domain' + (f' and {", ".join(allowed)}' if allowed else '')
        raise ValueError(f'{path} has {len(custom)} node(s) outside {where}: '
                         f'{", ".join(custom[:10])}' + (' ...' if len(custom) > 10 else ''))
    domains = [imp.domain for imp in model.opset_import
               if imp.domain not in STANDARD_DOMAINS and imp.domain not in allowed]
    if domains:
        raise ValueError(f'{path} imports non-standard operator sets {domains}')
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def resolve_backend(backend: Optional[str]) -> Tuple[str, str]:
    """The ``--backend`` to use and why: the given one, or 'onnxruntime' when
    the custom-op library is built, else 'onnx'.

    Raises:
        FileNotFoundError: 'onnxruntime' asked for without the library.
    """
    from sasa_mmdet.deployment import onnxruntime_ops_available, onnxruntime_ops_path
    if backend is None:
        if onnxruntime_ops_available():
            return 'onnxruntime', 'default: the onnxruntime custom-op library is built'
        return 'onnx', ('default: the onnxruntime custom-op library is not built, so '
                        'standard operators only')
    if backend == 'onnxruntime':
        onnxruntime_ops_path()  # raises with what to do when it is not built
    return backend, 'asked for'


def export(network: nn.Module, inputs: torch.Tensor, out: str, opset: int = 17,
           dynamic: bool = False, backend: str = 'onnx') -> List[str]:
    """``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``), the
    attention recorded as ``backend`` says (:data:`BACKENDS`); with
    ``'onnxruntime'`` the fused nodes then take their layer's packed q/k/v
    projection (``sasa_mmdet.deployment.pack_attention_inputs``) and fold
    in the stride pool, BatchNorm and ReLU after them
    (``fuse_attention_epilogues``); the exporter's equal Constant nodes are
    merged (``deduplicate_constants``).

    Args:
        network (nn.Module): A :class:`TensorModeNetwork` or an
            ``End2EndDetector`` (its ``output_names``).

    Returns:
        list[str]: The output names.
    """
    from sasa_mmdet.deployment import register_onnx_symbolic
    from sasa_mmdet.layers.backends.onnx_graph import export_graph

    with torch.no_grad():
        network(inputs)  # sets a TensorModeNetwork's output names
    names = list(network.output_names)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        if isinstance(network, TensorModeNetwork):
            dynamic_axes.update({name: {0: 'batch', 2: f'{name}_height',
                                        3: f'{name}_width'} for name in names})
        else:
            dynamic_axes.update({name: {0: 'batch'} for name in names})
    if backend == 'onnxruntime':
        register_onnx_symbolic(opset)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), export_graph(backend, dynamic):
        # shape checks read as constants under tracing; the static window
        # loops are meant to be unrolled
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='Constant folding - Only steps=1')
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        torch.onnx.export(
            network, (inputs, ), out, input_names=['input'], output_names=names,
            opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
            dynamo=False)
    import onnx

    from sasa_mmdet.deployment import (deduplicate_constants, fuse_attention_epilogues,
                                       pack_attention_inputs)
    model = onnx.load(out)
    rewrites = 0
    if backend == 'onnxruntime':
        # each fused node reads its layer's q/k/v projection in place and
        # applies what follows it (as onnxruntime folds a convolution's)
        rewrites += pack_attention_inputs(model) + fuse_attention_epilogues(model)
    # the exporter records one Constant node per use of a value
    if rewrites + deduplicate_constants(model):
        onnx.save(model, out)
    return names


def onnxruntime_session(path: str, backend: str = 'onnx', threads: int = 0):
    """An onnxruntime CPU session of ``path``, with the package's custom-op
    library registered for ``backend='onnxruntime'``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if backend == 'onnxruntime':
        from sasa_mmdet.deployment import onnxruntime_ops_path
        options.register_custom_ops_library(onnxruntime_ops_path())
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def compare_with_onnxruntime(path: str, network: nn.Module, inputs: torch.Tensor,
                             names: Sequence[str], rtol: float,
                             backend: str = 'onnx') -> List[dict]:
    """Run ``path`` in onnxruntime (CPU) and PyTorch on ``inputs``.

    Returns:
        list[dict]: Per output: ``name``, ``shape``, ``max_abs_diff``,
        ``scale`` (largest |PyTorch| value), ``relative`` and ``ok``
        (``relative <= rtol``).
    """
    session = onnxruntime_session(path, backend)
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


def mmdet_detections(detector: nn.Module, inputs: torch.Tensor) -> List[dict]:
    """MMDetection's own ``predict`` on a preprocessed batch (image shape =
    the input's, scale factor 1): per image ``bboxes``, ``scores``,
    ``labels`` (numpy)."""
    from mmdet.structures import DetDataSample

    height, width = inputs.shape[-2:]
    samples = []
    for _ in range(inputs.shape[0]):
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(height, width), ori_shape=(height, width),
                                 pad_shape=(height, width), scale_factor=(1.0, 1.0),
                                 batch_input_shape=(height, width)))
        samples.append(sample)
    with torch.no_grad():
        results = detector.predict(inputs, samples, rescale=False)
    return [dict(bboxes=r.pred_instances.bboxes.numpy(), scores=r.pred_instances.scores.numpy(),
                 labels=r.pred_instances.labels.numpy()) for r in results]


def _best_first(detections: dict) -> np.ndarray:
    """The order best score first; equal scores (to 1e-5) by label, then
    by box (to 0.01 px), so that ties sort alike in both runs."""
    boxes = np.round(np.asarray(detections['bboxes'], np.float64).reshape(-1, 4), 2)
    keys = [boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], detections['labels'],
            -np.round(np.asarray(detections['scores'], np.float64), 5)]
    return np.lexsort(keys)


def compare_detections(got: List[dict], want: List[dict], rtol: float) -> List[dict]:
    """Detections of onnxruntime (``got``) against PyTorch's (``want``), per
    image: ``count`` (both), ``labels_equal``, ``max_box_diff``,
    ``max_score_diff``, ``scale`` (largest |box coordinate|), ``relative``
    (box difference / scale) and ``ok``: same count and labels, boxes and
    scores within ``rtol`` (scores: absolute). Both lists are compared best
    score first."""
    rows = []
    for g, w in zip(got, want):
        order_g = _best_first(g)
        order_w = _best_first(w)
        count = (len(g['scores']), len(w['scores']))
        same = count[0] == count[1]
        labels_equal = same and bool(np.array_equal(g['labels'][order_g],
                                                    w['labels'][order_w]))
        box_diff = float(np.abs(g['bboxes'][order_g] - w['bboxes'][order_w]).max()) \
            if same and count[0] else 0.0
        score_diff = float(np.abs(g['scores'][order_g] - w['scores'][order_w]).max()) \
            if same and count[0] else 0.0
        scale = float(np.abs(w['bboxes']).max()) if count[1] else 1.0
        relative = box_diff / scale
        rows.append(dict(count=count, labels_equal=labels_equal, max_box_diff=box_diff,
                         max_score_diff=score_diff, scale=scale, relative=relative,
                         ok=bool(same and labels_equal and relative <= rtol
                                 and score_diff <= rtol)))
    return rows


def build_detector(args) -> nn.Module:
    """The config's detector, with the checkpoint or conditioned random
    weights (module docstring)."""
    from sasa_mmdet.utils.inference import load_detector

    log(f'building {args.config}' + (f' with {args.checkpoint}' if args.checkpoint
                                     else ' (random initialisation, no checkpoint)'))
    torch.manual_seed(args.seed)  # the random initialisation, when no checkpoint
    detector = load_detector(args.config, args.checkpoint, args.cfg_options)
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
    return detector.eval()


def main(argv=None, detector: Optional[nn.Module] = None) -> dict:
    """Export and check; returns what was done (``checks``: per input, the
    rows of :func:`compare_with_onnxruntime` (tensor mode) or
    :func:`compare_detections` (end to end); ``network``: the exported
    module; ``export_s``: seconds of ``torch.onnx.export``).

    Args:
        argv (list[str]): Command-line arguments.
        detector (nn.Module, optional): Export this detector instead of
            building it from the config and checkpoint (tests).
    """
    args = parse_args(argv)
    from sasa_mmdet.deployment import End2EndDetector

    start = time.perf_counter()
    backend, why = resolve_backend(args.backend)
    log(f'attention layers: --backend {backend} ({why})')
    if detector is None:
        detector = build_detector(args)
    height, width = args.shape
    network = TensorModeNetwork(detector) if args.tensor_only else End2EndDetector(detector)
    network.eval()
    generator = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(1, 3, height, width, generator=generator)

    mode = 'tensor mode' if args.tensor_only else 'end to end (dets, labels)'
    log(f'exporting {mode} to {args.out} (opset {args.opset}, input 1x3x{height}x{width}'
        f'{", dynamic batch/height/width" if args.dynamic else ""})')
    export_start = time.perf_counter()
    names = export(network, inputs, args.out, args.opset, args.dynamic, backend)
    export_s = time.perf_counter() - export_start
    allowed = ('sasa_mmdet', ) if backend == 'onnxruntime' else ()
    ops = check_standard_ops(args.out, allowed)
    size_mb = osp.getsize(args.out) / 2**20
    kinds = 'standard ONNX operators and sasa_mmdet::LocalAttention' if allowed else \
        'standard ONNX operators only'
    log(f'wrote {args.out} in {export_s:.1f} s ({size_mb:.1f} MB, {sum(ops.values())} nodes, '
        f'{kinds}: {", ".join(f"{k} {v}" for k, v in sorted(ops.items()))})')
    result = dict(config=args.config, checkpoint=args.checkpoint, out=args.out,
                  opset=args.opset, dynamic=args.dynamic, backend=backend,
                  end2end=not args.tensor_only, outputs=names, ops=ops, checks=[],
                  network=network, export_s=export_s)
    if args.skip_check:
        log(f'done in {time.perf_counter() - start:.1f} s (onnxruntime check skipped)')
        return result

    checks = [inputs]
    if args.dynamic:  # another batch size and shape through the same graph
        checks.append(torch.randn(2, 3, height + 32, max(width - 32, 32), generator=generator))
    failed = []
    for x in checks:
        shape = 'x'.join(map(str, x.shape))
        if args.tensor_only:
            failed += _check_tensors(args, network, names, x, shape, backend, result)
        else:
            failed += _check_detections(args, detector, x, shape, backend, result)
    if failed:
        raise SystemExit(f'[export_onnx] FAILED: onnxruntime differs from PyTorch: '
                         f'{", ".join(failed)}')
    log(f'done in {time.perf_counter() - start:.1f} s: {args.out} matches PyTorch')
    return result


def _check_tensors(args, network, names, x, shape, backend, result) -> List[str]:
    rows = compare_with_onnxruntime(args.out, network, x, names, args.rtol, backend)
    worst = max(rows, key=lambda r: r['relative'])
    log(f'onnxruntime vs PyTorch on {shape}: largest |difference| '
        f'{max(r["max_abs_diff"] for r in rows):.3g} (worst relative '
        f'{worst["relative"]:.3g} at {worst["name"]}, allowed {args.rtol:g})')
    for row in rows:
        log(f'  {row["name"]:<14} {"x".join(map(str, row["shape"])):<16} '
            f'max |diff| {row["max_abs_diff"]:.3g}  scale {row["scale"]:.3g}  '
            f'relative {row["relative"]:.3g}{"" if row["ok"] else "  FAIL"}')
    result['checks'].append(dict(input_shape=tuple(x.shape), outputs=rows))
    return [f'{r["name"]} on {shape} ({r["relative"]:.3g} > {args.rtol:g})'
            for r in rows if not r['ok']]


def _check_detections(args, detector, x, shape, backend, result) -> List[str]:
    from sasa_mmdet.deployment import detections_from_outputs

    dets, labels = onnxruntime_session(args.out, backend).run(None, {'input': x.numpy()})
    got = detections_from_outputs(dets, labels)
    want = mmdet_detections(detector, x)
    rows = compare_detections(got, want, args.box_rtol)
    for image, row in enumerate(rows):
        log(f'onnxruntime vs MMDetection predict on {shape}, image {image}: '
            f'{row["count"][0]} / {row["count"][1]} detections, labels '
            f'{"equal" if row["labels_equal"] else "DIFFER"}, max |box diff| '
            f'{row["max_box_diff"]:.3g} (relative {row["relative"]:.3g}), max |score diff| '
            f'{row["max_score_diff"]:.3g}, allowed {args.box_rtol:g}'
            f'{"" if row["ok"] else "  FAIL"}')
    result['checks'].append(dict(input_shape=tuple(x.shape), detections=rows))
    return [f'detections of image {i} on {shape}' for i, r in enumerate(rows) if not r['ok']]


if __name__ == '__main__':
    main(sys.argv[1:])
