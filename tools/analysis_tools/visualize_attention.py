"""Draw where a detector's local self-attention layers look, on an image.

For chosen attention layers (default: one per backbone stage -- the last
attention layer of each stage, and the attention stem -- and the first
attention FPN level when the neck has attention) it runs the detector on the
image once, takes each layer's input and computes the layer's softmax
weights (``attention_weights``), then writes PNGs to ``--out-dir``:

- ``<layer>_p<k>_window.png``: for image point k (``--points X,Y``, in
  pixels of the image file; default the centres of the top detections), each
  head's weights over its window, drawn on the image at the layer's stride
  and dilation (one square per tap, the size of one pixel of the layer's
  input; the query pixel outlined in white), one panel per head, after an
  overview panel;
- ``<layer>_entropy.png``: per head, the entropy of the attention of every
  pixel (nats; 0 = one tap, log(k*k) = uniform over the window);
- ``<layer>_offsets.png``: per head, the mean offset each pixel attends to
  (sum of tap offsets weighted by the attention), as arrows in image pixels.

Example::

    python tools/analysis_tools/visualize_attention.py \
        configs/demo/retinanet_sasa-tiny_shapes.py \
        work_dirs/retinanet_sasa-tiny_shapes/epoch_36.pth \
        data/sasa_demo/val/000000.png --out-dir work_dirs/attention
"""
import argparse
import math
import os
import os.path as osp
import re
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import DictAction


def log(message: str) -> None:
    print(f'[visualize_attention] {message}', flush=True)


def parse_point(text: str) -> Tuple[float, float]:
    """``'X,Y'`` (image pixels) -> ``(X, Y)``."""
    parts = text.split(',')
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'a point is X,Y in image pixels (e.g. 80,64), got {text!r}') from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Draw the attention weights, entropy and mean offsets of '
        "a detector's local self-attention layers on an image")
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file (weights-only)')
    parser.add_argument('image', help='image file')
    parser.add_argument(
        '--layers', nargs='+', default=None, metavar='NAME',
        help='attention layers by module name (e.g. backbone.layer3.1.conv2, '
        'neck.fpn_convs.0.conv, backbone.stem); NAME@k takes the k-th call of a '
        'layer that runs several times (a head shared across levels; default '
        'the first). Default: one per backbone stage and one FPN level')
    parser.add_argument(
        '--points', nargs='+', type=parse_point, default=None, metavar='X,Y',
        help='image points (pixels of the image file) whose windows to draw; '
        'default: the centres of the top detections')
    parser.add_argument(
        '--num-points', type=int, default=3,
        help='detections used as default points (highest scores first)')
    parser.add_argument(
        '--score-thr', type=float, default=0.3,
        help='score threshold for default points (the best detection is '
        'taken if none passes)')
    parser.add_argument(
        '--out-dir', default='work_dirs/attention', help='where the PNGs go')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, xxx=yyy format')
    args = parser.parse_args(argv)
    if args.num_points < 1:
        parser.error(f'--num-points must be >= 1, got {args.num_points}')
    if not osp.isfile(args.image):
        parser.error(f'image file not found: {args.image}')
    return args


# ----------------------------------------------------------------- layers


def attention_layers(model) -> 'OrderedDict[str, torch.nn.Module]':
    """The model's attention layers (modules with ``attention_weights``,
    pointwise ones excluded), outermost only (the stem, not its attention)."""
    found = OrderedDict()
    for name, module in model.named_modules():
        if not callable(getattr(module, 'attention_weights', None)):
            continue
        if getattr(module, 'pointwise', False):
            continue
        if any(name.startswith(outer + '.') for outer in found):
            continue
        found[name] = module
    return found


def default_layers(model) -> List[str]:
    """One attention layer per backbone stage (the last of the stage; the
    attention stem as well) and the first attention layer of the neck."""
    names = list(attention_layers(model))
    chosen = [n for n in names if n.startswith('backbone.stem')][:1]
    for stage in getattr(getattr(model, 'backbone', None), 'res_layers', []):
        in_stage = [n for n in names if n.startswith(f'backbone.{stage}.')]
        chosen += in_stage[-1:]
    chosen += [n for n in names if n.startswith('neck.')][:1]
    return chosen


