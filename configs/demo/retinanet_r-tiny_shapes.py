# Convolutional twin of the bundled demo (retinanet_sasa-tiny_shapes.py):
# mmdet's RetinaNet with a ResNet-18 at a quarter width (16 base channels),
# FPN and heads of 32 channels (GroupNorm in the head towers), trained from
# scratch with AdamW on the synthetic shapes dataset (3 classes, 160x160
# images, written by tools/misc/make_demo_dataset.py). Every size here is
# shared with the attention demo, which inherits this file and only swaps in
# the attention modules. The dataset folder is data/sasa_demo unless the
# SASA_DEMO_DATA_ROOT environment variable names another one.
# mmdet's retinanet_r18_fpn_1x_coco.py, composed from the same bases with
# sasa_mmdet's runtime (checkpoint safety and exact-resume hooks).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    '../_base_/sasa_runtime.py',
]

data_root = '{{$SASA_DEMO_DATA_ROOT:data/sasa_demo}}/'
img_scale = (160, 160)
max_epochs = 36

model = dict(
    backbone=dict(
        depth=18,
        base_channels=16,
        # from scratch: nothing frozen, BN statistics updated
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(
        in_channels=[16, 32, 64, 128],
        out_channels=32,
        add_extra_convs='on_output'),
    bbox_head=dict(
        num_classes=3,
        in_channels=32,
        stacked_convs=2,
        feat_channels=32,
        # From scratch, the head towers need a normalisation (as in He et
        # al., "Rethinking ImageNet Pre-training"): 0.41 -> 0.61 mAP here
        # after 24 epochs.
        norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
        # objects span 16 to 72 pixels: anchors of 16 to 25 pixels on P3
        # (mmdet's octave_base_scale=4 starts at 32, and the smallest shapes
        # would match no anchor)
        anchor_generator=dict(octave_base_scale=2)),
    # a model trained for minutes scores low; keep its boxes for the mAP
    test_cfg=dict(score_thr=0.01, max_per_img=20))

dataset_type = 'SyntheticShapesDataset'
metainfo = None
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    # mmdet's persistent worker, as the demo's documented results were
    # trained; --cfg-options train_dataloader.persistent_workers=False makes
    # --resume exact (docs/reliability.md), and changes the result
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

# evaluate once, at the end
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
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
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
log_processor = dict(window_size=25)
randomness = dict(seed=0)
