# The detection demo (retinanet_sasa-tiny_shapes.py) on a 12-epoch schedule
# instead of 36: the from-scratch side of the pretraining demo
# (tools/run_pretrain_demo.sh). retinanet_sasa-tiny-shapes-pre_12e_shapes.py
# is the same model and schedule starting from a pretrained backbone.
_base_ = './retinanet_sasa-tiny_shapes.py'

max_epochs = 12

train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=100),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-5,
        begin=0,
        end=max_epochs,
        by_epoch=True,
        convert_to_iter_based=True)
]
default_hooks = dict(checkpoint=dict(interval=max_epochs))
