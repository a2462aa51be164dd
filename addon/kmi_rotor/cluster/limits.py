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
from collections import deque
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
from ..core.signals import Window
from .budgets import NEVER_MS, budget_reports
from .channel import ScriptChannel

log = logging.getLogger("kmi_rotor")

TIMEOUT = 0.1
"""No request waits longer than this on one Redis call."""
RESTAMP_AFTER = 0.005
"""An admission answered later than this is stamped again when the request leaves."""
ADMITTED = 10_000
"""Admissions remembered between two reads of the shared windows, at most."""
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
    """The handle of a shared reservation: what to correct, report on and free."""

    id: str
    windows: tuple[tuple[str, str], ...]
    """(scope, window) of every token window the reservation counts in."""
    slots: tuple[str, ...]
    """Scopes whose concurrency slot it holds."""
    tokens: int
    stamps: tuple[tuple[str, str], ...] = ()
    """(scope, window) of every window the reservation counts in."""
    flight: tuple[str, str, str] | tuple[()] = ()
    """(key, scope, member): its place among the key's requests in flight, if it has one
    (only on a key with a provider budget)."""
    key: str = ""
    scope: str = ""
    released: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    pending: dict[str, Any] | None = None
    """What is to be sent of it at the next turn of the event loop (one call for all)."""


@dataclass(frozen=True)
class Cursor:
    """A pool's shared place in its cycle: round-robin moves past the chosen key, sticky stays."""

    pool: str
    size: int
    mode: str  # "rr" | "sticky"
    pinned: bool
    span: bool = False
    """The candidates (after a pinned one) are a run of the pool's keys in cyclic order from
    this process's place in the cycle, not all of its usable keys: when the shared place is
    outside the run, the admission answers `Moved` rather than choose."""


