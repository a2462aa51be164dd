"""The engine's state shared through a real redis-server: two "processes" (two RedisStates,
each with its own engine) in one test, and the fallback when Redis is away."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import free_port
from testkit import script_args

from kmi_rotor.cluster.limits import SharedDown
from kmi_rotor.cluster.node import RedisState
from kmi_rotor.cluster.state import Ask, LocalState
from kmi_rotor.config import Settings, from_dict
from kmi_rotor.core.refusal import Refusal
from kmi_rotor.core.signals import FailureKind, Signal, Window
from kmi_rotor.engine import Chosen, Engine, Wait

SOURCE = Path("/tmp/x/rotor.toml")


def settings(url: str, *, policy: str = "local", rps: int | None = None, **pool: Any) -> Settings:
    keys: list[dict[str, Any]] = [
        {"label": label, "key": f"sk-{label}-{i:024d}"} for i, label in enumerate("abc")
    ]
    if rps is not None:
        for k in keys:
            k["limits"] = {"requests_per_second": rps}
    raw = {
        "state_dir": "/tmp/x/state",
        "limits": {"guard": 0},
        "cluster": {"redis_url": url, "on_redis_down": policy, "prefix": f"t{time.time_ns()}"},
        "pools": [
            {"name": "p", "provider": "generic", "hosts": ["llm.test"], "keys": keys, **pool}
        ],
    }
    return from_dict(raw, SOURCE, env={})


def process(s: Settings) -> tuple[RedisState, Engine]:
    assert s.cluster is not None
    engine = Engine(s)
    state = RedisState(s.cluster)
    state.configure(s, engine)
    return state, engine


async def decide(state: Any, engine: Engine, now: float | None = None) -> Any:
    now = time.time() if now is None else now
    pool = engine.settings.pools[0]
    return await state.decide(engine, Ask(pool, 10, now, now + 5))


async def test_round_robin_and_limits_span_processes(server):
    s = settings(server.url, rps=1)
    (one, e1), (two, e2) = process(s), process(s)
    got = [await decide(one if i % 2 else two, e1 if i % 2 else e2) for i in range(3)]
    assert [g.key.label for g in got if isinstance(g, Chosen)] == ["a", "b", "c"]
    # Each key took its one request per second, whichever process sent it.
    waiting = await decide(one, e1)
    assert isinstance(waiting, Wait) and waiting.until is not None
    for state in (one, two):
        await state.stop()


async def test_a_cooldown_seen_by_one_process_holds_for_the_other(server):
    s = settings(server.url)
    (one, e1), (two, e2) = process(s), process(s)
    key = e1.keys[s.keys[0].fingerprint]
    now = time.time()
    sig = Signal(429, FailureKind.RATE_LIMITED, now + 30.0, (), "rate limited")
    e1.observe(key, sig, now)
    one.observed(e1, key, now)
    await asyncio.gather(*one._background)
    labels = set()
    for _ in range(4):
        d = await decide(two, e2)
        assert isinstance(d, Chosen)
        labels.add(d.key.label)
        e2.settle(d.key, d.reservation, None)
    assert labels == {"b", "c"}
    for state in (one, two):
        await state.stop()


async def test_without_redis_local_shares_apply_and_it_is_said_once(caplog):
    s = settings(f"redis://127.0.0.1:{free_port()}/0", rps=3)
    state, engine = process(s)
    state.alive = 3
    state._rescale()
    caplog.set_level(logging.WARNING, "kmi_rotor")
    chosen = [await decide(state, engine) for _ in range(4)]  # connection refused: at once
    assert state.status()["mode"] == "degraded"
    # 3 keys x 1 request per second each: this process's third of 3 per key.
    assert [type(d).__name__ for d in chosen] == ["Chosen", "Chosen", "Chosen", "Wait"]
    assert sum("unreachable" in r.message for r in caplog.records) == 1
    await state.stop()


async def test_refuse_policy_answers_503():
    s = settings(f"redis://127.0.0.1:{free_port()}/0", policy="refuse")
    state, engine = process(s)
    d = await decide(state, engine)
    assert isinstance(d, Refusal) and d.status == 503 and d.code == "shared_state_unavailable"
    await state.stop()


async def test_the_in_process_state_is_the_engine_itself():
    s = settings("redis://127.0.0.1:1/0")
    engine = Engine(s)
    d = await decide(LocalState(), engine)
    assert isinstance(d, Chosen) and engine.shared is None


async def test_one_process_polls_a_pool(server):
    s = settings(server.url)
    (one, _), (two, _) = process(s), process(s)
    assert await one.may_poll("p", 1.0)
    assert not await two.may_poll("p", 1.0)
    assert await one.may_poll("p", 1.0)  # its turn, renewed
    started = time.monotonic()
    while not await two.may_poll("p", 1.0):  # the first one stopped renewing
        assert time.monotonic() - started < 5.0
        await asyncio.sleep(0.1)
    assert not await one.may_poll("p", 1.0)
    for state in (one, two):
        await state.stop()


async def test_the_headroom_order_across_processes_is_the_requests_scope(server):
    """Token windows (which Redis does not count) order the keys by the request's model."""
    s = settings(server.url, strategy="headroom", limit_scope="model")
    state, engine = process(s)
    pool = engine.settings.pools[0]
    a, b, c = pool.keys
    now = time.time()
    mini, big = "model:mini", "model:big"

    def tokens(left: int) -> Signal:
        window = Window("tokens", None, 1000, left, now + 60)
        return Signal(200, FailureKind.OK, None, (window,), "ok")

    for key, scope, left in ((a, mini, 50), (b, mini, 900), (a, big, 900), (b, big, 50)):
        engine.observe(key, tokens(left), now, scope=scope)
    for scope in (mini, big):
        engine.observe(c, tokens(10), now, scope=scope)
    for scope, expected in ((mini, "b"), (big, "a")):
        got = await state.decide(engine, Ask(pool, 10, now, now + 5, scope=scope))
        assert isinstance(got, Chosen) and got.key.label == expected, (scope, got)
    await state.stop()


