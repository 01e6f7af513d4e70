from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..checkpoint import (check_checkpoint_fits, decode_checkpoint,
                          encode_checkpoint)
from .add_hook import add_custom_hook


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Write checkpoints that load with ``torch.load(weights_only=True)``,
    and refuse checkpoints that do not fit the model.

    mmengine stores numpy arrays, numpy scalars and
    :class:`~mmengine.logging.HistoryBuffer` objects in a checkpoint's
    ``meta`` and ``message_hub``; torch >= 2.6 refuses to unpickle them by
    default. Before each save this hook rewrites them as tensors and plain
    values (:func:`~sasa_mmdet.engine.encode_checkpoint`), and after each
    load it restores them (:func:`~sasa_mmdet.engine.decode_checkpoint`), so
    ``Runner.resume`` gets back the logged history. It runs last
    (``VERY_LOW``) so that values other hooks add before saving are
    rewritten too.

    Every load through the runner (``load_from``, ``resume``,
    ``tools/test.py CKPT``) is checked before any tensor is copied: a
    checkpoint whose tensor names or shapes differ from the model's raises a
    :class:`~sasa_mmdet.engine.CheckpointMismatchError` naming them, where
    mmengine would load what fits and log a warning.
    ``init_cfg=dict(type='Pretrained', ...)`` does not go through the runner
    and keeps its partial loading (the convolution-to-attention
    initialisation, which :class:`~sasa_mmdet.models.SASAResNet` reports).

    ``tools/train.py`` and ``tools/test.py`` add it to every config through
    :func:`add_safe_checkpoint_hook`.

    Args:
        allow_partial_load (bool): Skip the check and let mmengine load the
            tensors that fit (e.g. to fine-tune a detector trained with
            other classes). Defaults to False.

    Examples:
        >>> custom_hooks = [dict(type='SafeCheckpointHook')]
    """

    priority = 'VERY_LOW'

    def __init__(self, allow_partial_load: bool = False) -> None:
        if not isinstance(allow_partial_load, bool):
            raise ValueError('allow_partial_load must be a bool, got '
                             f'{allow_partial_load!r}')
        self.allow_partial_load = allow_partial_load

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        encode_checkpoint(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # The runner calls this before it copies the weights into the model.
        decode_checkpoint(checkpoint)
        if not self.allow_partial_load:
            check_checkpoint_fits(runner.model, checkpoint)


def add_safe_checkpoint_hook(cfg: Config) -> Config:
    """Append :class:`SafeCheckpointHook` to ``cfg.custom_hooks`` unless it
    is there already.

    Args:
        cfg (Config): A runner config; changed in place.

    Returns:
        Config: ``cfg``.
    """
    return add_custom_hook(cfg, SafeCheckpointHook)
