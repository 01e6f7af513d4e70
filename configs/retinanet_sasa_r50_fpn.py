# Entry point kept under its first published name: Table 2, row 2 (ResNet-50
# with a convolutional stem and 7x7 local self-attention in every stage,
# convolutional FPN and heads, mmdet's 1x schedule, trained from scratch).
# The config itself, and every other Table 2 row and ablation, is in
# configs/sasa/ (see configs/sasa/README.md).
_base_ = './sasa/retinanet_sasa-r50_fpn_1x_coco.py'
