# Ablation: absolute (fixed sinusoidal) positional encoding added to the
# keys instead of the learned relative row / column embeddings.
_base_ = './retinanet_sasa-r50_fpn_1x_coco.py'

model = dict(backbone=dict(attention_cfg=dict(position_encoding='absolute')))
