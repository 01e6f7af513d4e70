# Ablation: position-only logits q.r (no content term q.k).
_base_ = './retinanet_sasa-r50_fpn_1x_coco.py'

model = dict(backbone=dict(attention_cfg=dict(logits='qr')))
