# The bundled demo detector (configs/demo/retinanet_r-tiny_shapes.py: data,
# FPN, head and schedule) with a demo-sized SAN backbone, pairwise
# self-attention: SAN10's blocks per stage (2, 1, 2, 4, 1) at an eighth of
# its widths (stage 0 at 32, the least its attention allows with
# share_planes=8), a 16-channel stem, and 5x5 windows after the 3x3 of
# stage 0, as the SASA demo uses 5x5. Compared side by side with the SASA
# demo and the convolutional twin in docs/san.md.
_base_ = '../demo/retinanet_r-tiny_shapes.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='SAN',
        depth=10,
        sa_type='pairwise',
        stem_channels=16,
        stage_channels=(32, 32, 64, 128, 256),
        kernels=(3, 5, 5, 5, 5),
        out_indices=(1, 2, 3, 4),
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256]))
