"""Runner-side support for mmengine 0.10.7 on torch >= 2.6 and on CPU.

Importing it registers :class:`SafeCheckpointHook`, :class:`EpochSeedHook`
and :class:`BF16AmpOptimWrapper` with mmengine's registries, makes
weights-only loading mmengine's loader for local checkpoint files and makes
mmengine's writes of local files atomic.
"""
from .checkpoint import (CheckpointMismatchError, UnsafeCheckpointError,
                         check_checkpoint_fits, decode_checkpoint,
                         encode_checkpoint, load_from_local, load_weights_only,
                         register_weights_only_loader)
from .dist import finish_cpu_distributed, init_cpu_dist, setup_cpu_distributed
from .fileio import (AtomicLocalBackend, register_atomic_local_backend,
                     write_atomically)
from .hooks import (RUNTIME_HOOKS, EpochSeedHook, SafeCheckpointHook,
                    add_epoch_seed_hook, add_safe_checkpoint_hook,
                    missing_runtime_hooks, runtime_hooks_warning)
from .optimizers import BF16AmpOptimWrapper, bf16_autocast, enable_amp

register_weights_only_loader()
register_atomic_local_backend()

__all__ = [
    'AtomicLocalBackend', 'BF16AmpOptimWrapper', 'CheckpointMismatchError',
    'EpochSeedHook', 'SafeCheckpointHook', 'UnsafeCheckpointError',
    'add_epoch_seed_hook', 'add_safe_checkpoint_hook', 'bf16_autocast',
    'check_checkpoint_fits',
    'decode_checkpoint', 'enable_amp', 'encode_checkpoint',
    'finish_cpu_distributed', 'init_cpu_dist', 'load_from_local',
    'load_weights_only', 'missing_runtime_hooks', 'RUNTIME_HOOKS',
    'register_atomic_local_backend', 'runtime_hooks_warning',
    'register_weights_only_loader', 'setup_cpu_distributed', 'write_atomically'
]
