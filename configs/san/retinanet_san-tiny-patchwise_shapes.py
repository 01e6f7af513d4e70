# The SAN demo detector with patchwise self-attention; everything else as
# retinanet_san-tiny-pairwise_shapes.py.
_base_ = './retinanet_san-tiny-pairwise_shapes.py'

model = dict(backbone=dict(sa_type='patchwise'))
