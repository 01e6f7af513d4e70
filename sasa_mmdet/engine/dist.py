"""Multi-process training and testing on CPU (gloo).

mmengine 0.10.7 assumes an accelerator once a launcher is set: its
``init_dist`` calls ``torch.cuda.set_device`` and the runner wraps the model
in ``DistributedDataParallel(device_ids=[LOCAL_RANK])``; both fail on CPU,
and SyncBN has no CPU kernel. :func:`setup_cpu_distributed` prepares a
config so that the unchanged ``Runner`` works: it starts the gloo process
group itself (the runner then skips ``init_dist``), asks for a DDP wrapper
without device ids and replaces SyncBN by BN. On a GPU it does nothing.
"""
import atexit
import datetime
import logging
import os
import subprocess
import sys
from typing import Optional, Tuple

import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.device import get_device
from mmengine.dist import is_distributed
from mmengine.logging import print_log
from mmengine.registry import MODEL_WRAPPERS
from torch.nn.parallel import DistributedDataParallel

# Norm layer types (mmcv NORM_LAYERS names) that only run on GPUs.
_SYNC_BN_TYPES = ('SyncBN', 'MMSyncBN')
_DEFAULT_PORT = '29500'


def _rank_and_world_size(launcher: str,
                         port: Optional[int] = None) -> Tuple[int, int]:
    """Read rank and world size from the launcher's environment and set the
    variables ``init_method='env://'`` needs (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    env = os.environ
    if launcher == 'pytorch':  # torchrun sets everything
        pass
    elif launcher == 'slurm':
        env['RANK'] = env['SLURM_PROCID']
        env['WORLD_SIZE'] = env['SLURM_NTASKS']
        env['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {env["SLURM_NODELIST"]} | head -n1')
    elif launcher == 'mpi':
        env['RANK'] = env['OMPI_COMM_WORLD_RANK']
        env['WORLD_SIZE'] = env['OMPI_COMM_WORLD_SIZE']
        env['LOCAL_RANK'] = env['OMPI_COMM_WORLD_LOCAL_RANK']
        if 'MASTER_ADDR' not in env:
            raise KeyError('The environment variable MASTER_ADDR is not set')
    else:
        raise ValueError(f'Invalid launcher type: {launcher}')
    if port is not None:
        env['MASTER_PORT'] = str(port)
    env.setdefault('MASTER_PORT', _DEFAULT_PORT)
    return int(env['RANK']), int(env['WORLD_SIZE'])


_STARTED_GROUP = False


def init_cpu_dist(launcher: str,
                  backend: str = 'gloo',
                  timeout: Optional[float] = None,
                  port: Optional[int] = None,
                  init_backend: str = 'torch',
                  **kwargs) -> None:
    """Initialise the default process group for CPU processes.

    The counterpart of :func:`mmengine.dist.init_dist` without
    ``torch.cuda.set_device``. The group is destroyed when the interpreter
    exits.

    Args:
        launcher (str): ``'pytorch'`` (torchrun), ``'slurm'`` or ``'mpi'``.
        backend (str): Process group backend. Defaults to ``'gloo'``.
        timeout (float, optional): Collective timeout in seconds. Defaults
            to None (torch's default).
        port (int, optional): Master port (slurm configs use it). Defaults
            to None: ``MASTER_PORT`` or 29500.
        init_backend (str): Only ``'torch'`` is supported; the argument
            exists because mmengine's ``dist_cfg`` may name it. Defaults to
            ``'torch'``.
        **kwargs: Other arguments of
            :func:`torch.distributed.init_process_group`.
    """
    if init_backend != 'torch':
        raise ValueError('CPU processes only support init_backend="torch", '
                         f'got "{init_backend}"')
    rank, world_size = _rank_and_world_size(launcher, port)
    if timeout is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=timeout)
    torch_dist.init_process_group(
        backend=backend,
        init_method='env://',
        rank=rank,
        world_size=world_size,
        **kwargs)
    # Without it, gloo worker threads alive during interpreter finalization
    # can abort the process ("terminate called without an active
    # exception"; see pytorch/pytorch#179291).
    atexit.register(_destroy_process_group)
    global _STARTED_GROUP
    _STARTED_GROUP = True


def _destroy_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def finish_cpu_distributed() -> None:
    """End a CPU process group started by :func:`init_cpu_dist` and exit.

    Call it last in a tool's ``main``. Destroying the group at exit was not
    enough: gloo threads still alive while the interpreter tears down
    abort the process now and then ("terminate called without an active
    exception", pytorch/pytorch#179291), failing a run that finished. So
    every rank waits for the others, destroys the group, flushes its logs
    and leaves with ``os._exit(0)``, skipping the teardown. A no-op where
    this package did not start the group (GPU runs, single process).
    """
    if not (_STARTED_GROUP and torch_dist.is_initialized()):
        return
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _replace_sync_bn(cfg) -> int:
    """Turn SyncBN norm configs below ``cfg`` into BN; return how many."""
    count = 0
    if isinstance(cfg, dict):
        if cfg.get('type') in _SYNC_BN_TYPES:
            cfg['type'] = 'BN'
            count += 1
        for value in cfg.values():
            count += _replace_sync_bn(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            count += _replace_sync_bn(value)
    return count


def setup_cpu_distributed(cfg: Config) -> Config:
    """Prepare a runner config for multi-process CPU runs.

    Does nothing unless ``cfg.launcher`` is not ``'none'`` and mmengine runs
    on CPU. Then it

    * initialises the gloo process group (:func:`init_cpu_dist`) with the
      ``timeout`` of ``env_cfg.dist_cfg``, and records
      ``backend='gloo'`` there; the runner skips its own ``init_dist``;
    * sets ``model_wrapper_cfg.device_ids=None`` (by default
      ``MMDistributedDataParallel``), which CPU modules require;
    * replaces SyncBN norm layers in ``cfg.model`` by BN and drops
      ``cfg.sync_bn``, since SyncBN has no CPU kernel.

    Args:
        cfg (Config): A runner config with ``launcher`` set; changed in
            place.

    Returns:
        Config: ``cfg``.
    """
    if cfg.get('launcher', 'none') == 'none' or get_device() != 'cpu':
        return cfg
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    if not is_distributed():
        init_cpu_dist(cfg.launcher, **dist_cfg)

    wrapper_cfg = cfg.get('model_wrapper_cfg', None)
    if wrapper_cfg is None:
        wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper_type = wrapper_cfg.get('type', 'MMDistributedDataParallel')
    if isinstance(wrapper_type, str):
        wrapper_type = MODEL_WRAPPERS.get(wrapper_type)
    if isinstance(wrapper_type, type) and issubclass(wrapper_type,
                                                     DistributedDataParallel):
        wrapper_cfg['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper_cfg

    replaced = _replace_sync_bn(cfg.model)
    if replaced or cfg.get('sync_bn', None):
        cfg.sync_bn = None
        print_log(
            'SyncBN has no CPU kernel: using BN in each process instead',
            logger='current')
    return cfg
