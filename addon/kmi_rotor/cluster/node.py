"""The engine's state shared through Redis (`EngineState`), with this process's fallback.

Admission is one script call; cooldowns, counters and actions go out without holding up a
request, and so does the provider's report of a request's key (its budget, shared). A
heartbeat (every `BEAT` s) registers the process, renews its requests' leases, flushes
counters, reads the shared windows as this process's share (`seeds`) and notices when Redis
comes back. Without Redis: `on_redis_down = "local"` admits against this process's share of
every limit, its windows starting from that share of what the cluster sent; "refuse" answers
503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from ..config import Key, Pool, Settings
from ..core import health as hl
from ..core.budget import COUNTED
from ..core.limiter import Admitted, Rejected, global_binds, rejected_in_turn
from ..core.refusal import Refusal
from ..core.share import scaled
from ..engine import Decision, Engine, Plan, Wait, limits_of
from ..listening import address as listen_address
from . import actions, seeds
from .channel import ScriptChannel
from .limits import Cursor, Moved, SharedDown, SharedLimits, _text
from .registry import Registry, process_id
from .settings import Cluster, connect
from .state import Ask

log = logging.getLogger("kmi_rotor")

BEAT = 0.5
POLL = 0.05
"""A request waiting for a slot another process holds looks again this often."""
CURSORS = {"round-robin": "rr", "sticky": "sticky", "headroom": "rr"}
"""The shared cursor of each strategy (headroom's breaks ties in round-robin order)."""
TURNS = 4
"""Admissions one process has in flight to Redis at once."""
FIRST_ASKED = 8
"""Candidate keys an admission first sends to Redis; when none of them can take the request,
the next call sends four times as many of the rest (a pool of 1,000 usable keys is asked in
five calls at most)."""
"""Admissions one process has in flight to Redis at once."""
SLOW_FOR = 1.0
"""Seconds of answers later than the bound before the process falls back. A loaded machine
stalls an event loop now and then, and a late answer is not an outage: the request that saw
it looks again after POLL. Redis refusing the connection is one at once."""


class RedisState:
    """One process's handle on the shared state (implements `EngineState`)."""

    def __init__(self, cluster: Cluster, *, listen: str = "", client: Any = None) -> None:
        self.cluster = cluster
        self.id = process_id()
        self.listen = listen
        url = cluster.url.get_secret_value()
        self.client = client or connect(url)
        # The scripts every request runs (admission, settling) go on a connection of their own.
        self.channel = ScriptChannel.for_url(url)
        self.limits = SharedLimits(
            self.client, cluster.prefix, self.id, cluster.lease_seconds, self.channel
        )
        self.registry = Registry(self.client, cluster.prefix)
        self.mode = "shared"
        self.alive = 1
        self.down_reason: str | None = None
        self.processes: list[dict[str, Any]] = []
        self.on_action: Callable[[dict[str, Any]], None] | None = None
        self.in_flight: Callable[[], int] = lambda: 0
        self._engine: Engine | None = None
        self._settings: Settings | None = None
        self._counts: dict[tuple[str, str], int] = {}
        self._cooled: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._slow_since: float | None = None
        self._read: seeds.Read | None = None
        """The shared windows as last read, this process's share of them."""
        self._place_of: dict[str, tuple[tuple[Key, ...], dict[str, int]]] = {}
        """Each pool's keys and their places in it, by fingerprint (`_places`)."""
        self._turn = asyncio.Semaphore(TURNS)
        """A few admissions at a time per process: requests woken together queue here, not
        as a burst of calls to Redis where all but one would be refused."""

    # -- set-up ------------------------------------------------------------------------------

    def configure(self, settings: Settings, engine: Engine) -> None:
        """The limits to share, and the engine whose local limiter is the fallback."""
        self._settings, self._engine = settings, engine
        engine.shared = self.limits
        keys = {fp: limits_of(k.limits) for fp, k in engine.keys.items()}
        self.limits.configure(limits_of(settings.limits), keys, settings.limits.guard)
        self._rescale()

    def _rescale(self) -> None:
        """The local limiter holds this process's share: what it enforces without Redis."""
        if self._engine is None or self._settings is None:
            return
        n = self.alive
        keys = {fp: scaled(limits_of(k.limits), n) for fp, k in self._engine.keys.items()}
        self._engine.limit_locally(scaled(limits_of(self._settings.limits), n), keys)

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._heartbeat(), name="kmi-rotor-cluster-beat"),
                loop.create_task(self._listen(), name="kmi-rotor-cluster-actions"),
            ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), 0.5)
        if self.channel is not None:
            await self.channel.aclose()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- admission ---------------------------------------------------------------------------

    async def decide(self, engine: Engine, ask: Ask) -> Decision:
        if self.mode != "shared":
            return self._without_redis(engine, ask)
        now, deadline = ask.now, ask.deadline
        plan = _plan(engine, ask)
        try:
            async with self._turn:
                if self.mode != "shared":  # it went down while this request queued
                    return self._without_redis(engine, ask)
                plan, result = await self._admit(engine, ask, plan)
            self._slow_since = None
        except SharedDown as e:
            if not self._failed(e) and now + POLL <= deadline:
                return Wait(now + POLL, "shared state slow to answer")
            self._went_down(str(e))
            return self._without_redis(engine, ask)
        d = engine.conclude(plan, result, now, deadline=deadline)
        if isinstance(d, Wait) and d.until is None:
            # Another process's release wakes nobody here: look again soon. (A window frees
            # at the time given, wherever the request that fills it came from.)
            return Wait(min(deadline, now + POLL), d.reason)
        return d

    async def _admit(
        self, engine: Engine, ask: Ask, plan: Plan
    ) -> tuple[Plan, Admitted | Rejected]:
        """The plan's candidates asked in turns of growing size, read from it only as far as
        they are asked: an admission sends a few keys, not every usable key of a large pool.
        When the pool's shared cycle is not where this process last left it (another process
        moved it), its first turn is answered `Moved` and the plan made again from there: the
        plan it admitted on (or rejected), and the answer."""
        pool = ask.pool
        places = self._places(pool)
        mode = CURSORS.get(pool.strategy)
        # Round-robin and sticky plans are runs of the pool in cyclic order: the first turn of
        # a larger pool than it holds checks that the shared cycle begins within it.
        span = pool.strategy in ("round-robin", "sticky") and len(pool.keys) > FIRST_ASKED
        unread, rejections, size = iter(plan.candidates), list[Rejected](), FIRST_ASKED
        while asked := [(fp, places[fp]) for fp in itertools.islice(unread, size)]:
            cursor = None
            if mode:
                run = span and len(asked) == size  # fewer: every usable key is in it
                cursor = Cursor(pool.name, len(pool.keys), mode, plan.pinned, run)
            headroom = None
            if pool.strategy == "headroom":
                headroom = {
                    fp: _unshared_headroom(engine, fp, ask.now, ask.scope) for fp, _ in asked
                }
            result = await self.limits.admit(
                asked, ask.tokens, ask.now, cursor=cursor, scope=ask.scope, headroom=headroom
            )
            span = False
            if isinstance(result, Moved):  # begin again where the processes left the cycle
                engine.seek(pool, result.start)
                plan = _plan(engine, ask)
                unread = iter(plan.candidates)
                continue
            if isinstance(result, Admitted):
                return plan, result
            rejections.append(result)
            if global_binds(result):  # no other key takes it before those limits free
                return plan, rejected_in_turn(rejections, next(unread, None) is not None)
            size *= 4
        return plan, rejected_in_turn(rejections) if rejections else Rejected((), None)

    def _places(self, pool: Pool) -> dict[str, int]:
        """Each key's place in the pool, by fingerprint: made once for a pool's keys, not for
        every admission."""
        held = self._place_of.get(pool.name)
        if held is None or held[0] is not pool.keys:
            held = (pool.keys, {k.fingerprint: i for i, k in enumerate(pool.keys)})
            self._place_of[pool.name] = held
        return held[1]

    def _without_redis(self, engine: Engine, ask: Ask) -> Decision:
        if self.cluster.on_redis_down == "refuse":
            # The reason (host, port, error) stays in the log: it is the operator's, not the
            # client's.
            why = "the shared state (Redis) cannot be reached"
            return Refusal(503, "shared_state_unavailable", why)
        return ask.locally(engine)

    def _went_down(self, reason: str) -> None:
        if self.mode == "shared":
            self.mode = "degraded" if self.cluster.on_redis_down == "local" else "refusing"
            self.down_reason = reason or "no answer"
            if self.mode == "degraded":
                self._seed()
            share = f"local limits, 1/{self.alive} of each"
            what = share if self.mode == "degraded" else "refusing requests (503)"
            log.warning(
                "kmi-rotor: Redis at %s unreachable (%s): %s until it is back",
                self.cluster.shown_url,
                self.down_reason,
                what,
            )

    def _failed(self, e: SharedDown) -> bool:
        """Whether this failure means Redis is away (rather than one late answer)."""
        if not e.slow:
            return True
        at = time.monotonic()
        if self._slow_since is None:
            self._slow_since = at
        return at - self._slow_since >= SLOW_FOR

    def _seed(self) -> None:
        """Start the local windows from this process's share of what the cluster last sent
        in them, plus what it admitted since (see `seeds`)."""
        if self._engine is None:
            return
        now = time.time()
        data = seeds.seed(self._read, self.limits.admitted, self.limits.windows(), now)
        self._engine.limiter.restore(data, now)

    async def _read_windows(self) -> None:
        """Read the shared windows as this process's share (on every beat)."""
        redis_now, raw = await self.limits.snapshot(self.alive)  # bounded, as every script
        now = time.time()
        self._read = seeds.read_from(raw, redis_now, now)
        admitted = self.limits.admitted
        while admitted and admitted[0][0] <= now - seeds.OVERLAP:
            admitted.popleft()

    def _came_back(self) -> None:
        self._slow_since = None
        if self.mode != "shared":
            self.mode, self.down_reason = "shared", None
            log.warning(
                "kmi-rotor: Redis at %s reachable again: limits are shared", self.cluster.shown_url
            )

    # -- what this process saw ----------------------------------------------------------------

    def observed(self, engine: Engine, key: Key, now: float, scope: str = "") -> None:
        """Share the key's cooldown (or its end). Its budgets travel with its requests'
        settlement (`SharedLimits.report`), counted request by request in Redis."""
        fp = key.fingerprint
        held, at = engine.health_hold(key, now, scope)
        if held:
            self._cooled.add((fp, scope))
            self._later(self.limits.cool(fp, None if at is None else at - now, scope))
        elif (fp, scope) in self._cooled:
            self._cooled.discard((fp, scope))
            self._later(self.limits.clear(fp, scope))

    def operated(self, key: Key, action: str) -> None:
        self._later(
            self.limits.call(
                actions.announce(
                    self.client, self.cluster.prefix, action, [key.fingerprint], self.id
                )
            )
        )

    def rotated(self, pool: Pool) -> None:
        announce = actions.announce(
            self.client,
            self.cluster.prefix,
            "rotate",
            [pool.name],
            self.id,
            pool_size=len(pool.keys),
        )
        self._later(self.limits.call(announce))

    async def may_poll(self, pool: str, seconds: float) -> bool:
        """Holding the pool's poll turn for `seconds` (taken, or renewed when it is ours).
        Without Redis every process polls: a duplicate read beats none."""
        name, ms = f"{self.cluster.prefix}:poll:{pool}", max(1000, int(seconds * 1000))
        try:
            if await self.limits.call(self.client.set(name, self.id, nx=True, px=ms)):
                return True
            holder = await self.limits.call(self.client.get(name))
            if holder is not None and _text(holder) == self.id:
                await self.limits.call(self.client.pexpire(name, ms))
                return True
            return False
        except SharedDown:
            return True

    def count(self, fp: str, name: str, n: int = 1) -> None:
        self._counts[(fp, name)] = self._counts.get((fp, name), 0) + n

    def _later(self, aw: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(aw))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quietly(self, aw: Any) -> None:
        try:
            await aw
        except SharedDown as e:
            log.debug("kmi-rotor: a shared update was lost (%s)", e)

    # -- background ---------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        started = time.time()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.limits.warm(), 2.0)
        while True:
            if not self.listen:
                self.listen = listen_address()
            record = {
                "host": self.id.rsplit("-", 2)[0],
                "listen": self.listen,
                "in_flight": self.in_flight(),
                "mode": self.mode,
                "started": started,
            }
            try:
                alive = await self.limits.call(self.registry.beat(self.id, record))
                self._came_back()
                if alive != self.alive:
                    self.alive = alive
                    self._rescale()
                await self.limits.renew()
                await self._flush()
                await self._read_windows()
                self.processes = await self.limits.call(self.registry.processes())
            except SharedDown as e:
                if self._failed(e):
                    self._went_down(str(e))
            except Exception:
                log.exception("kmi-rotor: cluster heartbeat failed")
            await asyncio.sleep(BEAT)

    async def _flush(self) -> None:
        counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            await self.limits.count(counts)
        except BaseException:
            for k, n in counts.items():  # kept for the next beat
                self._counts[k] = self._counts.get(k, 0) + n
            raise

    async def _listen(self) -> None:
        """Operators' actions from every process and the CLI (pub/sub; reconnects)."""
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(actions.channel(self.cluster.prefix))
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    action = actions.parse(msg.get("data"))
                    if action and action.get("origin") != self.id and self.on_action:
                        self.on_action(action)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("kmi-rotor: action channel interrupted (%s)", e)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "redis": self.cluster.shown_url,
            "prefix": self.cluster.prefix,
            "on_redis_down": self.cluster.on_redis_down,
            "down_reason": self.down_reason,
            "process": self.id,
            "alive": self.alive,
            "processes": self.processes,
        }


def _plan(engine: Engine, ask: Ask) -> Plan:
    return engine.plan(
        ask.pool, ask.now, exclude=ask.exclude, affinity=ask.affinity, scope=ask.scope
    )


def _unshared_headroom(engine: Engine, fp: str, now: float, scope: str) -> float:
    """The key's headroom for a request of `scope` in the provider windows Redis does not
    count (tokens; its request budgets it does), as this process last saw them."""
    return hl.headroom(engine.health_of(fp), now, scope, skip=COUNTED)
