from .safe_checkpoint_hook import SafeCheckpointHook, add_safe_checkpoint_hook

__all__ = ['SafeCheckpointHook', 'add_safe_checkpoint_hook']
