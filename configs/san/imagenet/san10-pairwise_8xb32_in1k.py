# SAN10 with pairwise self-attention on ImageNet (Zhao, Jia, Koltun, CVPR
# 2020; official: 10.5M parameters, 2.2G multiply-adds, 74.9 top-1), an
# mmpretrain ImageClassifier around mmdet.SAN, with the official recipe
# (hszhao/SAN config/imagenet/imagenet_san*.yaml): 8 GPUs x 32 images, SGD
# lr 0.1, momentum 0.9, weight decay 1e-4, cosine decay over 100 epochs,
# label smoothing 0.1, no mixup. Where the official files are silent,
# mmpretrain's ImageNet pipeline (RandomResizedCrop 224 + flip; resize 256,
# centre crop 224 for evaluation), as the official train.py does.
# The other five SAN configs change only depth and sa_type.
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    'mmpretrain::_base_/schedules/imagenet_bs256_coslr.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sasa_mmdet'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        # MMDetection's registry (mmpretrain's falls back to mmengine's root
        # registry, not to mmdet's)
        type='mmdet.SAN',
        depth=10,
        sa_type='pairwise',
        out_indices=(4, ),
        frozen_stages=-1,
        norm_eval=False),
    head=dict(
        in_channels=2048,
        loss=dict(
            _delete_=True,
            type='LabelSmoothLoss',
            label_smooth_val=0.1,
            mode='original',
            loss_weight=1.0)))

# 8 GPUs x 32 images = 256, the lr's batch size (auto_scale_lr: 256)
train_dataloader = dict(batch_size=32)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(
    type='CosineAnnealingLR', T_max=100, by_epoch=True, begin=0, end=100)
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)

default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2, save_last=True))
custom_hooks = [dict(type='SafeCheckpointHook'), dict(type='EpochSeedHook')]
randomness = dict(seed=0)
