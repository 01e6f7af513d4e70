# Table 2, row 5: full attention everywhere: attention stem and stages,
# attention FPN and heads (paper: 22.0M, 110 B FLOPs).
_base_ = './retinanet_sasa-r50_sasa-fpn-head_1x_coco.py'

model = dict(
    backbone=dict(
        stem_type='attention',
        stem_cfg=dict(window_size=4, num_heads=4, num_value_mixtures=4)))
