"""Weights-only checkpoint loading for mmengine on torch >= 2.6.

torch >= 2.6 unpickles with ``weights_only=True`` by default: only tensors,
plain Python containers and an allow-list of torch types may appear in a
file. Checkpoints written by mmengine 0.10.7's ``Runner`` do not qualify:
their message hub holds :class:`~mmengine.logging.HistoryBuffer` objects
(numpy arrays inside, and a pickled ``getattr`` of the class's statistics
methods) and numpy scalars such as ``eta``. So ``--resume`` and
``tools/test.py CKPT`` fail, and turning the safety off for every file would
let any checkpoint run code.

This module fixes that at the two narrowest points instead:

* :func:`encode_checkpoint` (applied by
  :class:`~sasa_mmdet.engine.hooks.SafeCheckpointHook` just before a run
  saves) rewrites the numpy and ``HistoryBuffer`` values of the ``meta`` and
  ``message_hub`` entries as tensors, plain Python values and tagged dicts;
  :func:`decode_checkpoint` (the same hook, right after a load) restores
  them. A checkpoint written this way holds only types that torch's
  weights-only unpickler allows by default (``dict``, ``OrderedDict``,
  ``Counter`` for scheduler milestones, tensors), so no extra global has to
  be allow-listed.
* :func:`load_from_local` replaces mmengine's loader for local paths (the
  ``''`` scheme of :class:`~mmengine.runner.CheckpointLoader`, used by
  ``Runner.resume``, ``Runner.load_checkpoint``, ``load_checkpoint`` and
  ``init_cfg=dict(type='Pretrained')``). It always loads with
  ``weights_only=True``; a file holding any other global, e.g. a pickled
  ``os.system`` call, is refused with an :class:`UnsafeCheckpointError` that
  names the file and the offending globals. Plain third-party state dicts
  load as before. The other schemes (``http://``, ``torchvision://``...)
  already load with torch's weights-only default.

It is registered when ``sasa_mmdet`` is imported.

:func:`check_checkpoint_fits` (run by the same hook after every load
through the runner: ``load_from``, ``--resume``, ``tools/test.py CKPT``)
refuses a checkpoint whose tensors do not fit the model. mmengine loads such
a file in part and only logs a warning.
"""
import os.path as osp
import pickle
import re
from collections import OrderedDict
from typing import Any, Callable, List, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner import CheckpointLoader

# Marks a value that encode_checkpoint rewrote; holds the original type.
_TAG = '__sasa_mmdet_type__'
# Top-level checkpoint entries that mmengine fills with non-tensor objects.
_ENCODED_KEYS = ('meta', 'message_hub')


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that weights-only loading refuses.

    Args:
        filename (str): The checkpoint file.
        unsafe_globals (list[str]): The refused globals, e.g.
            ``['posix.system']``.
        reason (str): torch's own error message. Defaults to ''.
    """

    def __init__(self,
                 filename: str,
                 unsafe_globals: List[str],
                 reason: str = '') -> None:
        self.filename = filename
        self.unsafe_globals = unsafe_globals
        names = ', '.join(unsafe_globals) or 'unknown (see below)'
        message = (
            f'Refusing to load checkpoint "{filename}": it holds Python '
            f'objects that weights-only loading does not allow: {names}. '
            'sasa_mmdet loads every checkpoint with torch.load('
            'weights_only=True); checkpoints written by sasa_mmdet runs '
            '(SafeCheckpointHook) hold only tensors and plain values. If you '
            'trust this file, load it once yourself with '
            'torch.load(path, weights_only=False) and save its tensors '
            '(e.g. its "state_dict") to a new file.')
        if reason:
            message += f'\ntorch said: {reason}'
        super().__init__(message)


def _unsafe_globals(filename: str, error: Exception) -> List[str]:
    """Globals in ``filename`` that the weights-only unpickler refuses."""
    try:
        # lists every global torch does not allow by default (zip files only)
        return torch.serialization.get_unsafe_globals_in_checkpoint(filename)
    except Exception:  # legacy (non-zip) format: parse torch's message
        return sorted(set(re.findall(r'GLOBAL (\S+)', str(error))))


def load_weights_only(filename: str,
                      map_location: Union[str, Callable, None] = None) -> Any:
    """``torch.load`` a local file with ``weights_only=True``.

    Args:
        filename (str): Path of the checkpoint.
        map_location (str | callable, optional): Same as in
            :func:`torch.load`. Defaults to None.

    Returns:
        The unpickled object, usually a dict.

    Raises:
        UnsafeCheckpointError: If the file holds a global that torch's
            weights-only unpickler does not allow.
    """
    try:
        return torch.load(
            filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(filename, _unsafe_globals(filename, error),
                                    str(error)) from None


def load_from_local(filename: str,
                    map_location: Union[str, Callable, None] = None) -> Any:
    """Weights-only replacement of mmengine's ``load_from_local``.

    Args:
        filename (str): Local checkpoint path (``~`` is expanded).
        map_location (str | callable, optional): Same as in
            :func:`torch.load`. Defaults to None.

    Returns:
        dict | OrderedDict: The loaded checkpoint.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return load_weights_only(filename, map_location)


def register_weights_only_loader() -> None:
    """Make :func:`load_from_local` mmengine's loader for local paths."""
    CheckpointLoader.register_scheme(
        prefixes='', loader=load_from_local, force=True)


