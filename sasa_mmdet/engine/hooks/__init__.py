from .add_hook import (RUNTIME_HOOKS, missing_runtime_hooks,
                       runtime_hooks_warning)
from .epoch_seed_hook import EpochSeedHook, add_epoch_seed_hook
from .safe_checkpoint_hook import SafeCheckpointHook, add_safe_checkpoint_hook

__all__ = [
    'RUNTIME_HOOKS', 'missing_runtime_hooks', 'runtime_hooks_warning',
    'EpochSeedHook', 'SafeCheckpointHook', 'add_epoch_seed_hook',
    'add_safe_checkpoint_hook'
]
