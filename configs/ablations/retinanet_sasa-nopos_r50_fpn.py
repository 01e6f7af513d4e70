# Ablation: no positional encoding (logits q.k only).
_base_ = '../retinanet_sasa_r50_fpn.py'

model = dict(backbone=dict(attention_cfg=dict(position_encoding='none')))
