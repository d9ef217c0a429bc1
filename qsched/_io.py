"""File writing and hashing shared by the whole pack: one atomic write, one file hash.

``atomic_write(path, write)``: ``write(tmp)`` fills a temporary file in the target's folder, which is fsynced and
renamed over ``path`` -- a crash never leaves a half-written or truncated file, and an existing file keeps its
permissions (a new one gets 0666 minus the umask, like ``open(path, "w")``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

CHUNK = 1 << 22


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Call ``write(tmp_path)`` to fill a temporary file, fsync it, rename it to ``path``; returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=os.path.basename(path), dir=folder)
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


TEMP_PREFIX = ".tmp-"


def remove_stale_temp_files(path: str | os.PathLike, every: bool = False) -> None:
    """Remove the temporary files of ``path``'s atomic writes that a killed writer left (``.tmp-<pid>-*<name>``
    whose process is gone; ``every``: all of them, for a caller holding the file's lock). Files of live writers
    and files that cannot be removed (permissions) are left alone: they are hidden from every list anyway."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for f in entries:
        if not (f.startswith(TEMP_PREFIX) and f.endswith(name) and len(f) > len(TEMP_PREFIX) + len(name)):
            continue
        pid = f[len(TEMP_PREFIX):].split("-", 1)[0]
        if not every and pid.isdigit() and _alive(int(pid)):
            continue
        if not every and not pid.isdigit():  # written before temp names carried the pid: only when old
            try:
                if time.time() - os.lstat(os.path.join(folder, f)).st_mtime < 3600:
                    continue
            except OSError:
                continue
        try:
            os.unlink(os.path.join(folder, f))
        except OSError:
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or the platform cannot tell: keep the file
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


class NotRegularFile(ValueError):
    """A path the pack reads or writes is a FIFO, device, folder or (where links are refused) a symbolic link."""


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, *, follow: bool = True, what: str = "file",
                 mode: int = 0o666) -> int:
    """``os.open`` that never blocks on a FIFO and refuses anything but a regular file: the open itself is
    non-blocking (a FIFO without a writer would hang a plain ``open``), then ``fstat`` must say regular file.
    ``follow=False`` adds ``O_NOFOLLOW`` (a symbolic link as the last component is refused, never followed; on
    systems without it an ``lstat`` check is done first). Returns a blocking file descriptor.
    Raises :class:`NotRegularFile` naming the path, or the ``OSError`` of the open (e.g. ``FileNotFoundError``)."""
    path = os.fspath(path)
    nofollow = 0 if follow else getattr(os, "O_NOFOLLOW", 0)
    if not follow and not nofollow and os.path.islink(path):
        raise NotRegularFile(f"{path}: the {what} is a symbolic link; the pack does not follow links here "
                             "(remove the link)")
    extra = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | nofollow | extra, mode)
    except IsADirectoryError:
        raise NotRegularFile(f"{path}: the {what} is a folder, not a regular file") from None
    except OSError as exc:
        import errno

        if exc.errno == errno.ELOOP and not follow:
            raise NotRegularFile(f"{path}: the {what} is a symbolic link; the pack does not follow links here "
                                 "(remove the link)") from None
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # a FIFO opened for writing without a reader, a socket
            raise NotRegularFile(f"{path}: the {what} is not a regular file (a FIFO, socket or device)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device"
            raise NotRegularFile(f"{path}: the {what} is not a regular file ({kind}); give a regular file")
        if extra & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def update_from_file(h, path: str | os.PathLike, chunk: int = CHUNK):
    """Feed the bytes of ``path`` into the hash object ``h`` (streamed); returns ``h``."""
    with os.fdopen(open_regular(path), "rb") as f:
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


class UnsafePath(ValueError):
    """A name that cannot be a file inside its folder: absolute, ``..``, hidden, too long, or a symlink out."""


#: Longest name part (bytes, UTF-8) and whole relative name the pack accepts: the common file-system limits, checked
#: before the OS refuses them with a raw ENAMETOOLONG.
NAME_MAX = 255
RELATIVE_NAME_MAX = 1024


def confined(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` if ``name`` is a relative name that stays inside ``root`` once every symlink is resolved: the
    one rule for every name a workflow, a node input or a command line gives for a file inside a folder (presets,
    scorer weights, standard weight names).

    Refused (:class:`UnsafePath`, message quoting at most 80 characters of the name): empty names, NUL bytes,
    absolute names, drive letters, UNC paths, empty / ``.`` / ``..`` / hidden (``.``-prefixed, e.g. temporary
    ``.tmp-*`` files) parts, a part over :data:`NAME_MAX` bytes or a name over :data:`RELATIVE_NAME_MAX`, and
    names (or symlinks on the way) that lead out of ``root``. The returned path may not exist."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UnsafePath(f"{brief(name)} is not a file name")
    shown = brief(name)
    parts = name.replace("\\", "/").split("/")
    drive = len(name) > 1 and name[1] == ":" and name[0].isalpha()  # a Windows drive, on every OS
    if os.path.isabs(name) or name.startswith(("/", "\\")) or drive or os.path.splitdrive(name)[0] or ".." in parts:
        raise UnsafePath(f"{shown} must be a name inside the folder (no absolute path, no '..')")
    if any(p == "" for p in parts):
        raise UnsafePath(f"{shown} has an empty part (a leading, doubled or trailing '/'): give a file name")
    if any(p.startswith(".") for p in parts):
        raise UnsafePath(f"{shown} has a hidden part (starting with '.'); hidden and temporary files are never used")
    if len(name.encode("utf-8", "surrogatepass")) > RELATIVE_NAME_MAX or any(
            len(p.encode("utf-8", "surrogatepass")) > NAME_MAX for p in parts):
        raise UnsafePath(f"{shown} is too long (at most {NAME_MAX} bytes per name, {RELATIVE_NAME_MAX} in all)")
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, *parts))
    if os.path.commonpath([base, target]) != base:
        raise UnsafePath(f"{shown} leads out of the folder {root} (a symlink to {brief(target)}); copy the file "
                         "into the folder, or register its folder (extra_model_paths.yaml / QSCHED_MODELS_DIR)")
    return Path(target)


def brief(value, limit: int = 80) -> str:
    """``repr`` of a value for an error message, cut to ``limit`` characters: a message never formats a huge
    structure or string that came from a file."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 4, 4, 2
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class TextFileError(ValueError):
    """A text file the pack reads (preset, prompt file) is too large, too deeply nested or not UTF-8 text."""


#: Presets hold two vectors of at most 1000 numbers plus a little metadata.
PRESET_MAX_BYTES = 1 << 20
#: Prompt files: sDCI.yaml-sized lists with room to spare.
PROMPTS_MAX_BYTES = 32 << 20
#: Nesting of JSON/YAML brackets: presets need 3, prompt files 2, a diffusers model_index.json 2.
MAX_NESTING = 32
INDEX_NESTING = 8


def read_text_capped(path: str | os.PathLike, max_bytes: int, what: str) -> str:
    """UTF-8 text of ``path`` (a UTF-8 BOM is accepted), refused before reading when larger than ``max_bytes``;
    errors name the file. Raises ``FileNotFoundError`` or :class:`TextFileError`."""
    path = os.fspath(path)
    try:
        fd = open_regular(path, what=what)
    except NotRegularFile as exc:
        raise TextFileError(str(exc)) from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise TextFileError(f"{path}: {size:,} bytes is too large for a {what} (at most {max_bytes:,})")
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
