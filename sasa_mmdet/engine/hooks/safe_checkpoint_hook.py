from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..checkpoint import decode_checkpoint, encode_checkpoint


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Write checkpoints that load with ``torch.load(weights_only=True)``.

    mmengine stores numpy arrays, numpy scalars and
    :class:`~mmengine.logging.HistoryBuffer` objects in a checkpoint's
    ``meta`` and ``message_hub``; torch >= 2.6 refuses to unpickle them by
    default. Before each save this hook rewrites them as tensors and plain
    values (:func:`~sasa_mmdet.engine.encode_checkpoint`), and after each
    load it restores them (:func:`~sasa_mmdet.engine.decode_checkpoint`), so
    ``Runner.resume`` gets back the logged history. It runs last
    (``VERY_LOW``) so that values other hooks add before saving are
    rewritten too.

    ``tools/train.py`` and ``tools/test.py`` add it to every config through
    :func:`add_safe_checkpoint_hook`.

    Examples:
        >>> custom_hooks = [dict(type='SafeCheckpointHook')]
    """

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        encode_checkpoint(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        decode_checkpoint(checkpoint)


def add_safe_checkpoint_hook(cfg: Config) -> Config:
    """Append :class:`SafeCheckpointHook` to ``cfg.custom_hooks`` unless it
    is there already.

    Args:
        cfg (Config): A runner config; changed in place.

    Returns:
        Config: ``cfg``.
    """
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(
            hook.get('type') in ('SafeCheckpointHook', SafeCheckpointHook)
            for hook in hooks):
        hooks.append(dict(type='SafeCheckpointHook'))
    cfg.custom_hooks = hooks
    return cfg
