# Ablation: spatial extent k = 11 (the paper tries 3, 5, 7, 9, 11; 7 is its
# default) in every attention layer of the backbone.
_base_ = './retinanet_sasa-r50_fpn_1x_coco.py'

model = dict(backbone=dict(attention_cfg=dict(window_size=11)))
