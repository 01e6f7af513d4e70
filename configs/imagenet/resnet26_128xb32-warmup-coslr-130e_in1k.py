# Table 1: ResNet-26 convolutional baseline (bottleneck blocks per stage:
# 1, 2, 4, 1), the recipe of resnet50_128xb32-warmup-coslr-130e_in1k.py.
_base_ = './resnet50_128xb32-warmup-coslr-130e_in1k.py'

model = dict(backbone=dict(depth=26))
