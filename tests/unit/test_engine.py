"""The rotation engine driven directly, with a clock the tests choose."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kmi_rotor.config import Settings, from_dict
from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.refusal import Refusal
from kmi_rotor.core.signals import FailureKind, Signal, Window
from kmi_rotor.engine import (
    OUTAGE_WINDOW,
    Chosen,
    Decision,
    Engine,
    Wait,
    pool_available_at,
)

T0 = 1_000_000.0
SOURCE = Path("/tmp/x/rotor.toml")
STATUS = {
    FailureKind.OK: 200,
    FailureKind.RATE_LIMITED: 429,
    FailureKind.QUOTA: 402,
    FailureKind.AUTH: 401,
    FailureKind.OVERLOADED: 503,
}


def settings(
    n: int = 3,
    *,
    limits: dict[str, Any] | None = None,
    key_limits: dict[str, Any] | None = None,
    strategy: str = "round-robin",
    health: dict[str, Any] | None = None,
    per_key: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """One pool `p` of `n` keys labelled a, b, c, ...; `per_key` adds fields to a key."""
    keys = [
        {"label": label, "key": f"sk-{label}-{i:024d}", **(per_key or {}).get(label, {})}
        for i, label in enumerate("abcdefgh"[:n])
    ]
    pool: dict[str, Any] = {
        "name": "p",
        "provider": "generic",
        "hosts": ["llm.test"],
        "strategy": strategy,
        "keys": keys,
    }
    if key_limits is not None:
        pool["key_limits"] = key_limits
    # guard 0: these tables check the exact windows (the guard has tests of its own)
    raw: dict[str, Any] = {"state_dir": "/tmp/x/state", "pools": [pool]}
    raw["limits"] = {"guard": 0, **(limits or {})}
    if health is not None:
        raw["health"] = health
    return from_dict(raw, SOURCE, env={})


class Bench:
    """An engine, its only pool and its keys by label."""

    def __init__(self, s: Settings) -> None:
        self.engine = Engine(s)
        self.pool = s.pools[0]
        self.keys = {k.label: k for k in s.keys}

    def fps(self, labels: str) -> frozenset[str]:
        return frozenset(self.keys[x].fingerprint for x in labels)

    def decide(
        self,
        now: float,
        tokens: int = 1,
        *,
        deadline: float | None = None,
        exclude: str = "",
        affinity: str | None = None,
    ) -> Decision:
        """A decision; by default the request may not wait (deadline = now)."""
        return self.engine.decide(
            self.pool,
            tokens,
            now,
            deadline=now if deadline is None else deadline,
            exclude=self.fps(exclude),
            affinity=affinity,
        )

    def take(self, now: float, tokens: int = 1, **kw: Any) -> Chosen:
        d = self.decide(now, tokens, **kw)
        assert isinstance(d, Chosen), d
        return d

    def serve(self, now: float, n: int = 1, **kw: Any) -> str:
        """Labels of `n` requests admitted and finished at `now`."""
        out = []
        for _ in range(n):
            c = self.take(now, **kw)
            self.engine.settle(c.key, c.reservation, None)
            out.append(c.key.label)
        return "".join(out)

    def signal(self, label: str, kind: FailureKind, now: float, **kw: Any) -> KeyHealth:
        return self.engine.observe(self.keys[label], sig(kind, **kw), now)

    def status(self, label: str, now: float) -> str:
        return str(self.engine.key_status(self.keys[label], now)["status"])


def sig(
    kind: FailureKind, retry_at: float | None = None, windows: tuple[Window, ...] = ()
) -> Signal:
    return Signal(STATUS[kind], kind, retry_at, windows, kind.value)


def refusal(d: Decision) -> Refusal:
    assert isinstance(d, Refusal), d
    return d


# -- admission under each window --------------------------------------------------------------

WINDOWS = [
    # (limit, window length, limit value, tokens per request)
    ("requests_per_second", 1.0, 2, 1),
    ("requests_per_minute", 60.0, 2, 1),
    ("requests_per_hour", 3600.0, 2, 1),
    ("requests_per_day", 86400.0, 2, 1),
    ("tokens_per_minute", 60.0, 100, 40),
    ("tokens_per_day", 86400.0, 100, 40),
]


def scoped(scope: str, limit: str, value: int) -> Bench:
    """A bench whose `limit` applies to the whole proxy or to its only key."""
    if scope == "global":
        return Bench(settings(1, limits={limit: value}))
    return Bench(settings(1, key_limits={limit: value}))


SCOPE_NAME = {"global": "the proxy", "key": "key 'a'"}


@pytest.mark.parametrize("scope", ["global", "key"])
@pytest.mark.parametrize(("limit", "length", "value", "tokens"), WINDOWS)
def test_each_window_admits_up_to_its_limit_then_refuses_until_it_frees(
    scope: str, limit: str, length: float, value: int, tokens: int
) -> None:
    b = scoped(scope, limit, value)
    gap = 0.5 if length == 1.0 else 2.0  # inside the window, in another second
    b.serve(T0, tokens=tokens)
    b.serve(T0 + gap, tokens=tokens)
    r = refusal(b.decide(T0 + gap + 0.1, tokens))
    assert (r.status, r.code) == (429, "local_rate_limit")
    assert r.retry_at == T0 + length
    assert (r.limit, r.limit_value, r.scope) == (limit, value, SCOPE_NAME[scope])
    assert isinstance(b.decide(T0 + length - 0.001, tokens), Refusal)
    assert b.serve(T0 + length, tokens=tokens) == "a"


@pytest.mark.parametrize("scope", ["global", "key"])
@pytest.mark.parametrize(("limit", "length", "value", "tokens"), WINDOWS)
def test_waits_when_the_window_frees_within_the_deadline(
    scope: str, limit: str, length: float, value: int, tokens: int
) -> None:
    b = scoped(scope, limit, value)
    b.serve(T0, tokens=tokens)
    b.serve(T0, tokens=tokens)
    now = T0 + 0.25
    for deadline in (T0 + length, T0 + length + 5, T0 + 10 * length):
        assert b.decide(now, tokens, deadline=deadline) == Wait(T0 + length, limit)
    r = refusal(b.decide(now, tokens, deadline=T0 + length - 0.01))
    assert r.retry_at == T0 + length


@pytest.mark.parametrize("scope", ["global", "key"])
def test_concurrency_waits_for_a_release_or_refuses(scope: str) -> None:
    b = scoped(scope, "concurrency", 1)
    held = b.take(T0)
    assert b.decide(T0 + 1, deadline=T0 + 30) == Wait(None, "concurrency")
    r = refusal(b.decide(T0 + 1))
    assert (r.status, r.limit, r.limit_value, r.scope) == (429, "concurrency", 1, SCOPE_NAME[scope])
    assert r.retry_at is not None and r.retry_at > T0 + 1
    b.engine.settle(held.key, held.reservation, None)
    assert b.serve(T0 + 1) == "a"


BINDING_BUG = (
    "engine._binding names an exhausted global limit even when a key limit frees later and "
    "so decides retry_at: the refusal blames requests_per_second (w=1) with retry_at +60 s"
)
COMBINATIONS = [
    # (limits, key_limits, keys, tokens, admitted at, asked at, limit, scope, retry_at)
    ({"requests_per_second": 5, "requests_per_minute": 3}, None, 1, 1,
     (0, 0.1, 0.2), 0.3, "requests_per_minute", "the proxy", 60.0),
    ({"requests_per_second": 1, "requests_per_minute": 10}, None, 1, 1,
     (0,), 0.1, "requests_per_second", "the proxy", 1.0),
    ({"requests_per_minute": 1}, {"requests_per_second": 1}, 1, 1,
     (0,), 0.5, "requests_per_minute", "the proxy", 60.0),
    pytest.param(
        {"requests_per_second": 1}, {"requests_per_minute": 1}, 1, 1,
        (0,), 0.5, "requests_per_minute", "key 'a'", 60.0,
    ),
    ({"requests_per_second": 10}, {"requests_per_minute": 1}, 3, 1,
     (0, 5, 10), 20, "requests_per_minute", "key 'a'", 60.0),
    ({"tokens_per_minute": 100, "requests_per_minute": 10}, None, 1, 60,
     (0,), 1, "tokens_per_minute", "the proxy", 60.0),
    (None, {"requests_per_minute": 2, "tokens_per_minute": 100}, 1, 30,
     (0, 1), 2, "requests_per_minute", "key 'a'", 60.0),
    (None, {"requests_per_minute": 5, "tokens_per_day": 100}, 1, 30,
     (0, 2, 4), 6, "tokens_per_day", "key 'a'", 86400.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "key_limits", "n", "tokens", "admitted", "asked", "limit", "scope", "retry"),
    COMBINATIONS,
)
def test_the_strictest_limit_binds(
    limits: dict[str, int] | None,
    key_limits: dict[str, int] | None,
    n: int,
    tokens: int,
    admitted: tuple[float, ...],
    asked: float,
    limit: str,
    scope: str,
    retry: float,
) -> None:
    b = Bench(settings(n, limits=limits, key_limits=key_limits))
    for t in admitted:
        b.serve(T0 + t, tokens=tokens)
    r = refusal(b.decide(T0 + asked, tokens))
    assert (r.limit, r.scope, r.retry_at) == (limit, scope, T0 + retry)
    assert b.decide(T0 + asked, tokens, deadline=T0 + retry) == Wait(T0 + retry, limit)
    assert isinstance(b.decide(T0 + retry, tokens), Chosen)


def test_a_key_limit_moves_requests_to_the_next_key() -> None:
    b = Bench(settings(3, key_limits={"requests_per_minute": 2}))
    assert b.serve(T0, 6) == "abcabc"
    r = refusal(b.decide(T0 + 1))
    assert (r.scope, r.retry_at) == ("key 'a'", T0 + 60)


def test_a_keys_own_limits_override_the_pools_defaults() -> None:
    b = Bench(
        settings(
            2,
            key_limits={"requests_per_minute": 1},
            per_key={"b": {"limits": {"requests_per_minute": 3}}},
        )
    )
    assert b.serve(T0, 4) == "abbb"
    assert isinstance(b.decide(T0), Refusal)


def test_a_request_waits_for_a_key_coming_back_before_a_window_frees() -> None:
    b = Bench(settings(2, key_limits={"requests_per_minute": 1}))
    b.serve(T0)  # a
    b.signal("b", FailureKind.RATE_LIMITED, T0, retry_at=T0 + 5)
    assert b.decide(T0 + 1, deadline=T0 + 10) == Wait(T0 + 5, "requests_per_minute")
    assert refusal(b.decide(T0 + 1)).retry_at == T0 + 5
    assert b.serve(T0 + 5) == "b"


# -- tokens ------------------------------------------------------------------------------------


def tokens_used(b: Bench, now: float, scope: str = "global") -> float | None:
    return b.engine.usage(scope, now)["tokens_per_minute"]["used"]


@pytest.mark.parametrize(("actual", "next_fits"), [(100, True), (400, True), (401, False)])
def test_settle_corrects_the_reserved_tokens(actual: int, next_fits: bool) -> None:
    b = Bench(settings(1, limits={"tokens_per_minute": 1000}))
    c = b.take(T0, 600)
    assert tokens_used(b, T0) == 600
    assert isinstance(b.decide(T0 + 1, 600), Refusal)
    b.engine.settle(c.key, c.reservation, actual)
    assert tokens_used(b, T0 + 1) == actual
    assert isinstance(b.decide(T0 + 1, 600), Chosen) is next_fits


def test_settle_can_raise_the_reservation_to_what_was_used() -> None:
    b = Bench(settings(1, limits={"tokens_per_minute": 1000}))
    c = b.take(T0, 10)
    b.engine.settle(c.key, c.reservation, 1000)
    r = refusal(b.decide(T0 + 1, 1))
    assert (r.limit, r.retry_at) == ("tokens_per_minute", T0 + 60)


def test_settle_without_tokens_keeps_the_estimate() -> None:
    b = Bench(settings(1, limits={"tokens_per_minute": 1000}))
    c = b.take(T0, 600)
    b.engine.settle(c.key, c.reservation, None)
    assert tokens_used(b, T0 + 1) == 600


@pytest.mark.parametrize(
    ("scope", "limits", "key_limits", "per_key", "tokens", "expected"),
    [
        ("the proxy", {"tokens_per_minute": 100}, None, None, 101, 413),
        ("the proxy", {"tokens_per_day": 100}, None, None, 101, 413),
        ("the proxy", {"tokens_per_minute": 100}, None, None, 100, 200),
        ("key 'a'", None, {"tokens_per_minute": 100}, None, 101, 413),
        (None, None, None, {"a": {"limits": {"tokens_per_minute": 100}}}, 101, 200),
    ],
)
def test_oversized_token_estimate_is_413_at_once(
    scope: str | None,
    limits: dict[str, int] | None,
    key_limits: dict[str, int] | None,
    per_key: dict[str, dict[str, Any]] | None,
    tokens: int,
    expected: int,
) -> None:
    b = Bench(settings(2, limits=limits, key_limits=key_limits, per_key=per_key))
    d = b.decide(T0, tokens, deadline=T0 + 3600)
    if expected == 200:
        assert isinstance(d, Chosen)
        return
    r = refusal(d)
    assert (r.status, r.code, r.scope) == (413, "request_too_large", scope)
    assert r.limit is not None and r.limit.startswith("tokens_per_")


# -- concurrency is released on every path --------------------------------------------------------


@pytest.mark.parametrize("tokens", [None, 0, 50, 5000])
def test_settle_releases_the_slot(tokens: int | None) -> None:
    b = Bench(settings(2, limits={"concurrency": 1}))
    c = b.take(T0)
    assert isinstance(b.decide(T0), Refusal)
    b.engine.settle(c.key, c.reservation, tokens)
    assert isinstance(b.decide(T0), Chosen)


def test_release_is_idempotent() -> None:
    b = Bench(settings(1, limits={"concurrency": 2}))
    first = b.take(T0)
    for _ in range(3):
        b.engine.settle(first.key, first.reservation, None)
    b.take(T0)
    b.take(T0)
    # two in flight under a limit of 2: the repeated settles freed nothing extra
    assert refusal(b.decide(T0)).limit == "concurrency"


def test_settle_without_a_reservation_does_nothing() -> None:
    b = Bench(settings(1, limits={"concurrency": 1}))
    c = b.take(T0)
    b.engine.settle(c.key, None, 10)
    assert isinstance(b.decide(T0), Refusal)


# -- health: what providers said ------------------------------------------------------------------

HEALTH_CASES = [
    # (kind, retry_at offset, status while it lasts, back at offset or None for never)
    (FailureKind.RATE_LIMITED, 10.0, "cooling", 10.0),
    (FailureKind.RATE_LIMITED, None, "cooling", 2.0),  # first hint-less backoff
    (FailureKind.QUOTA, 30.0, "blocked", 30.0),
    (FailureKind.QUOTA, None, "blocked", 3600.0),
    (FailureKind.OVERLOADED, None, "cooling", 1.0),
    (FailureKind.AUTH, None, "disabled", None),
]


@pytest.mark.parametrize(("kind", "retry", "state", "back"), HEALTH_CASES)
def test_a_failing_key_is_skipped_and_comes_back_exactly_at_its_reset(
    kind: FailureKind, retry: float | None, state: str, back: float | None
) -> None:
    b = Bench(settings(2))
    b.signal("a", kind, T0, retry_at=None if retry is None else T0 + retry)
    assert b.status("a", T0) == state
    assert b.serve(T0, 4) == "bbbb"
    if back is None:
        assert not b.engine.usable(b.keys["a"], T0 + 10 * 86400)
        assert refusal(b.decide(T0 + 1, exclude="b")).status == 503
        return
    before = T0 + back - 0.001
    assert not b.engine.usable(b.keys["a"], before)
    assert refusal(b.decide(before, exclude="b")).retry_at == T0 + back
    assert b.decide(before, exclude="b", deadline=T0 + back) == Wait(T0 + back, "no usable key")
    assert b.engine.usable(b.keys["a"], T0 + back)
    assert b.serve(T0 + back, 4) == "abab"


@pytest.mark.parametrize(
    ("window", "skipped_until"),
    [
        (Window("requests", "minute", 100, 0, T0 + 30), T0 + 30),
        (Window("tokens", "minute", 1000, 0, T0 + 45), T0 + 45),
        (Window("requests", "day", 100, 2, T0 + 30), None),  # enough left: usable
        (Window("requests", "day", 100, 0, None), None),  # no reset known: not trusted
    ],
)
def test_a_window_at_zero_skips_the_key_until_its_reset(
    window: Window, skipped_until: float | None
) -> None:
    b = Bench(settings(2))
    b.signal("a", FailureKind.OK, T0, windows=(window,))
    if skipped_until is None:
        assert b.serve(T0, 4) == "abab"
        return
    assert b.serve(T0 + 1, 3) == "bbb"
    assert pool_available_at(b.engine, b.pool, T0 + 1, b.fps("b")) == skipped_until
    assert not b.engine.usable(b.keys["a"], skipped_until - 0.001)
    assert b.serve(skipped_until, 2) == "ab"


def test_a_later_success_without_windows_keeps_the_known_exhaustion() -> None:
    b = Bench(settings(2))
    b.signal("a", FailureKind.OK, T0, windows=(Window("requests", "minute", 10, 0, T0 + 30),))
    b.signal("a", FailureKind.OK, T0 + 1)
    assert not b.engine.usable(b.keys["a"], T0 + 2)


@pytest.mark.parametrize("ways", ["CCC", "AAA", "OOO", "CAO", "OAA"])
def test_every_key_disabled_is_503(ways: str) -> None:
    """Keys a, b, c disabled in the Config, for an Auth failure, or by an Operator."""
    how = dict(zip("abc", ways, strict=True))
    b = Bench(settings(3, per_key={x: {"disabled": True} for x, w in how.items() if w == "C"}))
    for label, way in how.items():
        if way == "A":
            b.signal(label, FailureKind.AUTH, T0)
        elif way == "O":
            b.engine.operate(b.keys[label], "disable", T0)
    r = refusal(b.decide(T0 + 1, deadline=T0 + 3600))
    assert (r.status, r.code, r.retry_at) == (503, "all_keys_disabled", None)
    assert [k["label"] for k in r.keys] == ["a", "b", "c"]
    assert {k["status"] for k in r.keys} == {"disabled"}
    assert pool_available_at(b.engine, b.pool, T0 + 1, frozenset()) is None


def test_auth_recheck_brings_a_disabled_key_back_for_a_try() -> None:
    b = Bench(settings(1, health={"auth_recheck_seconds": 60}))
    b.signal("a", FailureKind.AUTH, T0)
    r = refusal(b.decide(T0 + 1))
    assert (r.code, r.retry_at) == ("pool_exhausted", T0 + 60)
    assert b.serve(T0 + 60) == "a"


POOL_EXHAUSTED = [
    # (what happens to each key, the pool's next availability)
    ({"a": ("rate", 10), "b": ("quota", 30)}, 10),
    ({"a": ("quota", 50), "b": ("rate", 20)}, 20),
    ({"a": ("auth", None), "b": ("rate", 40)}, 40),
    ({"a": ("rate", 10), "b": ("quota", 30), "a-window": ("zero", 40)}, 30),
    ({"a": ("zero", 25), "b": ("zero", 15)}, 15),
]


def apply_case(b: Bench, case: dict[str, tuple[str, float | None]]) -> None:
    kinds = {"rate": FailureKind.RATE_LIMITED, "quota": FailureKind.QUOTA}
    for who, (what, at) in case.items():
        label = who[0]
        if what == "auth":
            b.signal(label, FailureKind.AUTH, T0)
        elif what == "zero":
            assert at is not None
            w = Window("requests", "minute", 10, 0, T0 + at)
            b.signal(label, FailureKind.OK, T0, windows=(w,))
        else:
            assert at is not None
            b.signal(label, kinds[what], T0, retry_at=T0 + at)


@pytest.mark.parametrize(("case", "at"), POOL_EXHAUSTED)
def test_pool_exhausted_says_when_the_pool_can_serve_again(
    case: dict[str, tuple[str, float | None]], at: float
) -> None:
    b = Bench(settings(2))
    apply_case(b, case)
    r = refusal(b.decide(T0 + 1))
    assert (r.status, r.code, r.retry_at) == (429, "pool_exhausted", T0 + at)
    assert [k["label"] for k in r.keys] == ["a", "b"]
    assert all(k["status"] != "ready" for k in r.keys)
    assert pool_available_at(b.engine, b.pool, T0 + 1, frozenset()) == T0 + at
    assert b.decide(T0 + 1, deadline=T0 + at) == Wait(T0 + at, "no usable key")
    assert isinstance(b.decide(T0 + at), Chosen)


# -- exclude, affinity ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["round-robin", "sticky", "weighted", "headroom"])
@pytest.mark.parametrize("exclude", ["a", "b", "ac", "bc"])
def test_exclude_never_returns_an_excluded_key(strategy: str, exclude: str) -> None:
    b = Bench(settings(3, strategy=strategy))
    got = b.serve(T0, 12, exclude=exclude)
    assert not set(got) & set(exclude)
    assert set(got) <= set("abc") - set(exclude)


def test_exclude_skips_an_affine_key_too() -> None:
    b = Bench(settings(3))
    assert b.serve(T0, affinity="s") == "a"
    assert b.serve(T0, 3, exclude="a", affinity="s") == "bbb"


def test_affinity_keeps_a_conversation_on_one_key() -> None:
    b = Bench(settings(3))
    seq = [b.serve(T0, affinity="s1"), b.serve(T0), b.serve(T0, affinity="s1"), b.serve(T0)]
    assert seq == ["a", "b", "a", "b"]
    assert b.serve(T0, 3, affinity="s1") == "aaa"
    assert b.serve(T0, affinity="s2") == "b"
    assert b.serve(T0, 2, affinity="s2") == "bb"


def test_affinity_moves_when_the_key_is_unusable_and_stays_moved() -> None:
    b = Bench(settings(3))
    assert b.serve(T0, affinity="s1") == "a"
    b.signal("a", FailureKind.RATE_LIMITED, T0, retry_at=T0 + 10)
    moved = b.serve(T0 + 1, affinity="s1")
    assert moved != "a"
    assert b.serve(T0 + 2, 3, affinity="s1") == moved * 3
    assert b.serve(T0 + 20, 2, affinity="s1") == moved * 2  # a is back; no reason to move


def test_affinity_moves_when_the_key_has_no_capacity() -> None:
    b = Bench(settings(2, key_limits={"concurrency": 1}))
    held = b.take(T0, affinity="s1")
    assert held.key.label == "a"
    assert b.take(T0, affinity="s1").key.label == "b"
    b.engine.settle(held.key, held.reservation, None)
    assert b.take(T0, affinity="s1").key.label == "a"


# -- outages ---------------------------------------------------------------------------------


def overload(b: Bench, label: str, now: float, network: bool) -> KeyHealth:
    if network:
        return b.engine.network_error(b.keys[label], now, "connection reset")
    return b.signal(label, FailureKind.OVERLOADED, now)


@pytest.mark.parametrize("network", [False, True], ids=["overloaded", "network"])
def test_every_key_overloaded_is_an_outage_and_the_last_is_not_penalised(network: bool) -> None:
    b = Bench(settings(3))
    assert overload(b, "a", T0, network).cooling_until == T0 + 1
    assert overload(b, "b", T0 + 1, network).cooling_until == T0 + 2
    last = overload(b, "c", T0 + 2, network)
    assert last.cooling_until is None and last.overload_streak == 0
    assert b.status("c", T0 + 2) == "ready"


@pytest.mark.parametrize("network", [False, True], ids=["overloaded", "network"])
def test_overloads_spread_beyond_the_window_are_the_keys_own(network: bool) -> None:
    b = Bench(settings(3))
    overload(b, "a", T0, network)
    overload(b, "b", T0 + 1, network)
    late = T0 + OUTAGE_WINDOW + 0.5
    assert overload(b, "c", late, network).cooling_until == late + 1


def test_a_single_key_pool_has_no_outage_to_detect() -> None:
    b = Bench(settings(1))
    assert b.signal("a", FailureKind.OVERLOADED, T0).cooling_until == T0 + 1


def test_a_key_disabled_in_the_configuration_does_not_hide_an_outage() -> None:
    b = Bench(settings(3, per_key={"c": {"disabled": True}}))
    b.signal("a", FailureKind.OVERLOADED, T0)
    assert b.signal("b", FailureKind.OVERLOADED, T0 + 1).cooling_until is None


@pytest.mark.parametrize("how", ["operator", "auth"])
def test_a_key_disabled_at_run_time_does_not_hide_an_outage(how: str) -> None:
    b = Bench(settings(3))
    if how == "operator":
        b.engine.operate(b.keys["c"], "disable", T0 - 100)
    else:
        b.signal("c", FailureKind.AUTH, T0 - 100)
    b.signal("a", FailureKind.OVERLOADED, T0)
    assert b.signal("b", FailureKind.OVERLOADED, T0 + 1).cooling_until is None


# -- operators ---------------------------------------------------------------------------------


def test_operator_disable_and_enable() -> None:
    b = Bench(settings(3))
    h = b.engine.operate(b.keys["b"], "disable", T0)
    assert (h.disabled_reason, h.updated_at) == ("disabled by operator", T0)
    assert b.status("b", T0) == "disabled"
    assert b.serve(T0, 4) == "acac"
    b.engine.operate(b.keys["b"], "enable", T0 + 1)
    assert b.status("b", T0 + 1) == "ready"
    assert b.serve(T0 + 1, 3) == "abc"


@pytest.mark.parametrize("action", ["enable", "reset"])
@pytest.mark.parametrize(
    "kind", [FailureKind.RATE_LIMITED, FailureKind.QUOTA, FailureKind.AUTH, FailureKind.OK]
)
def test_operator_enable_or_reset_makes_a_key_usable_now(action: str, kind: FailureKind) -> None:
    b = Bench(settings(2))
    windows = (Window("requests", "minute", 10, 0, T0 + 600),) if kind is FailureKind.OK else ()
    b.signal("a", kind, T0, retry_at=T0 + 600, windows=windows)
    assert not b.engine.usable(b.keys["a"], T0 + 1)
    h = b.engine.operate(b.keys["a"], action, T0 + 1)
    assert h.updated_at == T0 + 1
    assert b.engine.usable(b.keys["a"], T0 + 1)
    assert b.serve(T0 + 1, 2, exclude="b") == "aa"


def test_operator_unknown_action() -> None:
    b = Bench(settings(1))
    with pytest.raises(ValueError, match="unknown action"):
        b.engine.operate(b.keys["a"], "explode", T0)


def test_rotate_moves_a_sticky_pool_on() -> None:
    b = Bench(settings(3, strategy="sticky"))
    assert b.serve(T0, 3) == "aaa"
    assert b.engine.rotate("p") is True
    assert b.serve(T0, 2) == "bb"
    assert b.engine.rotate("p", times=2) is True
    assert b.serve(T0, 2) == "aa"


def test_sticky_pool_moves_only_when_the_key_is_unusable() -> None:
    b = Bench(settings(3, strategy="sticky"))
    assert b.serve(T0, 2) == "aa"
    b.signal("a", FailureKind.RATE_LIMITED, T0, retry_at=T0 + 5)
    assert b.serve(T0 + 1, 2) == "bb"
    assert b.serve(T0 + 10, 2) == "bb"


@pytest.mark.parametrize(("strategy", "pool"), [("round-robin", "p"), ("sticky", "nope")])
def test_rotate_is_false_for_other_pools(strategy: str, pool: str) -> None:
    b = Bench(settings(3, strategy=strategy))
    assert b.engine.rotate(pool) is False
    assert b.serve(T0, 3) == ("abc" if strategy == "round-robin" else "aaa")


# -- health from elsewhere, reloads ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mine", "theirs", "adopted"),
    [(None, T0, True), (T0, T0 + 1, True), (T0, T0, False), (T0 + 1, T0, False)],
)
def test_adopt_takes_only_newer_health(mine: float | None, theirs: float, adopted: bool) -> None:
    b = Bench(settings(2))
    fp = b.keys["a"].fingerprint
    if mine is not None:
        b.signal("a", FailureKind.RATE_LIMITED, mine, retry_at=mine + 100)
    before = b.engine.health_of(fp)
    other = KeyHealth(disabled_reason="disabled elsewhere", disabled_at=theirs, updated_at=theirs)
    assert b.engine.adopt(fp, other) is adopted
    assert b.engine.health_of(fp) == (other if adopted else before)
    assert b.status("a", T0 + 2) == ("disabled" if adopted else "cooling")


def test_reconfigure_keeps_health_cursor_and_limiter_history() -> None:
    b = Bench(settings(3, key_limits={"requests_per_minute": 5}))
    assert b.serve(T0, 1) == "a"
    b.signal("c", FailureKind.RATE_LIMITED, T0, retry_at=T0 + 100)
    used = b.engine.usage(f"key:{b.keys['a'].fingerprint}", T0)
    b.engine.reconfigure(settings(3, key_limits={"requests_per_minute": 5}, limits={}))
    assert b.engine.usage(f"key:{b.keys['a'].fingerprint}", T0) == used
    assert b.status("c", T0 + 1) == "cooling"
    assert b.serve(T0 + 1, 4) == "baba"


def test_reconfigure_with_another_strategy_starts_afresh() -> None:
    b = Bench(settings(3))
    assert b.serve(T0, 2) == "ab"
    b.engine.reconfigure(settings(3, strategy="sticky"))
    assert b.serve(T0, 2) == "aa"


def test_reconfigure_applies_new_limits() -> None:
    b = Bench(settings(1, limits={"requests_per_minute": 1}))
    b.serve(T0)
    assert isinstance(b.decide(T0 + 1), Refusal)
    b.engine.reconfigure(settings(1, limits={"requests_per_minute": 2}))
    assert b.serve(T0 + 1) == "a"


def test_reconfigure_drops_removed_keys() -> None:
    b = Bench(settings(3))
    removed = b.keys["c"].fingerprint
    b.engine.reconfigure(settings(2))
    pool = b.engine.settings.pools[0]
    got = ""
    for _ in range(4):
        d = b.engine.decide(pool, 1, T0, deadline=T0)
        assert isinstance(d, Chosen)
        got += d.key.label
    assert got == "abab"
    assert removed not in b.engine.keys


# -- strategies through the engine ------------------------------------------------------------


def test_weighted_pool_follows_configured_weights() -> None:
    b = Bench(settings(2, strategy="weighted", per_key={"a": {"weight": 3.0}}))
    assert Counter(b.serve(T0, 40)) == {"a": 30, "b": 10}


def test_headroom_pool_moves_away_from_a_key_running_dry() -> None:
    b = Bench(settings(3, strategy="headroom"))
    assert b.serve(T0, 3) == "abc"
    b.signal("a", FailureKind.OK, T0, windows=(Window("requests", "minute", 100, 3, T0 + 60),))
    assert "a" not in b.serve(T0 + 1, 4)


def test_headroom_pool_counts_local_limits() -> None:
    b = Bench(settings(2, strategy="headroom", per_key={"a": {"limits": {"concurrency": 2}}}))
    held = b.take(T0)
    assert held.key.label == "a"
    # a is half used, b is untouched: b is preferred until a's slot is free
    assert b.serve(T0, 2) == "bb"
    b.engine.settle(held.key, held.reservation, None)
    assert b.serve(T0, 2) == "ab"  # equal again: the cycle goes on


# -- pool availability ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "exclude", "expected"),
    [
        ({}, "", 0.0),
        ({"a": ("rate", 10)}, "", 0.0),
        ({"a": ("rate", 10)}, "b", 10.0),
        ({"a": ("rate", 10), "b": ("quota", 5)}, "", 5.0),
        ({"a": ("auth", None), "b": ("quota", 5)}, "", 5.0),
        ({"a": ("auth", None), "b": ("quota", 5)}, "b", None),
        ({}, "ab", None),
    ],
)
def test_pool_available_at(
    case: dict[str, tuple[str, float | None]], exclude: str, expected: float | None
) -> None:
    b = Bench(settings(2))
    apply_case(b, case)
    got = pool_available_at(b.engine, b.pool, T0 + 1, b.fps(exclude))
    want = None if expected is None else max(T0 + 1, T0 + expected)
    assert got == want


def test_key_status_reports_label_and_reason() -> None:
    b = Bench(settings(1))
    b.signal("a", FailureKind.QUOTA, T0, retry_at=T0 + 30)
    st = b.engine.key_status(b.keys["a"], T0 + 1)
    assert st == {"label": "a", "status": "blocked", "until": T0 + 30, "reason": "quota"}


def test_standing_is_the_key_status_without_label_its_reason_as_recorded() -> None:
    b = Bench(settings(1))
    b.signal("a", FailureKind.QUOTA, T0, retry_at=T0 + 30)
    b.signal("a", FailureKind.OK, T0 + 1, windows=(Window("requests", "minute", 5, 0, T0 + 40),))
    for now in (T0 + 2, T0 + 35, T0 + 41):
        st = b.engine.key_status(b.keys["a"], now)
        assert b.engine.standing(b.keys["a"], now) == {k: v for k, v in st.items() if k != "label"}


# -- provider budgets ---------------------------------------------------------------------------


def test_a_reported_remaining_is_spent_by_what_is_sent_before_the_next_report() -> None:
    b = Bench(settings(2))
    b.signal("a", FailureKind.OK, T0, windows=(Window("requests", "minute", 10, 2, T0 + 30),))
    assert b.serve(T0 + 1, 6) == "ababbb"  # a had 2 left: skipped before the provider refuses it
    assert not b.engine.usable(b.keys["a"], T0 + 29)
    assert b.engine.usable(b.keys["a"], T0 + 31)


def test_requests_in_flight_when_the_provider_answered_count_against_its_remaining() -> None:
    b = Bench(settings(2))
    held = [b.take(T0) for _ in range(4)]  # a, b, a, b in flight
    answered = held[0]
    window = (Window("requests", "minute", 10, 1, T0 + 30),)
    b.engine.observe(
        b.keys["a"], sig(FailureKind.OK, windows=window), T0 + 0.1, answered.reservation
    )
    # One left by the report, and the other request in flight on a may not be in it.
    assert not b.engine.usable(b.keys["a"], T0 + 0.2)


def test_only_the_keys_own_requests_still_in_flight_count_against_its_remaining() -> None:
    b = Bench(settings(2))
    held = [b.take(T0) for _ in range(6)]  # a, b, a, b, a, b in flight
    assert [h.key.label for h in held] == list("ababab")
    for done in (held[2], held[1], held[3]):  # one of a's and two of b's are over
        b.engine.settle(done.key, done.reservation, None)
        b.engine.settle(done.key, done.reservation, None)  # twice: nothing more is forgotten
    window = (Window("requests", "minute", 10, 2, T0 + 30),)
    answered = held[0].reservation
    b.engine.observe(b.keys["a"], sig(FailureKind.OK, windows=window), T0 + 0.1, answered)
    # Two left by the report, less a's one request still in flight (held[4]); b's do not count.
    assert b.engine.usable(b.keys["a"], T0 + 0.2)
    assert b.take(T0 + 0.2, exclude="b").key.label == "a"  # its last one
    assert not b.engine.usable(b.keys["a"], T0 + 0.3)


def test_local_request_limits_pace_a_key_instead_of_the_providers_reports() -> None:
    b = Bench(settings(2, per_key={"a": {"limits": {"requests_per_minute": 100}}}))
    b.signal("a", FailureKind.OK, T0, windows=(Window("requests", "minute", 10, 0, T0 + 30),))
    assert b.engine.usable(b.keys["a"], T0 + 1)  # its own limit has room: that decides


def test_a_limit_of_zero_holds_a_key_until_the_reset_then_one_request_probes() -> None:
    from kmi_rotor.core.signals import parse_signal

    b = Bench(settings(2))
    headers = {
        "x-ratelimit-limit-requests": "0",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
    }
    b.engine.observe(b.keys["a"], parse_signal(200, headers, b"{}", T0), T0)
    # Held back, and not called ready meanwhile.
    assert not b.engine.usable(b.keys["a"], T0 + 1)
    assert b.status("a", T0 + 1) == "cooling"
    assert b.engine.key_status(b.keys["a"], T0 + 1)["until"] == T0 + 2
    # The reset came and nothing refreshed it: one request looks, the next waits for a window.
    assert b.engine.usable(b.keys["a"], T0 + 3)
    assert b.status("a", T0 + 3) == "ready"
    assert b.serve(T0 + 3, 3) == "abb"
    assert b.status("a", T0 + 3.5) == "cooling"
    assert b.engine.usable(b.keys["a"], T0 + 5)


def test_a_spent_window_with_a_far_reset_holds_a_key_at_most_the_cooldown_cap() -> None:
    b = Bench(settings(2, health={"max_cooldown_seconds": 60}))
    far = (Window("requests", "day", 100, 0, T0 + 20 * 86400),)
    b.signal("a", FailureKind.OK, T0, windows=far)
    assert not b.engine.usable(b.keys["a"], T0 + 59)
    assert b.engine.key_status(b.keys["a"], T0 + 59)["until"] == T0 + 60
    assert b.engine.usable(b.keys["a"], T0 + 60)
    assert b.serve(T0 + 60, 3) == "abb"  # one probe, not a rush


def test_pacing_follows_the_configuration_and_the_key_object_asked_about() -> None:
    paced = settings(2, per_key={"a": {"limits": {"requests_per_minute": 100}}})
    b = Bench(paced)
    old_a = b.keys["a"]
    b.signal("a", FailureKind.OK, T0, windows=(Window("requests", "minute", 10, 0, T0 + 30),))
    assert b.engine.usable(old_a, T0 + 1)
    b.engine.reconfigure(settings(2))  # its local limit is gone: the report holds it back
    new_a = next(k for k in b.engine.keys.values() if k.label == "a")
    assert not b.engine.usable(new_a, T0 + 1)
    assert b.engine.usable(old_a, T0 + 1)  # a request of the old configuration: its own limits
    b.engine.reconfigure(paced)
    assert b.engine.usable(next(k for k in b.engine.keys.values() if k.label == "a"), T0 + 1)
