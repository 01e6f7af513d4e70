# The bundled demo (tools/run_demo.sh): an attention RetinaNet small enough
# to train and evaluate on a laptop CPU in minutes (docs/get_started.md has
# the measured time and mAP). Sizes, data and
# schedule are those of its convolutional twin (retinanet_r-tiny_shapes.py);
# this file swaps in the paper's attention backbone: a quarter-width
# ResNet-18 with local self-attention in place of every 3x3 convolution of
# all four stages, convolutional stem, convolutional FPN and heads -- the
# Table 2 row of configs/sasa/retinanet_sasa-r50_fpn_1x_coco.py.
#
# Attention FPN and heads as well (configs/demo/
# retinanet_sasa-tiny_shapes_sasa-fpn_sasa-head.py) train too, but their
# twenty attention layers on P3-P7 take several times longer on a CPU.
_base_ = './retinanet_r-tiny_shapes.py'

# A 5x5 window (the paper's ablation spans 3 to 11; its detection models use
# 7): the feature maps of 160-pixel images are at most 40x40, and a 7x7
# window costs twice the time for this demo's budget.
attention_cfg = dict(window_size=5, num_heads=4)

model = dict(
    backbone=dict(
        type='SASAResNet',
        stem_type='conv',
        stage_with_attention=(True, True, True, True),
        attention_cfg=attention_cfg))
