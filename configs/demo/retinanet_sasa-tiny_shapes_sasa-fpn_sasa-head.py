# The bundled demo with attention everywhere: the attention backbone of
# retinanet_sasa-tiny_shapes.py plus an attention FPN (P6 / P7 by attention +
# 2x2 average pool) and attention heads (GroupNorm kept in the towers). It
# trains like the others but is several times slower on a CPU:
#
#   bash tools/run_demo.sh \
#       configs/demo/retinanet_sasa-tiny_shapes_sasa-fpn_sasa-head.py
_base_ = './retinanet_sasa-tiny_shapes.py'

attention_cfg = dict(window_size=5, num_heads=4)  # the backbone's

model = dict(
    neck=dict(type='SASAFPN', attention_cfg=attention_cfg),
    bbox_head=dict(
        type='SASARetinaHead',
        attention_cfg=dict(attention_cfg, value_init_std=0.01)))
