# Table 2, row 1: convolutional ResNet-50, FPN and heads (paper: 33.4M
# parameters, 182 B FLOPs). mmdet's RetinaNet computes P6 from C5
# ('on_input', 37.7M); the paper's baseline computes it from P5 (FPN output).
# mmdet's 1x schedule; ImageNet-pretrained torchvision ResNet-50 as in mmdet.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['sasa_mmdet'], allow_failed_imports=False)

model = dict(neck=dict(add_extra_convs='on_output'))