def resolve_layers(model, requested: Sequence[str]) -> List[Tuple[str, str, int]]:
    """``NAME`` or ``NAME@k`` -> ``(spec, name, call index)``, checked."""
    layers = attention_layers(model)
    resolved = []
    for spec in requested:
        name, _, call = spec.partition('@')
        if name not in layers:
            modules = dict(model.named_modules())
            what = ('is not an attention layer (a ' + type(modules[name]).__name__ + ')'
                    if name in modules else 'is not a module of this model')
            raise ValueError(f'--layers: {name!r} {what}; attention layers: '
                             f'{", ".join(layers) or "none"}')
        if call and not call.isdigit():
            raise ValueError(f'--layers: the call index of {spec!r} must be an int >= 0')
        resolved.append((spec, name, int(call or 0)))
    return resolved


# --------------------------------------------------------------- geometry


class LayerGeometry:
    """Maps a layer's input pixels to image pixels and back.

    ``stride`` is the layer input's stride in the network input (the padded
    batch), ``scale`` the test pipeline's resize (``scale_factor``: network
    input pixels per image pixel, ``(w, h)``).
    """

    def __init__(self, feature_hw, batch_input_hw, scale_factor) -> None:
        self.height, self.width = feature_hw
        self.stride_y = batch_input_hw[0] / self.height
        self.stride_x = batch_input_hw[1] / self.width
        self.scale_x, self.scale_y = scale_factor
        # one pixel of the layer input, in image pixels
        self.cell_x = self.stride_x / self.scale_x
        self.cell_y = self.stride_y / self.scale_y

    def to_feature(self, x: float, y: float) -> Tuple[int, int]:
        row = int(y * self.scale_y / self.stride_y)
        col = int(x * self.scale_x / self.stride_x)
        return min(max(row, 0), self.height - 1), min(max(col, 0), self.width - 1)

    def to_image(self, row: float, col: float) -> Tuple[float, float]:
        """Image ``(x, y)`` of the centre of the layer input pixel (row, col)."""
        return (col + 0.5) * self.cell_x, (row + 0.5) * self.cell_y

    def offsets_to_image(self, offsets: np.ndarray) -> np.ndarray:
        """``(..., 2)`` (dy, dx) in layer input pixels -> (dx, dy) in image pixels."""
        return np.stack([offsets[..., 1] * self.cell_x, offsets[..., 0] * self.cell_y], -1)


def tap_positions(geometry: LayerGeometry, row: int, col: int, window, dilation) -> np.ndarray:
    """Image ``(x, y)`` of the window taps of layer input pixel (row, col),
    ``(kh * kw, 2)`` in the layers' row-major tap order."""
    from sasa_mmdet.layers.attention_weights import tap_offsets

    centre = np.array(geometry.to_image(row, col))
    return centre + geometry.offsets_to_image(tap_offsets(window, dilation).numpy())


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """``(..., taps, H, W)`` -> ``(..., H, W)`` in nats (0 log 0 = 0)."""
    return -torch.special.xlogy(weights, weights).sum(-3)


