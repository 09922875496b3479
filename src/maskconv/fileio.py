"""Atomic file writes, the one home for them (weights, checkpoints, run records, exports, the scenes JSON): the
data goes to a temporary file beside the target and is renamed over it only once it is on disk, so a crash
never leaves a half-written file under the real name (run folders delete stale ``.<name>.*.tmp`` files)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush ``tmp`` to disk, rename it over ``path``, then flush the folder entry (where the filesystem can)."""
    with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(Path(path).parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object]) -> Path:
    """Call ``write_fn(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the user's usual mode
        replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
