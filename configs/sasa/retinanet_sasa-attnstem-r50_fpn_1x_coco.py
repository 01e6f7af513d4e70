# Table 2, row 3: full-attention ResNet-50 (the paper's spatially-aware
# attention stem: 4x4 window, 4 heads, 4 value mixtures, BN, 4x4 max pool);
# convolutional FPN and heads (paper: 25.9M, 173 B FLOPs).
_base_ = './retinanet_sasa-r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        stem_type='attention',
        stem_cfg=dict(window_size=4, num_heads=4, num_value_mixtures=4)))
