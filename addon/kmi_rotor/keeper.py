"""The proxy's view of the state: deltas kept in memory, merged to disk off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .config import Key
from .core.state import KeyDelta, StateDoc, overlay
from .store import StateStore

log = logging.getLogger("kmi_rotor")


class StateKeeper:
    """Records observations instantly (no I/O) and writes them, debounced, from a thread.

    It also picks up what other processes wrote, so their changes are merged, never overwritten.
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
        self._pending: dict[str, KeyDelta] = {}
        self._writing: dict[str, KeyDelta] = {}  # handed to the writer thread, not yet on disk
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- observations (event loop, no I/O) --------------------------------------------------

    def _delta(self, key: Key) -> KeyDelta:
        d = self._pending.get(key.fingerprint)
        if d is None:
            d = self._pending[key.fingerprint] = KeyDelta(label=key.label, pool=key.pool)
        self._dirty.set()
        return d

    def sent(self, key: Key) -> None:
        self._delta(key).requests += 1

    def answered(self, key: Key, status: int) -> None:
        self._delta(key).observe(self.clock(), status, None)

    def failed(self, key: Key, error: str) -> None:
        d = self._delta(key)
        d.errors += 1
        d.observe(self.clock(), None, error)

    def view(self) -> StateDoc:
        return overlay(overlay(self.base, self._writing), self._pending)

    # -- persistence ------------------------------------------------------------------------

    def load_blocking(self) -> None:
        """Read the file once at start-up (configure runs before any request)."""
        self.base = self.store.read()

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
        pending, self._pending = self._pending, {}
        if not pending and not await asyncio.to_thread(self.store.changed):
            return
        self._writing = pending
        try:
            self.base = await asyncio.to_thread(self.store.commit, pending, self.clock())
        except Exception as e:  # a full disk or a stuck lock must not lose observations
            log.warning("kmi-rotor: could not write state (%s); will retry", e)
            self._restore(pending)
        finally:
            self._writing = {}

    def _restore(self, pending: dict[str, KeyDelta]) -> None:
        for fp, old in pending.items():
            new = self._pending.get(fp)
            if new is not None:
                old.requests += new.requests
                old.errors += new.errors
                if new.last_used is not None:
                    old.observe(new.last_used, new.last_status, new.last_error)
            self._pending[fp] = old
        self._dirty.set()

    def close_blocking(self) -> None:
        """Stop the writer and flush what is left (shutdown; blocking is fine there)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        pending, self._pending = self._pending, {}
        if pending:
            try:
                self.base = self.store.commit(pending, self.clock())
            except Exception as e:
                log.error("kmi-rotor: final state write failed: %s", e)
