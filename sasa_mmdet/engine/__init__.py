"""Runner-side support for mmengine 0.10.7 on torch >= 2.6 and on CPU.

Importing it registers :class:`SafeCheckpointHook` and
:class:`BF16AmpOptimWrapper` with mmengine's registries and makes
weights-only loading mmengine's loader for local checkpoint files.
"""
from .checkpoint import (UnsafeCheckpointError, decode_checkpoint,
                         encode_checkpoint, load_from_local, load_weights_only,
                         register_weights_only_loader)
from .dist import finish_cpu_distributed, init_cpu_dist, setup_cpu_distributed
from .hooks import SafeCheckpointHook, add_safe_checkpoint_hook
from .optimizers import BF16AmpOptimWrapper, enable_amp

register_weights_only_loader()

__all__ = [
    'BF16AmpOptimWrapper', 'SafeCheckpointHook', 'UnsafeCheckpointError',
    'add_safe_checkpoint_hook', 'decode_checkpoint', 'enable_amp',
    'encode_checkpoint', 'finish_cpu_distributed', 'init_cpu_dist', 'load_from_local',
    'load_weights_only', 'register_weights_only_loader',
    'setup_cpu_distributed'
]
