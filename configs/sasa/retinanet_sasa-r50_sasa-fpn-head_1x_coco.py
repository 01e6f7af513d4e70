# Table 2, row 4: attention ResNet-50 (conv stem), attention FPN (P6 / P7:
# attention + 2x2 average pool) and attention heads (W_V ~ N(0, 0.01), a
# pointwise head-mixing convolution at the end of each tower) (paper: 22.0M,
# 111 B FLOPs).
_base_ = './retinanet_sasa-r50_fpn_1x_coco.py'

model = dict(
    neck=dict(
        type='SASAFPN',
        add_extra_convs='on_output',
        attention_cfg=dict(window_size=7, num_heads=8)),
    bbox_head=dict(
        type='SASARetinaHead',
        attention_cfg=dict(window_size=7, num_heads=8, value_init_std=0.01)))