# -- a large pool: a few candidates per call -----------------------------------------------------


def large(
    url: str,
    n: int,
    key_limits: dict[str, int],
    strategy: str = "round-robin",
    **global_limits: int,
) -> Settings:
    keys = [
        {"label": f"k{i:03d}", "key": f"sk-k{i:03d}-{i:024d}", "limits": key_limits}
        for i in range(n)
    ]
    raw = {
        "state_dir": "/tmp/x/state",
        "limits": {"guard": 0, **global_limits},
        "cluster": {"redis_url": url, "prefix": f"t{time.time_ns()}"},
        "pools": [
            {
                "name": "p",
                "provider": "generic",
                "hosts": ["llm.test"],
                "keys": keys,
                "strategy": strategy,
            }
        ],
    }
    return from_dict(raw, SOURCE, env={})


def asked(state: RedisState) -> list[int]:
    """The number of candidates of each admission call `state` makes from now on."""
    sizes: list[int] = []
    admit = state.limits.admit

    async def counting(candidates: Any, *args: Any, **kw: Any) -> Any:
        sizes.append(len(candidates))
        return await admit(candidates, *args, **kw)

    state.limits.admit = counting  # type: ignore[method-assign]
    return sizes


async def test_a_large_pool_sends_a_few_candidates_and_more_only_when_they_are_full(server):
    s = large(server.url, 100, {})
    (one, e1), (two, e2) = process(s), process(s)
    now = time.time()
    for key in s.pools[0].keys[:8]:  # the first eight cool down, for every process
        e1.observe(key, Signal(429, FailureKind.RATE_LIMITED, now + 30.0, (), "rate limited"), now)
        one.observed(e1, key, now)
    await asyncio.gather(*one._background)
    sizes = asked(two)
    d = await decide(two, e2)
    assert isinstance(d, Chosen) and d.key.label == "k008"
    assert sizes == [8, 32]  # the next 32 asked only once the first 8 could not take it
    d = await decide(two, e2)
    assert isinstance(d, Chosen) and d.key.label == "k009"
    assert sizes == [8, 32, 8]
    for state in (one, two):
        await state.stop()


