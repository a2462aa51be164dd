"""state.json on disk: atomic writes under a file lock, corrupt files moved aside, never lost."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from .core.state import SCHEMA_VERSION, Delta, StateDoc, merge
from .core.state_json import DocRenderer

log = logging.getLogger("kmi_rotor")

LOCK_TIMEOUT = 10.0

# filelock logs four debug lines per save (acquiring, acquired, releasing, released), about
# twice a second under load. Inside mitmproxy each record is an event-log entry handed from the
# writer's thread to the event loop and to every addon, and fills mitmweb's event log; a lock
# that cannot be taken is reported by kmi-rotor itself.
logging.getLogger("filelock").setLevel(logging.INFO)


class StateError(Exception):
    """The state file exists but cannot be used at all (not a file, unreadable)."""


def stat_is_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


class StateStore:
    """One state file. Every method blocks: call them from a thread, never from a hook.

    `read_only`: a store that changes nothing on disk (no lock file, no clean-up, no folder
    mode, an unusable file reported as a `StateError` rather than moved aside)."""

    def __init__(self, state_dir: Path, *, read_only: bool = False) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self.read_only = read_only
        self._lock_path = Path(str(self.path) + ".lock")
        self._lock = FileLock(str(self._lock_path), timeout=LOCK_TIMEOUT)
        self._seen: tuple[int, int, int] | None = None
        self._known: tuple[bytes, StateDoc] | None = None
        """The file's bytes as this store last read or wrote them, and their document: while
        nobody else writes, a commit finds them again and need not parse and validate them."""
        self._swept = False
        self._tightened = False
        self._renderer = DocRenderer()

    def read(self) -> StateDoc:
        """The document on disk (empty when there is none)."""
        if self.read_only:
            return self._read_locked()
        self._tighten()
        if not os.path.lexists(self.path):
            return StateDoc()
        with self._locked():
            return self._read_locked()

    def _locked(self) -> FileLock:
        # The lock file is opened with O_TRUNC: a link planted in its place is refused.
        if os.path.islink(self._lock_path):
            raise StateError(f"{self._lock_path} is a symbolic link: remove it")
        return self._lock

    def _tighten(self) -> None:
        """An existing folder of ours readable by others is made 0700 (once per store)."""
        if self._tightened or self.read_only:
            return
        self._tightened = True
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.dir)
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(self.dir, 0o700)
                log.warning("kmi-rotor: %s was open to other users; now 0700", self.dir)

    def changed(self) -> bool:
        """Whether the file changed since this store last read or wrote it."""
        try:
            return _identity(os.stat(self.path)) != self._seen
        except FileNotFoundError:
            return False

    def commit(self, delta: Delta, now: float | None = None) -> StateDoc:
        """Merge a delta into the file under the lock and return what is now on disk."""
        now = time.time() if now is None else now
        if self.read_only:
            raise StateError("a read-only state store cannot write")
        self._ensure_dir()
        self._tighten()
        with self._locked():
            if not self._swept:
                self._sweep_locked()
            doc = self._read_locked() if os.path.lexists(self.path) else StateDoc()
            if not delta:
                return doc
            doc = merge(doc, delta, now)
            self._write_locked(doc)
            return doc

    def _ensure_dir(self) -> None:
        if not self.dir.exists():
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _sweep_locked(self) -> None:
        """Remove temporary files of writes cut short (a kill mid-write): under the lock no
        other writer is busy, so every one of them is stale."""
        self._swept = True
        for tmp in self.dir.glob(".state.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _read_locked(self) -> StateDoc:
        if not self._swept and not self.read_only:
            self._sweep_locked()
        try:
            st, raw = _read_regular(self.path)
        except FileNotFoundError:
            return StateDoc()
        known = self._known
        if known is not None and raw == known[0]:
            self._seen = _identity(st)
            return known[1]
        try:
            data = json.loads(raw)
            version = _version(data.get("schema_version")) if isinstance(data, dict) else None
            if version is not None and version > SCHEMA_VERSION:
                if self.read_only:
                    raise StateError(f"{self.path} was written by a newer kmi-rotor")
                tag = f"newer-v{version}" if version < 10**6 else "newer"
                self._move_aside(tag, f"was written by a newer kmi-rotor (schema {tag[7:] or '?'})")
                return StateDoc()
            doc = StateDoc.model_validate(data)
        except (ValueError, ValidationError, RecursionError):
            if self.read_only:
                raise StateError(
                    f"{self.path} is not valid kmi-rotor state (left as it is; a running proxy "
                    "moves it aside and starts afresh)"
                ) from None
            self._move_aside("corrupt", "is not valid kmi-rotor state")
            return StateDoc()
        self._seen, self._known = _identity(st), (raw, doc)
        return doc

    def _move_aside(self, tag: str, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"state.json.{tag}-{stamp}")
        n = 1
        while aside.exists():  # never overwrite an earlier copy
            n += 1
            aside = self.path.with_name(f"state.json.{tag}-{stamp}-{n}")
        os.replace(self.path, aside)
        log.warning("kmi-rotor: %s %s; kept it as %s and started fresh", self.path, why, aside)

    def _write_locked(self, doc: StateDoc) -> None:
        data = self._renderer.render(doc)
        # mkstemp creates the file 0600: the state never is world-readable, not even briefly.
        fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._seen, self._known = _identity(os.stat(self.path)), (data, doc)


def _read_regular(path: Path) -> tuple[os.stat_result, bytes]:
    """The stat and bytes of a regular file, never through a symbolic link; FileNotFoundError
    when there is none, StateError (one line) when it cannot be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        if os.path.islink(path):
            raise StateError(f"{path} is a symbolic link: not followed; remove it") from None
        raise StateError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat_is_file(st):
            raise StateError(f"{path} is not a regular file: move it out of the way")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return st, f.read()
    except OSError as e:
        raise StateError(f"{path} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _version(value: object) -> int | None:
    """A schema version however it was written (2, 2.0, "2"); None when it is no number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value) if isinstance(value, float | str) else None
    except ValueError:
        return None
    if number is None or not number.is_integer() or abs(number) > 10**9:
        return None
    return int(number)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    # Every write is a rename of a new file, so the inode changes even within one mtime tick.
    return (st.st_ino, st.st_mtime_ns, st.st_size)
