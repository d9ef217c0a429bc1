"""The calibration record: a JSON-lines file of every evaluated point, and the lock that gives it one writer.

Line 1 is a header with the run's fingerprint (model file hash, family, sampler, steps, quantization, image size,
scorer config, prompts, seeds, search space, strategy) and a CRC-32; every other line is one evaluated point (its
search coordinates, coefficients, per-prompt JAQ and component scores, seconds, images) with a ``digest``: an
HMAC-SHA256 of its content keyed by the header (:func:`record_key`), so a line copied from another record (another
model, thread count, prompt set...) is refused like a damaged one, and its values are checked against the record
(one ``images`` per prompt, one coefficient per step, finite numbers). Each line is written with one ``write`` +
``fsync``; the header with the first point, so a run that fails before its first point leaves no record behind.
The record and its lock file are never followed through a symbolic link.

A half-written last line (the process was killed inside a ``write``) is dropped; a damaged point line is skipped
with a :class:`RecordWarning` naming it and its point is computed again; a damaged header, a header for a different
model/config (the field is named), a record of an older version or an unknown format is refused with an error
naming the file. One process at a time holds a record (:class:`RecordLock`); a full disk or read-only folder
raises :class:`RecordWriteError` naming the record, which stays resumable. ``calibration.runner`` drives it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import socket
import time
import warnings
import zlib
from typing import Callable, Mapping, Sequence

from ..qsched._io import NotRegularFile, atomic_write_text, open_regular, remove_stale_temp_files

RECORD_FORMAT = "qsched-calibration-record"
#: 2: fingerprint covers scorer files, batch size, dtype, threads, configs; 3: point lines carry a digest keyed
#: by the header (bound to their record) instead of a CRC
RECORD_VERSION = 3


class RecordError(ValueError):
    """A calibration record that cannot be resumed (corrupt, foreign, or written by another version)."""


def _crc(obj: Mapping) -> str:
    return f"{zlib.crc32(json.dumps(obj, sort_keys=True, separators=(',', ':')).encode()) & 0xFFFFFFFF:08x}"


def record_line(obj: Mapping) -> str:
    body = dict(obj)
    body["crc"] = _crc(obj)
    return json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"


def record_key(header: Mapping) -> bytes:
    """The key of a record's point-line digests: sha256 of its header (format, version, fingerprint)."""
    head = {k: header.get(k) for k in ("format", "version", "fingerprint")}
    return hashlib.sha256(json.dumps(head, sort_keys=True, separators=(",", ":")).encode()).digest()


def _digest(obj: Mapping, key: bytes) -> str:
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()[:32]


def point_line(entry: Mapping, key: bytes) -> str:
    """One point line of the record whose :func:`record_key` is ``key``."""
    body = dict(entry)
    body["digest"] = _digest(entry, key)
    return json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"


