import numpy as np
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner.utils import set_random_seed

from .add_hook import add_custom_hook


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Seed the global random generators at the start of every training
    epoch, so that a resumed run draws what an uninterrupted one draws.

    mmengine 0.10.7 seeds Python's, numpy's and torch's generators once,
    when the runner is built, and does not store their states in
    checkpoints. Everything drawn in the training process (random
    augmentations of a data loader with ``num_workers=0``, the data loader's
    worker base seed, dropout) therefore continues the stream of the epochs
    before in an uninterrupted run, but restarts from the runner's seed in a
    resumed one. This hook reseeds all three before each epoch (and the
    accelerator's generator) from ``(runner.seed, epoch)`` through numpy's
    ``SeedSequence``, so each epoch's draws depend only on the seed and the
    epoch. The sampler's shuffling already does (``DefaultSampler`` shuffles
    with ``seed + epoch``), and mmengine seeds data-loader workers with the
    same fixed seed every epoch, so with both a run resumed from an
    end-of-epoch checkpoint trains on exactly the same batches.

    Not covered: ``persistent_workers=True`` with ``num_workers > 0`` (the
    workers' generators run on across epochs in an uninterrupted run but
    start afresh in a resumed one), and checkpoints saved in the middle of
    an epoch of an ``EpochBasedTrainLoop`` (mmengine restarts that epoch).

    ``tools/train.py`` adds it to every config through
    :func:`add_epoch_seed_hook`.

    Examples:
        >>> custom_hooks = [dict(type='EpochSeedHook')]
    """

    # before other hooks' before_train_epoch, so that they draw from the
    # reseeded generators too
    priority = 'VERY_HIGH'

    def before_train_epoch(self, runner) -> None:
        seed = np.random.SeedSequence([runner.seed,
                                       runner.epoch]).generate_state(1)[0]
        set_random_seed(int(seed))


def add_epoch_seed_hook(cfg: Config) -> Config:
    """Append :class:`EpochSeedHook` to ``cfg.custom_hooks`` unless it is
    there already.

    Args:
        cfg (Config): A runner config; changed in place.

    Returns:
        Config: ``cfg``.
    """
    return add_custom_hook(cfg, EpochSeedHook)
