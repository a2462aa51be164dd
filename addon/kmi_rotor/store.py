"""state.json on disk: atomic writes under a file lock, corrupt files moved aside, never lost."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from .core.state import SCHEMA_VERSION, Delta, StateDoc, merge

log = logging.getLogger("kmi_rotor")

LOCK_TIMEOUT = 10.0


class StateStore:
    """One state file. Every method blocks: call them from a thread, never from a hook."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self._lock = FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT)
        self._seen: tuple[int, int, int] | None = None

    def read(self) -> StateDoc:
        """The document on disk (empty when there is none)."""
        if not self.path.exists():
            return StateDoc()
        with self._lock:
            return self._read_locked()

    def changed(self) -> bool:
        """Whether the file changed since this store last read or wrote it."""
        try:
            return _identity(os.stat(self.path)) != self._seen
        except FileNotFoundError:
            return False

    def commit(self, delta: Delta, now: float | None = None) -> StateDoc:
        """Merge a delta into the file under the lock and return what is now on disk."""
        now = time.time() if now is None else now
        self._ensure_dir()
        with self._lock:
            doc = self._read_locked() if self.path.exists() else StateDoc()
            if not delta:
                return doc
            doc = merge(doc, delta, now)
            self._write_locked(doc)
            return doc

    def _ensure_dir(self) -> None:
        if not self.dir.exists():
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _read_locked(self) -> StateDoc:
        try:
            stat = os.stat(self.path)
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return StateDoc()
        try:
            data = json.loads(raw)
            version = data.get("schema_version") if isinstance(data, dict) else None
            if isinstance(version, int) and version > SCHEMA_VERSION:
                self._move_aside(
                    f"newer-v{version}", f"was written by a newer kmi-rotor (schema {version})"
                )
                return StateDoc()
            doc = StateDoc.model_validate(data)
        except (ValueError, ValidationError):
            self._move_aside("corrupt", "is not valid kmi-rotor state")
            return StateDoc()
        self._seen = _identity(stat)
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
        data = doc.model_dump_json(indent=1).encode("utf-8")
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
        self._seen = _identity(os.stat(self.path))


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    # Every write is a rename of a new file, so the inode changes even within one mtime tick.
    return (st.st_ino, st.st_mtime_ns, st.st_size)
