"""The paper's attention stem (section 3.2 of Ramachandran et al., 2019).

Pixels carry little information (3 channels), so the stem's values are
spatially aware: each pixel's value is a position-dependent convex mix of
``m`` value matrices, ``v_ab = (sum_m p(a, b, m) W_V^m) x_ab`` with
``p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu_m)``, the row and
column embeddings indexed by the pixel's position inside the max-pooling
window that follows ("pooling-window aligned").
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor

from .local_attention import LocalSelfAttention2d


@MODELS.register_module()
class SpatiallyAwareAttention2d(LocalSelfAttention2d):
    """Local self-attention whose values mix ``num_value_mixtures`` matrices.

    Same arguments as :class:`LocalSelfAttention2d`, plus:

    Args:
        num_value_mixtures (int): Value matrices m. Default: 4.
        mixture_period (int): The mixing weights depend on the pixel's row
            and column modulo this period (the stem's pooling window).
            Default: 4.

    Example:
        >>> layer = SpatiallyAwareAttention2d(3, 16, 4, num_heads=4)
        >>> layer(torch.rand(1, 3, 18, 21)).shape
        torch.Size([1, 16, 18, 21])
    """

    def __init__(self, *args, num_value_mixtures: int = 4, mixture_period: int = 4,
                 **kwargs) -> None:
        for name, value in (('num_value_mixtures', num_value_mixtures),
                            ('mixture_period', mixture_period)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        self.num_value_mixtures = num_value_mixtures
        self.mixture_period = mixture_period
        super().__init__(*args, **kwargs)
        if self.pointwise:
            raise ValueError('SpatiallyAwareAttention2d needs kernel_size > 1, got '
                             f'{self.kernel_size}')
        dim = self.out_channels
        self.mixture_row = nn.Parameter(torch.empty(mixture_period, dim))
        self.mixture_col = nn.Parameter(torch.empty(mixture_period, dim))
        self.mixture_query = nn.Parameter(torch.empty(num_value_mixtures, dim))
        self.reset_parameters()

    @property
    def num_projections(self) -> int:
        return 2 + self.num_value_mixtures

    def reset_parameters(self) -> None:
        # The base class initialises all m value matrices like its W_V.
        super().reset_parameters()
        if hasattr(self, 'mixture_query'):  # not yet built on the first call
            nn.init.normal_(self.mixture_row)
            nn.init.normal_(self.mixture_col)
            nn.init.normal_(self.mixture_query, std=self.out_channels**-0.5)

    def tile_mixture_weights(self) -> Tensor:
        """``p(a, b, m)`` for one ``period x period`` tile: ``(m, P, P)``,
        sums to 1 over m.

        Logits and softmax stay in (at least) float32 under autocast too:
        elementwise products and sums, which autocast leaves alone (an einsum
        would run in bfloat16 on CPU).
        """
        emb = self.mixture_row[:, None, :] + self.mixture_col[None, :, :]  # (P, P, C)
        logits = (emb[None] * self.mixture_query[:, None, None, :]).sum(-1)  # (m, P, P)
        return logits.softmax(dim=0, dtype=torch.promote_types(logits.dtype, torch.float32))

    def mixture_weights(self, height: int, width: int) -> Tensor:
        """``p(a, b, m)`` for every pixel: ``(m, height, width)``, sums to 1 over m."""
        mix = self.tile_mixture_weights()
        rows = torch.arange(height, device=mix.device) % self.mixture_period
        cols = torch.arange(width, device=mix.device) % self.mixture_period
        return mix[:, rows][:, :, cols]

    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        batch, in_channels, height, width = x.shape
        heads, dim, channels = self.num_heads, self.head_channels, self.out_channels
        weight_qk, weight_v = self.qkv_weight.split(
            [2 * channels, self.num_value_mixtures * channels])
        # q and k as two products (not one split in two: an ONNX Split copies)
        query, key = (torch.bmm(w.expand(batch, -1, -1), x.flatten(2)).view(
            batch, heads, dim, height, width) for w in weight_qk.split(channels))

        # v_ab = (sum_m p(a, b, m) W_V^m) x_ab: the mixture depends only on
        # the pixel's place in the period x period tile, so mix the m
        # matrices once per place (P*P matrices of C x C_in) and project
        # each pixel with its place's matrix, instead of projecting every
        # pixel m times and mixing m full-resolution maps.
        period = self.mixture_period
        mix = self.tile_mixture_weights()  # (m, P, P)
        weight_v = weight_v.view(self.num_value_mixtures, channels, in_channels)
        tile_weights = torch.einsum('mpq,mci->pqci', mix.to(weight_v.dtype), weight_v)
        if torch.onnx.is_in_onnx_export():
            value = self._exported_values(x, tile_weights)
        else:
            x = F.pad(x, (0, -width % period, 0, -height % period))
            tiles = x.view(batch, in_channels, x.shape[2] // period, period,
                           x.shape[3] // period, period)
            value = torch.einsum('bihpwq,pqci->bchpwq', tiles, tile_weights.to(tiles.dtype))
            value = value.reshape(batch, channels, x.shape[2], x.shape[3])[..., :height, :width]
        return query, key, value.view(batch, heads, dim, height, width)

    def _exported_values(self, x: Tensor, tile_weights: Tensor) -> Tensor:
        """The mixed values as an ONNX export records them: each pixel's
        input spread over the P*P places by the one-hots of its row's and
        its column's place, then one MatMul with the places' matrices side
        by side, ``(C, P*P*C_in)``. The tiles' einsum would need a 6-D
        Transpose of the output back to image order, which onnxruntime
        runs element by element (10x the rest of the stem at 640x640).

        Returns:
            Tensor: ``(B, C, H, W)``.
        """
        batch, in_channels, height, width = x.shape
        period = self.mixture_period
        places = torch.arange(period, device=x.device)[:, None]
        row_places = (torch.arange(height, device=x.device) % period == places).to(x.dtype)
        col_places = (torch.arange(width, device=x.device) % period == places).to(x.dtype)
        # (B, P, P, C_in, H, W): x where the pixel sits at place (p, q), else 0
        spread = x[:, None, None] * row_places[:, None, None, :, None] * col_places[:, None, None]
        weight = tile_weights.permute(2, 0, 1, 3).reshape(self.out_channels, -1)
        value = torch.matmul(weight.to(x.dtype), spread.reshape(batch, -1, height * width))
        return value.view(batch, self.out_channels, height, width)

    def multiply_adds(self, input_shape) -> int:
        batch, _, height, width = input_shape
        mixing = batch * height * width * self.num_value_mixtures * self.out_channels
        return super().multiply_adds(input_shape) + mixing


@MODELS.register_module()
class AttentionStem(nn.Module):
    """The paper's full-attention stem: attention, norm, ReLU, max pool.

    Spatially-aware local attention at full resolution over a
    ``window_size`` window, then batch norm, ReLU and a
    ``pool_size x pool_size`` max pool (ceil mode): output stride 4 and
    output size ``ceil(H / 4)``, like ResNet's convolutional stem.

    Args:
        in_channels (int): Image channels. Default: 3.
        out_channels (int): Stem channels. Default: 64.
        window_size (int): Attention window (the paper's 4x4 extent).
        num_heads (int): Default: 4.
        num_value_mixtures (int): Value matrices m. Default: 4.
        norm_cfg (dict): Norm layer config. Default: BN.
        pool_size (int): Max-pool window and stride. Default: 4.
        attention_cfg (dict, optional): Further
            :class:`LocalSelfAttention2d` options (e.g. ``impl``).

    Example:
        >>> stem = AttentionStem(3, 16, num_heads=4)
        >>> stem(torch.rand(2, 3, 65, 50)).shape
        torch.Size([2, 16, 17, 13])
    """

    def __init__(self,
                 in_channels: int = 3,
                 out_channels: int = 64,
                 *,
                 window_size: int = 4,
                 num_heads: int = 4,
                 num_value_mixtures: int = 4,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 pool_size: int = 4,
                 attention_cfg: dict = None) -> None:
        # mmcv's norm registry; imported here so that the attention layers
        # import without mmcv (tools/gpu_check.sh on a bare GPU machine).
        from mmcv.cnn import build_norm_layer
        super().__init__()
        self.attention = SpatiallyAwareAttention2d(
            in_channels, out_channels, window_size, num_heads=num_heads,
            num_value_mixtures=num_value_mixtures, mixture_period=pool_size,
            **(attention_cfg or {}))
        self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
        self.add_module(self.norm_name, norm)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(pool_size, pool_size, ceil_mode=True)

    @property
    def norm(self) -> nn.Module:
        return getattr(self, self.norm_name)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.relu(self.norm(self.attention(x))))

    def attention_weights(self, x: Tensor) -> Tensor:
        """The stem attention's softmax weights on the image ``x``.

        The stem's attention is :class:`SpatiallyAwareAttention2d`, whose
        logits are those of :class:`LocalSelfAttention2d` (only its values
        mix several matrices), so this is
        :meth:`LocalSelfAttention2d.attention_weights` of ``self.attention``:
        ``(B, num_heads, window * window, H, W)`` at the image's resolution,
        before the norm and the max pool.

        Example:
            >>> stem = AttentionStem(3, 16, num_heads=4)
            >>> stem.attention_weights(torch.rand(1, 3, 10, 12)).shape
            torch.Size([1, 4, 16, 10, 12])
        """
        return self.attention.attention_weights(x)

    def multiply_adds(self, input_shape) -> int:
        return self.attention.multiply_adds(input_shape)
