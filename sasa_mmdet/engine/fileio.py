"""Atomic writes of local files for mmengine 0.10.7.

mmengine writes a checkpoint with ``open(path, 'wb').write(data)``
(:class:`~mmengine.fileio.LocalBackend`): a run killed during the write, or
a full disk, leaves a truncated file under the final name, and when the
name already existed (a resumed run saving ``epoch_N.pth`` again, a "best"
checkpoint) the previous, complete file is gone as well.

:class:`AtomicLocalBackend` writes to a temporary file in the same folder,
flushes it to disk and renames it over the final name (``os.replace``, atomic
on POSIX and Windows): the final name holds either the previous file or the
complete new one, never a partial one. A write that fails removes its
temporary file; a process killed while writing leaves a hidden
``.<name>.<random>.tmp`` file beside it and the final name untouched.

:func:`register_atomic_local_backend` makes it mmengine's backend for local
paths (the ``''`` prefix and the name ``'local'``), so
``Runner.save_checkpoint``, ``mmengine.dump`` and every other writer that
goes through :func:`~mmengine.fileio.get_file_backend` use it. It is
registered when ``sasa_mmdet`` is imported.
"""
import os
import os.path as osp
import uuid
from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend


def write_atomically(data: Union[bytes, str],
                     filepath: Union[str, Path],
                     encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``filepath`` through a temporary file and a rename.

    Args:
        data (bytes | str): The content; ``str`` is encoded with
            ``encoding``.
        filepath (str | Path): The final path. Missing folders are created;
            a symbolic link is followed, like ``open`` does.
        encoding (str): Encoding of ``str`` data. Defaults to 'utf-8'.
    """
    if isinstance(data, str):
        data = data.encode(encoding)
    filepath = osp.realpath(filepath)
    folder, name = osp.split(filepath)
    os.makedirs(folder, exist_ok=True)
    # same folder, so the rename never crosses a file system
    tmp_path = osp.join(folder, f'.{name}.{uuid.uuid4().hex}.tmp')
    try:
        # 'x': a new file with open()'s usual permissions (0o666 & ~umask)
        with open(tmp_path, 'xb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, filepath)
    except BaseException:
        if osp.exists(tmp_path):
            os.remove(tmp_path)
        raise


class AtomicLocalBackend(LocalBackend):
    """:class:`~mmengine.fileio.LocalBackend` whose ``put`` and ``put_text``
    replace the file atomically (see :func:`write_atomically`)."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        """Write bytes to ``filepath`` atomically.

        Args:
            obj (bytes): Data to be written.
            filepath (str | Path): Path to write data.
        """
        write_atomically(obj, filepath)

    def put_text(self,
                 obj: str,
                 filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        """Write text to ``filepath`` atomically.

        Args:
            obj (str): Text to be written.
            filepath (str | Path): Path to write data.
            encoding (str): The encoding of the text. Defaults to 'utf-8'.
        """
        write_atomically(obj, filepath, encoding)


def register_atomic_local_backend() -> None:
    """Make :class:`AtomicLocalBackend` mmengine's backend for local paths."""
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
