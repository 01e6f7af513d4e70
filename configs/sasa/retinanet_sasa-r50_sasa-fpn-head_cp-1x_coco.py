# Table 2, row 4 with activation checkpointing in every attention layer:
# each keeps only its input for the backward pass and recomputes projections
# and attention there. Measured at 640x640 on CPU (README, Performance),
# against the conv baseline trained the same way: 1.00x its peak memory for
# 1.07x its step time, against 1.47x and 0.83x without it. Same model and
# weights as row 4.
_base_ = './retinanet_sasa-r50_sasa-fpn-head_1x_coco.py'

model = dict(
    backbone=dict(attention_cfg=dict(with_cp=True)),
    neck=dict(attention_cfg=dict(with_cp=True)),
    bbox_head=dict(attention_cfg=dict(with_cp=True)))