def mean_offsets(weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``(N, taps, H, W)`` weights, ``(taps, 2)`` offsets -> ``(N, 2, H, W)``
    attention-weighted mean (dy, dx), in layer input pixels."""
    return torch.einsum('nthw,tc->nchw', weights, offsets.to(weights.dtype))


# ---------------------------------------------------------------- running


def run_detector(model, image_path: str, specs):
    """Run the test pipeline and the detector on the image, keeping the
    inputs of the chosen layers. Returns the data sample and
    ``{(name, call): input}``."""
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate

    pipeline = [t for t in model.cfg.test_dataloader.dataset.pipeline
                if t['type'] not in ('LoadAnnotations', 'mmdet.LoadAnnotations')]
    data = Compose(pipeline)(dict(img_path=image_path, img_id=0))
    modules = dict(model.named_modules())
    inputs, counts, handles = {}, {}, []
    wanted = {(name, call) for _, name, call in specs}

    def make_hook(name):

        def hook(module, args):
            call = counts.get(name, 0)
            counts[name] = call + 1
            if (name, call) in wanted:
                inputs[(name, call)] = args[0].detach().clone()

        return hook

    for name in {name for _, name, _ in specs}:
        handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            sample = model.test_step(pseudo_collate([data]))[0]
    finally:
        for handle in handles:
            handle.remove()
    for spec, name, call in specs:
        if (name, call) not in inputs:
            raise ValueError(f'--layers: {spec!r} asks for call {call} of {name}, which '
                             f'ran {counts.get(name, 0)} time(s) on this image')
    return sample, inputs


def default_points(sample, num_points: int, score_thr: float, image_hw):
    """Centres of the best detections, or the image centre without any."""
    pred = sample.pred_instances
    if len(pred) == 0:
        log('no detections: using the image centre')
        return [(image_hw[1] / 2, image_hw[0] / 2)]
    order = pred.scores.argsort(descending=True)
    keep = [int(i) for i in order if pred.scores[i] >= score_thr][:num_points] or [int(order[0])]
    points = []
    for i in keep:
        x0, y0, x1, y1 = pred.bboxes[i].tolist()
        points.append(((x0 + x1) / 2, (y0 + y1) / 2))
        log(f'point {len(points) - 1}: centre of detection {i} (label {int(pred.labels[i])}, '
            f'score {float(pred.scores[i]):.2f}): ({points[-1][0]:.0f}, {points[-1][1]:.0f})')
    return points


# ---------------------------------------------------------------- drawing


def _grid(num_panels: int, size: float = 3.2):
    import matplotlib.pyplot as plt

    cols = min(num_panels, 5)
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.6),
                             squeeze=False, layout='constrained')
    for ax in axes.flat[num_panels:]:
        ax.axis('off')
    return fig, list(axes.flat[:num_panels])


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=80)
    plt.close(fig)
    log(f'wrote {path}')
    return path


def draw_window(image, weights, geometry, point, layer, window, dilation, title, path):
    """One panel per head: the weights ``(N, taps)`` of the pixel under
    ``point`` over its window, drawn on the image."""
    import matplotlib
    from matplotlib.patches import Rectangle

    row, col = geometry.to_feature(*point)
    taps = tap_positions(geometry, row, col, window, dilation)
    cx, cy = geometry.to_image(row, col)
    half_w, half_h = geometry.cell_x / 2, geometry.cell_y / 2
    x0, x1 = taps[:, 0].min() - 3 * half_w, taps[:, 0].max() + 3 * half_w
    y0, y1 = taps[:, 1].min() - 3 * half_h, taps[:, 1].max() + 3 * half_h
    heads = weights.shape[0]
    fig, axes = _grid(heads + 1)
    axes[0].imshow(image)
    axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color='yellow', lw=1.5))
    axes[0].plot([point[0]], [point[1]], 'y+', ms=10, mew=2)
    axes[0].set_title(f'({point[0]:.0f}, {point[1]:.0f}), stride {geometry.cell_x:g}',
                      fontsize=9)
    cmap = matplotlib.colormaps['inferno']
    show_values = len(taps) <= 49
    for n, ax in enumerate(axes[1:]):
        w = weights[n]
        ax.imshow(image)
        top = float(w.max())
        for t, (tx, ty) in enumerate(taps):
            value = float(w[t])
            ax.add_patch(Rectangle((tx - half_w, ty - half_h), 2 * half_w, 2 * half_h,
                                   color=cmap(value / top if top > 0 else 0.0),
                                   alpha=0.75 if value > 0 else 0.15, lw=0))
            if show_values and value >= 0.005:
                ax.text(tx, ty, f'{value:.2f}'.lstrip('0'), ha='center', va='center',
                        fontsize=6, color='white' if value < 0.6 * top else 'black')
        ax.add_patch(Rectangle((cx - half_w, cy - half_h), 2 * half_w, 2 * half_h,
                               fill=False, color='white', lw=1.5))
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ent = float(entropy(w[:, None, None])[0, 0])
        ax.set_title(f'head {n}: max {top:.2f}, entropy {ent:.2f}', fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def draw_entropy(image, weights, geometry, title, path):
    """Per head, the entropy map of the layer's attention over the image."""
    ent = entropy(weights).numpy()  # (N, H, W)
    taps = weights.shape[1]
    fig, axes = _grid(ent.shape[0])
    extent = (0, geometry.width * geometry.cell_x, geometry.height * geometry.cell_y, 0)
    for n, ax in enumerate(axes):
        ax.imshow(image)
        shown = ax.imshow(ent[n], extent=extent, alpha=0.65, cmap='viridis', vmin=0,
                          vmax=math.log(taps), interpolation='nearest')
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        ax.set_title(f'head {n}: mean {ent[n].mean():.2f} nats', fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, shrink=0.8, label=f'entropy (nats, uniform = {math.log(taps):.2f})')
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def draw_offsets(image, weights, geometry, window, dilation, title, path, max_arrows=20):
    """Per head, arrows from each pixel to the mean of its attention."""
    from sasa_mmdet.layers.attention_weights import tap_offsets

    mean = mean_offsets(weights, tap_offsets(window, dilation).float()).numpy()  # (N, 2, H, W)
    step = max(1, math.ceil(max(geometry.height, geometry.width) / max_arrows))
    rows = np.arange(0, geometry.height, step)
    cols = np.arange(0, geometry.width, step)
    grid_r, grid_c = np.meshgrid(rows, cols, indexing='ij')
    xs, ys = geometry.to_image(grid_r, grid_c)
    fig, axes = _grid(mean.shape[0])
    for n, ax in enumerate(axes):
        d = geometry.offsets_to_image(np.moveaxis(mean[n][:, grid_r, grid_c], 0, -1))
        length = np.hypot(d[..., 0], d[..., 1])
        ax.imshow(image)
        ax.quiver(xs, ys, d[..., 0], d[..., 1], length, cmap='autumn', angles='xy',
                  scale_units='xy', scale=1, width=0.006)
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        ax.set_title(f'head {n}: mean |offset| {length.mean():.1f} px', fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _file_name(spec: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]', '_', spec)


def main(argv=None) -> Dict[str, List[str]]:
    args = parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    import mmcv

    from sasa_mmdet.utils.inference import load_detector

    start = time.perf_counter()
    log(f'loading {args.config} with {args.checkpoint}')
    model = load_detector(args.config, args.checkpoint, args.cfg_options)
    if not attention_layers(model):
        raise SystemExit(f'[visualize_attention] {args.config} has no attention layers '
                         '(no module with attention_weights)')
    specs = resolve_layers(model, args.layers or default_layers(model))
    log('layers: ' + ', '.join(spec for spec, _, _ in specs))
    sample, inputs = run_detector(model, args.image, specs)
    image = mmcv.imread(args.image, channel_order='rgb')
    image_hw = image.shape[:2]
    if args.points:
        points = args.points
        outside = [p for p in points if not (0 <= p[0] < image_hw[1] and 0 <= p[1] < image_hw[0])]
        if outside:
            raise SystemExit(f'[visualize_attention] --points {outside} lie outside the '
                             f'{image_hw[1]}x{image_hw[0]} image (X in [0, {image_hw[1]}), '
                             f'Y in [0, {image_hw[0]}))')
    else:
        points = default_points(sample, args.num_points, args.score_thr, image_hw)
    os.makedirs(args.out_dir, exist_ok=True)
    batch_hw = sample.metainfo['batch_input_shape']
    scale = sample.metainfo.get('scale_factor', (1.0, 1.0))
    layers = attention_layers(model)
    written = OrderedDict()
    for spec, name, call in specs:
        layer = layers[name]
        attention = getattr(layer, 'attention', layer)  # the stem's attention
        x = inputs[(name, call)]
        with torch.no_grad():
            weights = layer.attention_weights(x)[0].float()  # (N, taps, H, W)
        geometry = LayerGeometry(x.shape[-2:], batch_hw, scale)
        window, dilation = attention.window_size, attention.dilation
        what = (f'{spec}: {type(layer).__name__}, window {window[0]}x{window[1]}, '
                f'dilation {dilation[0]}, {weights.shape[0]} heads, input '
                f'{x.shape[-2]}x{x.shape[-1]} at stride {geometry.stride_x:g}')
        stem = _file_name(spec)
        files = []
        for k, point in enumerate(points):
            row, col = geometry.to_feature(*point)
            files.append(draw_window(
                image, weights[:, :, row, col], geometry, point, spec, window, dilation,
                what, osp.join(args.out_dir, f'{stem}_p{k}_window.png')))
        files.append(draw_entropy(image, weights, geometry, what,
                                  osp.join(args.out_dir, f'{stem}_entropy.png')))
        files.append(draw_offsets(image, weights, geometry, window, dilation, what,
                                  osp.join(args.out_dir, f'{stem}_offsets.png')))
        written[spec] = files
    log(f'done in {time.perf_counter() - start:.1f} s: '
        f'{sum(len(f) for f in written.values())} PNGs in {args.out_dir}')
    return written


if __name__ == '__main__':
    main(sys.argv[1:])
