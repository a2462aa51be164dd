"""The shared admission script against a real redis-server (started on a free port)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_server import free_port
from testkit import script_args

from kmi_rotor.cluster import limits
from kmi_rotor.cluster.channel import ScriptChannel
from kmi_rotor.cluster.limits import Cursor, SharedDown, SharedLimits
from kmi_rotor.cluster.settings import connect
from kmi_rotor.core.limiter import Admitted, Limits, Rejected

_channels: list[ScriptChannel] | None = None
"""While a test runs its scripts on a channel (see `via`): the channels it opened."""


@pytest.fixture(params=["client", "channel"], autouse=True)
async def via(request: pytest.FixtureRequest, server: Any) -> AsyncIterator[None]:
    """Every test twice: the scripts run through the redis package's client, then on the
    channel of their own that a proxy gives them."""
    global _channels
    _channels = [] if request.param == "channel" else None
    yield
    for channel in _channels or ():
        await channel.aclose()
    _channels = None


def _channel(url: str) -> ScriptChannel | None:
    if _channels is None:
        return None
    channel = ScriptChannel.for_url(url)
    assert channel is not None
    _channels.append(channel)
    return channel


def shared(client: aioredis.Redis, name: str = "p1", lease: float = 15.0) -> SharedLimits:
    url = client.connection_pool.connection_kwargs
    channel = _channel(f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}")
    return SharedLimits(client, "t", name, lease, channel)


KEYS = [("a", 0), ("b", 1), ("c", 2)]


async def test_a_full_key_passes_the_request_to_the_next_and_says_when_it_frees(client):
    s = shared(client)
    s.configure(Limits(), {fp: Limits(requests_per_second=2) for fp, _ in KEYS}, 0.0)
    started = time.time()
    got = [await s.admit(KEYS[:2], 10, time.time()) for _ in range(4)]
    assert [g.key for g in got if isinstance(g, Admitted)] == ["a", "a", "b", "b"]
    now = time.time()
    r = await s.admit(KEYS[:2], 10, now)
    assert isinstance(r, Rejected) and r.possible
    assert r.retry_at is not None and started + 0.9 < r.retry_at < now + 1.1
    assert {(e.scope, e.limit) for e in r.exhausted} == {
        ("key:a", "requests_per_second"),
        ("key:b", "requests_per_second"),
    }
    await asyncio.sleep(max(0.0, r.retry_at - time.time()) + 0.01)
    assert isinstance(await s.admit(KEYS[:2], 10, time.time()), Admitted)


async def test_the_global_limit_binds_every_key(client):
    s = shared(client)
    s.configure(Limits(requests_per_minute=3), {}, 0.0)
    now = time.time()
    for _ in range(3):
        assert isinstance(await s.admit(KEYS, 1, now), Admitted)
    r = await s.admit(KEYS, 1, now)
    assert isinstance(r, Rejected) and r.exhausted[0].scope == "global"
    assert r.retry_at is not None and r.retry_at > now + 55


async def test_tokens_are_corrected_at_their_original_time(client):
    s = shared(client)
    s.configure(Limits(), {"a": Limits(tokens_per_minute=100)}, 0.0)
    now = time.time()
    first = await s.admit([("a", 0)], 60, now)
    assert isinstance(first, Admitted)
    assert isinstance(await s.admit([("a", 0)], 60, now), Rejected)
    s.adjust(first.reservation, 10)
    await asyncio.gather(*first.reservation.handle.tasks)
    assert isinstance(await s.admit([("a", 0)], 60, now), Admitted)
    assert isinstance(await s.admit([("a", 0)], 60, now), Rejected)
    too_big = await s.admit([("a", 0)], 101, now)
    assert isinstance(too_big, Rejected) and not too_big.possible


async def test_a_concurrency_slot_frees_on_release_or_when_its_lease_ends(client):
    s = shared(client, lease=1.0)
    s.configure(Limits(), {"a": Limits(concurrency=1)}, 0.0)
    held = await s.admit([("a", 0)], 1, time.time())
    assert isinstance(held, Admitted)
    r = await s.admit([("a", 0)], 1, time.time())
    assert isinstance(r, Rejected) and r.possible and r.retry_at is None
    s.release(held.reservation)
    await asyncio.gather(*held.reservation.handle.tasks)
    assert isinstance(await s.admit([("a", 0)], 1, time.time()), Admitted)  # never released
    started = time.monotonic()
    while isinstance(await s.admit([("a", 0)], 1, time.time()), Rejected):
        assert time.monotonic() - started < 5.0
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.8


async def test_leases_settled_in_one_turn_of_the_loop_go_in_one_call(client, monkeypatch):
    s = shared(client)
    s.configure(Limits(), {"a": Limits(concurrency=3, tokens_per_minute=100)}, 0.0)
    now = time.time()
    held = [await s.admit([("a", 0)], 30, now) for _ in range(3)]
    assert all(isinstance(h, Admitted) for h in held)
    assert isinstance(await s.admit([("a", 0)], 1, now), Rejected)  # three slots taken
    calls = script_args(s, monkeypatch)
    for h in held:  # as three requests ending in one turn of the loop
        s.adjust(h.reservation, 5)
        s.release(h.reservation)
    await asyncio.gather(*(t for h in held for t in h.reservation.handle.tasks))
    assert [len(c.get("many", [c])) for c in calls] == [3]
    # Each one applied: the slots are free and the tokens corrected (3 x 5 of 100 counted).
    again = [await s.admit([("a", 0)], 28, now) for _ in range(3)]
    assert all(isinstance(a, Admitted) for a in again)
    assert isinstance(await s.admit([("a", 0)], 1, now), Rejected)


async def test_renewal_keeps_a_running_requests_slot(client):
    s = shared(client, lease=1.0)
    s.configure(Limits(), {"a": Limits(concurrency=1)}, 0.0)
    assert isinstance(await s.admit([("a", 0)], 1, time.time()), Admitted)
    for _ in range(6):
        await asyncio.sleep(0.3)
        await s.renew()
    assert isinstance(await s.admit([("a", 0)], 1, time.time()), Rejected)


async def test_a_cooldown_keeps_every_process_off_the_key(client):
    one, two = shared(client, "p1"), shared(client, "p2")
    for s in (one, two):
        s.configure(Limits(), {}, 0.0)
    await one.cool("a", 30.0)
    got = await two.admit(KEYS[:2], 1, time.time())
    assert isinstance(got, Admitted) and got.key == "b"
    await one.cool("b", 0.5)
    now = time.time()
    r = await two.admit(KEYS[:2], 1, now)
    assert isinstance(r, Rejected) and r.retry_at is not None and r.retry_at < now + 0.7
    await one.clear("a")
    got = await two.admit(KEYS[:2], 1, time.time())
    assert isinstance(got, Admitted) and got.key == "a"
    await one.cool("a", None)  # an operator's disable: no expiry
    assert (await two.admit(KEYS[:1], 1, time.time())).retry_at is None


async def test_round_robin_is_one_cycle_across_processes(client):
    procs = [shared(client, f"p{i}") for i in range(3)]
    for s in procs:
        s.configure(Limits(), {}, 0.0)
    cursor = Cursor("pool", 3, "rr", False)
    chosen = []
    for i in range(9):
        # Every process offers its own local order; the shared cursor decides.
        got = await procs[i % 2].admit(KEYS, 1, time.time(), cursor=cursor)
        assert isinstance(got, Admitted)
        chosen.append(got.key)
    assert chosen == ["a", "b", "c"] * 3


async def test_concurrent_admissions_never_exceed_a_limit(client, server, monkeypatch):
    # What is tested is atomicity: a burst of 60 on a loaded machine may take longer than the
    # bound a request waits, which would only make some of them fail, not change the count.
    monkeypatch.setattr(limits, "TIMEOUT", 5.0)
    clients = [connect(server.url) for _ in range(3)]
    procs = [
        SharedLimits(c, "t", f"p{i}", 15.0, _channel(server.url)) for i, c in enumerate(clients)
    ]
    for s in procs:
        s.configure(Limits(requests_per_minute=25), {"a": Limits(requests_per_minute=10)}, 0.0)
        await s.warm(16)
    results = await asyncio.gather(
        *(procs[i % 3].admit([("a", 0), ("b", 1)], 1, time.time()) for i in range(60))
    )
    admitted = [r.key for r in results if isinstance(r, Admitted)]
    assert admitted.count("a") == 10 and len(admitted) == 25
    for c in clients:
        await c.aclose()


async def test_times_are_given_in_the_callers_clock(client):
    s = shared(client)
    s.configure(Limits(), {"a": Limits(requests_per_second=1)}, 0.0)
    skewed = time.time() + 7.0  # a process whose clock is 7 s ahead
    assert isinstance(await s.admit([("a", 0)], 1, skewed), Admitted)
    r = await s.admit([("a", 0)], 1, skewed)
    assert isinstance(r, Rejected) and r.retry_at is not None
    assert skewed + 0.7 < r.retry_at < skewed + 1.2


async def test_an_unreachable_redis_fails_fast():
    c = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.1)
    s = SharedLimits(c, "t", "p1", 15.0, _channel(f"redis://127.0.0.1:{free_port()}/0"))
    started = time.monotonic()
    with pytest.raises(SharedDown):
        await s.admit(KEYS, 1, time.time())
    assert time.monotonic() - started < 1.0
    await c.aclose()


async def test_a_late_answer_counts_the_request_from_when_it_leaves(client):
    s = shared(client)
    s.configure(Limits(), {"a": Limits(requests_per_second=1)}, 0.0)
    got = await s.admit([("a", 0)], 1, time.time())
    assert isinstance(got, Admitted)
    await asyncio.sleep(0.3)  # as if this process had not run for 0.3 s
    await s._restamp(got.reservation)
    now = time.time()
    r = await s.admit([("a", 0)], 1, now)
    assert isinstance(r, Rejected) and r.retry_at is not None
    assert r.retry_at > now + 0.9  # a second from the new stamp, not from the first


async def test_a_rotation_moves_the_shared_sticky_key_for_every_process(client):
    from kmi_rotor.cluster import actions

    one, two = shared(client, "p1"), shared(client, "p2")
    for s in (one, two):
        s.configure(Limits(), {}, 0.0)
    cursor = Cursor("pool", 3, "sticky", False)
    got = [await s.admit(KEYS, 1, time.time(), cursor=cursor) for s in (one, two, one)]
    assert [g.key for g in got] == ["a", "a", "a"]
    await actions.announce(client, "t", "rotate", ["pool"], "cli", pool_size=3)
    got = [await s.admit(KEYS, 1, time.time(), cursor=cursor) for s in (two, one)]
    assert [g.key for g in got] == ["b", "b"]
