# The pretraining demo's detector (tools/run_pretrain_demo.sh): the detection
# demo on its 12-epoch schedule (retinanet_sasa-tiny_12e_shapes.py), its
# attention backbone starting from the classifier of
# sasa-tiny_1xb32-6e_shape-classes.py instead of from scratch. Every
# backbone tensor comes from the classifier's backbone.* tensors (a checkpoint
# that does not fit is refused, naming the tensors); stem and stage 1 frozen
# and BN statistics frozen, as for mmdet's ImageNet-pretrained ResNets.
# Another checkpoint: --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './retinanet_sasa-tiny_12e_shapes.py'

model = dict(
    backbone=dict(
        frozen_stages=1,
        norm_eval=True,
        strict_pretrained=True,
        init_cfg=dict(
            _delete_=True,
            type='Pretrained',
            prefix='backbone.',
            checkpoint='work_dirs/pretrain_demo/'
            'sasa-tiny_1xb32-6e_shape-classes/epoch_6.pth')))
