"""SAN's pairwise and patchwise self-attention as drop-ins for a convolution.

Zhao, Jia, Koltun, "Exploring Self-attention for Image Recognition", CVPR
2020 (arXiv:2004.13621); the official code is hszhao/SAN (``model/san.py``,
the SAM module). Both layers take ``nn.Conv2d``'s constructor arguments and
are registered in mmengine's root ``MODELS`` registry, like
:class:`~sasa_mmdet.layers.LocalSelfAttention2d`, so mmcv's
``build_conv_layer`` and ``ConvModule`` build them from a ``conv_cfg``:
``conv_cfg=dict(type='PatchwiseSelfAttention2d', window_size=7)``.

For every pixel ``i`` and each tap ``j`` of its ``k x k`` window, both
compute weights ``w_ij`` from a relation of the 1x1 projections
``phi(x)`` and ``psi(x)`` (``rel_channels`` each) and aggregate the values
``beta(x)`` (``out_channels``):

    y_i = sum_j w_ij * beta(x_j),   output channel c using weight channel
                                     c % (out_channels / share_planes)

- pairwise: ``delta_ij = [phi(x_i) - psi(x_j), p_i - p_j]`` with p a 1x1
  conv (2 -> 2) of the pixel coordinates (``linspace(-1, 1)`` along each
  axis), mapped per tap by ``gamma = BN-ReLU-conv1x1(rel + 2 -> rel, no
  bias)-BN-ReLU-conv1x1(rel -> out / share_planes)``, then a softmax over
  the window;
- patchwise: ``delta_i = [phi(x_i), psi(x_j) for every tap j]`` mapped by
  ``gamma = BN-ReLU-conv1x1(rel * (k^2 + 1) -> out / share_planes, no
  bias)-BN-ReLU-conv1x1(-> k^2 * out / share_planes)``; no softmax.

The relation tensors are ``k^2`` times the projections by design (the
pairwise one ``(rel + 2) * k^2`` numbers per pixel): they, not the values,
dominate the memory the layer keeps for backward (``docs/san.md`` measures
it, and what ``with_cp`` saves).
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from .backends.geometry import neighbourhood_mask
from .backends.san_geometry import BORDERS
from .local_attention import _check_positive_pair, average_pool_ceil
from .san_ops import (san_aggregation, san_aggregation_reference, san_gather, san_subtraction,
                      san_subtraction_reference, san_unfold_reference)

SAN_LAYER_IMPLS = ('auto', 'cpp', 'torch', 'triton', 'reference')


def pixel_coordinates(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """SAN's position input: ``(1, 2, H, W)``, channel 0 the column and
    channel 1 the row coordinate, each ``linspace(-1, 1)`` over its axis."""

    def axis(length: int) -> Tensor:
        # linspace(-1, 1, length) written as arange, which ONNX export keeps
        # in the input's dtype (its linspace becomes float64)
        steps = torch.arange(length, device=device, dtype=dtype)
        return steps * (2.0 / (length - 1)) - 1.0 if length > 1 else steps - 1.0

    cols, rows = axis(width), axis(height)
    return torch.stack([cols.expand(height, width), rows[:, None].expand(height, width)])[None]


class SANSelfAttention2d(nn.Module):
    """Common part of SAN's pairwise and patchwise layers (the SAM module).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels (``beta``'s; the official
            block's ``mid_planes``).
        kernel_size (int | tuple[int]): Kernel size of the convolution being
            replaced; the window unless ``window_size`` is given. 1 builds a
            pointwise convolution (``nn.Conv2d``'s ``weight`` and ``bias``).
            Default: 3.
        stride (int | tuple[int]): ``s x s`` average pool (ceil mode) after
            the attention, so the output has the replaced convolution's size.
            Default: 1.
        padding (int | tuple[int] | str, optional): Only the "same" padding
            ``dilation * (kernel_size - 1) / 2`` is meaningful; None or
            'same' means it. Default: None.
        dilation (int | tuple[int]): Spacing of the window taps. Default: 1.
        groups (int): Only 1 (for Conv2d compatibility).
        bias (bool): Bias of ``beta``, the value projection (the official
            code has one). ``phi``, ``psi`` and the last conv of ``gamma``
            always have biases, as officially. Default: True.
        window_size (int | tuple[int], optional): The window, when it is not
            ``kernel_size`` (e.g. a 3x3 convolution replaced by a 7x7
            window).
        share_planes (int): Channels sharing one weight: ``gamma`` makes
            ``out_channels / share_planes`` weights per tap. Default: 8.
        rel_channels (int, optional): Channels of ``phi`` and ``psi``.
            Default: ``out_channels // 4`` (the official block's
            ``planes / 16`` with ``out_channels = planes / 4``), at least 1.
        border (str): What a tap outside the image reads: 'reflect' (the
            mirrored pixel, SAN's) or 'mask' (nothing: zero relations and
            values, left out of the pairwise softmax, as in SASA).
            Default: 'reflect'.
        norm_cfg (dict, optional): The norm layers of ``gamma`` (mmcv's
            ``build_norm_layer``); None: ``nn.BatchNorm2d``, the official.
        impl (str): 'auto' (the compiled CPU kernel for CPU tensors when
            built, else PyTorch), 'cpp', 'torch' (any device), 'triton'
            (CUDA; verified under the interpreter only) or 'reference'
            (unfold, slow; for tests). See
            :mod:`sasa_mmdet.layers.san_ops`. Default: 'auto'.
        with_cp (bool): Activation checkpointing of the layer: keep only its
            input for backward and recompute the rest there. Default: False.
    """

    transposed = False
    output_padding = (0, 0)

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: Union[int, Tuple[int, int]] = 3,
                 stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[int, Tuple[int, int], str, None] = None,
                 dilation: Union[int, Tuple[int, int]] = 1,
                 groups: int = 1,
                 bias: bool = True,
                 *,
                 window_size: Union[int, Tuple[int, int], None] = None,
                 share_planes: int = 8,
                 rel_channels: Optional[int] = None,
                 border: str = 'reflect',
                 norm_cfg: Optional[dict] = None,
                 impl: str = 'auto',
                 with_cp: bool = False) -> None:
        super().__init__()
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if groups != 1:
            raise ValueError(f'groups must be 1 for {type(self).__name__}, got {groups!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _check_positive_pair('kernel_size', kernel_size)
        self.stride = _check_positive_pair('stride', stride)
        self.dilation = _check_positive_pair('dilation', dilation)
        self.groups = 1
        self.padding = self._check_padding(padding)
        self.pointwise = self.kernel_size == (1, 1)
        if impl not in SAN_LAYER_IMPLS:
            raise ValueError(f'impl must be one of {SAN_LAYER_IMPLS}, got {impl!r}')
        self.impl = impl
        if not isinstance(with_cp, bool):
            raise ValueError(f'with_cp must be a bool, got {with_cp!r}')
        self.with_cp = with_cp
        if self.pointwise:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
            self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
            self.reset_parameters()
            return

        self.window_size = _check_positive_pair(
            'window_size', self.kernel_size if window_size is None else window_size)
        if not isinstance(share_planes, int) or share_planes <= 0 or \
                out_channels % share_planes:
            raise ValueError(f'share_planes must be a positive int dividing out_channels='
                             f'{out_channels}, got {share_planes!r}')
        if rel_channels is None:
            rel_channels = max(out_channels // 4, 1)
        if not isinstance(rel_channels, int) or isinstance(rel_channels, bool) or \
                rel_channels <= 0:
            raise ValueError(f'rel_channels must be a positive int or None, got '
                             f'{rel_channels!r}')
        if border not in BORDERS:
            raise ValueError(f'border must be one of {BORDERS}, got {border!r}')
        self.share_planes = share_planes
        self.rel_channels = rel_channels
        self.weight_channels = out_channels // share_planes
        self.border = border
        self.phi = nn.Conv2d(in_channels, rel_channels, 1)
        self.psi = nn.Conv2d(in_channels, rel_channels, 1)
        self.beta = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.gamma = self._build_gamma(norm_cfg)

    @property
    def taps(self) -> int:
        return self.window_size[0] * self.window_size[1]

    def _build_gamma(self, norm_cfg) -> nn.Sequential:
        raise NotImplementedError

    @staticmethod
    def _norm(norm_cfg: Optional[dict], channels: int) -> nn.Module:
        if norm_cfg is None:
            return nn.BatchNorm2d(channels)
        from mmcv.cnn import build_norm_layer
        return build_norm_layer(norm_cfg, channels)[1]

    def _check_padding(self, padding) -> Tuple[int, int]:
        same = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))
        if padding is None or padding == 'same':
            return same
        pair = _pair(padding)
        if not all(2 * p == d * (k - 1)
                   for p, k, d in zip(pair, self.kernel_size, self.dilation)):
            raise ValueError(
                f'padding={padding!r} does not preserve the input size for kernel_size='
                f'{self.kernel_size} and dilation={self.dilation}; {type(self).__name__} '
                f"only replaces 'same'-padded convolutions: use padding=None, 'same' or "
                f'dilation * (kernel_size - 1) / 2 (odd kernel sizes)')
        return pair

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation of every convolution and norm
        (the official code's)."""
        if self.pointwise:
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)
            if self.bias is not None:
                bound = self.in_channels**-0.5
                nn.init.uniform_(self.bias, -bound, bound)
            return
        for module in self.modules():
            if module is not self and hasattr(module, 'reset_parameters'):
                module.reset_parameters()

    def init_weights(self) -> None:
        """Called by mmcv's ``ConvModule`` instead of its Kaiming init."""
        self.reset_parameters()

    # -- the operators, per impl -------------------------------------------

    def _subtract(self, x1: Tensor, x2: Tensor) -> Tensor:
        if self.impl == 'reference':
            return san_subtraction_reference(x1, x2, self.window_size, self.dilation,
                                             self.border)
        return san_subtraction(x1, x2, self.window_size, self.dilation, self.border, self.impl)

    def _gather(self, x: Tensor) -> Tensor:
        if self.impl == 'reference':
            return san_unfold_reference(x, self.window_size, self.dilation, self.border)
        return san_gather(x, self.window_size, self.dilation, self.border, self.impl)

    def _aggregate(self, value: Tensor, weight: Tensor) -> Tensor:
        if self.impl == 'reference':
            return san_aggregation_reference(value, weight.to(value.dtype), self.window_size,
                                             self.dilation, self.border)
        return san_aggregation(value, weight, self.window_size, self.dilation, self.border,
                               self.impl)

    # -- forward ------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} expects input (N, {self.in_channels}, H, W), '
                             f'got {tuple(x.shape)}')

    def attention_weights(self, x: Tensor) -> Tensor:
        """The weights :meth:`forward` applies to ``beta(x)``.

        Returns:
            Tensor: ``(B, out_channels / share_planes, kh * kw, H, W)`` at the
            input's resolution, taps in row-major window order.
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.pointwise:
            return F.conv2d(x, self.weight, self.bias, self.stride)
        if self.with_cp and torch.is_grad_enabled():
            return checkpoint(self._attend, x, use_reentrant=False)
        return self._attend(x)

    def _attend(self, x: Tensor) -> Tensor:
        out = self._aggregate(self.beta(x), self.attention_weights(x))
        if self.stride != (1, 1):
            out = average_pool_ceil(out, self.stride)
        return out

    # -- cost -----------------------------------------------------------------

    def _weight_multiply_adds(self) -> int:
        """Multiply-adds of ``gamma`` per pixel."""
        raise NotImplementedError

    def multiply_adds(self, input_shape) -> int:
        """Multiply-adds of one forward pass for an input ``(N, C, H, W)``:
        the 1x1 projections, ``gamma``'s convolutions (per tap for pairwise)
        and the aggregation; norms, activations, the softmax, subtractions
        and the stride's pooling are not multiply-adds."""
        batch, _, height, width = input_shape
        if self.pointwise:
            out_h = (height - 1) // self.stride[0] + 1
            out_w = (width - 1) // self.stride[1] + 1
            return batch * out_h * out_w * self.in_channels * self.out_channels
        per_pixel = (2 * self.rel_channels + self.out_channels) * self.in_channels
        per_pixel += self._weight_multiply_adds()
        per_pixel += self.out_channels * self.taps  # aggregation
        return batch * height * width * per_pixel

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}')
        if not self.pointwise:
            s += (f', window_size={self.window_size}, dilation={self.dilation}, '
                  f'rel_channels={self.rel_channels}, share_planes={self.share_planes}, '
                  f'border={self.border!r}')
            if self.with_cp:
                s += ', with_cp=True'
        return s


