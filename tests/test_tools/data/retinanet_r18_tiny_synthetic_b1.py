# The tool-test config with one image per step and per process, for
# comparing 2 torchrun processes with one process that accumulates the
# gradients of 2 steps (optim_wrapper.accumulative_counts=2): both then see
# the same images in the same groups (BatchNorm statistics and RetinaHead's
# loss normalisation by the number of positive anchors are per group).
# Also: no random flip (each process draws its own random stream), 4 images
# (a multiple of the number of processes: the sampler pads by repeating
# images), no iteration-based warm-up (one process counts twice the
# iterations) and no validation.
_base_ = './retinanet_r18_tiny_synthetic.py'

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs')
]
train_dataloader = dict(
    batch_size=1, dataset=dict(indices=4, pipeline=train_pipeline))
train_cfg = dict(max_epochs=2)
val_dataloader = val_cfg = val_evaluator = None
param_scheduler = [
    dict(type='MultiStepLR', by_epoch=True, milestones=[1], gamma=0.1)
]
