import errno
import os
import os.path as osp
import stat

import pytest
import torch
from mmengine.fileio import get_file_backend
from mmengine.runner import Runner
from toy_runner import toy_runner_cfg

from sasa_mmdet.engine import (AtomicLocalBackend, add_safe_checkpoint_hook,
                               write_atomically)


def _fail_fsync(fd):
    raise OSError(errno.ENOSPC, 'No space left on device (simulated)')


def test_local_paths_use_the_atomic_backend(tmp_path):
    assert type(get_file_backend(str(tmp_path / 'a.pth'))) is \
        AtomicLocalBackend
    assert type(get_file_backend(backend_args=dict(backend='local'))) is \
        AtomicLocalBackend


def test_failed_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    work_dir = str(tmp_path)
    runner = Runner.from_cfg(
        add_safe_checkpoint_hook(toy_runner_cfg(work_dir, max_epochs=1)))
    runner.train()
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    with open(ckpt, 'rb') as f:
        previous = f.read()
    files = sorted(os.listdir(work_dir))

    # the disk fills up after the new bytes are written, before the rename
    monkeypatch.setattr(os, 'fsync', _fail_fsync)
    for name in ('epoch_1.pth', 'epoch_2.pth'):
        with pytest.raises(OSError, match='simulated'):
            runner.save_checkpoint(work_dir, name)
    monkeypatch.undo()

    with open(ckpt, 'rb') as f:
        assert f.read() == previous
    # no partial epoch_2.pth, no temporary file left behind
    assert sorted(os.listdir(work_dir)) == files
    assert torch.load(ckpt, weights_only=True)['meta']['epoch'] == 1


def test_write_atomically_replaces_whole_files(tmp_path):
    path = tmp_path / 'sub' / 'file.txt'
    write_atomically('first', path)  # creates the folder
    write_atomically(b'second', path)
    assert path.read_bytes() == b'second'
    assert os.listdir(tmp_path / 'sub') == ['file.txt']
    # the permissions open() would give (umask applied), not mkstemp's 0o600
    plain = tmp_path / 'plain.txt'
    plain.write_text('x')
    assert stat.S_IMODE(path.stat().st_mode) == \
        stat.S_IMODE(plain.stat().st_mode)


def test_write_atomically_follows_symbolic_links(tmp_path):
    target = tmp_path / 'target.pth'
    link = tmp_path / 'latest.pth'
    target.write_bytes(b'old')
    link.symlink_to(target)
    write_atomically(b'new', link)
    assert link.is_symlink()
    assert target.read_bytes() == b'new'
