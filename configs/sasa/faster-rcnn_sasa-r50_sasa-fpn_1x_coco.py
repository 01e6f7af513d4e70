# Example: MMDetection's Faster R-CNN (R-50-FPN, 1x) with the attention
# backbone and the attention FPN, to show SASAResNet and SASAFPN in a
# detector the paper did not train (no paper figures to compare with).
#
# What becomes attention: every 3x3 convolution of the four ResNet stages
# (7x7 window, 8 heads; the 7x7 stem stays a convolution) and the FPN's 3x3
# output convolutions. The RPN head and the RoI head stay convolutional:
# RPNHead with one conv builds a plain nn.Conv2d whatever conv_cfg says, and
# the box head is fully connected. SASAFPN keeps FPN's default
# add_extra_convs=False, so P6 is a max pool of P5 as in mmdet's Faster R-CNN.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    '../_base_/sasa_runtime.py',
]

model = dict(
    backbone=dict(
        type='SASAResNet',
        stem_type='conv',
        attention_cfg=dict(window_size=7, num_heads=8),
        # no ImageNet-pretrained attention ResNet to start from: train
        # everything (see configs/sasa/*-in1k-pre_* for the pretrained path)
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(type='SASAFPN', attention_cfg=dict(window_size=7, num_heads=8)))
# Exact --resume: fresh workers every epoch (docs/reliability.md).
train_dataloader = dict(persistent_workers=False)
