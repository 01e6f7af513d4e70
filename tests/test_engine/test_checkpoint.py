import copy
import os
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmdet.models import DetTTAModel
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner, load_checkpoint
from toy_runner import ToyModel, toy_runner_cfg

from sasa_mmdet.engine import (CheckpointMismatchError, SafeCheckpointHook,
                               UnsafeCheckpointError, add_safe_checkpoint_hook,
                               check_checkpoint_fits, decode_checkpoint,
                               encode_checkpoint)


class _RunsShellCommand:
    """Unpickling this calls ``os.system`` (what a malicious file does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


def _train(work_dir, max_epochs, resume=False, safe=True):
    cfg = toy_runner_cfg(work_dir, max_epochs=max_epochs, resume=resume)
    if safe:
        add_safe_checkpoint_hook(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def test_runner_checkpoint_is_weights_only_and_resumes(tmp_path):
    work_dir = str(tmp_path)
    first = _train(work_dir, max_epochs=1)
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    # nothing beyond torch's weights-only defaults: no numpy, HistoryBuffer
    # or getattr
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    iters_per_epoch = first.iter
    weights = first.model.linear.weight.detach().clone()

    resumed = Runner.from_cfg(
        add_safe_checkpoint_hook(
            toy_runner_cfg(work_dir, max_epochs=2, resume=True)))
    resumed.load_or_resume()
    assert resumed.epoch == 1 and resumed.iter == iters_per_epoch
    assert torch.equal(resumed.model.linear.weight, weights)
    # the logged history came back as HistoryBuffers
    loss_history = resumed.message_hub.get_scalar('train/loss')
    assert isinstance(loss_history, HistoryBuffer)
    assert len(loss_history.data[0]) == iters_per_epoch

    resumed.train()
    assert resumed.epoch == 2 and resumed.iter == 2 * iters_per_epoch
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))


def test_plain_mmengine_checkpoint_is_refused_by_name(tmp_path):
    # without SafeCheckpointHook mmengine pickles HistoryBuffer objects and
    # numpy values; loading must stay weights-only and say what it refused
    _train(str(tmp_path), max_epochs=1, safe=False)
    ckpt = osp.join(str(tmp_path), 'epoch_1.pth')
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(nn.Linear(2, 1), ckpt)
    assert ckpt in str(info.value)
    assert ('mmengine.logging.history_buffer.HistoryBuffer'
            in info.value.unsafe_globals)


def test_mmengine_alone_cannot_load_its_own_checkpoints_on_this_torch(tmp_path):
    """Why the weights-only loader and SafeCheckpointHook exist: mmengine
    0.10.7's own local loader calls ``torch.load`` with torch's default
    ``weights_only`` (True since torch 2.6), which refuses the
    HistoryBuffers and numpy values mmengine itself writes into
    ``message_hub``, so ``--resume`` fails (measured on torch 2.14.1).
    If this test fails, mmengine or torch changed and the workaround may no
    longer be needed."""
    import pickle

    from mmengine.runner import checkpoint as mmengine_checkpoint
    from mmengine.runner.checkpoint import CheckpointLoader

    from sasa_mmdet.engine import checkpoint as ours
    from sasa_mmdet.engine import load_weights_only

    # the runner's local scheme is ours, mmengine's own function is still there
    assert CheckpointLoader._schemes[''] is ours.load_from_local
    assert mmengine_checkpoint.load_from_local is not ours.load_from_local

    _train(str(tmp_path / 'plain'), max_epochs=1, safe=False)
    plain = str(tmp_path / 'plain' / 'epoch_1.pth')
    for load in (torch.load,
                 lambda f: mmengine_checkpoint.load_from_local(f, None)):
        with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
            load(plain)
    # the file itself is fine: only the weights-only default refuses it
    # (our own file, so unpickling it in full is safe here)
    full = torch.load(plain, weights_only=False)
    assert isinstance(full['message_hub']['log_scalars']['train/loss'],
                      HistoryBuffer)

    # with SafeCheckpointHook the same run writes a file that torch's
    # default, mmengine's own loader and ours all load
    _train(str(tmp_path / 'safe'), max_epochs=1)
    safe = str(tmp_path / 'safe' / 'epoch_1.pth')
    for load in (torch.load, load_weights_only,
                 lambda f: mmengine_checkpoint.load_from_local(f, None)):
        loaded = load(safe)
        assert torch.equal(loaded['state_dict']['linear.weight'],
                           full['state_dict']['linear.weight'])


@pytest.mark.parametrize('zipfile', [True, False])
def test_checkpoint_with_code_is_refused(tmp_path, zipfile):
    marker = tmp_path / 'code_ran'
    ckpt = str(tmp_path / 'evil.pth')
    torch.save(
        dict(state_dict=dict(), payload=_RunsShellCommand(str(marker))),
        ckpt,
        _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(nn.Linear(2, 1), ckpt)
    message = str(info.value)
    assert ckpt in message
    assert any(name.endswith('.system') for name in info.value.unsafe_globals)
    assert 'system' in message
    assert not marker.exists()


def test_third_party_state_dict_loads(tmp_path):
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    nn.init.normal_(source[0].weight)
    plain = str(tmp_path / 'plain.pth')
    wrapped = str(tmp_path / 'wrapped.pth')
    torch.save(source.state_dict(), plain)
    torch.save(
        dict(state_dict=source.state_dict(), meta=dict(epoch=3)), wrapped)
    for path in (plain, wrapped):
        target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        load_checkpoint(target, path, strict=True)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def test_encode_decode_round_trip():
    history = HistoryBuffer([0.5, 0.25], [1, 2], max_length=10)
    checkpoint = dict(
        meta=dict(seed=np.int64(7), palette=[(1, 2, 3)]),
        message_hub=dict(
            log_scalars=dict(loss=history),
            runtime_info=dict(eta=np.float64(1.5), arr=np.arange(3))),
        state_dict=dict(w=torch.ones(1)))
    encode_checkpoint(checkpoint)
    assert type(checkpoint['meta']['seed']) is int
    assert type(checkpoint['message_hub']['runtime_info']['eta']) is float
    assert isinstance(checkpoint['message_hub']['log_scalars']['loss'], dict)

    decode_checkpoint(checkpoint)
    restored = checkpoint['message_hub']['log_scalars']['loss']
    assert isinstance(restored, HistoryBuffer)
    assert restored.max_length == 10
    np.testing.assert_array_equal(restored.data[0], [0.5, 0.25])
    np.testing.assert_array_equal(restored.data[1], [1, 2])
    np.testing.assert_array_equal(
        checkpoint['message_hub']['runtime_info']['arr'], np.arange(3))
    assert checkpoint['meta'] == dict(seed=7, palette=[(1, 2, 3)])


def test_encode_refuses_object_arrays():
    checkpoint = dict(meta=dict(bad=np.array([object()])))
    with pytest.raises(TypeError, match='meta.bad'):
        encode_checkpoint(checkpoint)


def _toy_checkpoint(tmp_path, **state_dict_changes):
    """epoch_1.pth of a toy run with ``state_dict`` entries replaced (a value
    of None removes the entry), saved as ``tmp_path/changed.pth``."""
    _train(str(tmp_path / 'trained'), max_epochs=1)
    checkpoint = torch.load(
        tmp_path / 'trained' / 'epoch_1.pth', weights_only=True)
    for key, value in state_dict_changes.items():
        if value is None:
            del checkpoint['state_dict'][key]
        else:
            checkpoint['state_dict'][key] = value
    path = str(tmp_path / 'changed.pth')
    torch.save(checkpoint, path)
    return path, checkpoint


@pytest.mark.parametrize('resume', [False, True])
def test_checkpoint_that_does_not_fit_is_refused(tmp_path, resume):
    # the toy model is Linear(2, 1) (+ a BatchNorm2d(1) named norm)
    ckpt, _ = _toy_checkpoint(
        tmp_path,
        **{
            'linear.weight': torch.zeros(1, 3),
            'linear.bias': None,
            'head.weight': torch.zeros(2)
        })
    runner = Runner.from_cfg(
        add_safe_checkpoint_hook(
            toy_runner_cfg(
                str(tmp_path / 'run'), load_from=ckpt, resume=resume)))
    before = copy.deepcopy(runner.model.state_dict())
    with pytest.raises(CheckpointMismatchError) as info:
        runner.load_or_resume()
    message = str(info.value)
    assert 'linear.weight: checkpoint (1, 3) vs model (1, 2)' in message
    assert 'Not in the checkpoint (1): linear.bias' in message
    assert 'Not in the model (1): head.weight' in message
    assert info.value.mismatched == [('linear.weight', (1, 3), (1, 2))]
    # refused before anything was copied into the model
    for key, value in runner.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_allow_partial_load_loads_what_fits(tmp_path):
    ckpt, checkpoint = _toy_checkpoint(
        tmp_path, **{'linear.weight': torch.zeros(1, 3)})
    cfg = toy_runner_cfg(
        str(tmp_path / 'run'),
        load_from=ckpt,
        custom_hooks=[
            dict(type='SafeCheckpointHook', allow_partial_load=True)
        ])
    runner = Runner.from_cfg(add_safe_checkpoint_hook(cfg))
    assert sum(isinstance(h, SafeCheckpointHook) for h in runner.hooks) == 1
    weight = runner.model.linear.weight.detach().clone()
    runner.load_or_resume()  # mmengine's partial load: what fits is copied
    assert torch.equal(runner.model.linear.bias,
                       checkpoint['state_dict']['linear.bias'])
    assert torch.equal(runner.model.linear.weight, weight)


def test_check_checkpoint_fits_like_the_runner_loads():
    # tools/test.py --tta loads into the model inside the TTA model
    toy = ToyModel()
    check_checkpoint_fits(
        DetTTAModel(module=toy), dict(state_dict=toy.state_dict()))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    # the runner strips DDP's prefix from checkpoint keys
    state_dict = {f'module.{k}': v for k, v in model.state_dict().items()}
    check_checkpoint_fits(model, dict(state_dict=state_dict))
    # BatchNorm's counter may be missing (older checkpoints)
    del state_dict['module.1.num_batches_tracked']
    check_checkpoint_fits(model, state_dict)
    state_dict['module.0.bias'] = torch.zeros(5)
    with pytest.raises(CheckpointMismatchError, match=r'0\.bias'):
        check_checkpoint_fits(model, state_dict)


def test_safe_checkpoint_hook_bad_argument():
    with pytest.raises(ValueError, match='allow_partial_load'):
        SafeCheckpointHook(allow_partial_load='yes')