class RecordLock:
    """Exclusive lock on a record (``<record>.lock``, OS-level: released when the process ends, even killed; the
    file is removed by a clean release).

    The lock file holds the owner's pid, host and start time, so a second writer is refused naming the process
    that holds the record."""

    def __init__(self, record_path: str):
        self.path = record_path + ".lock"
        self._fh = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            try:  # never through a symbolic link (it would truncate its target), never a FIFO (it would hang)
                fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, follow=False, what="record lock file")
            except NotRegularFile as exc:
                raise RecordError(f"{exc}. Q-Sched creates this file itself while a calibration runs: remove "
                                  "it") from None
            fh = os.fdopen(fd, "r+", encoding="utf-8")
            try:
                _lock_file(fh)
            except OSError:
                fh.seek(0)
                owner = fh.read(500).strip() or "another process (it wrote no details)"
                fh.close()
                raise RecordLocked(f"{self.path[:-5]}: this calibration record is in use by {owner}. Two runs on "
                                   "one record would both fail to resume: wait for it to finish (or stop it), or "
                                   "use another output folder / record file") from None
            try:  # the holder we waited on may have removed the file: then lock the new one
                same = os.path.samestat(os.fstat(fh.fileno()), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()} (since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                os.unlink(self.path)  # while still locked, so no one can be holding a lock on the unlinked file
            except OSError:
                pass  # a read-only folder: the file stays, and is free once closed
            fh.close()


def _lock_file(fh) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


class RecordLocked(RecordError):
    """Another process holds the record."""


ENTRY_KEYS = ("point", "c_x", "c_eps", "score", "jaq", "components", "images", "seconds")


class Record:
    """Append-only JSONL record of evaluated points (see the module docstring). Held under :class:`RecordLock`
    from opening to :meth:`close`."""

    def __init__(self, path: str | None, fingerprint: dict, resume: bool, expect: Mapping[str, int] | None = None):
        self.path = None if path is None else os.fspath(path)
        self.fingerprint = fingerprint
        self.header = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "fingerprint": fingerprint}
        self.key = record_key(self.header)
        #: what every point line must fit: {"images": per point, "dim": search coordinates, "steps": coefficients}
        self.expect = dict(expect or {})
        self.entries: dict[str, dict] = {}
        self.order: list[str] = []
        self.skipped: list[int] = []  # damaged line numbers (their points are recomputed)
        self.lock = None
        self._header_written = True
        if self.path is None:
            return
        self.lock = RecordLock(self.path)
        self.lock.acquire()
        try:
            self._remove_stale_temp_files()
            if os.path.lexists(self.path):
                if not resume:
                    raise RecordError(f"{self.path}: a calibration record already exists; pass resume=True (CLI "
                                      "--resume) to continue it, or choose another record file")
                self._load()
            else:
                self._header_written = False  # written with the first point: a failed start leaves no record
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _remove_stale_temp_files(self) -> None:
        """Temporary files of this record's atomic writes left by a killed run (we hold the lock: none is live)."""
        remove_stale_temp_files(self.path, every=True)

    @staticmethod
    def point_key(point: Sequence[float]) -> str:
        return json.dumps([float(v) for v in point])

    def _open(self, flags: int) -> int:
        try:
            return open_regular(self.path, flags, follow=False, what="calibration record")
        except NotRegularFile as exc:
            raise RecordError(f"{exc}. Give the record's own file (it is never read or written through a "
                              "link)") from None

    def _load(self) -> None:
        with os.fdopen(self._open(os.O_RDONLY), "rb") as f:
            data = f.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            # the process was killed inside a write: drop the partial line (it was never acknowledged)
            with os.fdopen(self._open(os.O_RDWR), "r+b") as f:
                f.truncate(complete)
                f.flush()
                os.fsync(f.fileno())
            data = data[:complete]
        lines = data.split(b"\n")[:-1] if data else []
        if not lines:
            raise RecordError(f"{self.path}: empty calibration record (no header); delete it to start over")
        try:
            header = self._parse(lines[0].decode("utf-8"), 1)
        except (RecordError, UnicodeDecodeError) as exc:
            raise RecordError(f"{self.path}: its first line (the header) is damaged ({exc}); the record cannot "
                              "be resumed: delete it or use another record file") from None
        if header.get("format") != RECORD_FORMAT:
            raise RecordError(f"{self.path}: not a Q-Sched calibration record (format {header.get('format')!r}, "
                              f"expected {RECORD_FORMAT!r})")
        version = header.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version < RECORD_VERSION:
            raise RecordError(
                f"{self.path}: written by an older version of Q-Sched (record version {version}; this one writes "
                f"version {RECORD_VERSION}, whose fingerprint also covers the scorer weight files, batch size, "
                "dtype, CPU threads and pipeline config files). Its points cannot be proven comparable: start a "
                "new record (another output folder / record file, or delete this one)")
        if version != RECORD_VERSION:
            raise RecordError(f"{self.path}: record version {version!r}, this Q-Sched reads "
                              f"version {RECORD_VERSION} (written by a newer version?)")
        theirs = header.get("fingerprint")
        if theirs != self.fingerprint:
            diff = _diff(theirs if isinstance(theirs, Mapping) else {}, self.fingerprint)
            raise RecordError(f"{self.path}: record was made for a different model/config and cannot be resumed; "
                              f"differs in {diff}. Use another record file or the original settings")
        for n, raw in enumerate(lines[1:], start=2):
            try:
                e = self._parse(raw.decode("utf-8"), n, self.key)
                missing = [k for k in ENTRY_KEYS if k not in e]
                if missing:
                    raise RecordError(f"line {n} is damaged (missing {missing[0]!r})")
                why = _entry_problem(e, self.expect)
                if why:
                    raise RecordError(f"line {n} is damaged ({why})")
            except (RecordError, UnicodeDecodeError) as exc:
                self.skipped.append(n)
                warnings.warn(f"{self.path}: {exc}; skipping it, its point will be computed again",
                              RecordWarning, stacklevel=4)
                continue
            key = self.point_key(e["point"])
            if key in self.entries:
                self.skipped.append(n)
                warnings.warn(f"{self.path}: line {n} repeats point {e['point']}; the first one is kept",
                              RecordWarning, stacklevel=4)
                continue
            self.entries[key] = e
            self.order.append(key)

    def _parse(self, text: str, n: int, key: bytes | None = None) -> dict:
        """A line's object, its CRC (header, ``key`` None) or its digest under ``key`` (point lines) checked."""
        try:
            obj = json.loads(text, parse_constant=_no_constant)
        except (json.JSONDecodeError, ValueError, RecursionError):
            raise RecordError(f"line {n} is damaged (not JSON)") from None
        field = "crc" if key is None else "digest"
        if not isinstance(obj, dict) or field not in obj:
            raise RecordError(f"line {n} is damaged (no {'checksum' if key is None else 'digest'})")
        check = obj.pop(field)
        if key is None and check != _crc(obj):
            raise RecordError(f"line {n} is damaged (checksum mismatch)")
        if key is not None and not (isinstance(check, str) and hmac.compare_digest(check, _digest(obj, key))):
            raise RecordError(f"line {n} is damaged (its digest does not match this record's header: the line was "
                              "changed, or copied from another record)")
        return obj

    def append(self, entry: dict) -> None:
        key = self.point_key(entry["point"])
        if self.path is not None:
            if not self._header_written:
                _write_or_explain(self.path, lambda: atomic_write_text(self.path, record_line(self.header)))
                self._header_written = True
            line = point_line(entry, self.key)

            def write():
                with os.fdopen(self._open(os.O_WRONLY | os.O_APPEND), "w", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())

            _write_or_explain(self.path, write)
        self.entries[key] = entry
        self.order.append(key)