@dataclass(frozen=True)
class Moved:
    """The shared place in the pool's cycle is not among the candidates sent: begin there."""

    start: int


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class SharedLimits:
    """Admission, corrections, leases and cooldowns of every process, in one Redis."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        process: str,
        lease_seconds: float,
        channel: ScriptChannel | None = None,
    ) -> None:
        """`channel`: where the scripts run (admission, settling, snapshots), when not through
        `client`."""
        self.client = client
        self.channel = channel
        self.prefix = prefix
        self.process = process
        self.lease_ms = lease_seconds * 1000.0
        self._admit = client.register_script(_script("admit.lua"))
        self._settle = client.register_script(_script("settle.lua"))
        self._cool = client.register_script(COOL)
        self._snapshot = client.register_script(_script("snapshot.lua"))
        self._ids = itertools.count(1)
        self._global: dict[str, Any] = {"name": GLOBAL, "windows": [], "conc": 0}
        self._keys: dict[str, dict[str, Any]] = {}
        self._shapes: dict[str, Any] = {}
        """Per key, what a reservation on it holds (`_shape_of`)."""
        self.held: dict[str, Lease] = {}
        """Leases not yet released, renewed while their requests run."""
        self._due: list[Lease] | None = None
        """Leases to settle at the next turn of the loop, in one call (`_later`)."""
        self._sending: asyncio.Task[None] | None = None
        self.admitted: deque[tuple[float, str, int]] = deque(maxlen=ADMITTED)
        """(local time, key, tokens) of this process's recent admissions: what the windows it
        last read from Redis may miss (`Seeds`)."""

    def configure(
        self, global_limits: Limits, key_limits: Mapping[str, Limits], guard: float
    ) -> None:
        """The limits every admission checks (each process passes its own config's)."""
        self._global = _spec(GLOBAL, global_limits, guard)
        self._keys = {fp: _spec(f"key:{fp}", lim, guard) for fp, lim in key_limits.items()}
        self._shapes.clear()

    async def warm(self, connections: int = 8) -> None:
        """Load the scripts and open connections ahead of the first burst of requests (a cold
        connection with a script to load takes longer than the bound on a loaded machine)."""
        for script in (self._admit, self._settle, self._cool, self._snapshot):
            script.sha = await self.client.script_load(script.script)
        await asyncio.gather(*(self.client.ping() for _ in range(connections)))
        if self.channel is not None:
            await self.channel.connect()

    async def _script(self, script: Any, arg: dict[str, Any]) -> Any:
        """One of this module's scripts (a registered `Script`) called with its JSON argument,
        as `call` makes a call: on the channel when there is one (which bounds the wait
        itself, without a timer for each call), else through the client."""
        body = json.dumps(arg)
        try:
            if self.channel is not None:
                sha = _sha(script)
                return await self.channel.evalsha(
                    script.script, sha, (), (body.encode(),), within=TIMEOUT
                )
            return await asyncio.wait_for(script(args=[body]), TIMEOUT)
        except Exception as e:
            raise _down(e) from None

    def windows(self) -> dict[str, list[str]]:
        """The configured window names, by scope ("global", "key:<fp>")."""
        return {
            spec["name"]: [w[0] for w in spec["windows"]]
            for spec in (self._global, *self._keys.values())
        }

    async def snapshot(self, processes: int, cap: int = 256) -> tuple[float, dict[str, Any]]:
        """Every configured window as one of `processes` processes' share of it (see
        snapshot.lua): Redis's time (ms) and scope -> window -> [[time_ms, amount]...].
        Scopes without a window are not sent (a pool of 1,000 keys without limits of their
        own sends none of them on every beat)."""
        scopes = [spec for spec in (self._global, *self._keys.values()) if spec["windows"]]
        arg = {"p": self.prefix, "n": max(1, processes), "cap": cap, "scopes": scopes}
        out = await self._script(self._snapshot, arg)
        return float(_text(out[0])), json.loads(_text(out[1])) or {}

    def owns(self, reservation: Reservation) -> bool:
        return isinstance(reservation.handle, Lease)

    async def call(self, aw: Awaitable[T]) -> T:
        """One Redis round trip, at most TIMEOUT; any failure is SharedDown."""
        try:
            return await asyncio.wait_for(aw, TIMEOUT)
        except Exception as e:
            raise _down(e) from None

    async def admit(
        self,
        candidates: Sequence[tuple[str, int]],
        tokens: int,
        now: float,
        *,
        cursor: Cursor | None = None,
        scope: str = "",
        headroom: Mapping[str, float] | None = None,
    ) -> Admitted | Rejected | Moved:
        """Reserve on the first candidate (fingerprint, place in the pool) that fits, the
        shared cursor deciding the order; or say when something could fit (local clock); or,
        with `cursor.span`, where the shared cursor is when it is not among the candidates.
        A key whose provider budget (in `scope`) is spent is skipped until it frees.
        `headroom`: order the candidates by headroom (the headroom strategy), the shared
        windows and budgets with each key's headroom in what is not shared (given)."""
        rid = f"{self.process}:{next(self._ids)}"
        keys = []
        for fp, idx in candidates:
            spec = self._keys.get(fp) or {"name": f"key:{fp}", "windows": [], "conc": 0}
            keys.append({**spec, "fp": fp, "idx": idx})
            if headroom is not None:
                keys[-1]["hh"] = headroom.get(fp, 1.0)
        arg: dict[str, Any] = {
            "p": self.prefix,
            "id": rid,
            "tokens": tokens,
            "lease": self.lease_ms,
            "scope": scope,
            "global": self._global,
            "keys": keys,
        }
        if headroom is not None:
            arg["order"] = "headroom"
        if cursor is not None:
            arg["cursor"] = {
                "pool": cursor.pool,
                "n": cursor.size,
                "mode": cursor.mode,
                "pinned": int(cursor.pinned),
                "span": int(cursor.span),
            }
        sent = time.monotonic()
        out = await self._script(self._admit, arg)
        if int(out[0]) == 2:
            return Moved(int(_text(out[1])))
        result = self._answer(out, rid, tokens, now, scope)
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
            await self._script(self._settle, arg)

    def _answer(
        self, out: list[Any], rid: str, tokens: int, now: float, scope: str = ""
    ) -> Admitted | Rejected:
        def local(ms: float) -> float:
            return now + (ms - redis_now) / 1000.0

        if int(out[0]) == 1:
            fp = _text(out[1])
            windows, slots, stamps = self._shape_of(fp)
            member = _text(out[3])
            flight = (fp, scope, member) if member else ()
            lease = Lease(rid, windows, slots, tokens, stamps, flight, key=fp, scope=scope)
            if slots or flight:
                self.held[rid] = lease
            self.admitted.append((now, fp, tokens))
            return Admitted(Reservation(fp, now, tokens, lease), fp)
        possible, retry, redis_now = int(out[1]) == 1, float(_text(out[2])), float(_text(out[3]))
        found = json.loads(_text(out[4])) or []
        exhausted = tuple(
            Exhausted(scope, limit, local(free) if free is not False else None)
            for scope, limit, free in found
        )
        retry_at = None if retry < 0 else max(now, local(retry))
        return Rejected(exhausted, retry_at, possible=possible)

    def _shape_of(
        self, fp: str
    ) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[tuple[str, str], ...]]:
        """What a reservation on key `fp` holds (a `Lease`'s `windows`, `slots` and `stamps`),
        from the configured limits: worked out once per key and configuration."""
        shape = self._shapes.get(fp)
        if shape is None:
            scopes = (self._global, self._keys.get(fp) or {"windows": [], "conc": 0})
            named = [(GLOBAL if s is self._global else f"key:{fp}", s) for s in scopes]
            windows = tuple((n, w[0]) for n, s in named for w in s["windows"] if w[3] == 1)
            slots = tuple(n for n, s in named if s["conc"] > 0)
            stamps = tuple((n, w[0]) for n, s in named for w in s["windows"])
            shape = self._shapes[fp] = (windows, slots, stamps)
        return shape

    # -- settling (the event loop goes on; a lost call is made good by the lease's expiry) -----

    def adjust(self, reservation: Reservation, actual_tokens: int) -> None:
        lease = _lease(reservation)
        delta, lease.tokens = actual_tokens - lease.tokens, actual_tokens
        if delta and lease.windows:
            self._later(lease).update(delta=self._later(lease).get("delta", 0) + delta)

    def release(self, reservation: Reservation) -> None:
        lease = _lease(reservation)
        if lease.released:
            return
        lease.released = True
        self.held.pop(lease.id, None)
        if lease.slots or lease.flight or lease.pending is not None:
            self._later(lease)["release"] = True

    def report(
        self,
        reservation: Reservation,
        windows: Sequence[Window],
        now: float,
        *,
        guard: float,
        cap: float,
    ) -> None:
        """The provider's answer to this request reported `windows`: they become the key's
        budgets (in the request's scope) for every process. `guard`: the fraction added to a
        window (at most 0.25 s); `cap`: the longest a report may hold a key back (s)."""
        lease = _lease(reservation)
        counted = budget_reports(windows, now)
        if counted:
            self._later(lease)["report"] = {
                "fp": lease.key,
                "scope": lease.scope,
                "except": lease.flight[2] if lease.flight else "",
                "gf": guard,
                "cap": min(NEVER_MS, cap * 1000.0),
                "windows": counted,
            }

    def _later(self, lease: Lease) -> dict[str, Any]:
        """The lease's pending settle call, sent at the next turn of the loop: a correction,
        a report and a release made together (as a finished request makes them) go as one,
        and with those of every other lease settled in the same turn."""
        if lease.pending is None:
            lease.pending = {}
            if self._due is None:
                self._due = []
                self._sending = asyncio.get_running_loop().create_task(
                    self._settle_quietly(self._due)
                )
            self._due.append(lease)
            task = self._sending
            assert task is not None
            lease.tasks.add(task)
            task.add_done_callback(lease.tasks.discard)
        return lease.pending

    async def _settle_quietly(self, due: list[Lease]) -> None:
        # What the current step of the loop adds is sent along (the task may start eagerly).
        await asyncio.sleep(0)
        self._due = None  # what is settled from now on goes in the next call
        many = [arg for arg in map(self._settling, due) if arg is not None]
        if not many:
            return  # nothing held in Redis (no slot, no place in flight), nothing to tell
        arg = many[0] if len(many) == 1 else {"op": "settle", "many": many}
        arg["p"] = self.prefix
        try:
            await self._script(self._settle, arg)
        except SharedDown as e:
            log.debug("kmi-rotor: shared settle lost (%s); the leases expire instead", e)

    @staticmethod
    def _settling(lease: Lease) -> dict[str, Any] | None:
        """The settle of one lease (settle.lua's "settle"), its pending changes taken; None
        when it has nothing to tell Redis."""
        pending, lease.pending = lease.pending or {}, None
        release = bool(pending.get("release")) and bool(lease.slots or lease.flight)
        if not (pending.get("delta") or release or pending.get("report")):
            return None
        return {
            "op": "settle",
            "id": lease.id,
            "delta": pending.get("delta", 0),
            "windows": lease.windows,
            "release": release,
            "slots": lease.slots,
            "flight": lease.flight,
            "report": pending.get("report") or False,
        }

    async def count(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Add to keys' counters ((fingerprint, name) -> n) in one script call, however many
        keys they are (a pool of 1,000 keys in round-robin touches hundreds between beats)."""
        if counts:
            rows = [[fp, name, n] for (fp, name), n in counts.items()]
            await self._script(self._settle, {"op": "count", "p": self.prefix, "counts": rows})

    async def renew(self) -> None:
        """Extend the slots of every running request (called well within the lease): one
        call for all of them."""
        held = [[lease.id, lease.slots, lease.flight] for lease in self.held.values()]
        if held:
            arg = {"op": "renew", "p": self.prefix, "held": held, "lease": self.lease_ms}
            await self._script(self._settle, arg)

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


def _down(e: Exception) -> Exception:
    """What a failed Redis call raises: SharedDown for a call that timed out (`slow`), a
    connection that failed or was lost, and the redis package's own errors; any other error
    as it is."""
    if isinstance(e, SharedDown):
        return e
    if isinstance(e, TimeoutError):
        return SharedDown("no answer within 100 ms", slow=True)
    if isinstance(e, (OSError, ConnectionError)):
        return SharedDown(str(e) or type(e).__name__)
    if type(e).__module__.startswith("redis"):
        return SharedDown(str(e) or type(e).__name__, slow="Timeout" in type(e).__name__)
    return e


def _sha(script: Any) -> bytes:
    sha = script.sha
    return sha.encode() if isinstance(sha, str) else sha


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


__all__ = ["CONCURRENCY", "Cursor", "Lease", "Moved", "SharedDown", "SharedLimits"]
