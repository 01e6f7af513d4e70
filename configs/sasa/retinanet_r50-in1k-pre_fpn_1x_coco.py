# Table 2, row 1: convolutional RetinaNet-R50, P6 from P5, mmdet's 1x schedule.
# Starts from an ImageNet classifier of
# configs/imagenet/resnet50_128xb32-warmup-coslr-130e_in1k.py (train it first;
# the path below is its last checkpoint): every backbone tensor is loaded from
# the classifier's backbone.* tensors, and a checkpoint whose backbone does not
# fit is refused, naming the tensors (strict_pretrained). Stem and stage 1
# frozen, BN statistics frozen, as for mmdet's ImageNet-pretrained ResNet.
# Another checkpoint: --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './retinanet_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        # mmdet's ResNet as SASAResNet without attention: the same model and
        # tensor names, and the strict hand-off check
        type='SASAResNet',
        depth=50,
        stem_type='conv',
        stage_with_attention=(False, False, False, False),
        frozen_stages=1,
        norm_eval=True,
        strict_pretrained=True,
        init_cfg=dict(
            _delete_=True,
            type='Pretrained',
            prefix='backbone.',
            checkpoint='work_dirs/resnet50_128xb32-warmup-coslr-130e_in1k/'
            'epoch_130.pth')))
