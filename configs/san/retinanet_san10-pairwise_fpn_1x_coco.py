# RetinaNet with a SAN10 backbone, pairwise self-attention (Zhao, Jia,
# Koltun, CVPR 2020; ImageNet: 10.5M parameters, 74.9 top-1). SAN's stages
# 1-4 give strides 4/8/16/32 with 256/512/1024/2048 channels, C2-C5 of a
# ResNet-50, so mmdet's FPN and head are unchanged. As in the project's
# RetinaNet baselines, P6 comes from P5 ('on_output'); mmdet's 1x schedule.
# The other SAN configs in this folder change only depth and sa_type.
# The project's convolutional RetinaNet-R50 (P6 from P5, sasa_mmdet's runtime:
# checkpoint-safety and exact-resume hooks) with the backbone replaced.
_base_ = '../sasa/retinanet_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='SAN',
        depth=10,
        sa_type='pairwise',
        out_indices=(1, 2, 3, 4),
        # No ImageNet-pretrained SAN is bundled, so the backbone trains from
        # scratch: nothing frozen, BN statistics updated. With ImageNet
        # weights, set frozen_stages=2 (stem, stages 0-1), norm_eval=True
        # and, for a checkpoint of configs/san/imagenet/,
        #   init_cfg=dict(type='Pretrained', checkpoint='san10.pth',
        #                 prefix='backbone.')
        # or, for an official hszhao/SAN one converted by
        # tools/model_converters/san_official_to_mmdet.py,
        #   init_cfg=dict(type='Pretrained', checkpoint='converted.pth')
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(add_extra_convs='on_output'))
