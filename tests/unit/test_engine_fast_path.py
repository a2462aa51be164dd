"""`Engine.decide`'s fast path (the strategy's first usable key, tried alone) decides as the
general path (a plan, the limiter on its candidates, `conclude`) does: twin engines driven
through the same requests, answers and releases agree on every decision and on what they
leave behind (cursors, limiter windows, budgets, requests in flight)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kmi_rotor.config import from_dict
from kmi_rotor.core.limiter import Limiter, Limits, Reservation
from kmi_rotor.core.rotation import RoundRobin, Sticky, make
from kmi_rotor.core.signals import FailureKind, Signal, Window
from kmi_rotor.engine import Chosen, Decision, Engine
from tests.unit.test_engine import SOURCE, T0

MODELS = (None, "m-small", "m-big")


def _settings(strategy: str, n: int, key_limits: dict[str, Any], limits: dict[str, Any]) -> Any:
    keys = [{"label": f"k{i}", "key": f"sk-k{i}-{i:024d}"} for i in range(n)]
    pool: dict[str, Any] = {
        "name": "p",
        "provider": "generic",
        "hosts": ["llm.test"],
        "strategy": strategy,
        "keys": keys,
        "model_limits": {"m-small": {"requests_per_second": 1, "tokens_per_minute": 300}},
    }
    if key_limits:
        pool["key_limits"] = key_limits
    raw = {"state_dir": "/tmp/x/state", "pools": [pool], "limits": {"guard": 0, **limits}}
    return from_dict(raw, SOURCE, env={})


def _shown(d: Decision) -> Any:
    if isinstance(d, Chosen):
        r = d.reservation
        return ("chosen", d.key.label, r.key, r.at, r.estimate)
    return (type(d).__name__, repr(d))


def _left(e: Engine, now: float) -> Any:
    """What a decision leaves behind that a later one reads."""
    scopes = ["global", *(f"key:{fp}" for fp in e.keys)]
    cursors = {
        n: (getattr(s, "_next", None), getattr(s, "_active", None)) for n, s in e.strategies.items()
    }
    return (
        cursors,
        {s: e.usage(s, now) for s in scopes},
        {fp: e.budget_scopes(fp, now) for fp in e.keys},
        {fp: sorted(v.values()) for fp, v in e._open.items()},
    )


LIMITS = [
    ({}, {}),
    ({"requests_per_second": 2}, {}),
    ({"concurrency": 1}, {}),
    ({"tokens_per_minute": 500}, {"requests_per_second": 5}),
    ({"requests_per_minute": 3, "concurrency": 2}, {"tokens_per_minute": 2000}),
    ({}, {"concurrency": 2}),
]


@pytest.mark.parametrize("strategy", ["round-robin", "sticky", "weighted", "headroom"])
@pytest.mark.parametrize(("key_limits", "limits"), LIMITS)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("seed", range(3))
def test_fast_and_general_paths_agree(
    strategy: str, key_limits: dict[str, Any], limits: dict[str, Any], n: int, seed: int
) -> None:
    s = _settings(strategy, n, key_limits, limits)
    fast, general = Engine(s), Engine(s)
    keys = list(s.keys)
    rng = random.Random(seed)
    held: list[tuple[Chosen, Chosen]] = []
    now = T0
    for _ in range(150):
        now += rng.choice([0.0, 0.01, 0.3, 1.1, 7.0])
        op = rng.random()
        if op < 0.6:
            exclude = frozenset(k.fingerprint for k in keys if rng.random() < 0.15)
            tokens = rng.choice([0, 1, 100, 450, 10**6])
            model = rng.choice(MODELS)
            scope = rng.choice(["", "", "model:m-small"])
            deadline = now + rng.choice([0.0, 2.0, 90.0])
            a = fast.decide(
                s.pools[0],
                tokens,
                now,
                deadline=deadline,
                exclude=exclude,
                scope=scope,
                model=model,
            )
            b = general._decide_planned(
                s.pools[0], tokens, now, deadline, exclude, None, scope, model
            )
            assert _shown(a) == _shown(b)
            if isinstance(a, Chosen) and isinstance(b, Chosen):
                held.append((a, b))
        elif op < 0.8 and held:
            a, b = held.pop(rng.randrange(len(held)))
            used = rng.choice([None, 0, 50])
            fast.settle(a.key, a.reservation, used)
            general.settle(b.key, b.reservation, used)
        else:
            key = rng.choice(keys)
            kind = rng.choice(
                [FailureKind.OK, FailureKind.RATE_LIMITED, FailureKind.OVERLOADED, FailureKind.AUTH]
            )
            windows = (
                (
                    Window(
                        "requests", "minute", 10, rng.choice([0, 3]), now + rng.choice([1.0, 20.0])
                    ),
                )
                if rng.random() < 0.5
                else ()
            )
            retry = now + 5.0 if kind is FailureKind.RATE_LIMITED else None
            status = {"ok": 200, "rate_limited": 429, "overloaded": 503, "auth": 401}[kind.value]
            signal = Signal(status, kind, retry, windows, kind.value)
            fast.observe(key, signal, now)
            general.observe(key, signal, now)
        assert _left(fast, now) == _left(general, now)


def test_the_fast_path_is_taken_and_left_as_it_should() -> None:
    s = _settings("round-robin", 2, {"requests_per_minute": 1}, {})
    e = Engine(s)
    pool = s.pools[0]
    first = e._first_fit(pool, 1, T0, frozenset(), "", None)
    assert first is not None and first.key.label == "k0"
    second = e._first_fit(pool, 1, T0, frozenset(), "", None)
    assert second is not None and second.key.label == "k1"
    # k0 is first again, and full: the fast path takes nothing, the general path moves on
    assert e._first_fit(pool, 1, T0, frozenset(), "", None) is None
    assert e.usage(f"key:{first.key.fingerprint}", T0)["requests_per_minute"]["used"] == 1
    # an affinity, or a strategy that must score every key, always goes the general way
    w = Engine(_settings("weighted", 2, {}, {}))
    assert w._first_fit(w.settings.pools[0], 1, T0, frozenset(), "", None) is None


@pytest.mark.parametrize("chosen", [None, 0, 1, 2])
@pytest.mark.parametrize("usable", ["", "a", "c", "ac", "abc"])
def test_a_cycles_start_gives_its_candidates(chosen: int | None, usable: str) -> None:
    keys = ["a", "b", "c"]
    for strategy in (RoundRobin(), Sticky()):
        if chosen is not None:
            strategy.chose(keys, keys[chosen])
        ok = lambda k: k in usable  # noqa: E731
        start = strategy.start()
        walked = [keys[(start + i) % 3] for i in range(3) if ok(keys[(start + i) % 3])]
        assert walked == list(strategy.candidates(keys, ok))
    assert not hasattr(make("weighted"), "start") and not hasattr(make("headroom"), "start")


CASES = [
    # (global limits, key limits, model limits, tokens, model)
    (Limits(), Limits(), None, 1, None),
    (Limits(requests_per_second=1), Limits(), None, 1, None),
    (Limits(), Limits(requests_per_second=1), None, 1, None),
    (Limits(), Limits(tokens_per_minute=10), None, 11, None),
    (Limits(), Limits(), {"m": Limits(requests_per_second=1)}, 1, "m"),
    (Limits(), Limits(), {"m": Limits(tokens_per_minute=5)}, 6, "m"),
    (Limits(), Limits(), {"m": Limits(requests_per_second=1)}, 1, "other"),
    (Limits(concurrency=1), Limits(concurrency=1), None, 0, None),
]


def _shown_reservation(r: Reservation | None) -> Any:
    return None if r is None else (r.key, r.at, r.estimate, r.handle.tokens, len(r.handle.scopes))


@pytest.mark.parametrize(("glob", "own", "models", "tokens", "model"), CASES)
def test_admit_on_is_try_admit_of_one_key(
    glob: Limits, own: Limits, models: Any, tokens: int, model: str | None
) -> None:
    a = Limiter(glob, {"k": own}, model_limits={"k": models} if models else None)
    b = Limiter(glob, {"k": own}, model_limits={"k": models} if models else None)
    for step in range(4):
        now = T0 + step * 0.4
        got = a.admit_on("k", tokens, now, model)
        want = b.try_admit(["k"], tokens, now, model)
        assert _shown_reservation(got) == _shown_reservation(getattr(want, "reservation", None))
        assert a.usage("key:k", now) == b.usage("key:k", now)
        assert a.usage("global", now) == b.usage("global", now)
    with pytest.raises(ValueError):
        a.admit_on("k", -1, T0)
    # a key never configured is unlimited, as in `try_admit`
    got, want = a.admit_on("new", 0, T0 + 9), b.try_admit(["new"], 0, T0 + 9)
    assert _shown_reservation(got) == _shown_reservation(getattr(want, "reservation", None))


def test_a_reservation_compares_and_hashes_by_its_fields_as_a_frozen_one() -> None:
    a, b = Reservation("k", 1.0, 10, object()), Reservation("k", 1.0, 10, object())
    assert a == b and hash(a) == hash(b) == hash(("k", 1.0, 10))
    assert a != Reservation("k", 1.0, 11, a.handle)
    assert "handle" not in repr(a)
