# Table 1 of Ramachandran et al. 2019 (arXiv:1906.05909), ResNet-50
# convolutional baseline (paper: 25.6M parameters, 8.2 B FLOPs, 76.9 top-1),
# with the paper's ImageNet recipe (its appendix): batch 4096 (128 TPU cores
# x 32), Nesterov SGD at lr 1.6, linear warm-up over 10 epochs then cosine
# decay, 130 epochs, an exponential moving average of the weights (0.9999).
# Where the paper is silent, mmpretrain's ResNet-50 recipe: momentum 0.9,
# weight decay 1e-4, RandomResizedCrop 224 + flip, resize 256 / centre crop
# 224 for evaluation, plain cross entropy.
#
# Every Table 1 config is this file with another backbone; all of them use
# MMDetection's ResNet through mmdet.SASAResNet (here without attention), so
# the checkpoint's backbone.* tensors carry exactly the names the detection
# configs (configs/sasa/*-in1k-pre_*.py) load.
#
# Fewer devices: keep 32 images per device and add --auto-scale-lr (lr
# scaled from 1.6 at 4096 images per step), e.g. 8 GPUs:
#   bash tools/dist_train.sh configs/imagenet/<this file> 8 --auto-scale-lr
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    'mmpretrain::_base_/schedules/imagenet_bs256_coslr.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sasa_mmdet'], allow_failed_imports=False)

max_epochs = 130
warmup_epochs = 10

model = dict(
    backbone=dict(
        _delete_=True,
        # MMDetection's registry (mmpretrain's falls back to mmengine's root
        # registry, not to mmdet's)
        type='mmdet.SASAResNet',
        depth=50,
        stem_type='conv',
        stage_with_attention=(False, False, False, False),
        attention_cfg=dict(window_size=7, num_heads=8),
        # a classifier: the last stage only, BN in training mode, nothing
        # frozen (mmdet's ResNet defaults are made for detection)
        out_indices=(3, ),
        frozen_stages=-1,
        norm_eval=False,
        style='pytorch'),
    head=dict(in_channels=2048))

# new workers every epoch, so that --resume is exact (docs/reliability.md)
train_dataloader = dict(batch_size=32, persistent_workers=False)
val_dataloader = dict(batch_size=32)
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(
        type='SGD', lr=1.6, momentum=0.9, weight_decay=1e-4, nesterov=True))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        begin=0,
        end=warmup_epochs,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=max_epochs - warmup_epochs,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_epochs,
        end=max_epochs,
        convert_to_iter_based=True)
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
# lr 1.6 is for 4096 images per step: 128 devices x 32
auto_scale_lr = dict(base_batch_size=4096)

default_hooks = dict(
    logger=dict(interval=100),
    checkpoint=dict(interval=10, max_keep_ckpts=2, save_last=True))
custom_hooks = [
    # the paper's weight average (0.9999 per step); checkpoints hold the
    # averaged weights as 'state_dict' (what the detection configs load)
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    # weights-only checkpoints and exact resume, with this repository's
    # tools/train.py and with mmpretrain's own (no tool adds them)
    dict(type='SafeCheckpointHook'),
    dict(type='EpochSeedHook'),
]
randomness = dict(seed=0)
