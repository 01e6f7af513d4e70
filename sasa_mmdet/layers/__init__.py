from .attention_stem import AttentionStem, SpatiallyAwareAttention2d
from .local_attention import LocalSelfAttention2d, sinusoidal_position_encoding
from .local_attention_ops import (local_attention, local_attention_reference,
                                  neighbourhood_mask)
from .san_attention import PairwiseSelfAttention2d, PatchwiseSelfAttention2d
from .san_ops import san_aggregation, san_gather, san_subtraction

__all__ = [
    'LocalSelfAttention2d', 'SpatiallyAwareAttention2d', 'AttentionStem',
    'local_attention', 'local_attention_reference', 'neighbourhood_mask',
    'sinusoidal_position_encoding', 'PairwiseSelfAttention2d',
    'PatchwiseSelfAttention2d', 'san_aggregation', 'san_gather', 'san_subtraction'
]
