"""The request trace: one JSON line per request, appended from a thread, rotated by size.

A line never holds a prompt, a key or a query string: only labels, fingerprints, the path,
timings and the outcome. `TraceWriter.write` is called on the event loop and only appends to a
queue; a background thread wakes a few times a second (not once per record: every wake-up
costs the event loop the GIL) and writes what has gathered in one call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from pydantic_core import PydanticSerializationError
from pydantic_core import to_json as _to_json

log = logging.getLogger("kmi_rotor")

TRACE_FILE: Final = "trace.jsonl"

Outcome = Literal[
    "ok",
    "rate_limited",
    "quota",
    "auth",
    "overloaded",
    "client_error",
    "local_429",
    "error",
    "truncated",
    "stream_error",
    "client_gone",
]
OUTCOMES: Final[tuple[str, ...]] = get_args(Outcome)

# Records taken off the queue per write: bounds one write call, not the throughput.
_BATCH: Final = 1000
FLUSH_SECONDS: Final = 0.2
"""How long a record may wait in the queue before the thread writes it."""
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def trace_path(state_dir: Path) -> Path:
    """Where the trace of a configuration with this state folder lives."""
    return state_dir / TRACE_FILE


def strip_query(path: str) -> str:
    """`path` without its query string or fragment (a `key=` parameter can be a credential)."""
    return path.split("?", 1)[0].split("#", 1)[0]


@dataclass(slots=True)
class TraceRecord:
    """One request attempt as kmi-rotor handled it. `path` is stored without any query string.

    `key` and `fp` are None for a request refused before a key was chosen; `attempt` is 1 for
    the first try and 2+ for a failover retry of the same request (same `id`). Not changed
    once made (not frozen only because a frozen dataclass costs ten times more to create, on
    every request).
    """

    ts: float
    id: str
    pool: str
    key: str | None
    fp: str | None
    method: str
    path: str
    status: int | None
    ttfb_ms: float | None
    total_ms: float | None
    tokens_in: int | None
    tokens_out: int | None
    outcome: Outcome
    attempt: int
    stream: bool
    scope: str | None = None
    """The request's limit scope (`model:<name>`, `class:<class>`), None when key-wide."""

    def __post_init__(self) -> None:
        # Enforced here, not by callers, so no code path can put a query string on disk.
        if "?" in self.path or "#" in self.path:
            self.path = strip_query(self.path)
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown trace outcome {self.outcome!r}")

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, in their order (what `dataclasses.asdict` gives, built directly:
        the values are all scalars)."""
        return {
            "ts": self.ts,
            "id": self.id,
            "pool": self.pool,
            "key": self.key,
            "fp": self.fp,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "ttfb_ms": self.ttfb_ms,
            "total_ms": self.total_ms,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "outcome": self.outcome,
            "attempt": self.attempt,
            "stream": self.stream,
            "scope": self.scope,
        }

    def to_json(self) -> str:
        """The record as one compact JSON object (no newline), field names as in the class."""
        return _ENCODE(self.as_dict())

    def to_line(self) -> bytes:
        """The record as the trace file holds it: one compact JSON object and a newline, in
        UTF-8 (non-ASCII text as itself, not escaped). A third of `to_json`'s cost, which the
        writer's thread pays for every request while it holds the interpreter's lock."""
        try:
            return _to_json(self.as_dict()) + b"\n"
        except PydanticSerializationError:  # text no UTF-8 can hold (a lone surrogate)
            return (self.to_json() + "\n").encode("utf-8")


class TraceWriter:
    """Appends records to `path` from a daemon thread; rotates to `path.1` … `path.{backups}`.

    `write` never blocks and never raises for I/O: past `max_queue` pending records, or when
    the file cannot be written, records are dropped and counted in `dropped`. The first I/O
    error is logged once. Files are created 0600, a missing folder 0700. A record reaches the
    file within `flush_seconds` (sooner once `_BATCH` are waiting), and all of them by `close`.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        backups: int = 3,
        max_queue: int = 10_000,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_queue = max_queue
        self.flush_seconds = flush_seconds
        # deque.append and popleft are atomic: the loop appends, the thread takes, no lock.
        self._queue: deque[TraceRecord] = deque()
        self._wake = threading.Event()
        self._dropped = 0
        self._drop_lock = threading.Lock()  # the caller and the thread both count drops
        self._closed = False
        self._fd: int | None = None
        self._size = 0
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="kmi-rotor-trace", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records lost so far: queue full, writer closed, or the file not writable."""
        return self._dropped

    def write(self, record: TraceRecord) -> None:
        """Queue `record` for the thread. Constant time, no I/O; drops rather than grow."""
        queued = len(self._queue)
        if self._closed or queued >= self.max_queue:
            self._drop(1)
            return
        self._queue.append(record)
        if queued + 1 == _BATCH:  # a full batch need not wait for the next wake-up
            self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread (blocks up to `timeout`). Idempotent."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("kmi-rotor: trace writer did not finish within %.1fs", timeout)
        elif self._dropped:
            log.warning("kmi-rotor: %d trace records were dropped", self._dropped)

    # -- the thread ---------------------------------------------------------------------------

    def _drop(self, n: int) -> None:
        with self._drop_lock:
            self._dropped += n

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            # Read before draining: a record queued before close() is in the queue by now.
            closing = self._closed
            while self._queue:
                batch = []
                take = self._queue.popleft
                while self._queue and len(batch) < _BATCH:
                    batch.append(take())
                self._write_batch(batch)
            if closing:
                break
        self._close_fd()

    def _write_batch(self, batch: list[TraceRecord]) -> None:
        if not batch:
            return
        try:
            lines = [r.to_line() for r in batch]
        except Exception as e:  # a malformed record must not stop the thread
            self._failed(e, len(batch))
            return
        written = 0
        try:
            self._open()
            chunk: list[bytes] = []
            pending = 0
            for line in lines:
                # A line longer than max_bytes still gets written: alone, in a fresh file.
                if self._size + pending + len(line) > self.max_bytes and self._size + pending:
                    written += self._flush(chunk)
                    chunk, pending = [], 0
                    self._rotate()
                chunk.append(line)
                pending += len(line)
            written += self._flush(chunk)
        except Exception as e:  # OSError above all; nothing may escape and kill the thread
            self._close_fd()
            self._failed(e, len(lines) - written)

    def _flush(self, chunk: list[bytes]) -> int:
        """Append `chunk` in one write call; returns how many records it held."""
        if chunk:
            self._append(b"".join(chunk))
        return len(chunk)

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(data)

    def _open(self) -> None:
        if self._fd is not None:
            return
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_APPEND: lines of another process writing the same trace interleave, never overlap.
        # O_NOFOLLOW: a link planted in the trace's place is not written through.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        self._fd = os.open(self.path, flags, 0o600)
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            self._close_fd()
            raise OSError(f"{self.path} is not a regular file")
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        self._close_fd()
        if self.backups < 1:
            self.path.unlink(missing_ok=True)
        else:
            self._backup(self.backups).unlink(missing_ok=True)
            for n in range(self.backups - 1, 0, -1):
                if self._backup(n).exists():
                    os.replace(self._backup(n), self._backup(n + 1))
            if self.path.exists():
                os.replace(self.path, self._backup(1))
        self._open()

    def _backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _failed(self, error: Exception, lost: int) -> None:
        self._drop(lost)
        if not self._warned:
            self._warned = True
            log.error(
                "kmi-rotor: cannot write the trace %s (%s); dropping records from now on",
                self.path,
                error,
            )


def read_trace(path: Path, include_rotated: bool = True) -> Iterator[dict[str, Any]]:
    """Every record of the trace, oldest first: `path.N` … `path.1`, then `path`.

    Lines that are not a JSON object (a last line cut short by a crash, say) are skipped. A
    missing file reads as empty.
    """
    files = _rotated(path) if include_rotated else []
    for file in [*files, path]:
        try:
            with file.open("rb") as f:
                for raw in f:
                    record = _parse(raw)
                    if record is not None:
                        yield record
        except FileNotFoundError:
            continue  # rotated away between listing and opening


def _rotated(path: Path) -> list[Path]:
    """The backups of `path`, highest number (oldest) first."""
    found: list[tuple[int, Path]] = []
    prefix = path.name + "."
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            suffix = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
            if suffix.isdigit():
                found.append((int(suffix), p))
    return [p for _, p in sorted(found, reverse=True)]


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        return None
    return record if isinstance(record, dict) else None