def _encode(value: Any, path: str) -> Any:
    """Rewrite numpy and HistoryBuffer values below ``value`` (recursive)."""
    if isinstance(value, HistoryBuffer):
        log_history, count_history = value.data
        return {
            _TAG: 'HistoryBuffer',
            'log_history': _encode(log_history, path),
            'count_history': _encode(count_history, path),
            'max_length': value.max_length,
        }
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f'cannot store the object array at "{path}" in a '
                            'weights-only checkpoint')
        return {_TAG: 'ndarray', 'data': torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        # dict subclasses other than OrderedDict would need an allow-list
        out_type = OrderedDict if isinstance(value, OrderedDict) else dict
        return out_type(
            (k, _encode(v, f'{path}.{k}')) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_encode(v, f'{path}[{i}]')
                           for i, v in enumerate(value))
    return value


def _decode(value: Any) -> Any:
    """Inverse of :func:`_encode` (recursive)."""
    if isinstance(value, dict):
        kind = value.get(_TAG)
        if kind == 'HistoryBuffer':
            return HistoryBuffer(
                _decode(value['log_history']), _decode(value['count_history']),
                value['max_length'])
        if kind == 'ndarray':
            return value['data'].numpy()
        return type(value)((k, _decode(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_decode(v) for v in value)
    return value


def encode_checkpoint(checkpoint: dict) -> None:
    """Make a runner checkpoint loadable with ``weights_only=True``, in place.

    In its ``meta`` and ``message_hub`` entries, numpy scalars become Python
    scalars, and numpy arrays and :class:`~mmengine.logging.HistoryBuffer`
    objects become tagged dicts of tensors that :func:`decode_checkpoint`
    turns back. Other entries (weights, optimizer and scheduler states) are
    left as they are.

    Args:
        checkpoint (dict): The checkpoint ``Runner.save_checkpoint`` is about
            to write.
    """
    for key in _ENCODED_KEYS:
        if key in checkpoint:
            checkpoint[key] = _encode(checkpoint[key], key)


def decode_checkpoint(checkpoint: dict) -> None:
    """Undo :func:`encode_checkpoint` in place; other checkpoints are left
    unchanged.

    Args:
        checkpoint (dict): A loaded checkpoint.
    """
    for key in _ENCODED_KEYS:
        if key in checkpoint:
            checkpoint[key] = _decode(checkpoint[key])


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's tensors do not fit the model it is loaded into.

    Args:
        mismatched (list[tuple]): ``(key, checkpoint shape, model shape)``
            of the tensors whose shapes differ.
        missing (list[str]): Model tensors the checkpoint does not hold.
        unexpected (list[str]): Checkpoint tensors the model does not have.
    """

    def __init__(self, mismatched: List[Tuple[str, tuple, tuple]],
                 missing: List[str], unexpected: List[str]) -> None:
        self.mismatched = mismatched
        self.missing = missing
        self.unexpected = unexpected
        lines = ['The checkpoint does not fit the model; nothing was loaded.']
        if mismatched:
            lines.append(f'Shapes differ ({len(mismatched)}): ' + ', '.join(
                f'{key}: checkpoint {ckpt_shape} vs model {model_shape}'
                for key, ckpt_shape, model_shape in mismatched))
        if missing:
            lines.append(f'Not in the checkpoint ({len(missing)}): ' +
                         ', '.join(missing))
        if unexpected:
            lines.append(f'Not in the model ({len(unexpected)}): ' +
                         ', '.join(unexpected))
        lines.append(
            'Check that the config builds the model the checkpoint was '
            'trained with. To start from part of a checkpoint on purpose, '
            "use init_cfg=dict(type='Pretrained', checkpoint=...) or "
            "dict(type='SafeCheckpointHook', allow_partial_load=True) in "
            'custom_hooks.')
        super().__init__('\n'.join(lines))


def check_checkpoint_fits(
    model: torch.nn.Module,
    checkpoint: dict,
    revise_keys: Sequence[Tuple[str, str]] = ((r'^module\.', ''), )
) -> None:
    """Raise unless ``checkpoint`` fills every tensor of ``model`` exactly.

    Compares names and shapes the way mmengine's ``Runner.load_checkpoint``
    will load them: the ``state_dict`` entry (or the whole dict), keys
    revised by ``revise_keys``, into the model inside model wrappers (DDP)
    and test-time-augmentation models. BatchNorm's
    ``num_batches_tracked`` counters may be missing (older checkpoints).

    Args:
        model (nn.Module): The model (or a model wrapper, or a TTA model).
        checkpoint (dict): The loaded checkpoint.
        revise_keys (Sequence[tuple[str, str]]): ``(pattern, replacement)``
            regular expressions applied to the checkpoint's keys. Defaults
            to stripping DDP's ``module.`` prefix, as the runner does.

    Raises:
        CheckpointMismatchError: Naming the tensors whose shapes differ, the
            model tensors missing from the checkpoint and the checkpoint
            tensors the model does not have.
    """
    # mmengine's loader loads into what these wrap
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    state_dict = checkpoint.get('state_dict', checkpoint)
    given = {}
    for key, value in state_dict.items():
        for pattern, replacement in revise_keys:
            key = re.sub(pattern, replacement, key)
        given[key] = value
    own = model.state_dict()
    mismatched = [(key, tuple(given[key].shape), tuple(value.shape))
                  for key, value in own.items()
                  if key in given and torch.is_tensor(given[key])
                  and given[key].shape != value.shape]
    missing = [
        key for key in own
        if key not in given and not key.endswith('num_batches_tracked')
    ]
    unexpected = [key for key in given if key not in own]
    if mismatched or missing or unexpected:
        raise CheckpointMismatchError(mismatched, missing, unexpected)
