# The pretraining demo's classifier (tools/run_pretrain_demo.sh): the
# detection demo's attention backbone (configs/demo/retinanet_sasa-tiny_shapes.py:
# a quarter-width ResNet-18, 16 base channels, 5x5 local self-attention with
# 4 heads in every stage, convolutional stem) with global average pooling and
# a linear classifier, trained with mmpretrain on the synthetic shape classes
# (tools/misc/make_pretrain_dataset.py: 8 classes, 64x64 images, 400 per
# class for training, 25 held out), 6 epochs at batch 32. (150 per class
# for 16 epochs, the same number of steps, overfitted: 70% top-1 on its
# training images, 35% held out.) It stands in for configs/imagenet/ at toy
# size: same model code, same mmpretrain classes, same hand-off. The dataset
# folder is data/sasa_pretrain unless SASA_PRETRAIN_DATA_ROOT names another.
_base_ = 'mmpretrain::_base_/default_runtime.py'

custom_imports = dict(imports=['sasa_mmdet'], allow_failed_imports=False)

data_root = '{{$SASA_PRETRAIN_DATA_ROOT:data/sasa_pretrain}}'
num_classes = 8
max_epochs = 6

model = dict(
    type='ImageClassifier',
    # as the detection demo's (mmdet's defaults for RetinaNet's inputs)
    data_preprocessor=dict(
        num_classes=num_classes,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True),
    backbone=dict(
        # the detection demo's backbone; tests/test_models/
        # test_pretrained_handoff.py holds the two equal
        type='mmdet.SASAResNet',
        depth=18,
        base_channels=16,
        stem_type='conv',
        stage_with_attention=(True, True, True, True),
        attention_cfg=dict(window_size=5, num_heads=4),
        norm_cfg=dict(type='BN', requires_grad=True),
        style='pytorch',
        # a classifier: last stage only, BN in training mode
        out_indices=(3, ),
        frozen_stages=-1,
        norm_eval=False),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=num_classes,
        in_channels=128,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

dataset_type = 'CustomDataset'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=1,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32,
    num_workers=1,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# the detection demo's optimiser; evaluate once, at the end
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=4e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=50),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-5,
        begin=0,
        end=max_epochs,
        by_epoch=True,
        convert_to_iter_based=True)
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=32)

default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
log_processor = dict(window_size=25)
# weights-only checkpoints and exact resume, with this repository's
# tools/train.py and with mmpretrain's own (no tool adds them)
custom_hooks = [dict(type='SafeCheckpointHook'), dict(type='EpochSeedHook')]
randomness = dict(seed=0)
