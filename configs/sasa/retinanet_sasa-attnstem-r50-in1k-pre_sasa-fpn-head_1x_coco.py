# Table 2, row 5: attention everywhere (attention stem, stages, FPN and heads),
# 1x. Starts from an ImageNet classifier of
# configs/imagenet/sasa-attnstem-resnet50_128xb32-warmup-coslr-130e_in1k.py
# (train it first; the path below is its last checkpoint): every backbone
# tensor is loaded from the classifier's backbone.* tensors, and a checkpoint
# whose backbone does not fit is refused, naming the tensors
# (strict_pretrained). Stem and stage 1 frozen, BN statistics frozen, as for
# mmdet's ImageNet-pretrained ResNet.
# Another checkpoint: --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py'

model = dict(
    backbone=dict(
        frozen_stages=1,
        norm_eval=True,
        strict_pretrained=True,
        init_cfg=dict(
            _delete_=True,
            type='Pretrained',
            prefix='backbone.',
            checkpoint='work_dirs/sasa-attnstem-resnet50_128xb32-warmup-coslr-130e_in1k/'
            'epoch_130.pth')))
