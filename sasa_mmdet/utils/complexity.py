"""Parameter and FLOP counts in the paper's convention.

Ramachandran et al. (arXiv:1906.05909) report FLOPS = 2 x multiply-adds of
the convolutions, fully connected layers and attention layers. Generic
counters (hooks on ``nn.Conv2d``, fvcore, mmengine's analysis) do not know
the attention layers, so here every module that has a
``multiply_adds(input_shape)`` method (``LocalSelfAttention2d``,
``AttentionStem``, ...) is counted by that method, as a leaf (its
submodules are not counted again), and ``nn.Conv2d`` / ``nn.Linear`` by
forward hooks. Normalisation, activations, pooling, upsampling, additions
and the softmax are not counted, as in the paper.
"""
import copy
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

TOTAL = 'total'


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (trainable or frozen) of ``module``."""
    return sum(param.numel() for param in module.parameters())


def _counted_modules(model: nn.Module):
    """Modules whose multiply-adds are counted, as ``(name, module)``.

    A module with ``multiply_adds`` is a leaf: its submodules are skipped.
    """
    leaves = []
    for name, module in model.named_modules():
        if any(name.startswith(leaf + '.') for leaf in leaves):
            continue
        if callable(getattr(module, 'multiply_adds', None)):
            leaves.append(name)
            yield name, module
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            yield name, module


def _module_multiply_adds(module: nn.Module, inputs: tuple,
                          output) -> int:
    if callable(getattr(module, 'multiply_adds', None)):
        return int(module.multiply_adds(tuple(inputs[0].shape)))
    if isinstance(module, nn.Conv2d):
        # One multiply-add per output element and kernel tap and input
        # channel of the group.
        kernel_h, kernel_w = module.kernel_size
        return output.numel() * (module.in_channels //
                                 module.groups) * kernel_h * kernel_w
    # nn.Linear
    return output.numel() * module.in_features


@torch.no_grad()
def count_multiply_adds(model: nn.Module, forward) -> 'OrderedDict[str, int]':
    """Multiply-adds of one call of ``forward()``, per child of ``model``.

    Args:
        model (nn.Module): The model whose modules are counted.
        forward (callable): Runs ``model`` once (e.g.
            ``lambda: model(inputs, mode='tensor')``); called under
            ``torch.no_grad()``. Layers called several times (a detection
            head over the pyramid levels) count every call.

    Returns:
        OrderedDict[str, int]: Multiply-adds per top-level child name (in
        ``model``'s order; ``'model'`` for layers owned by ``model``
        itself), and ``'total'``.
    """
    counts = OrderedDict((name, 0) for name, _ in model.named_children())
    handles = []

    def make_hook(component):

        def hook(module, inputs, output):
            counts[component] = counts.get(component, 0) + \
                _module_multiply_adds(module, inputs, output)

        return hook

    try:
        for name, module in _counted_modules(model):
            component = name.split('.')[0] if name else 'model'
            handles.append(module.register_forward_hook(make_hook(component)))
        forward()
    finally:
        for handle in handles:
            handle.remove()
    counts[TOTAL] = sum(counts.values())
    return counts


class ImageClassifier(nn.Module):
    """A backbone + global average pool + linear classifier.

    The ImageNet-style model the paper's ResNet numbers are counted on
    (Table 1: parameters include the 1000-way classifier). The classifier
    reads the backbone's last output.

    Args:
        backbone (nn.Module): Returns a feature map or a tuple of them.
        num_classes (int): Classifier outputs. Default: 1000.
        in_channels (int, optional): Channels of the last feature map;
            by default the backbone's ``feat_dim``, else found by running it
            once on a 1x3x64x64 input.

    Example:
        >>> from mmdet.models.backbones import ResNet
        >>> model = ImageClassifier(ResNet(18, base_channels=8), 10)
        >>> tuple(model(torch.rand(2, 3, 64, 64)).shape)
        (2, 10)
    """

    def __init__(self,
                 backbone: nn.Module,
                 num_classes: int = 1000,
                 in_channels: Optional[int] = None) -> None:
        super().__init__()
        self.backbone = backbone
        if in_channels is None:
            in_channels = getattr(backbone, 'feat_dim', None)
        if in_channels is None:
            was_training = backbone.training
            with torch.no_grad():
                in_channels = self._last(backbone.eval()(
                    torch.zeros(1, 3, 64, 64))).shape[1]
            backbone.train(was_training)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    @staticmethod
    def _last(features):
        return features[-1] if isinstance(features, (tuple, list)) \
            else features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self._last(self.backbone(x))).flatten(1))


def _detector_forward(model: nn.Module, height: int, width: int):
    """One ``mode='tensor'`` call of an MMDetection detector on zeros."""
    from mmdet.structures import DetDataSample

    inputs = torch.zeros(1, 3, height, width)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(height, width),
            ori_shape=(height, width),
            pad_shape=(height, width),
            batch_input_shape=(height, width),
            scale_factor=(1.0, 1.0)))
    return lambda: model(inputs, [sample], mode='tensor')


def get_model_complexity(model: nn.Module,
                         input_shape: Sequence[int],
                         detector: Optional[bool] = None) -> Dict:
    """Parameters, multiply-adds and FLOPs per component of ``model``.

    Args:
        model (nn.Module): An MMDetection detector (counted in
            ``mode='tensor'``: backbone, neck and heads, no post-processing)
            or any module taking a ``(1, 3, H, W)`` tensor.
        input_shape (Sequence[int]): ``(H, W)`` of the input image.
        detector (bool, optional): Treat ``model`` as an MMDetection
            detector. Default: whether it has ``extract_feat``.

    Returns:
        dict: ``input_shape`` ``(1, 3, H, W)`` and ``components``, an
        ordered list of ``dict(name, params, multiply_adds, flops)`` for each
        top-level child that has parameters or multiply-adds, then
        ``'total'``; ``flops = 2 * multiply_adds``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
        >>> info = get_model_complexity(model, (4, 4))
        >>> info['components'][-1]
        {'name': 'total', 'params': 224, 'multiply_adds': 3456, 'flops': 6912}
    """
    height, width = (int(size) for size in input_shape)
    if detector is None:
        detector = hasattr(model, 'extract_feat')
    was_training = model.training
    model.eval()
    try:
        if detector:
            forward = _detector_forward(model, height, width)
        else:
            inputs = torch.zeros(1, 3, height, width)
            forward = lambda: model(inputs)  # noqa: E731
        macs = count_multiply_adds(model, forward)
    finally:
        model.train(was_training)
    components = []
    for name, child in model.named_children():
        params = count_parameters(child)
        if params or macs.get(name, 0):
            components.append(
                dict(
                    name=name,
                    params=params,
                    multiply_adds=macs[name],
                    flops=2 * macs[name]))
    if macs.get('model', 0):
        own = count_parameters(model) - sum(
            count_parameters(child) for child in model.children())
        components.append(
            dict(
                name='model',
                params=own,
                multiply_adds=macs['model'],
                flops=2 * macs['model']))
    components.append(
        dict(
            name=TOTAL,
            params=count_parameters(model),
            multiply_adds=macs[TOTAL],
            flops=2 * macs[TOTAL]))
    return dict(input_shape=(1, 3, height, width), components=components)


def build_model_from_cfg(cfg, classifier: Optional[int] = None) -> nn.Module:
    """Build ``cfg.model`` (or its backbone + classifier), weights untouched.

    ``init_weights`` is not called, so no ``Pretrained`` checkpoint is
    downloaded or read: the counts do not depend on the values.

    Args:
        cfg (mmengine.Config): A detector config.
        classifier (int, optional): Build ``cfg.model.backbone`` inside an
            :class:`ImageClassifier` with this many classes instead of the
            detector.
    """
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    import sasa_mmdet  # noqa: F401  (registers the layers and models)

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    if classifier is None:
        return MODELS.build(copy.deepcopy(cfg.model))
    return ImageClassifier(
        MODELS.build(copy.deepcopy(cfg.model.backbone)), classifier)


def format_complexity(info: Dict, title: str = '') -> str:
    """A plain-text table of :func:`get_model_complexity`'s result."""
    header = ('component', 'params (M)', 'mult-adds (G)', 'FLOPs (G)')
    rows = [(c['name'], f'{c["params"] / 1e6:.3f}',
             f'{c["multiply_adds"] / 1e9:.3f}', f'{c["flops"] / 1e9:.2f}')
            for c in info['components']]
    widths = [
        max(len(row[i]) for row in [header] + rows) for i in range(4)
    ]

    def line(row):
        return '  '.join([row[0].ljust(widths[0])] +
                         [cell.rjust(width)
                          for cell, width in zip(row[1:], widths[1:])])

    shape = 'x'.join(str(size) for size in info['input_shape'])
    lines = [title] if title else []
    lines += [f'input: {shape}', line(header), line(['-' * w for w in widths])]
    lines += [line(row) for row in rows[:-1]]
    lines += [line(['-' * w for w in widths]), line(rows[-1])]
    lines.append('FLOPs = 2 x multiply-adds (the paper\'s convention) of '
                 'convolutions, linear and attention layers; norms, '
                 'activations, pooling, upsampling and additions are not '
                 'counted.')
    return '\n'.join(lines)


def parse_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """``[S]`` -> ``(S, S)``; ``[H, W]`` -> ``(H, W)``."""
    if len(shape) not in (1, 2) or not all(
            isinstance(size, int) and size > 0 for size in shape):
        raise ValueError(
            f'shape must be one or two positive ints (H W), got {shape!r}')
    return (shape[0], shape[-1])