@pytest.mark.parametrize(("strategy", "taken"), [("round-robin", 8), ("sticky", 12)])
async def test_a_process_behind_the_shared_cycle_begins_where_it_is(server, strategy, taken):
    """Another process moved the pool's cycle beyond this one's first eight keys (it took
    eight keys in turn; it made key 12 the active one): this process's first call is told
    where the cycle is, and it asks again from there."""
    s = large(server.url, 100, {}, strategy=strategy)
    (one, e1), (two, e2) = process(s), process(s)
    if strategy == "sticky":
        e1.rotate("p", 12)
    for _ in range(8 if strategy == "round-robin" else 1):
        assert isinstance(await decide(one, e1), Chosen)
    sizes = asked(two)
    d = await decide(two, e2)
    assert isinstance(d, Chosen) and d.key.label == f"k{taken:03d}"
    assert sizes == [8, 8]
    d = await decide(two, e2)  # in step now: one call
    nxt = taken + 1 if strategy == "round-robin" else taken
    assert isinstance(d, Chosen) and d.key.label == f"k{nxt:03d}"
    assert sizes == [8, 8, 8]
    for state in (one, two):
        await state.stop()


@pytest.mark.parametrize(
    ("key_limits", "global_limits", "sizes", "scope"),
    [
        # Every key full: every key asked, in three calls; the 429 says when the first frees.
        ({"requests_per_minute": 1}, {}, [8, 32, 10], "key 'k000'"),
        # The proxy's own limit binds: no other key could take it, one call.
        ({}, {"requests_per_minute": 8}, [8], "the proxy"),
    ],
)
async def test_a_full_pool_is_asked_in_a_few_calls_and_says_when_it_frees(
    server, key_limits, global_limits, sizes, scope
):
    s = large(server.url, 50, key_limits, **global_limits)
    state, engine = process(s)
    now = time.time()
    while isinstance(await decide(state, engine, now), Chosen):
        pass
    made = asked(state)
    d = await decide(state, engine)
    assert made == sizes
    # Beyond the request's wait (5 s): a 429 that says when the binding limit frees.
    assert isinstance(d, Refusal) and d.status == 429 and d.scope == scope
    assert d.retry_at is not None and now < d.retry_at <= time.time() + 60
    await state.stop()


def test_a_request_asked_again_is_the_same_request_at_another_time():
    pool = settings("redis://127.0.0.1:1/0").pools[0]
    values = {
        "pool": pool,
        "tokens": 10,
        "now": 1.0,
        "deadline": 5.0,
        "exclude": frozenset({"sha256:x"}),
        "affinity": "conversation",
        "scope": "model:m",
        "model": "m",
    }
    assert {f.name for f in dataclasses.fields(Ask)} == set(values)  # every field set here
    ask = Ask(**values)
    assert ask.at(2.0) == dataclasses.replace(ask, now=2.0)


async def test_counters_of_many_keys_reach_redis_in_one_call_and_are_kept_when_it_fails(
    server, monkeypatch
):
    s = large(server.url, 300, {})
    state, _ = process(s)
    keys = s.pools[0].keys
    for i, key in enumerate(keys):
        state.count(key.fingerprint, "requests", i + 1)
    state.count(keys[0].fingerprint, "errors")
    sent = script_args(state.limits, monkeypatch)
    await state._flush()
    assert len(sent) == 1 and sent[0]["op"] == "count" and len(sent[0]["counts"]) == 301
    assert await state.client.hgetall(f"{s.cluster.prefix}:n:{keys[0].fingerprint}") == {
        b"requests": b"1",
        b"errors": b"1",
    }
    assert await state.client.hget(f"{s.cluster.prefix}:n:{keys[-1].fingerprint}", "requests") == (
        b"300"
    )
    await state.stop()
    # Redis away: the counts wait for the next beat.
    down, _ = process(large(f"redis://127.0.0.1:{free_port()}/0", 2, {}))
    down.count("sha256:x", "requests", 2)
    with pytest.raises(SharedDown):
        await down._flush()
    assert down._counts == {("sha256:x", "requests"): 2}
    await down.stop()
