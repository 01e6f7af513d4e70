# RetinaNet with a SAN15 backbone, patchwise self-attention; everything else as
# retinanet_san10-pairwise_fpn_1x_coco.py.
_base_ = './retinanet_san10-pairwise_fpn_1x_coco.py'

model = dict(backbone=dict(depth=15, sa_type='patchwise'))
