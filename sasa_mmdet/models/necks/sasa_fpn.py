"""FPN whose 3x3 output convolutions are stand-alone local self-attention.

Ramachandran et al., "Stand-Alone Self-Attention in Vision Models",
NeurIPS 2019 (arXiv:1906.05909), section 4.2: every 3x3 convolution of
RetinaNet's FPN is replaced by the attention layer; where it had stride 2
(the extra P6 / P7 levels) a 2x2 stride-2 average pool follows.
"""
import copy
from typing import List, Union

from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from mmdet.utils import MultiConfig, OptConfigType


@MODELS.register_module()
class SASAFPN(FPN):
    """:class:`mmdet.models.necks.FPN` built with local self-attention.

    The whole change is ``conv_cfg=dict(type='LocalSelfAttention2d', ...)``:
    FPN builds all its convolutions through ``ConvModule(conv_cfg=...)``, so
    the 3x3 ``fpn_convs`` (extra levels included) become local attention
    (strided ones: attention, then a 2x2 stride-2 average pool) and the 1x1
    lateral convolutions become the layer's pointwise mode, which is a 1x1
    convolution. The default ``init_cfg`` is FPN's Xavier init extended to
    those pointwise layers (attention layers keep their own init, Xavier
    finds no ``weight`` on them and only zeroes their bias).

    Args:
        in_channels (list[int]): Input channels per scale.
        out_channels (int): Output channels at each scale.
        num_outs (int): Number of output scales.
        attention_cfg (dict, optional): Options of
            :class:`~sasa_mmdet.layers.LocalSelfAttention2d`; they update the
            defaults ``dict(window_size=7, num_heads=8)``.
        add_extra_convs (bool | str): As in FPN, with FPN's default: False
            (extra levels by max pooling, no attention there). The paper's
            RetinaNet computes P6 from P5 with attention: 'on_output'
            (configs/sasa/ set it). Default: False.
        init_cfg (dict or list[dict]): Initialization config.
        **kwargs: Other :class:`~mmdet.models.necks.FPN` arguments
            (``start_level``, ``norm_cfg``, ``relu_before_extra_convs``, ...),
            except ``conv_cfg``.

    Example:
        >>> import torch
        >>> in_channels = [2, 3, 5, 7]
        >>> scales = [34, 17, 9, 5]
        >>> inputs = [torch.rand(1, c, s, s)
        ...           for c, s in zip(in_channels, scales)]
        >>> self = SASAFPN(in_channels, 8, 5, start_level=1,
        ...                add_extra_convs='on_output',
        ...                attention_cfg=dict(window_size=3, num_heads=2))
        >>> for out in self.forward(inputs):
        ...     print(tuple(out.shape))
        (1, 8, 17, 17)
        (1, 8, 9, 9)
        (1, 8, 5, 5)
        (1, 8, 3, 3)
        (1, 8, 2, 2)
    """

    def __init__(self,
                 in_channels: List[int],
                 out_channels: int,
                 num_outs: int,
                 attention_cfg: OptConfigType = None,
                 add_extra_convs: Union[bool, str] = False,
                 init_cfg: MultiConfig = dict(
                     type='Xavier',
                     layer=['Conv2d', 'LocalSelfAttention2d'],
                     distribution='uniform'),
                 **kwargs) -> None:
        if 'conv_cfg' in kwargs:
            raise ValueError(
                'SASAFPN builds its convolutions from attention_cfg; got '
                f'conv_cfg={kwargs["conv_cfg"]!r} (use attention_cfg, or '
                "mmdet's FPN with conv_cfg)")
        if attention_cfg is not None and not isinstance(attention_cfg, dict):
            raise ValueError(f'attention_cfg must be a dict or None, got '
                             f'{attention_cfg!r}')
        conv_cfg = dict(
            type='LocalSelfAttention2d', window_size=7, num_heads=8)
        conv_cfg.update(copy.deepcopy(attention_cfg or {}))
        super().__init__(
            in_channels,
            out_channels,
            num_outs,
            add_extra_convs=add_extra_convs,
            conv_cfg=conv_cfg,
            init_cfg=init_cfg,
            **kwargs)
