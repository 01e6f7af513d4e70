# Ablation: no positional encoding (logits q.k only).
_base_ = './retinanet_sasa-r50_fpn_1x_coco.py'

model = dict(backbone=dict(attention_cfg=dict(position_encoding='none')))
