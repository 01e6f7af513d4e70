# Ablation: convolution in stages 1-2, attention in stages 3-4 only (the
# paper: convolution early and attention late works best).
_base_ = './retinanet_sasa-r50_fpn_1x_coco.py'

model = dict(backbone=dict(stage_with_attention=(False, False, True, True)))
