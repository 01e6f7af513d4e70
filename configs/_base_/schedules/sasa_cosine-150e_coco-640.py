# The paper's RetinaNet training recipe (Ramachandran et al. 2019, sec. 4.2):
# batch 64 (8 GPUs x 8 images), linear warm-up to lr 0.12 over the first
# epoch then cosine decay over 150 epochs, multi-scale jitter, random crops
# of at most 640 x 640, horizontal flip 0.5.
#
# Like mmdet's configs/common/lsj-*.py it holds the data pipeline, the
# schedule and the runtime, so it goes beside a model base, not beside a
# full config (mmengine rejects keys defined by two bases), e.g.
#   _base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py',
#             './_base_/schedules/sasa_cosine-150e_coco-640.py']
# (see configs/sasa/*_8xb8-cosine-150e_coco-640.py). The Table 2 configs use
# mmdet's 1x schedule instead.
#
# Training workers are not persistent: with persistent workers a resumed run
# draws other random augmentations than the uninterrupted one (their
# generators run on across epochs in one run and restart in the other). New
# workers each epoch cost a few seconds per epoch of about 1,800 iterations.
#
# Not stated by the paper (our choices): the jitter range (0.8-1.2 of 640),
# SGD momentum 0.9 and weight decay 1e-4 (mmdet's), warm-up start factor.
_base_ = '../sasa_runtime.py'

dataset_type = 'CocoDataset'
data_root = 'data/coco/'
image_size = (640, 640)
backend_args = None
max_epochs = 150

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='RandomResize',
        scale=image_size,
        ratio_range=(0.8, 1.2),
        keep_ratio=True),
    dict(
        type='RandomCrop',
        crop_type='absolute',
        crop_size=image_size,
        recompute_bbox=True,
        allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=10)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.12, momentum=0.9, weight_decay=0.0001))
param_scheduler = [
    # Linear warm-up over the first epoch, then cosine decay to zero.
    dict(
        type='LinearLR',
        start_factor=0.001,
        by_epoch=True,
        begin=0,
        end=1,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=max_epochs - 1,
        eta_min=0.0,
        by_epoch=True,
        begin=1,
        end=max_epochs,
        convert_to_iter_based=True)
]

default_hooks = dict(checkpoint=dict(interval=10, max_keep_ckpts=3))
# lr 0.12 is for 64 images per iteration; enable with --auto-scale-lr.
auto_scale_lr = dict(enable=False, base_batch_size=64)