@MODELS.register_module()
class PairwiseSelfAttention2d(SANSelfAttention2d):
    """SAN's pairwise self-attention with Conv2d's interface.

    Weights from ``gamma([phi(x_i) - psi(x_j), p_i - p_j])``, softmax over
    the window; arguments in :class:`SANSelfAttention2d`.

    Example:
        >>> layer = PairwiseSelfAttention2d(16, 32, 3, stride=2, window_size=7)
        >>> layer(torch.rand(2, 16, 25, 30)).shape
        torch.Size([2, 32, 13, 15])
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.pointwise:
            self.position = nn.Conv2d(2, 2, 1)

    def _build_gamma(self, norm_cfg) -> nn.Sequential:
        rel = self.rel_channels
        return nn.Sequential(
            self._norm(norm_cfg, rel + 2), nn.ReLU(inplace=True),
            nn.Conv2d(rel + 2, rel, 1, bias=False),
            self._norm(norm_cfg, rel), nn.ReLU(inplace=True),
            nn.Conv2d(rel, self.weight_channels, 1))

    def attention_weights(self, x: Tensor) -> Tensor:
        self._check_input(x)
        batch, _, height, width = x.shape
        relation = self._subtract(self.phi(x), self.psi(x))  # (B, rel, T, H, W)
        coords = pixel_coordinates(height, width, x.device, x.dtype)
        position = self.position(coords)
        position = self._subtract(position, position)  # (1, 2, T, H, W)
        delta = torch.cat([relation, position.expand(batch, -1, -1, -1, -1)], dim=1)
        # gamma's 1x1 convolutions act per tap: (B, rel + 2, T, H * W)
        logits = self.gamma(delta.flatten(3)).unflatten(3, (height, width))
        if self.border == 'mask':
            exists = neighbourhood_mask(height, width, self.window_size, self.dilation,
                                        x.device)  # (T, H, W)
            logits = logits.masked_fill(~exists, float('-inf'))
        return logits.softmax(dim=2, dtype=torch.promote_types(logits.dtype, torch.float32))

    def _weight_multiply_adds(self) -> int:
        rel = self.rel_channels
        return ((rel + 2) * rel + rel * self.weight_channels) * self.taps

    def multiply_adds(self, input_shape) -> int:
        macs = super().multiply_adds(input_shape)
        if not self.pointwise:
            macs += 4 * input_shape[2] * input_shape[3]  # position conv, once per call
        return macs


@MODELS.register_module()
class PatchwiseSelfAttention2d(SANSelfAttention2d):
    """SAN's patchwise self-attention with Conv2d's interface.

    Weights for the whole window from ``gamma([phi(x_i), psi(x_j) for every
    tap j])``, no softmax; arguments in :class:`SANSelfAttention2d`.

    Example:
        >>> layer = PatchwiseSelfAttention2d(16, 32, 3, window_size=5)
        >>> layer(torch.rand(2, 16, 9, 11)).shape
        torch.Size([2, 32, 9, 11])
    """

    def _build_gamma(self, norm_cfg) -> nn.Sequential:
        rel, weights = self.rel_channels, self.weight_channels
        return nn.Sequential(
            self._norm(norm_cfg, rel * (self.taps + 1)), nn.ReLU(inplace=True),
            nn.Conv2d(rel * (self.taps + 1), weights, 1, bias=False),
            self._norm(norm_cfg, weights), nn.ReLU(inplace=True),
            nn.Conv2d(weights, weights * self.taps, 1))

    def attention_weights(self, x: Tensor) -> Tensor:
        self._check_input(x)
        batch, _, height, width = x.shape
        neighbours = self._gather(self.psi(x))  # (B, rel, T, H, W)
        # channels: phi(x_i), then psi(x_j) channel-major (c * T + t), the official order
        delta = torch.cat([self.phi(x), neighbours.flatten(1, 2)], dim=1)
        return self.gamma(delta).view(batch, self.weight_channels, self.taps, height, width)

    def _weight_multiply_adds(self) -> int:
        rel, weights = self.rel_channels, self.weight_channels
        return rel * (self.taps + 1) * weights + weights * weights * self.taps


__all__ = ['PairwiseSelfAttention2d', 'PatchwiseSelfAttention2d', 'SANSelfAttention2d',
           'pixel_coordinates']
