# Table 1: ResNet-50, full attention: the paper's spatially-aware attention
# stem (4x4 window, 4 heads, 4 value mixtures, BN, 4x4 max pool) and local
# self-attention in every stage.
_base_ = './sasa-resnet50_128xb32-warmup-coslr-130e_in1k.py'

model = dict(
    backbone=dict(
        stem_type='attention',
        stem_cfg=dict(window_size=4, num_heads=4, num_value_mixtures=4)))
