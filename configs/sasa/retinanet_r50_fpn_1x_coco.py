# Table 2, row 1: convolutional ResNet-50, FPN and heads (paper: 33.4M
# parameters, 182 B FLOPs). mmdet's retinanet_r50_fpn_1x_coco.py with two
# changes: P6 is computed from P5, the FPN output, as in the paper (mmdet
# computes it from C5, 'on_input', 37.7M), and sasa_mmdet's runtime
# (checkpoint safety and exact-resume hooks, configs/_base_/sasa_runtime.py).
# mmdet's 1x schedule; ImageNet-pretrained torchvision ResNet-50 as in mmdet.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::retinanet/retinanet_tta.py',
    '../_base_/sasa_runtime.py',
]

model = dict(neck=dict(add_extra_convs='on_output'))
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
# Exact --resume: fresh workers every epoch (docs/reliability.md).
train_dataloader = dict(persistent_workers=False)
