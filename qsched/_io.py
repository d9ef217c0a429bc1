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
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    except OSError as exc:  # read-only folder, permissions: name the target
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, path) from None
    try:
        os.close(fd)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; presets and images are shared files
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if exc.errno is None:
            raise
        # name the file the caller asked for, not the temporary one (disk full, read-only folder, permissions)
        raise type(exc)(exc.errno, exc.strerror, path) from None
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


class TextFileError(ValueError):
    """A text file the pack reads (preset, prompt file) is too large, too deeply nested or not UTF-8 text."""


#: Presets hold two vectors of at most 1000 numbers plus a little metadata.
PRESET_MAX_BYTES = 1 << 20
#: Prompt files: sDCI.yaml-sized lists with room to spare.
PROMPTS_MAX_BYTES = 32 << 20
#: Nesting of JSON/YAML brackets: presets need 3, prompt files 2.
MAX_NESTING = 32


def read_text_capped(path: str | os.PathLike, max_bytes: int, what: str) -> str:
    """UTF-8 text of ``path`` (a UTF-8 BOM is accepted), refused before reading when larger than ``max_bytes``;
    errors name the file. Raises ``FileNotFoundError`` or :class:`TextFileError`."""
    path = os.fspath(path)
    size = os.stat(path).st_size
    if size > max_bytes:
        raise TextFileError(f"{path}: {size:,} bytes is too large for a {what} (at most {max_bytes:,})")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we looked
        raise TextFileError(f"{path}: too large for a {what} (at most {max_bytes:,} bytes)")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TextFileError(f"{path}: the {what} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextFileError(f"{path}: the {what} is not UTF-8 text (invalid byte at offset {exc.start}); save it "
                            "as UTF-8") from None


def check_nesting(text: str, what: str, max_depth: int = MAX_NESTING) -> None:
    """Refuse JSON/YAML flow text nested deeper than ``max_depth`` brackets before it is parsed (the parsers
    recurse). Quoted strings are skipped, so brackets inside prompts do not count."""
    depth, quote, escape = 0, "", False
    for ch in text:
        if quote:
            if escape:
                escape = False
            elif ch == "\\" and quote == '"':
                escape = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise TextFileError(f"{what}: nested more than {max_depth} levels deep")
        elif ch in "]}":
            depth -= 1
        elif ch == "\n":
            quote = ""  # an unclosed quote (e.g. an apostrophe in plain YAML text) ends with its line
