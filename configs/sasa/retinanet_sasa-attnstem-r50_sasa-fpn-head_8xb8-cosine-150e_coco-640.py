# Table 2, row 5 (full attention: attention stem and stages, attention FPN
# and heads) with the paper's recipe: batch 64, warm-up + cosine over 150
# epochs, jitter and 640 crops. Same model as
# retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    '../_base_/schedules/sasa_cosine-150e_coco-640.py'
]

model = dict(
    backbone=dict(
        type='SASAResNet',
        stem_type='attention',
        stem_cfg=dict(window_size=4, num_heads=4, num_value_mixtures=4),
        stage_with_attention=(True, True, True, True),
        attention_cfg=dict(window_size=7, num_heads=8),
        # Trained from scratch (no pretrained attention ResNet available).
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(
        type='SASAFPN',
        add_extra_convs='on_output',
        attention_cfg=dict(window_size=7, num_heads=8)),
    bbox_head=dict(
        type='SASARetinaHead',
        attention_cfg=dict(window_size=7, num_heads=8, value_init_std=0.01)))
