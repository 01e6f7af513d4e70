# RetinaNet with a SAN19 backbone, patchwise self-attention; everything else as
# retinanet_san10-pairwise_fpn_1x_coco.py.
_base_ = './retinanet_san10-pairwise_fpn_1x_coco.py'

model = dict(backbone=dict(depth=19, sa_type='patchwise'))
