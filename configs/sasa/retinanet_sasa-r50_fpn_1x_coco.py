# Table 2, row 2: ResNet-50 with a convolutional stem and local
# self-attention (7x7 window, 8 heads) in place of every 3x3 convolution;
# convolutional FPN and heads, P6 from P5 (paper: 25.9M, 173 B FLOPs).
# mmdet's 1x schedule.
_base_ = './retinanet_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        type='SASAResNet',
        stem_type='conv',
        stage_with_attention=(True, True, True, True),
        attention_cfg=dict(window_size=7, num_heads=8),
        # No ImageNet-pretrained attention ResNet is available, so the
        # backbone trains from scratch: nothing frozen, BN statistics
        # updated. With a checkpoint, restore mmdet's frozen_stages=1,
        # norm_eval=True and set, e.g.,
        #   init_cfg=dict(type='Pretrained', checkpoint='sasa_r50.pth')
        # A convolutional ResNet checkpoint ('torchvision://resnet50') also
        # loads: the stem, 1x1 convolutions and norms are filled, the
        # attention layers start fresh (SASAResNet logs which tensors).
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None))
