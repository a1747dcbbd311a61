"""Writing a file all or nothing, so that a crash or Ctrl-C never leaves a half-written file under the real name.

    with replacing(path) as tmp:      # write tmp (any writer: safetensors, PIL, bytes …)
        save_file(tensors, tmp)
    write_atomically(path, data)      # the same for bytes in memory

The new content goes to `<name>.partial` in the same folder (so the rename stays on one file system), is fsync'ed
(its bytes are on disk before its name is), then `os.replace`d over `path` (atomic on POSIX and Windows), and the
folder is fsync'ed (the new name itself survives a power cut). Killed at any point, `path` holds either the old bytes
or the new ones; an exception removes the temporary file. The new file gets the permissions a plain `open(path, "w")`
would give it (the old file's mode when it replaces one, else 0o666 minus the umask): some writers, the safetensors
library among them, create their files readable by their owner only.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write; on leaving without an exception it replaces `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """`path` ← `data`, all or nothing (see the module docstring)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _mode_for(path: Path) -> int:
    """The permission bits `path` keeps if it exists, else those a new file gets under the current umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)   # reading the umask means setting it; put it back at once
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(path: Path, flags: int) -> None:
    """fsync a file or a folder (Windows cannot open folders, some file systems refuse: nothing to do then)."""
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
