from mmengine.config import Config


def add_custom_hook(cfg: Config, hook_cls: type) -> Config:
    """Append ``dict(type=hook_cls.__name__)`` to ``cfg.custom_hooks`` unless
    a hook of that type (by name or class) is there already.

    Args:
        cfg (Config): A runner config; changed in place.
        hook_cls (type): A hook class registered under its own name.

    Returns:
        Config: ``cfg``.
    """
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(hook.get('type') in (hook_cls.__name__, hook_cls) for hook in hooks):
        hooks.append(dict(type=hook_cls.__name__))
    cfg.custom_hooks = hooks
    return cfg


RUNTIME_HOOKS = ('SafeCheckpointHook', 'EpochSeedHook')


def missing_runtime_hooks(cfg: Config, needed=RUNTIME_HOOKS) -> list:
    """The hooks of ``needed`` that ``cfg.custom_hooks`` does not list.

    The configs of this repository list both through
    ``configs/_base_/sasa_runtime.py``; the tools only report what a config
    of your own lacks, they add nothing.

    Args:
        cfg (Config): A runner config.
        needed (Sequence[str]): Hook type names. Default: SafeCheckpointHook
            (weights-only, atomic, fit-checked checkpoints) and EpochSeedHook
            (exact resume).

    Returns:
        list[str]: The missing names, in the order of ``needed``.
    """
    listed = set()
    for hook in cfg.get('custom_hooks', None) or []:
        hook_type = hook.get('type')
        listed.add(hook_type if isinstance(hook_type, str) else
                   getattr(hook_type, '__name__', None))
    return [name for name in needed if name not in listed]


def runtime_hooks_warning(missing: list) -> str:
    """What a run loses without the hooks in ``missing``, and the fix."""
    losses = {
        'SafeCheckpointHook':
        'checkpoints are not checked to fit the model, nor written '
        'atomically and for torch.load(weights_only=True)',
        'EpochSeedHook': '--resume does not continue exactly',
    }
    return (f'The config does not list {", ".join(missing)} in custom_hooks: '
            + '; '.join(losses[name] for name in missing if name in losses) +
            ". Inherit configs/_base_/sasa_runtime.py (or add "
            "dict(type='SafeCheckpointHook'), dict(type='EpochSeedHook') to "
            'custom_hooks) to have them.')
