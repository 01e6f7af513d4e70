# Table 1: ResNet-38 convolutional baseline (bottleneck blocks per stage:
# 2, 3, 5, 2), the recipe of resnet50_128xb32-warmup-coslr-130e_in1k.py.
_base_ = './resnet50_128xb32-warmup-coslr-130e_in1k.py'

model = dict(backbone=dict(depth=38))
