# The runtime of every sasa_mmdet detection config: MMDetection's default
# runtime plus the two hooks that make training safe and resumable, so that
# MMDetection's own tools/train.py and `mim train` get them as well as ours.
#
# - SafeCheckpointHook: checkpoints are written atomically and hold only
#   types that torch.load(weights_only=True) accepts; a checkpoint that does
#   not fit the model is refused (load_from, --resume, tools/test.py CKPT).
# - EpochSeedHook: Python's, numpy's and torch's generators are reseeded
#   from `randomness.seed` and the epoch before every epoch, so `--resume`
#   continues exactly as the uninterrupted run would. Exact resume also needs
#   `persistent_workers=False` in train_dataloader when num_workers > 0
#   (see docs/reliability.md); the configs of configs/sasa/ set it.
#
# A config that sets `custom_hooks` of its own replaces this list: keep both
# hooks in it, e.g.
#   custom_hooks = [dict(type='SafeCheckpointHook'),
#                   dict(type='EpochSeedHook'), dict(type='MyHook')]
_base_ = 'mmdet::_base_/default_runtime.py'

custom_imports = dict(imports=['sasa_mmdet'], allow_failed_imports=False)
custom_hooks = [dict(type='SafeCheckpointHook'), dict(type='EpochSeedHook')]
