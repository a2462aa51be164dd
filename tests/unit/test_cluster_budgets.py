"""Provider budgets shared through a real redis-server: every process's requests count against
the last report any process read, and a process that falls back to local limits starts from
its share of what the cluster sent."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis_server import RedisServer
from testkit import need_redis, script_args

from kmi_rotor.cluster import seeds
from kmi_rotor.cluster.limits import SharedLimits
from kmi_rotor.cluster.node import RedisState
from kmi_rotor.cluster.settings import connect
from kmi_rotor.cluster.state import Ask
from kmi_rotor.config import Settings, from_dict
from kmi_rotor.core.limiter import Admitted, Limiter, Limits, Rejected
from kmi_rotor.core.refusal import Refusal
from kmi_rotor.core.signals import FailureKind, Signal, Window
from kmi_rotor.engine import Chosen, Engine, Wait


def procs(client: aioredis.Redis, n: int) -> list[SharedLimits]:
    out = [SharedLimits(client, "t", f"p{i}", 15.0) for i in range(n)]
    for s in out:
        s.configure(Limits(), {}, 0.0)
    return out


def requests(limit: float | None, remaining: float, reset_in: float, now: float) -> Window:
    return Window("requests", None, limit, remaining, now + reset_in)


async def settled(*results: Any) -> None:
    for r in results:
        await asyncio.gather(*r.reservation.handle.tasks)


async def admitted(s: SharedLimits, keys: list[tuple[str, int]]) -> Admitted:
    r = await s.admit(keys, 1, time.time())
    assert isinstance(r, Admitted), r
    return r


A, B = [("a", 0)], [("a", 0), ("b", 1)]


async def budgeted(s: SharedLimits, fp: str = "a") -> None:
    """Give the key a budget (a report of plenty left): from then on its requests are counted
    among its requests in flight, which a report takes as sent."""
    first = await admitted(s, [(fp, 0)])
    now = time.time()
    s.report(first.reservation, [requests(100, 99, 30.0, now)], now, guard=0.0, cap=60.0)
    s.release(first.reservation)
    await settled(first)


async def test_requests_in_flight_anywhere_count_against_a_report(client):
    one, two = procs(client, 2)
    await budgeted(one)
    answered = await admitted(one, A)
    await admitted(two, A)  # sent by another process; the report may miss it
    now = time.time()
    one.report(answered.reservation, [requests(2, 1, 30.0, now)], now, guard=0.0, cap=math.inf)
    one.release(answered.reservation)
    await settled(answered)
    # 1 left as reported, less the other process's request still in flight: spent.
    got = await admitted(two, B)
    assert got.key == "b"
    r = await one.admit(A, 1, time.time())
    assert isinstance(r, Rejected) and r.retry_at is not None
    assert now + 29 < r.retry_at < now + 31
    assert ("key:a", "provider_budget") in {(e.scope, e.limit) for e in r.exhausted}


async def test_what_every_process_sends_after_a_report_spends_it(client):
    three = procs(client, 3)
    first = await admitted(three[0], A)
    now = time.time()
    three[0].report(first.reservation, [requests(10, 3, 30.0, now)], now, guard=0.0, cap=60.0)
    three[0].release(first.reservation)
    await settled(first)
    got = [await admitted(three[i], B) for i in range(3)]
    assert [g.key for g in got] == ["a", "a", "a"]
    assert (await admitted(three[1], B)).key == "b"  # a's 3 are spent, whoever sent them


async def test_a_newer_report_replaces_the_budget(client):
    one, two = procs(client, 2)
    early, late = await admitted(one, A), await admitted(two, A)
    now = time.time()
    one.report(early.reservation, [requests(5, 0, 30.0, now)], now, guard=0.0, cap=60.0)
    one.release(early.reservation)
    await settled(early)
    assert (await admitted(two, B)).key == "b"
    # The other request's answer, read later, says 4 are left (the window moved on).
    later = time.time()
    two.report(late.reservation, [requests(5, 4, 30.0, later)], later, guard=0.0, cap=60.0)
    two.release(late.reservation)
    await settled(late)
    assert (await admitted(one, B)).key == "a"


async def test_an_older_requests_answer_read_late_does_not_bring_its_budget_back(client):
    one, two = procs(client, 2)
    await budgeted(one)
    early, late = await admitted(one, A), await admitted(two, A)
    now = time.time()
    two.report(late.reservation, [requests(5, 0, 30.0, now)], now, guard=0.0, cap=60.0)
    two.release(late.reservation)
    await settled(late)
    # The earlier request's answer, read last (its process was slow), says 4 were left then.
    one.report(early.reservation, [requests(5, 4, 30.0, now)], now, guard=0.0, cap=60.0)
    one.release(early.reservation)
    await settled(early)
    assert (await admitted(two, B)).key == "b"


async def test_after_its_reset_a_key_takes_its_limit_per_window(client):
    one, two = procs(client, 2)
    first = await admitted(one, A)
    now = time.time()
    one.report(first.reservation, [requests(2, 0, 0.3, now)], now, guard=0.0, cap=60.0)
    one.release(first.reservation)
    await settled(first)
    r = await two.admit(A, 1, time.time())
    assert isinstance(r, Rejected) and r.retry_at is not None
    await asyncio.sleep(max(0.0, r.retry_at - time.time()) + 0.02)
    # Reset: its limit of 2 per period (1 s at least), across both processes.
    assert (await admitted(two, B)).key == "a"
    assert (await admitted(one, B)).key == "a"
    assert (await admitted(two, B)).key == "b"


async def test_the_headroom_order_is_the_shared_budgets(client):
    one, two = procs(client, 2)
    first = await admitted(one, A)
    now = time.time()
    one.report(first.reservation, [requests(10, 2, 30.0, now)], now, guard=0.0, cap=60.0)
    one.release(first.reservation)
    await settled(first)
    # Process two never saw a report of a; the shared one says a has 2 of 10 left.
    got = await two.admit(B, 1, time.time(), headroom={"a": 1.0, "b": 1.0})
    assert isinstance(got, Admitted) and got.key == "b"
    # What Redis does not count (given by the caller) weighs too.
    got = await two.admit(B, 1, time.time(), headroom={"a": 1.0, "b": 0.1})
    assert isinstance(got, Admitted) and got.key == "a"


def settings(url: str, prefix: str, rps: int | None) -> Settings:
    keys: list[dict[str, Any]] = [
        {"label": label, "key": f"sk-{label}-{i:024d}"} for i, label in enumerate("ab")
    ]
    if rps is not None:
        for k in keys:
            k["limits"] = {"requests_per_second": rps}
    raw = {
        "state_dir": "/tmp/x/state",
        "limits": {"guard": 0},
        "cluster": {"redis_url": url, "on_redis_down": "local", "prefix": prefix},
        "pools": [{"name": "p", "provider": "generic", "hosts": ["llm.test"], "keys": keys}],
    }
    return from_dict(raw, Path("/tmp/x/rotor.toml"), env={})


async def test_a_report_the_engine_reads_counts_every_processs_requests(server):
    s = settings(server.url, f"e{time.time_ns()}", None)  # only the provider tells the limit
    assert s.cluster is not None
    engines = []
    for _ in range(2):
        e = Engine(s)
        state = RedisState(s.cluster)
        state.configure(s, e)
        engines.append((state, e))
    (one, e1), (two, e2) = engines
    pool = e1.settings.pools[0]
    only_a = frozenset({s.keys[1].fingerprint})

    async def on_a(state: RedisState, engine: Engine) -> Any:
        now = time.time()
        return await state.decide(engine, Ask(pool, 1, now, now + 5, only_a))

    async def answered(d: Any, remaining: int) -> None:
        now = time.time()
        sig = Signal(200, FailureKind.OK, None, (requests(100, remaining, 30.0, now),), "ok")
        e1.observe(d.key, sig, now, d.reservation)
        e1.settle(d.key, d.reservation, None)
        one.observed(e1, d.key, now)
        await asyncio.gather(*d.reservation.handle.tasks)

    await answered(await on_a(one, e1), 99)  # a has a budget: plenty left
    flying = await on_a(two, e2)  # still in flight when one's answer comes back
    d = await on_a(one, e1)
    assert isinstance(flying, Chosen) and isinstance(d, Chosen) and d.key.label == "a"
    await answered(d, 1)
    # 1 left as reported, spent by the other process's request in flight: neither process
    # sends another (each alone would see 1 left).
    for state, engine in engines:
        got = await on_a(state, engine)
        assert isinstance(got, Wait | Refusal), got
    for state, _ in engines:
        await state.stop()


async def test_degraded_mode_starts_from_the_clusters_windows(tmp_path):
    need_redis()
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    try:
        s = settings(srv.url, "d", 2)
        assert s.cluster is not None
        engine = Engine(s)
        state = RedisState(s.cluster)
        state.configure(s, engine)
        pool = engine.settings.pools[0]
        now = time.time()
        got = [await state.decide(engine, Ask(pool, 1, now, now + 5)) for _ in range(4)]
        assert all(isinstance(d, Chosen) for d in got)
        await state._read_windows()
        srv.stop()
        now = time.time()
        d = await state.decide(engine, Ask(pool, 1, now, now + 5))
        assert state.mode == "degraded"
        # Both keys took their 2 this second through Redis: locally too, nothing is left.
        assert isinstance(d, Wait) and d.until is not None and d.until > now
        await state.stop()
    finally:
        srv.stop()


def test_a_seed_is_the_last_read_plus_what_was_admitted_since():
    read = seeds.read_from(
        {"global": {"requests_per_minute": [[100_000.0, 2]]}, "key:a": {"rps": [[99_500.0, 1]]}},
        100_000.0,
        now=50.0,
    )
    assert read.scopes["global"]["requests_per_minute"] == [[50.0, 2.0]]
    assert read.scopes["key:a"]["rps"] == [[49.5, 1.0]]
    windows = {"global": ["requests_per_minute", "tokens_per_minute"], "key:a": ["rps"]}
    admitted = [(48.0, "a", 7), (49.5, "a", 7), (51.0, "a", 7)]
    data = seeds.seed(read, admitted, windows, 52.0)
    # 48.0 is older than the read (less the overlap): the read holds it already.
    assert data["scopes"]["global"]["requests_per_minute"] == [[50.0, 2.0], [49.5, 1], [51.0, 1]]
    assert data["scopes"]["global"]["tokens_per_minute"] == [[49.5, 7], [51.0, 7]]
    assert data["scopes"]["key:a"]["rps"] == [[49.5, 1.0], [49.5, 1], [51.0, 1]]
    limiter = Limiter(Limits(requests_per_minute=5), {"a": Limits()})
    limiter.restore(data, 52.0)
    assert limiter.usage("global", 52.0)["requests_per_minute"]["used"] == 4


async def test_the_share_read_is_one_nth_of_each_window(client):
    s = SharedLimits(client, "t", "p0", 15.0)
    s.configure(Limits(requests_per_minute=100), {"a": Limits(tokens_per_minute=10_000)}, 0.0)
    for _ in range(7):
        await admitted(s, A)
    _, raw = await s.snapshot(3)
    # 7 requests read as 3 groups of up to 3, each 1 request: ceil(7 / 3).
    assert sum(n for _, n in raw["global"]["requests_per_minute"]) == 3
    assert sum(n for _, n in raw["key:a"]["tokens_per_minute"]) == 3  # 1 token each, rounded up
    _, raw = await s.snapshot(1, cap=2)
    assert len(raw["global"]["requests_per_minute"]) == 2
    assert sum(n for _, n in raw["global"]["requests_per_minute"]) == 7


async def test_the_share_read_sends_only_the_scopes_with_windows(client, monkeypatch):
    s = SharedLimits(client, "t", "p0", 15.0)
    s.configure(Limits(), {"a": Limits(tokens_per_minute=10_000), "b": Limits()}, 0.0)
    sent = script_args(s, monkeypatch)
    await s.snapshot(2)
    assert [spec["name"] for spec in sent[0]["scopes"]] == ["key:a"]


def test_the_status_shows_each_keys_shared_budget(server):
    from kmi_rotor.cluster import view

    prefix = f"v{time.time_ns()}"
    s = settings(server.url, prefix, None)
    fp = s.keys[0].fingerprint

    async def report() -> None:
        c = connect(server.url)
        limits = SharedLimits(c, prefix, "p0", 15.0)
        limits.configure(Limits(), {}, 0.0)
        await budgeted(limits, fp)
        await admitted(limits, [(fp, 0)])  # still in flight: counted as sent
        first = await admitted(limits, [(fp, 0)])
        now = time.time()
        limits.report(first.reservation, [requests(10, 4, 30.0, now)], now, guard=0.0, cap=60.0)
        await settled(first)
        await c.aclose()

    asyncio.run(report())
    shown = view.read(s)
    (budget,) = next(k for k in shown["keys"] if k["fingerprint"] == fp)["budgets"].values()
    assert budget["limit"] == 10 and budget["left"] == 3 and 29 < budget["reset_s"] <= 30
    assert "provider budget requests 3/10 (reset in" in view.render(shown)
