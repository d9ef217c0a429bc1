"""File writing and hashing shared by the whole pack: one atomic write, one file hash.

``atomic_write(path, write)``: ``write(tmp)`` fills a temporary file in the target's folder, which is fsynced and
renamed over ``path`` -- a crash never leaves a half-written or truncated file, and an existing file keeps its
permissions (a new one gets 0666 minus the umask, like ``open(path, "w")``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable

CHUNK = 1 << 22


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Call ``write(tmp_path)`` to fill a temporary file, fsync it, rename it to ``path``; returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        os.close(fd)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; presets and images are shared files
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def update_from_file(h, path: str | os.PathLike, chunk: int = CHUNK):
    """Feed the bytes of ``path`` into the hash object ``h`` (streamed); returns ``h``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    return update_from_file(hashlib.sha256(), path).hexdigest()


def _file_mode(path: str) -> int:
    """Keep an existing file's permissions; a new file gets 0666 minus the umask, like open(path, "w")."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
