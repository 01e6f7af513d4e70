# RetinaNet with the SASA ResNet-50 backbone (local self-attention, 7x7
# window, 8 heads, in place of every 3x3 convolution; convolutional stem)
# and Squeeze-and-Excitation (Hu et al., ratio 16) after conv3 of every
# bottleneck, before the residual addition, as in SE-ResNet. Convolutional
# FPN (P6 from P5) and head; mmdet's 1x schedule; from scratch.
# The project's convolutional RetinaNet-R50 (P6 from P5, sasa_mmdet's runtime:
# checkpoint-safety and exact-resume hooks) with the backbone replaced.
_base_ = '../sasa/retinanet_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        type='SASAResNet',
        stem_type='conv',
        stage_with_attention=(True, True, True, True),
        attention_cfg=dict(window_size=7, num_heads=8),
        plugins=[
            dict(cfg=dict(type='SEPlugin', ratio=16), position='after_conv3')
        ],
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(add_extra_convs='on_output'))
