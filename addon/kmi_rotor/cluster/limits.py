"""The limiter's windows, slots and cooldowns in Redis: one atomic script per admission.

Every call is bounded (`TIMEOUT`); a caller that gets `SharedDown` decides what to do without
Redis. Times in answers are converted from Redis's clock to the caller's: the script measures
windows with Redis's clock, so processes whose clocks differ still share exact windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

from ..core.limiter import (
    CONCURRENCY,
    GLOBAL,
    TOKEN_WINDOWS,
    WINDOWS,
    Admitted,
    Exhausted,
    Limits,
    Rejected,
    Reservation,
    enforced_length,
)

log = logging.getLogger("kmi_rotor")

TIMEOUT = 0.1
"""No request waits longer than this on one Redis call."""
RESTAMP_AFTER = 0.005
"""An admission answered later than this is stamped again when the request leaves."""
T = TypeVar("T")
COOL = """
local t = redis.call('TIME')
local ms = tonumber(ARGV[1])
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('SET', KEYS[1], string.format('%.3f', now + ms), 'PX', ms)
"""


class SharedDown(Exception):
    """Redis did not answer in time (`slow`), or could not be reached or answered an error."""

    def __init__(self, reason: str, *, slow: bool = False) -> None:
        super().__init__(reason)
        self.slow = slow


@dataclass(eq=False)
class Lease:
    """The handle of a shared reservation: what to correct and what to free."""

    id: str
    windows: tuple[tuple[str, str], ...]
    """(scope, window) of every token window the reservation counts in."""
    slots: tuple[str, ...]
    """Scopes whose concurrency slot it holds."""
    tokens: int
    stamps: tuple[tuple[str, str], ...] = ()
    """(scope, window) of every window the reservation counts in."""
    released: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


@dataclass(frozen=True)
class Cursor:
    """A pool's shared place in its cycle: round-robin moves past the chosen key, sticky stays."""

    pool: str
    size: int
    mode: str  # "rr" | "sticky"
    pinned: bool


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class SharedLimits:
    """Admission, corrections, leases and cooldowns of every process, in one Redis."""

    def __init__(self, client: Any, prefix: str, process: str, lease_seconds: float) -> None:
        self.client = client
        self.prefix = prefix
        self.process = process
        self.lease_ms = lease_seconds * 1000.0
        self._admit = client.register_script(_script("admit.lua"))
        self._settle = client.register_script(_script("settle.lua"))
        self._cool = client.register_script(COOL)
        self._ids = itertools.count(1)
        self._global: dict[str, Any] = {"name": GLOBAL, "windows": [], "conc": 0}
        self._keys: dict[str, dict[str, Any]] = {}
        self.held: dict[str, Lease] = {}
        """Leases not yet released, renewed while their requests run."""

    def configure(
        self, global_limits: Limits, key_limits: Mapping[str, Limits], guard: float
    ) -> None:
        """The limits every admission checks (each process passes its own config's)."""
        self._global = _spec(GLOBAL, global_limits, guard)
        self._keys = {fp: _spec(f"key:{fp}", lim, guard) for fp, lim in key_limits.items()}

    async def warm(self, connections: int = 8) -> None:
        """Load the scripts and open connections ahead of the first burst of requests (a cold
        connection with a script to load takes longer than the bound on a loaded machine)."""
        for script in (self._admit, self._settle, self._cool):
            script.sha = await self.client.script_load(script.script)
        await asyncio.gather(*(self.client.ping() for _ in range(connections)))

    def owns(self, reservation: Reservation) -> bool:
        return isinstance(reservation.handle, Lease)

    async def call(self, aw: Awaitable[T]) -> T:
        """One Redis round trip, at most TIMEOUT; any failure is SharedDown."""
        try:
            return await asyncio.wait_for(aw, TIMEOUT)
        except TimeoutError:
            raise SharedDown("no answer within 100 ms", slow=True) from None
        except (OSError, ConnectionError) as e:
            raise SharedDown(str(e) or type(e).__name__) from None
        except Exception as e:  # the redis package's own errors
            if type(e).__module__.startswith("redis"):
                slow = "Timeout" in type(e).__name__
                raise SharedDown(str(e) or type(e).__name__, slow=slow) from None
            raise

    async def admit(
        self,
        candidates: Sequence[tuple[str, int]],
        tokens: int,
        now: float,
        *,
        cursor: Cursor | None = None,
        scope: str = "",
    ) -> Admitted | Rejected:
        """Reserve on the first candidate (fingerprint, place in the pool) that fits, the
        shared cursor deciding the order; or say when something could fit (local clock)."""
        rid = f"{self.process}:{next(self._ids)}"
        keys = []
        for fp, idx in candidates:
            spec = self._keys.get(fp) or {"name": f"key:{fp}", "windows": [], "conc": 0}
            keys.append({**spec, "fp": fp, "idx": idx})
        arg: dict[str, Any] = {
            "p": self.prefix,
            "id": rid,
            "tokens": tokens,
            "lease": self.lease_ms,
            "scope": scope,
            "global": self._global,
            "keys": keys,
        }
        if cursor is not None:
            arg["cursor"] = {
                "pool": cursor.pool,
                "n": cursor.size,
                "mode": cursor.mode,
                "pinned": int(cursor.pinned),
            }
        sent = time.monotonic()
        out = await self.call(self._admit(args=[json.dumps(arg)]))
        result = self._answer(out, rid, tokens, now)
        late = time.monotonic() - sent > RESTAMP_AFTER
        if isinstance(result, Admitted) and late and _lease(result.reservation).stamps:
            await self._restamp(result.reservation)
        return result

    async def _restamp(self, reservation: Reservation) -> None:
        """The answer came late (this process was not running): count the request from now,
        when it really leaves, rather than from when the script ran. Later, never earlier, so
        no window ever holds more; a failure leaves the first stamp."""
        lease = _lease(reservation)
        arg = {
            "op": "restamp",
            "p": self.prefix,
            "id": lease.id,
            "windows": lease.stamps,
            "slots": (),
        }
        with contextlib.suppress(SharedDown):
            await self.call(self._settle(args=[json.dumps(arg)]))

    def _answer(self, out: list[Any], rid: str, tokens: int, now: float) -> Admitted | Rejected:
        def local(ms: float) -> float:
            return now + (ms - redis_now) / 1000.0

        if int(out[0]) == 1:
            fp = _text(out[1])
            scopes = (self._global, self._keys.get(fp) or {"windows": [], "conc": 0})
            windows = tuple(
                (GLOBAL if s is self._global else f"key:{fp}", w[0])
                for s in scopes
                for w in s["windows"]
                if w[3] == 1
            )
            slots = tuple(
                GLOBAL if s is self._global else f"key:{fp}" for s in scopes if s["conc"] > 0
            )
            stamps = tuple(
                (GLOBAL if s is self._global else f"key:{fp}", w[0])
                for s in scopes
                for w in s["windows"]
            )
            lease = Lease(rid, windows, slots, tokens, stamps)
            if slots:
                self.held[rid] = lease
            return Admitted(Reservation(fp, now, tokens, lease), fp)
        possible, retry, redis_now = int(out[1]) == 1, float(_text(out[2])), float(_text(out[3]))
        found = json.loads(_text(out[4])) or []
        exhausted = tuple(
            Exhausted(scope, limit, local(free) if free is not False else None)
            for scope, limit, free in found
        )
        retry_at = None if retry < 0 else max(now, local(retry))
        return Rejected(exhausted, retry_at, possible=possible)

    # -- settling (the event loop goes on; a lost call is made good by the lease's expiry) -----

    def adjust(self, reservation: Reservation, actual_tokens: int) -> None:
        lease = _lease(reservation)
        delta, lease.tokens = actual_tokens - lease.tokens, actual_tokens
        if delta and lease.windows:
            self._later(lease, {"op": "correct", "windows": lease.windows, "delta": delta})

    def release(self, reservation: Reservation) -> None:
        lease = _lease(reservation)
        if lease.released:
            return
        lease.released = True
        if self.held.pop(lease.id, None) is not None:
            self._later(lease, {"op": "release", "slots": lease.slots})

    def _later(self, lease: Lease, arg: dict[str, Any]) -> None:
        arg.update({"p": self.prefix, "id": lease.id, "windows": arg.get("windows", ())})
        arg.setdefault("slots", ())
        task = asyncio.get_running_loop().create_task(self._settle_quietly(arg))
        lease.tasks.add(task)
        task.add_done_callback(lease.tasks.discard)

    async def _settle_quietly(self, arg: dict[str, Any]) -> None:
        try:
            await self.call(self._settle(args=[json.dumps(arg)]))
        except SharedDown as e:
            log.debug("kmi-rotor: shared settle lost (%s); the lease expires instead", e)

    async def renew(self) -> None:
        """Extend the slots of every running request (called well within the lease): one
        call for all of them."""
        held = [[lease.id, lease.slots] for lease in self.held.values()]
        if held:
            arg = {"op": "renew", "p": self.prefix, "held": held, "lease": self.lease_ms}
            await self.call(self._settle(args=[json.dumps(arg)]))

    # -- cooldowns (per key and scope; "" is the whole key) ------------------------------------

    async def cool(self, fp: str, seconds: float | None, scope: str = "") -> None:
        """Keep every process off the key for `seconds` (None: until `clear`)."""
        name = f"{self.prefix}:cool:{fp}:{scope}"
        if seconds is None:
            await self.call(self.client.set(name, "inf"))
        elif seconds > 0:
            ms = max(1, int(seconds * 1000))
            await self.call(self._cool_for(name, ms))

    def _cool_for(self, name: str, ms: int) -> Awaitable[Any]:
        # The stored time is Redis's, so the admission script compares it with its own clock.
        return self._cool(keys=[name], args=[ms])

    async def clear(self, fp: str, scope: str = "") -> None:
        await self.call(self.client.delete(f"{self.prefix}:cool:{fp}:{scope}"))

    async def close(self) -> None:
        for lease in list(self.held.values()):
            for task in list(lease.tasks):
                with contextlib.suppress(Exception):
                    await task


def _lease(reservation: Reservation) -> Lease:
    handle = reservation.handle
    if not isinstance(handle, Lease):
        raise TypeError("reservation was not made by the shared limiter")
    return handle


def _spec(name: str, limits: Limits, guard: float) -> dict[str, Any]:
    windows = [
        [w, getattr(limits, w), enforced_length(w, guard) * 1000.0, int(w in TOKEN_WINDOWS)]
        for w in WINDOWS
        if getattr(limits, w) is not None
    ]
    return {"name": name, "windows": windows, "conc": limits.concurrency or 0}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["CONCURRENCY", "Cursor", "Lease", "SharedDown", "SharedLimits"]
