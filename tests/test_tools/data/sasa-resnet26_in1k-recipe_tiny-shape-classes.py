# Throwaway config for the tool tests: the Table 1 config of ResNet-26 with
# attention (its model, optimiser, schedule and hooks, EMA included) on the
# tiny synthetic shape classes at 32x32 instead of ImageNet. The dataset
# folder comes from the SASA_PRETRAIN_DATA_ROOT environment variable.
_base_ = '../../../configs/imagenet/sasa-resnet26_128xb32-warmup-coslr-130e_in1k.py'

data_root = '{{$SASA_PRETRAIN_DATA_ROOT:data/sasa_pretrain}}'
model = dict(head=dict(num_classes=8, topk=(1, )))
data_preprocessor = dict(num_classes=8)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=2))
