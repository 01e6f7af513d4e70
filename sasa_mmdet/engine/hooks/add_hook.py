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
