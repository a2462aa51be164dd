"""The proxy's view of the state: changes kept in memory, merged to disk off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from .config import Key, one_line
from .core.state import Delta, KeyDelta, StateDoc, overlay
from .store import StateStore

log = logging.getLogger("kmi_rotor")

WARN_EVERY = 60.0
"""Seconds between two warnings that the state cannot be written (it is retried meanwhile)."""


class StateKeeper:
    """Records observations instantly (no I/O) and writes them, debounced, from a thread.

    It also picks up what other processes wrote, so their changes are merged, never
    overwritten; `on_change` hears of every document read or written while it runs (not of the
    final flush at shutdown, when nobody is left to act on it).
    """

    def __init__(
        self,
        store: StateStore,
        *,
        debounce: float = 0.5,
        poll: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.debounce = debounce
        self.poll = poll
        self.clock = clock
        self.base = StateDoc()
        self.on_change: Callable[[StateDoc], None] | None = None
        self.limiter_source: Callable[[], Callable[[], dict[str, Any]]] | None = None
        """The limiter's windows, captured with every write that carries other changes (on the
        loop, cheaply) and rendered in the writer's thread: its daily and hourly windows are
        then no staler on disk than the counters."""
        self._pending = Delta()
        self._writing = Delta()  # handed to the writer thread, not yet on disk
        self._dirty = asyncio.Event()
        self._warned_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    # -- observations (event loop, no I/O) --------------------------------------------------

    def key(self, key: Key) -> KeyDelta:
        """The pending changes of one key, to be added to (marks the state dirty)."""
        self._dirty.set()
        return self._pending.key(key.fingerprint, key.label, key.pool)

    def pool_add(self, pool: str, name: str, n: int = 1) -> None:
        self._dirty.set()
        self._pending.pool_add(pool, name, n)

    def limiter_snapshot(self, snapshot: dict[str, Any]) -> None:
        self._pending.limiter, self._pending.limiter_at = snapshot, self.clock()
        self._dirty.set()

    def view(self) -> StateDoc:
        return overlay(overlay(self.base, self._writing), self._pending)

    # -- persistence ------------------------------------------------------------------------

    def load_blocking(self) -> None:
        """Read the file once at start-up (configure runs before any request)."""
        self._adopt(self.store.read())

    def _adopt(self, doc: StateDoc) -> None:
        self.base = doc
        if self.on_change is not None:
            try:
                self.on_change(doc)
            except Exception:
                log.exception("kmi-rotor: could not apply the state read from disk")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kmi-rotor-state")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.poll)
            if self._dirty.is_set():
                await asyncio.sleep(self.debounce)
            await self.sync()

    async def sync(self) -> None:
        """Merge pending changes into the file and take in what others wrote (in a thread)."""
        self._dirty.clear()
        pending, self._pending = self._pending, Delta()
        limiter = self._capture_limiter(pending)
        if not pending and not await asyncio.to_thread(self.store.changed):
            return
        self._writing = pending
        try:
            doc = await asyncio.to_thread(self._commit, pending, limiter, self.clock())
        except Exception as e:  # a full disk or a stuck lock must not lose observations
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY:
                self._warned_at = now
                log.warning("kmi-rotor: could not write state (%s); will retry", one_line(str(e)))
            pending.absorb(self._pending)
            self._pending = pending
            self._dirty.set()
            return
        finally:
            self._writing = Delta()
        self._adopt(doc)

    def _capture_limiter(self, pending: Delta) -> Callable[[], dict[str, Any]] | None:
        """The limiter's windows for a write that records requests, copied on the event loop
        (the limiter is not thread-safe); None when there is nothing to record."""
        if not pending or self.limiter_source is None:
            return None
        try:
            return self.limiter_source()
        except Exception:
            log.exception("kmi-rotor: could not take the limiter's windows")
            return None

    def _commit(
        self, pending: Delta, limiter: Callable[[], dict[str, Any]] | None, now: float
    ) -> StateDoc:
        """The writer thread's part: the limiter's snapshot rendered, then the merge."""
        if limiter is not None and pending.limiter is None:
            pending.limiter, pending.limiter_at = limiter(), now
        return self.store.commit(pending, now)

    def close_blocking(self) -> None:
        """Stop the writer and flush what is left (shutdown; blocking is fine there)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        pending, self._pending = self._pending, Delta()
        if pending:
            try:
                self.base = self.store.commit(pending, self.clock())
            except Exception as e:
                log.error("kmi-rotor: final state write failed: %s", e)
