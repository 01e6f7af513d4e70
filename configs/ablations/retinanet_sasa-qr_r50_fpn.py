# Ablation: position-only logits q.r (no content term q.k).
_base_ = '../retinanet_sasa_r50_fpn.py'

model = dict(backbone=dict(attention_cfg=dict(logits='qr')))