class RecordWarning(UserWarning):
    """A damaged record line was skipped (its point is recomputed)."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in a record")


def _entry_problem(e: Mapping, expect: Mapping[str, int]) -> str:
    """Why a point line's values cannot be this record's ('' when they fit): every number finite, ``images`` the
    record's images per point (a positive int), one coordinate per search dimension, one coefficient per step,
    one JAQ and one value per component per image."""
    def numbers(v, n=None, positive=False):
        return (isinstance(v, list) and (n is None or len(v) == n) and all(_finite(x) for x in v)
                and (not positive or all(x > 0 for x in v)))

    images = expect.get("images")
    if isinstance(e["images"], bool) or not isinstance(e["images"], int) or not (
            e["images"] >= 1 if images is None else e["images"] == images):
        return f"images is {_brief(e['images'])}, this record spends {images or 'a positive number of'} per point"
    n = e["images"]
    if not numbers(e["point"], expect.get("dim")):
        return f"point is not {expect.get('dim', 'a list of')} finite numbers"
    for k in ("c_x", "c_eps"):
        if not numbers(e[k], expect.get("steps"), positive=True):
            return f"{k} is not {expect.get('steps', 'a list of')} positive finite numbers"
    if not numbers(e["jaq"], n):
        return f"jaq is not {n} finite numbers (one per image)"
    comps = e["components"]
    if not isinstance(comps, dict) or not all(isinstance(k, str) and numbers(v, n) for k, v in comps.items()):
        return f"components are not lists of {n} finite numbers"
    if not _finite(e["score"]):
        return "score is not a finite number"
    if not _finite(e["seconds"]) or e["seconds"] < 0:
        return "seconds is not a finite number >= 0"
    return ""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _brief(value, limit: int = 40) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _write_or_explain(path: str, write: Callable[[], object]):
    """Run ``write``; a full disk or a read-only folder becomes one error naming the record (what was recorded
    before stays valid and resumable)."""
    import errno

    try:
        return write()
    except OSError as exc:
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}.get(exc.errno, exc.strerror or str(exc))
        raise RecordWriteError(
            f"cannot write the calibration record {path}: {reason}. Everything recorded before is kept; free "
            "space / fix the folder and run again with --resume (ComfyUI: queue again) to continue") from None


class RecordWriteError(OSError):
    """The record could not be written (disk full, read-only, permissions); the record stays resumable."""


def _diff(a: Mapping, b: Mapping, prefix: str = "") -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va == vb:
            continue
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.append(_diff(va, vb, f"{prefix}{k}."))
        else:
            sa, sb = json.dumps(va)[:80], json.dumps(vb)[:80]
            out.append(f"{prefix}{k} (record: {sa}, now: {sb})")
    return "; ".join(out)
