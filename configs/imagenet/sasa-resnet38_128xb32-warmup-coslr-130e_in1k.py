# Table 1: ResNet-38, convolutional stem, local self-attention (7x7 window,
# 8 heads) in place of every 3x3 convolution ("conv-stem + attention").
_base_ = './resnet38_128xb32-warmup-coslr-130e_in1k.py'

model = dict(
    backbone=dict(stage_with_attention=(True, True, True, True)))
