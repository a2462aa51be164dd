"""Limits held per key and scope: what is scoped (provider windows, budgets, 429 cooldowns),
what stays key-wide (quota, credentials, overloads, operators), and selection by scope."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kmi_rotor.config import ConfigError, from_dict
from kmi_rotor.core.budget import Budgets
from kmi_rotor.core.health import (
    MAX_SCOPES,
    SCOPE_TTL,
    KeyHealth,
    Policy,
    apply_network_error,
    apply_signal,
    headroom,
    next_usable_at,
    operator_reset,
    prune_scopes,
    status,
    usable,
)
from kmi_rotor.core.presets import PRESETS
from kmi_rotor.core.signals import FailureKind, Signal, Window
from kmi_rotor.core.state import KeyRecord, StateDoc
from kmi_rotor.engine import Chosen, Engine, Wait
from kmi_rotor.status import render_table, rows

NOW = 1_000_000.0
POLICY = Policy()
MINI, BIG = "model:gpt-4o-mini", "model:gpt-4o"
STATUS = {
    FailureKind.OK: 200,
    FailureKind.RATE_LIMITED: 429,
    FailureKind.QUOTA: 402,
    FailureKind.AUTH: 401,
    FailureKind.OVERLOADED: 503,
}


def sig(kind: FailureKind, retry_at: float | None = None, windows: tuple[Window, ...] = ()):
    return Signal(STATUS[kind], kind, retry_at, windows, kind.value)


def spent(reset_at: float, dim: str = "requests") -> Window:
    return Window(dim, None, 60, 0, reset_at)


# -- health: what is scoped and what is key-wide --------------------------------------------------

# (id, signal kind, retry after, scope it was seen in, usable for: "" / MINI / BIG after it)
HEALTH_CASES = [
    (
        "429-in-a-scope-cools-that-scope-only",
        FailureKind.RATE_LIMITED,
        30,
        MINI,
        (True, False, True),
    ),
    ("429-key-wide-cools-every-scope", FailureKind.RATE_LIMITED, 30, "", (False, False, False)),
    ("quota-is-key-wide", FailureKind.QUOTA, 30, MINI, (False, False, False)),
    ("bad-credential-is-key-wide", FailureKind.AUTH, None, MINI, (False, False, False)),
    ("overload-is-key-wide", FailureKind.OVERLOADED, None, MINI, (False, False, False)),
    ("success-cools-nothing", FailureKind.OK, None, MINI, (True, True, True)),
]


@pytest.mark.parametrize(
    ("kind", "retry", "scope", "after"),
    [c[1:] for c in HEALTH_CASES],
    ids=[c[0] for c in HEALTH_CASES],
)
def test_what_a_signal_holds_and_for_which_scope(
    kind: FailureKind, retry: float | None, scope: str, after: tuple[bool, ...]
) -> None:
    retry_at = None if retry is None else NOW + retry
    h = apply_signal(KeyHealth(), sig(kind, retry_at), NOW, POLICY, scope=scope)
    got = tuple(usable(h, NOW + 0.5, scope=s) for s in ("", MINI, BIG))
    assert got == after


def test_a_scoped_cooldown_ends_at_its_retry_and_says_why() -> None:
    h = apply_signal(KeyHealth(), sig(FailureKind.RATE_LIMITED, NOW + 30), NOW, POLICY, scope=MINI)
    assert status(h, NOW, MINI).state == "cooling"
    assert status(h, NOW, MINI).until == NOW + 30
    assert status(h, NOW, "").state == "ready"
    assert next_usable_at(h, NOW, POLICY, scope=MINI) == NOW + 30
    assert next_usable_at(h, NOW, POLICY, scope=BIG) == NOW
    assert usable(h, NOW + 30, scope=MINI)


def test_scoped_429s_back_off_by_their_own_streak() -> None:
    h = KeyHealth()
    for _ in range(3):
        h = apply_signal(h, sig(FailureKind.RATE_LIMITED), NOW, POLICY, scope=MINI)
    # 2, 4, 8 seconds: the third 429 of the scope backs off 8 s; the key itself has no streak
    assert h.scopes[MINI].cooling_until == NOW + 8
    assert h.rate_limit_streak == 0
    h = apply_signal(h, sig(FailureKind.RATE_LIMITED), NOW, POLICY, scope=BIG)
    assert h.scopes[BIG].cooling_until == NOW + 2
    h = apply_signal(h, sig(FailureKind.OK), NOW, POLICY, scope=MINI)
    assert h.scopes[MINI].rate_limit_streak == 0


def test_a_scoped_429_without_hint_waits_for_the_scopes_exhausted_window() -> None:
    h = apply_signal(
        KeyHealth(), sig(FailureKind.OK, windows=(spent(NOW + 40),)), NOW, POLICY, scope=MINI
    )
    h = apply_signal(h, sig(FailureKind.RATE_LIMITED), NOW, POLICY, scope=MINI)
    assert h.scopes[MINI].cooling_until == NOW + 40


# (id, where the spent window was reported, usable for "" / MINI / BIG)
WINDOW_CASES = [
    ("scope-window-binds-its-scope", MINI, (True, False, True)),
    ("key-window-binds-every-scope", "", (False, False, False)),
]


@pytest.mark.parametrize(
    ("seen_in", "after"), [c[1:] for c in WINDOW_CASES], ids=[c[0] for c in WINDOW_CASES]
)
def test_windows_bind_their_scope_and_key_windows_bind_all(
    seen_in: str, after: tuple[bool, ...]
) -> None:
    h = apply_signal(
        KeyHealth(), sig(FailureKind.OK, windows=(spent(NOW + 30),)), NOW, POLICY, scope=seen_in
    )
    assert tuple(usable(h, NOW + 1, scope=s) for s in ("", MINI, BIG)) == after
    assert all(usable(h, NOW + 30, scope=s) for s in ("", MINI, BIG))


def test_headroom_is_the_scopes_and_the_keys_tightest() -> None:
    half = Window("requests", None, 100, 50, NOW + 60)
    tenth = Window("tokens", None, 1000, 100, NOW + 60)
    h = apply_signal(KeyHealth(), sig(FailureKind.OK, windows=(half,)), NOW, POLICY, scope=MINI)
    assert headroom(h, NOW, MINI) == 0.5
    assert headroom(h, NOW, BIG) == 1.0
    h = apply_signal(h, sig(FailureKind.OK, windows=(tenth,)), NOW, POLICY)
    assert headroom(h, NOW, BIG) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("scope", "skip", "expected"),
    [
        (MINI, (), 0.1),  # the scope's token window binds
        (MINI, ("requests",), 0.1),
        (MINI, ("tokens",), 0.5),  # a store that counts tokens: the requests window binds
        (MINI, ("requests", "tokens"), 1.0),
        (BIG, ("requests",), 1.0),  # another model's windows never bind
    ],
)
def test_headroom_leaves_out_the_dimensions_a_shared_store_counts(
    scope: str, skip: tuple[str, ...], expected: float
) -> None:
    windows = (
        Window("requests", None, 100, 50, NOW + 60),
        Window("tokens", None, 1000, 100, NOW + 60),
    )
    h = apply_signal(KeyHealth(), sig(FailureKind.OK, windows=windows), NOW, POLICY, scope=MINI)
    assert headroom(h, NOW, scope, skip=skip) == pytest.approx(expected)


def test_network_errors_and_operators_are_key_wide() -> None:
    h = apply_signal(KeyHealth(), sig(FailureKind.RATE_LIMITED, NOW + 60), NOW, POLICY, scope=MINI)
    n = apply_network_error(h, NOW, POLICY)
    assert not usable(n, NOW + 0.5, scope=BIG)
    r = operator_reset(h, NOW)
    assert r.scopes == {} and usable(r, NOW, scope=MINI)


def test_scopes_not_seen_for_a_day_are_dropped_and_their_number_is_bounded() -> None:
    h = apply_signal(KeyHealth(), sig(FailureKind.OK), NOW, POLICY, scope=MINI)
    h = apply_signal(h, sig(FailureKind.OK), NOW + SCOPE_TTL - 1, POLICY, scope=BIG)
    assert set(h.scopes) == {MINI, BIG}
    h = apply_signal(h, sig(FailureKind.OK), NOW + SCOPE_TTL + 1, POLICY, scope=BIG)
    assert set(h.scopes) == {BIG}
    for i in range(MAX_SCOPES + 5):
        h = apply_signal(h, sig(FailureKind.OK), NOW + SCOPE_TTL + 2 + i, POLICY, scope=f"m{i}")
    assert len(h.scopes) == MAX_SCOPES
    assert f"m{MAX_SCOPES + 4}" in h.scopes and BIG not in h.scopes


def test_a_scope_still_cooling_outlives_the_day() -> None:
    long = Policy(max_cooldown_seconds=3 * SCOPE_TTL)
    retry = sig(FailureKind.RATE_LIMITED, NOW + 2 * SCOPE_TTL)
    h = apply_signal(KeyHealth(), retry, NOW, long, scope=MINI)
    assert MINI in prune_scopes(h, NOW + SCOPE_TTL + 1).scopes
    assert MINI not in prune_scopes(h, NOW + 2 * SCOPE_TTL + 1).scopes


def test_scoped_records_survive_the_state_file() -> None:
    h = apply_signal(KeyHealth(), sig(FailureKind.RATE_LIMITED, NOW + 30), NOW, POLICY, scope=MINI)
    back = KeyHealth.model_validate(json.loads(h.model_dump_json()))
    assert back == h and not usable(back, NOW + 1, scope=MINI)
    old = KeyHealth.model_validate({"cooling_until": NOW + 5})  # a file from before scopes
    assert old.scopes == {}
    bad = KeyHealth.model_validate({"scopes": {MINI: {"cooling_until": float("nan")}}})
    assert bad.scopes[MINI].cooling_until is None


# -- budgets --------------------------------------------------------------------------------------


def test_a_spent_scope_budget_blocks_that_scope_only() -> None:
    b = Budgets()
    b.observe("k", (Window("requests", None, 10, 1, NOW + 60),), [], NOW, MINI)
    assert b.blocked_until("k", NOW, MINI) is None
    b.admitted("k", NOW, MINI)
    assert b.blocked_until("k", NOW, MINI) == NOW + 60
    assert b.blocked_until("k", NOW, BIG) is None
    assert b.blocked_until("k", NOW) is None
    assert b.fraction("k", NOW, MINI) == 0.0 and b.fraction("k", NOW, BIG) == 1.0


def test_a_key_budget_is_spent_by_every_scope() -> None:
    b = Budgets()
    b.observe("k", (Window("requests", None, 10, 2, NOW + 60),), [], NOW)
    b.admitted("k", NOW, MINI)
    b.admitted("k", NOW, BIG)
    assert b.blocked_until("k", NOW, BIG) == NOW + 60
    assert b.blocked_until("k", NOW) == NOW + 60


def test_scoped_budgets_are_pruned_and_listed() -> None:
    b = Budgets()
    b.observe("k", (Window("requests", None, 10, 5, NOW + 60),), [], NOW, MINI)
    assert set(b.scopes("k", NOW)) == {MINI}
    assert b.scopes("k", NOW)[MINI]["requests"]["left"] == 5
    b.prune("k", NOW + SCOPE_TTL - 1, SCOPE_TTL)
    assert set(b.scopes("k", NOW)) == {MINI}
    b.prune("k", NOW + SCOPE_TTL + 1, SCOPE_TTL)
    assert b.scopes("k", NOW) == {}


def test_pruning_follows_each_scopes_last_report() -> None:
    """Pruning on every answer goes by each scope's last report, whichever order they came
    in: one reported again stays, one never reported with a counted window goes at once."""
    b = Budgets()
    w = (Window("requests", None, 10, 5, NOW + 60),)
    b.observe("k", w, [], NOW, "model:a")
    b.observe("k", w, [], NOW + 100, "model:b")
    b.prune("k", NOW + 200, SCOPE_TTL)  # nothing old enough
    b.observe("k", w, [], NOW + 300, "model:a")  # a reported again: b is now the oldest
    b.observe("k", (Window("tokens", None, 10, 5, NOW + 60),), [], NOW + 400, "model:c")
    b.prune("k", NOW + 400, SCOPE_TTL)
    assert set(b.scopes("k", NOW + 400)) == {"model:a", "model:b"}  # c holds no budget
    b.prune("k", NOW + 100 + SCOPE_TTL + 1, SCOPE_TTL)
    assert set(b.scopes("k", NOW + 400)) == {"model:a"}
    b.observe("k", w, [], NOW + 500, "model:d")
    b.prune("k", NOW + 300 + SCOPE_TTL + 1, SCOPE_TTL)
    assert set(b.scopes("k", NOW + 500)) == {"model:d"}
    b.forget("k")
    b.observe("k", w, [], NOW, "model:e")
    b.prune("k", NOW + SCOPE_TTL + 1, SCOPE_TTL)
    assert b.scopes("k", NOW) == {}


# -- the engine: selection by scope --------------------------------------------------------------


def settings(provider: str = "openai", **pool: Any):
    keys = [{"label": x, "key": f"sk-{x}-{i:024d}"} for i, x in enumerate("ab")]
    raw = {
        "state_dir": "/tmp/x/state",
        "limits": {"guard": 0},
        "pools": [{"name": "p", "provider": provider, "keys": keys, **pool}],
    }
    return from_dict(raw, Path("/tmp/x/rotor.toml"), env={})


class Bench:
    def __init__(self, **pool: Any) -> None:
        s = settings(**pool)
        self.engine, self.pool = Engine(s), s.pools[0]
        self.keys = {k.label: k for k in s.keys}

    def take(self, now: float, scope: str) -> str:
        d = self.engine.decide(self.pool, 1, now, deadline=now, scope=scope)
        assert isinstance(d, Chosen), d
        self.engine.observe(d.key, sig(FailureKind.OK), now, d.reservation, scope)
        self.engine.settle(d.key, d.reservation, None)
        return d.key.label

    def limit(self, label: str, scope: str, retry: float) -> None:
        self.engine.observe(
            self.keys[label], sig(FailureKind.RATE_LIMITED, NOW + retry), NOW, scope=scope
        )


def test_a_key_cooling_for_one_model_keeps_serving_the_other() -> None:
    b = Bench()
    b.limit("a", MINI, 60)
    b.limit("b", MINI, 30)
    assert [b.take(NOW + 1, BIG) for _ in range(4)] == ["a", "b", "a", "b"]
    d = b.engine.decide(b.pool, 1, NOW + 1, deadline=NOW + 40, scope=MINI)
    assert d == Wait(NOW + 30, "no usable key")
    assert b.engine.key_status(b.keys["a"], NOW + 1, MINI)["status"] == "cooling"
    assert b.engine.key_status(b.keys["a"], NOW + 1)["status"] == "ready"


def test_a_spent_model_budget_steers_that_model_only() -> None:
    b = Bench()
    a = b.keys["a"]
    b.engine.observe(
        a, sig(FailureKind.OK, windows=(Window("requests", None, 5, 0, NOW + 60),)), NOW, scope=MINI
    )
    assert [b.take(NOW + 1, MINI) for _ in range(2)] == ["b", "b"]
    assert [b.take(NOW + 1, BIG) for _ in range(2)] == ["a", "b"]


def test_headroom_strategy_orders_by_the_requests_scope() -> None:
    b = Bench(strategy="headroom")
    a, bb = b.keys["a"], b.keys["b"]
    low = (Window("requests", None, 100, 10, NOW + 60),)
    high = (Window("requests", None, 100, 90, NOW + 60),)
    b.engine.observe(a, sig(FailureKind.OK, windows=low), NOW, scope=MINI)
    b.engine.observe(bb, sig(FailureKind.OK, windows=high), NOW, scope=MINI)
    b.engine.observe(a, sig(FailureKind.OK, windows=high), NOW, scope=BIG)
    b.engine.observe(bb, sig(FailureKind.OK, windows=low), NOW, scope=BIG)
    assert b.take(NOW + 1, MINI) == "b"
    assert b.take(NOW + 1, BIG) == "a"


def test_key_wide_steering_is_one_scope_for_every_model() -> None:
    b = Bench(limit_scope="key")
    assert b.pool.limit_scope == "key"
    b.limit("a", "", 60)  # what the addon passes for every request of a key-scoped pool
    assert [b.take(NOW + 1, "") for _ in range(2)] == ["b", "b"]


# -- presets and configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "scope"),
    [
        ("kimi-code", "key"),
        ("moonshot", "key"),
        ("generic", "key"),
        ("openai", "model"),
        ("gemini", "model"),
        ("groq", "model"),
        ("mistral", "model"),
        ("deepseek", "model"),
        ("anthropic", "model_class"),
    ],
)
def test_presets_say_their_scope_and_pools_inherit_it(provider: str, scope: str) -> None:
    assert PRESETS[provider].limit_scope == scope
    extra = {"hosts": ["llm.test"]} if provider == "generic" else {}
    assert settings(provider, **extra).pools[0].limit_scope == scope


@pytest.mark.parametrize("value", ["key", "model", "model_class"])
def test_a_pool_overrides_its_scope(value: str) -> None:
    assert settings("anthropic", limit_scope=value).pools[0].limit_scope == value


@pytest.mark.parametrize("value", ["models", "", 1, True, ["key"]])
def test_a_bad_limit_scope_is_a_clear_error(value: object) -> None:
    with pytest.raises(ConfigError, match=r"pools\[0\]\.limit_scope"):
        settings(limit_scope=value)


# -- status ---------------------------------------------------------------------------------------


def test_status_groups_a_keys_scopes_under_it() -> None:
    b = Bench()
    b.limit("a", MINI, 60)
    b.take(NOW, BIG)
    s = settings()
    out = rows(s, StateDoc(), NOW + 1, b.engine)
    a = next(r for r in out if r["label"] == "a")
    assert a["status"] == "ready"
    by = {x["scope"]: x for x in a["scopes"]}
    assert by[MINI]["status"] == "cooling" and by[MINI]["until"] == NOW + 60
    table = render_table(out, NOW + 1)
    assert f"  {MINI}" in table and "cooling" in table


def test_status_of_a_key_wide_pool_has_no_scope_lines() -> None:
    b = Bench(provider="kimi-code")
    b.limit("a", "", 60)
    out = rows(b.engine.settings, StateDoc(), NOW + 1, b.engine)
    assert all(r["scopes"] == [] for r in out)
    assert len(render_table(out, NOW + 1).splitlines()) == 3


# -- local limits per model -----------------------------------------------------------------------


def model_bench(**limits: Any) -> Bench:
    pool = {"model_limits": {"gpt-4o-mini": limits or {"requests_per_minute": 2}}}
    return Bench(**pool)


def decide(b: Bench, now: float, model: str | None, deadline: float | None = None) -> Any:
    scope = f"model:{model}" if model else ""
    at = now if deadline is None else deadline
    return b.engine.decide(b.pool, 1, now, deadline=at, scope=scope, model=model)


def test_a_models_local_limit_binds_each_key_for_that_model_only() -> None:
    b = model_bench()
    got = [decide(b, NOW, "gpt-4o-mini") for _ in range(4)]
    assert [d.key.label for d in got] == ["a", "b", "a", "b"]
    d = decide(b, NOW, "gpt-4o-mini")
    assert d.status == 429 and d.limit == "requests_per_minute" and d.limit_value == 2
    assert d.scope == "key 'a' for model 'gpt-4o-mini'"
    assert d.retry_at == pytest.approx(NOW + 60)
    assert isinstance(decide(b, NOW, "gpt-4o"), Chosen)
    assert isinstance(decide(b, NOW, None), Chosen)
    assert decide(b, NOW + 1, "gpt-4o-mini", deadline=NOW + 61) == Wait(
        pytest.approx(NOW + 60), "requests_per_minute"
    )


def test_a_models_concurrency_frees_on_settle() -> None:
    b = model_bench(concurrency=1)
    first = decide(b, NOW, "gpt-4o-mini")
    second = decide(b, NOW, "gpt-4o-mini")
    assert {first.key.label, second.key.label} == {"a", "b"}
    assert decide(b, NOW, "gpt-4o-mini", deadline=NOW + 5) == Wait(None, "concurrency")
    assert isinstance(decide(b, NOW, "gpt-4o"), Chosen)
    b.engine.settle(first.key, first.reservation, None)
    assert decide(b, NOW, "gpt-4o-mini").key == first.key


def test_a_models_token_limit_counts_the_reported_usage() -> None:
    b = model_bench(tokens_per_minute=100)
    for _ in range(2):
        d = decide(b, NOW, "gpt-4o-mini")
        b.engine.settle(d.key, d.reservation, 100)
    assert decide(b, NOW, "gpt-4o-mini").status == 429
    assert isinstance(decide(b, NOW, "gpt-4o"), Chosen)


def test_model_limits_survive_a_limiter_snapshot() -> None:
    b = model_bench()
    decide(b, NOW, "gpt-4o-mini")
    decide(b, NOW, "gpt-4o-mini")
    snap = b.engine.limiter.snapshot(NOW)
    fresh = model_bench()
    fresh.engine.limiter.restore(snap, NOW + 1)
    assert [decide(fresh, NOW + 1, "gpt-4o-mini").key.label for _ in range(2)] == ["a", "b"]
    assert decide(fresh, NOW + 1, "gpt-4o-mini").status == 429


def test_status_shows_a_models_local_limit() -> None:
    b = model_bench()
    decide(b, NOW, "gpt-4o-mini")
    out = rows(b.engine.settings, StateDoc(), NOW, b.engine)
    a = next(r for r in out if r["label"] == "a")
    q = {x["name"]: x for x in a["quota"]}
    assert q["requests_per_minute gpt-4o-mini"]["remaining"] == 1


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"gpt-4o-mini": {"requests_per_minute": 0}}, r"model_limits.gpt-4o-mini"),
        ({"gpt-4o-mini": {"requests_per_fortnight": 1}}, r"model_limits.gpt-4o-mini"),
        ({"": {"requests_per_minute": 1}}, r"model_limits.+not a model name"),
        ({"gpt-4o-mini": 5}, r"model_limits.gpt-4o-mini"),
        (["gpt-4o-mini"], r"model_limits"),
    ],
)
def test_bad_model_limits_are_clear_errors(value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=r"pools\[0\]\." + error):
        settings(model_limits=value)


def test_model_limits_are_refused_with_a_cluster() -> None:
    keys = [{"label": "a", "key": "sk-a-" + "0" * 24}]
    raw = {
        "state_dir": "/tmp/x/state",
        "cluster": {"redis_url": "redis://127.0.0.1:6379/0"},
        "pools": [
            {
                "name": "p",
                "provider": "openai",
                "keys": keys,
                "model_limits": {"m": {"requests_per_minute": 1}},
            }
        ],
    }
    with pytest.raises(ConfigError, match=r"model_limits.+cluster"):
        from_dict(raw, Path("/tmp/x/rotor.toml"), env={})


def test_the_cli_shows_scopes_from_the_state_file() -> None:
    s = settings()
    a = next(k for k in s.keys if k.label == "a")
    h = apply_signal(KeyHealth(), sig(FailureKind.RATE_LIMITED, NOW + 60), NOW, POLICY, scope=MINI)
    doc = StateDoc(
        keys={a.fingerprint: KeyRecord(fingerprint=a.fingerprint, label="a", pool="p", health=h)}
    )
    out = {r["label"]: r for r in rows(s, doc, NOW + 1)}
    assert out["a"]["status"] == "ready"
    assert [(x["scope"], x["status"]) for x in out["a"]["scopes"]] == [(MINI, "cooling")]
    assert out["b"]["scopes"] == []
    table = render_table(list(out.values()), NOW + 1).splitlines()
    assert table[1].split()[:2] == ["p", "a"]
    assert table[2].split()[:3] == [MINI, "cooling", "59s"]
