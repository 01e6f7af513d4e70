# SAN19, patchwise self-attention, on ImageNet; the official recipe, as
# san10-pairwise_8xb32_in1k.py.
_base_ = './san10-pairwise_8xb32_in1k.py'

model = dict(backbone=dict(depth=19, sa_type='patchwise'))
