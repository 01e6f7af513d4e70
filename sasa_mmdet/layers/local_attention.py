"""Stand-alone local self-attention as a drop-in for a spatial convolution.

Ramachandran, Parmar, Vaswani, Bello, Levskaya, Shlens, "Stand-Alone
Self-Attention in Vision Models", NeurIPS 2019 (arXiv:1906.05909).

The layer takes ``nn.Conv2d``'s constructor arguments and is registered in
mmengine's root ``MODELS`` registry, so mmcv's ``build_conv_layer`` and
``ConvModule`` build it wherever MMDetection builds a convolution:
``conv_cfg=dict(type='LocalSelfAttention2d', window_size=7)``.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from .attention_weights import local_attention_weights
from .backends import onnx_graph
from .local_attention_ops import (channels_last_projection, local_attention,
                                  local_attention_reference, split_projections)

POSITION_ENCODINGS = ('relative', 'absolute', 'none')
LOGITS = ('qk+qr', 'qr')
IMPLS = ('auto', 'cpp', 'triton', 'torch', 'reference')


def _check_positive_pair(name: str, value) -> Tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                 and v > 0 for v in pair):
        raise ValueError(f'{name} must be a positive int or a pair of positive '
                         f'ints, got {value!r}')
    return pair


def sinusoidal_position_encoding(height: int, width: int, dim_row: int,
                                 dim_col: int, device=None,
                                 dtype=torch.float32) -> Tensor:
    """Fixed 2-D sine/cosine encoding of absolute pixel positions.

    Returns:
        Tensor: ``(dim_row + dim_col, height, width)``: the first ``dim_row``
        channels encode the row, the rest the column (Vaswani et al. 2017's
        frequencies along each axis).
    """

    def encode(length: int, dim: int) -> Tensor:
        pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                         * (-math.log(10000.0) / max(dim, 1)))
        enc = torch.zeros(length, dim, device=device)
        enc[:, 0::2] = torch.sin(pos * freq)
        enc[:, 1::2] = torch.cos(pos * freq[:dim // 2])
        return enc.to(dtype)  # (length, dim)

    rows = encode(height, dim_row).t()[:, :, None].expand(-1, -1, width)
    cols = encode(width, dim_col).t()[:, None, :].expand(-1, height, -1)
    return torch.cat([rows, cols], dim=0)


def average_pool_ceil(x: Tensor, stride: Tuple[int, int]) -> Tensor:
    """``s x s`` average pool, stride ``s``, ceil mode: windows at the bottom
    and right borders average the pixels they hold. Output ``ceil(H / s)``.

    ``F.avg_pool2d(ceil_mode=True)``, except under ``torch.compile``, where
    it is a zero-padded sum pool over the pixel count: inductor's CPU
    backward of ``avg_pool2d`` in ceil mode is wrong when a border window is
    partial (torch 2.14; measured: gradients off by O(1) on a 9x11 map).
    """
    if not torch.compiler.is_compiling():
        return F.avg_pool2d(x, stride, stride, ceil_mode=True)
    height, width = x.shape[-2:]
    padding = (0, -width % stride[1], 0, -height % stride[0])
    total = F.avg_pool2d(F.pad(x, padding), stride, stride, divisor_override=1)
    count = F.avg_pool2d(F.pad(x.new_ones(1, 1, height, width), padding), stride, stride,
                         divisor_override=1)
    return total / count


@MODELS.register_module()
class LocalSelfAttention2d(nn.Module):
    """Local multi-head self-attention with Conv2d's interface.

    For every pixel, each head attends over the ``window_size`` neighbourhood
    with logits ``q.k + q.r`` (r: learned relative row/column embeddings);
    Q, K and V are dense 1x1 projections and there is no output projection,
    so the weights number ``3 * in_channels * out_channels``, plus the
    position tables (and ``out_channels`` with ``bias``). A stride ``s > 1``
    is an ``s x s`` average pool right after the attention (ceil mode), so
    the output has exactly the spatial size of the convolution it replaces.

    Built with ``kernel_size=1`` the layer is a pointwise convolution, with
    ``nn.Conv2d``'s ``weight`` and ``bias``: the paper keeps every 1x1
    convolution, and a ``conv_cfg`` that swaps all of a block's convolutions
    changes only the spatial ones.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels, split evenly over the heads.
        kernel_size (int | tuple[int]): Kernel size of the convolution being
            replaced; it is the attention window unless ``window_size`` is
            given. 1 builds a pointwise convolution. Default: 7.
        stride (int | tuple[int]): Average-pool stride after the attention.
            Default: 1.
        padding (int | tuple[int] | str, optional): The replaced
            convolution's padding. Only its "same" padding,
            ``dilation * (kernel_size - 1) / 2``, is meaningful (the
            attention looks at every pixel's own window); None or 'same'
            means that. Default: None.
        dilation (int | tuple[int]): Spacing of the window taps. Default: 1.
        groups (int): Only 1 (accepted for Conv2d compatibility).
        bias (bool): Add a learned per-channel output bias (equivalent to a
            bias on V, since attention weights sum to one). Default: False.
        num_heads (int): Attention heads. Default: 8.
        window_size (int | tuple[int], optional): Attention window (the
            paper's spatial extent k) when ``kernel_size > 1``. Set it in a
            ``conv_cfg`` to replace a 3x3 convolution by a 7x7 window.
        position_encoding (str): 'relative' (learned row/column offset
            embeddings, the paper's choice), 'absolute' (fixed sinusoidal
            encoding of the key's position, added to the keys) or 'none'.
        logits (str): 'qk+qr' (content and position, the paper's choice) or
            'qr' (position only; the paper's ablation). Default: 'qk+qr'.
        value_init_std (float, optional): Initialise W_V from
            N(0, value_init_std) instead of the default (the paper uses 0.01
            in the detection heads).
        impl (str): 'auto' (the compiled CPU kernel for CPU tensors when
            built, the Triton kernels for CUDA tensors, else 'torch'),
            'cpp', 'triton' (CUDA, or CPU under ``TRITON_INTERPRET=1``),
            'torch' (offset by offset, any device) or 'reference' (unfold;
            slow, for tests). None but the reference copies K and V per
            window tap; all but the reference run through the registered
            operator ``torch.ops.sasa_mmdet.local_attention``. Default: 'auto'.
        recompute_attention (bool): Keep no attention map for the backward
            pass and recompute it there: a memory lever for training. The
            map holds ``num_heads * k*k`` float32 numbers per pixel (392 at
            8 heads and k = 7: about 6x a 64-channel input, the largest
            tensor the layer keeps). The compiled kernel then computes the
            logits and softmax twice, which on CPU costs about what writing
            and reading the map does (``tools/benchmark.py``, k = 7, 8
            heads: the same time at 256 channels, less at 64; peak memory
            of forward + backward -20% at 256 channels, -55% at 64); so
            does the 'torch' path. The Triton kernels never keep the map
            (they always recompute it), so the option changes nothing
            there; 'reference' ignores it. Default: False.
        with_cp (bool): Activation checkpointing of the whole layer (mmdet's
            name for it): keep only the input for the backward pass and
            recompute the projections and the attention there. Saves the
            projections as well as the map (``3 * out_channels + num_heads
            * k*k`` numbers per pixel), for one more forward pass of the
            layer. Default: False.

    Example:
        >>> layer = LocalSelfAttention2d(16, 32, 3, stride=2, padding=1,
        ...                              num_heads=4, window_size=7)
        >>> layer(torch.rand(2, 16, 25, 30)).shape
        torch.Size([2, 32, 13, 15])
    """

    transposed = False
    output_padding = (0, 0)

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: Union[int, Tuple[int, int]] = 7,
                 stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[int, Tuple[int, int], str, None] = None,
                 dilation: Union[int, Tuple[int, int]] = 1,
                 groups: int = 1,
                 bias: bool = False,
                 *,
                 num_heads: int = 8,
                 window_size: Union[int, Tuple[int, int], None] = None,
                 position_encoding: str = 'relative',
                 logits: str = 'qk+qr',
                 value_init_std: Optional[float] = None,
                 impl: str = 'auto',
                 recompute_attention: bool = False,
                 with_cp: bool = False) -> None:
        super().__init__()
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if groups != 1:
            raise ValueError(f'groups must be 1 for LocalSelfAttention2d, got {groups!r} '
                             '(grouped attention is not supported)')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _check_positive_pair('kernel_size', kernel_size)
        self.stride = _check_positive_pair('stride', stride)
        self.dilation = _check_positive_pair('dilation', dilation)
        self.groups = 1
        self.pointwise = self.kernel_size == (1, 1)
        self.padding = self._check_padding(padding)
        self.impl = impl
        if impl not in IMPLS:
            raise ValueError(f'impl must be one of {tuple(IMPLS)}, got {impl!r}')
        for name, value in (('recompute_attention', recompute_attention),
                            ('with_cp', with_cp)):
            if not isinstance(value, bool):
                raise ValueError(f'{name} must be a bool, got {value!r}')
        self.recompute_attention = recompute_attention
        self.with_cp = with_cp

        if self.pointwise:
            # The paper keeps 1x1 convolutions: hold Conv2d's parameters.
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
            self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
            self.window_size = (1, 1)
            self.num_heads = 1
            self.position_encoding = 'none'
            self.logits = 'qk'
            self.value_init_std = value_init_std
            self.reset_parameters()
            return

        self.window_size = _check_positive_pair(
            'window_size', self.kernel_size if window_size is None else window_size)
        if not isinstance(num_heads, int) or num_heads <= 0 or out_channels % num_heads:
            raise ValueError(f'num_heads must be a positive int dividing out_channels='
                             f'{out_channels}, got num_heads={num_heads!r}')
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f'position_encoding must be one of {POSITION_ENCODINGS}, '
                             f'got {position_encoding!r}')
        if logits not in LOGITS:
            raise ValueError(f'logits must be one of {LOGITS}, got {logits!r}')
        if logits == 'qr' and position_encoding == 'none':
            raise ValueError("logits='qr' needs a position encoding, got "
                             "position_encoding='none' (the logits would be empty)")
        self.num_heads = num_heads
        self.head_channels = out_channels // num_heads
        if position_encoding != 'none' and self.head_channels < 2:
            raise ValueError(
                f'position_encoding={position_encoding!r} splits each head into row and '
                f'column channels, so out_channels / num_heads must be >= 2, got '
                f'{out_channels} / {num_heads}')
        self.position_encoding = position_encoding
        self.logits = logits
        if value_init_std is not None and value_init_std <= 0:
            raise ValueError(f'value_init_std must be positive or None, got {value_init_std!r}')
        self.value_init_std = value_init_std
        # Each head's channels: a row part, then a column part.
        self.row_channels = (self.head_channels + 1) // 2
        self.col_channels = self.head_channels // 2

        self.qkv_weight = nn.Parameter(torch.empty(self.num_projections * out_channels,
                                                   in_channels))
        if position_encoding == 'relative':
            kh, kw = self.window_size
            self.rel_row = nn.Parameter(torch.empty(kh, num_heads, self.row_channels))
            self.rel_col = nn.Parameter(torch.empty(kw, num_heads, self.col_channels))
        else:
            self.register_parameter('rel_row', None)
            self.register_parameter('rel_col', None)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    # Q, K, V; a subclass with more value matrices overrides this.
    num_projections = 3

    def _check_padding(self, padding) -> Tuple[int, int]:
        """The replaced convolution's padding must be its 'same' padding."""
        same = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))
        if padding is None or padding == 'same':
            return same
        pair = _pair(padding)
        exact = all(2 * p == d * (k - 1)
                    for p, k, d in zip(pair, self.kernel_size, self.dilation))
        if not exact:
            raise ValueError(
                f'padding={padding!r} does not preserve the input size for kernel_size='
                f'{self.kernel_size} and dilation={self.dilation}; LocalSelfAttention2d '
                f"only replaces 'same'-padded convolutions: use padding=None, 'same' or "
                f'dilation * (kernel_size - 1) / 2 (odd kernel sizes)')
        return pair

    def reset_parameters(self) -> None:
        """Initialise the weights (see the README's "decisions").

        W_Q ~ N(0, 1 / (in * d_head)) and W_K ~ N(0, 1 / in) give q.k about
        unit variance at the start without a 1/sqrt(d) in the logits (the
        paper's formula has none); position tables ~ N(0, 1) give q.r the
        same scale; W_V is Kaiming-normal (fan in), or N(0, value_init_std).
        """
        if self.pointwise:
            if self.value_init_std is not None:
                nn.init.normal_(self.weight, std=self.value_init_std)
            else:
                nn.init.kaiming_normal_(self.weight, mode='fan_out', nonlinearity='relu')
            if self.bias is not None:
                nn.init.zeros_(self.bias)
            return
        out = self.out_channels
        query, key, value = self.qkv_weight[:out], self.qkv_weight[out:2 * out], \
            self.qkv_weight[2 * out:]
        nn.init.normal_(query, std=(self.in_channels * self.head_channels) ** -0.5)
        nn.init.normal_(key, std=self.in_channels ** -0.5)
        if self.value_init_std is not None:
            nn.init.normal_(value, std=self.value_init_std)
        else:
            nn.init.normal_(value, std=(2.0 / self.in_channels) ** 0.5)
        if self.rel_row is not None:
            nn.init.normal_(self.rel_row)
            nn.init.normal_(self.rel_col)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def init_weights(self) -> None:
        """Called by mmcv's ``ConvModule`` instead of its Kaiming init."""
        self.reset_parameters()

    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Dense 1x1 projections, split into heads.

        Returns:
            tuple[Tensor]: q, k, v, each ``(B, num_heads, head_channels, H, W)``,
            views into one buffer: channels-last (``(B, H, W, 3, N, D)`` in
            memory) when ``x`` is, or when the Triton kernels will read them
            (:func:`~.local_attention_ops.channels_last_projection`: 'triton'
            or 'auto' on CUDA, head widths that are multiples of 8),
            otherwise contiguous.
        """
        batch, _, height, width = x.shape
        heads, dim = self.num_heads, self.head_channels
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Channels-last in, channels-last q, k, v out (the layout the
            # 'triton' kernels load with vector loads): (B, H, W, 3C).
            qkv = F.linear(x.permute(0, 2, 3, 1), self.qkv_weight)
        elif channels_last_projection(self.impl, x.device, dim):
            # Planar in, channels-last q, k, v out, for the 'triton' kernels'
            # vector loads: x taken as its transpose (B, H * W, C_in), which
            # the GEMM reads as it lies (F.linear would copy x when the
            # weight needs a gradient); dx comes back channels-last.
            weight = self.qkv_weight.t().expand(batch, -1, -1)
            qkv = torch.bmm(x.flatten(2).transpose(1, 2), weight)  # (B, H * W, 3C)
        else:
            # A batched matrix product rather than a 1x1 conv2d: neither pass
            # makes reordered copies of x or of the projection's gradient.
            weight = self.qkv_weight.expand(batch, -1, -1)
            qkv = torch.bmm(weight, x.flatten(2))  # (B, 3C, H * W)
            return split_projections(qkv.view(batch, 3, heads, dim, height, width))
        qkv = qkv.view(batch, height, width, 3, heads, dim)
        return split_projections(qkv.permute(0, 3, 4, 5, 1, 2))  # (B, 3, N, D, H, W)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} expects input (N, {self.in_channels}, H, W), '
                             f'got {tuple(x.shape)}')

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.pointwise:
            return F.conv2d(x, self.weight, self.bias, self.stride)
        if self.with_cp and torch.is_grad_enabled():
            # The map then lives only while this layer's backward runs: keep
            # it there rather than compute it a third time.
            out = checkpoint(self._project_and_attend, x, False, use_reentrant=False)
        else:
            out = self._project_and_attend(x, self.recompute_attention)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype)
        return out

    def _project_and_attend(self, x: Tensor, recompute_attention: bool) -> Tensor:
        if self._exports_pixel_rows():
            out = self._attend_pixel_rows(x)
        else:
            query, key, value = self.project(x)
            out = self.attend(query, key, value, recompute_attention)
        out = out.flatten(1, 2)  # (B, C_out, H, W)
        if self.stride != (1, 1):
            out = average_pool_ceil(out, self.stride)
        return out

    def _exports_pixel_rows(self) -> bool:
        """Whether an ONNX export records this layer's standard-operator
        graph from projections in its Gathers' layout
        (:meth:`_attend_pixel_rows`): this class's projection, and a key that
        nothing changes after it."""
        return (torch.onnx.is_in_onnx_export() and onnx_graph.current_graph() == 'onnx'
                and type(self).project is LocalSelfAttention2d.project
                and self.position_encoding != 'absolute' and self.impl != 'reference')

    def _attend_pixel_rows(self, x: Tensor) -> Tensor:
        """What :meth:`attend` of :meth:`project` computes, with q, k and v
        projected straight into each head's pixel rows ``(B, N, H * W, D)``
        (``onnx_graph.attend_rows``): one MatMul each, batched over the heads."""
        height, width = x.shape[-2:]
        pixels = x.flatten(2).transpose(1, 2)[:, None]  # (B, 1, H * W, C_in)
        weights = self.qkv_weight.view(3, self.num_heads, self.head_channels, -1)
        query, key, value = (torch.matmul(pixels, w.transpose(-1, -2)) for w in weights)
        key, rel_row, rel_col = self._logit_terms(query, key)  # not 'absolute': key as is
        out = onnx_graph.attend_rows(query, key, value, (height, width), rel_row, rel_col,
                                     self.window_size, self.dilation)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _logit_terms(self, query: Tensor, key: Tensor) -> Tuple[Optional[Tensor], ...]:
        """The key and relative tables the logits are made of, for this
        layer's position encoding and logits: ``(key or None, rel_row,
        rel_col)`` (tables None unless 'relative'; 'absolute' adds the
        encoding to the key, or is the key with ``logits='qr'``)."""
        rel_row = rel_col = None
        if self.position_encoding == 'relative':
            rel_row, rel_col = self.rel_row, self.rel_col
            if self.logits == 'qr':
                key = None
        elif self.position_encoding == 'absolute':
            height, width = query.shape[-2:]
            pos = sinusoidal_position_encoding(
                height, width, self.row_channels, self.col_channels,
                device=query.device, dtype=query.dtype)
            pos = pos.expand(self.num_heads, -1, -1, -1)  # (N, D, H, W)
            key = key + pos if self.logits == 'qk+qr' else pos.expand_as(key)
        return key, rel_row, rel_col

    def attend(self, query: Tensor, key: Tensor, value: Tensor,
               recompute_attention: Optional[bool] = None) -> Tensor:
        """Per-head softmax over the window; ``(B, N, D, H, W)`` in and out."""
        key, rel_row, rel_col = self._logit_terms(query, key)
        if self.impl == 'reference':
            return local_attention_reference(query, key, value, self.window_size,
                                             self.dilation, rel_row, rel_col)
        return local_attention(query, key, value, self.window_size, self.dilation,
                               rel_row, rel_col, impl=self.impl,
                               recompute_attention=(self.recompute_attention
                                                    if recompute_attention is None
                                                    else recompute_attention))

    def attention_weights(self, x: Tensor) -> Tensor:
        """The softmax weights that :meth:`forward` applies to the values of ``x``.

        Computed from :meth:`project` with the same position encoding and
        logits as :meth:`attend`, in plain tensor operations
        (:func:`~sasa_mmdet.layers.attention_weights.local_attention_weights`),
        whatever ``impl`` the forward pass uses: for inspection, not for
        speed.

        Args:
            x (Tensor): The layer's input, ``(B, in_channels, H, W)``.

        Returns:
            Tensor: ``(B, num_heads, kh * kw, H, W)`` in at least float32, at
            the input's resolution (a stride's average pool comes after the
            attention). Taps are in row-major window order, the order of
            ``rel_row`` / ``rel_col``: tap ``ty * kw + tx`` of pixel (i, j)
            is the input pixel ``(i + (ty - (kh - 1) // 2) * dilation[0],
            j + (tx - (kw - 1) // 2) * dilation[1])``. Over the taps the
            weights sum to 1; taps outside the image have weight exactly 0.

        Example:
            >>> layer = LocalSelfAttention2d(8, 16, 3, stride=2, num_heads=4,
            ...                              window_size=5)
            >>> layer.attention_weights(torch.rand(2, 8, 9, 7)).shape
            torch.Size([2, 4, 25, 9, 7])
        """
        if self.pointwise:
            raise ValueError(f'{type(self).__name__} built with kernel_size=1 is a pointwise '
                             'convolution: it has no attention weights')
        self._check_input(x)
        query, key, _ = self.project(x)
        key, rel_row, rel_col = self._logit_terms(query, key)
        return local_attention_weights(query, key, self.window_size, self.dilation,
                                       rel_row, rel_col)

    def multiply_adds(self, input_shape) -> int:
        """Multiply-adds of one forward pass for an input ``(N, C, H, W)``.

        Counts the projections, q.k, q.r and the weighted sum of the values
        (the softmax and pooling are not multiply-adds).
        """
        batch, _, height, width = input_shape
        if self.pointwise:
            out_h = (height - 1) // self.stride[0] + 1
            out_w = (width - 1) // self.stride[1] + 1
            return batch * out_h * out_w * self.in_channels * self.out_channels
        pixels = batch * height * width
        taps = self.window_size[0] * self.window_size[1]
        macs = self.num_projections * self.in_channels * self.out_channels
        macs += self.out_channels * taps  # weighted sum of values
        if self.logits == 'qk+qr' or self.position_encoding == 'absolute':
            macs += self.out_channels * taps  # q.k (q.(k + p) for 'absolute')
        if self.position_encoding == 'relative':
            macs += self.num_heads * (self.row_channels * self.window_size[0] +
                                      self.col_channels * self.window_size[1])
        return pixels * macs

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}')
        if not self.pointwise:
            s += (f', window_size={self.window_size}, dilation={self.dilation}, '
                  f'num_heads={self.num_heads}, position_encoding={self.position_encoding!r}, '
                  f'logits={self.logits!r}')
            if self.recompute_attention:
                s += ', recompute_attention=True'
            if self.with_cp:
                s += ', with_cp=True'
        return s + f', bias={self.bias is not None}'
