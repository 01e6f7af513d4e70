# Table 2, row 1 (convolutional RetinaNet-R50, P6 from P5) with the paper's
# recipe: batch 64, warm-up + cosine over 150 epochs, jitter and 640 crops.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    '../_base_/schedules/sasa_cosine-150e_coco-640.py'
]

model = dict(neck=dict(add_extra_convs='on_output'))
