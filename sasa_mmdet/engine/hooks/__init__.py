from .epoch_seed_hook import EpochSeedHook, add_epoch_seed_hook
from .safe_checkpoint_hook import SafeCheckpointHook, add_safe_checkpoint_hook

__all__ = [
    'EpochSeedHook', 'SafeCheckpointHook', 'add_epoch_seed_hook',
    'add_safe_checkpoint_hook'
]
