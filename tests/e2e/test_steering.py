"""Steering by what the provider says, end to end: health per failure kind, keys reported
empty, failover, the client pointed at the pool, refusals, and each strategy's order.

Real mitmdump in reverse mode in front of a TLS fake provider whose keys misbehave on purpose;
real SDK clients. Every check reads what really happened: the provider's request log, the
status the proxy reports live and in `kmi-rotor status --json` after SIGTERM.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from proctools import wait_until

import fake_provider
from fake_provider import HeaderDialect
from fake_provider import KeyBehaviour as KB

from ._steering_helpers import (
    CHAT,
    MESSAGES,
    PoolKey,
    cli,
    cli_status,
    direct,
    fake,
    live_status,
    reported,
    secret,
    served_by,
    spend,
    write_config,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fakes(upstream_ca) -> Iterator[Callable[..., fake_provider.FakeProvider]]:
    """Start fake providers (TLS, per-key behaviours); they stop after the test's proxies."""
    ca, _ = upstream_ca
    with contextlib.ExitStack() as stack:

        def start(keys: list[PoolKey], time_scale: float = 1.0) -> fake_provider.FakeProvider:
            return stack.enter_context(fake(ca, keys, time_scale))

        yield start


def oa_client(proxy_url: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url + "/v1", api_key="client-own", max_retries=retries)


def an_client(proxy_url: str, retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy_url, api_key="client-own", max_retries=retries)


def status_of(call: Callable[[], Any]) -> int:
    """The HTTP status the client saw: 200, or the status of the error the SDK raised."""
    try:
        call()
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        return e.status_code
    return 200


# -- 1. one failure kind, one remedy -------------------------------------------------------------

MATRIX = [
    (PoolKey("bad", KB(mode="invalid")), 401),
    (PoolKey("spent-openai", KB(mode="quota", quota_style="openai")), 429),
    (PoolKey("spent-kimi", KB(mode="quota", quota_style="kimi")), 403),
    (PoolKey("spent-openrouter", KB(mode="quota", quota_style="openrouter")), 402),
    (PoolKey("limited", KB(rpm=1, headers="openai")), 429),
    (PoolKey("busy", KB(mode="overloaded")), 503),
    (PoolKey("busy-anthropic", KB(mode="overloaded")), 529),
    (PoolKey("picky", KB(fail_next=[400])), 400),
    (PoolKey("fine"), 200),
]
QUOTA_BLOCK, OVERLOAD_BACKOFF, OVERLOAD_MAX = 600.0, 7.0, 8.0
MINUTE = 10.0  # the fake's "minute": long enough to read the status while it runs


def check_matrix(rows: dict[str, dict[str, Any]], answered: dict[str, float], start: float) -> None:
    """The remedy each failure kind calls for, as a status row shows it."""
    assert rows["bad"]["status"] == "disabled", rows["bad"]
    assert "401" in rows["bad"]["reason"]
    for label in ("spent-openai", "spent-kimi", "spent-openrouter"):
        row = rows[label]
        assert row["status"] == "blocked", row
        assert abs(row["until"] - (answered[label] + QUOTA_BLOCK)) < 5, row
    # Cooling until the provider's own reset (its Retry-After is rounded up to a second).
    assert rows["limited"]["status"] == "cooling", rows["limited"]
    assert start + MINUTE - 0.1 <= rows["limited"]["until"] <= start + MINUTE + 1.5
    for label in ("busy", "busy-anthropic"):
        row = rows[label]
        assert row["status"] == "cooling", row
        assert answered[label] < row["until"] <= answered[label] + OVERLOAD_MAX + 0.5, row
    for label in ("picky", "fine"):
        assert rows[label]["status"] == "ready", rows[label]


def test_each_failure_kind_gets_its_remedy(fakes, proxy_factory, tmp_path, upstream_ca):
    _, ca_path = upstream_ca
    keys = [k for k, _ in MATRIX]
    provider = fakes(keys, time_scale=MINUTE / 60)
    cfg = write_config(
        tmp_path / "rotor.toml",
        provider.port,
        keys,
        sections={
            "failover": {"max_attempts": 1},
            "health": {
                "quota_block_seconds": QUOTA_BLOCK,
                "overload_backoff": OVERLOAD_BACKOFF,
                "overload_backoff_max": OVERLOAD_MAX,
            },
        },
    )
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    with direct(provider, ca_path) as d:  # someone else used "limited"'s only request
        start = spend(d, secret("limited"), 1)
    oa, an = oa_client(m.url), an_client(m.url)
    seen = [
        status_of(lambda: an.messages.create(**MESSAGES))
        if k.label == "busy-anthropic"
        else status_of(lambda: oa.chat.completions.create(**CHAT))
        for k in keys
    ]
    sent = provider.requests[1:]
    assert [(r.credential, r.status) for r in sent] == [(k.key, s) for k, s in MATRIX]
    assert seen == [s for _, s in MATRIX]
    answered = {k.label: r.ended or r.time for k, r in zip(keys, sent, strict=True)}
    # A 404 costs nothing either; it lands on whichever key is next.
    assert status_of(lambda: oa.models.retrieve("no-such-model")) == 404
    assert status_of(lambda: oa.chat.completions.create(**CHAT)) == 200
    (nf,) = [r.credential for r in provider.requests if r.status == 404]
    live = live_status(m.url)
    assert m.stop() == 0
    final = cli_status(cfg)
    label_of = {k.key: k.label for k in keys}
    for rows in (live, final):
        check_matrix(rows, answered, start)
        assert rows[label_of[nf]]["status"] == "ready", rows[label_of[nf]]
    assert {k: final[k]["upstream_429"] for k in ("spent-openai", "limited", "fine")} == {
        "spent-openai": 1,
        "limited": 1,
        "fine": 0,
    }
    assert {k.label: final[k.label]["last_status"] for k, s in MATRIX if s not in (200, 400)} == {
        k.label: s for k, s in MATRIX if s not in (200, 400)
    }


# -- 2. a key reported empty gets nothing until its reset -----------------------------------------

DIALECTS: tuple[HeaderDialect, ...] = ("openai", "anthropic", "xratelimit", "ietf")


def trickle(
    proxy_url: str, provider: Any, limited: list[PoolKey]
) -> tuple[dict[str, tuple[float, float]], list[int]]:
    """Steady traffic until every limited key was reported empty and then served again after
    the reset it was given. Returns, per key, (when it was reported empty, the reset reported),
    and every status the client saw."""
    quiet: dict[str, tuple[float, float]] = {}
    statuses: list[int] = []

    def resumed(key: str) -> bool:
        at = quiet[key][1]
        return any(r.credential == key and r.time >= at and r.status == 200 for r in log)

    with httpx.Client(base_url=proxy_url, timeout=10) as c:
        end = time.time() + 15
        while time.time() < end:
            sent_at = time.time()
            r = c.post("/v1/chat/completions", json=CHAT)
            statuses.append(r.status_code)
            log = provider.requests
            for k, dialect in zip(limited, DIALECTS, strict=True):
                said = reported(dialect, r.headers, sent_at)
                if said and said[0] == 0 and k.key not in quiet and log[-1].credential == k.key:
                    quiet[k.key] = (time.time(), said[1])
            if len(quiet) == len(limited) and all(resumed(k) for k in quiet):
                break
            time.sleep(0.015)
    return quiet, statuses


def test_key_reported_empty_rests_until_its_reset(fakes, proxy_factory, tmp_path):
    limited = [PoolKey(f"lim-{d}", KB(rpm=2, headers=d)) for d in DIALECTS]
    keys = [*limited, PoolKey("other")]
    provider = fakes(keys, time_scale=2 / 60)  # a "minute" is 2 s
    cfg = write_config(tmp_path / "rotor.toml", provider.port, keys)
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    quiet, statuses = trickle(m.url, provider, limited)
    assert len(quiet) == len(limited), "a key never reported remaining 0"
    assert set(statuses) == {200}
    log = provider.requests
    for k in limited:
        told, reset = quiet[k.key]
        mine = [r for r in log if r.credential == k.key]
        early = [r for r in mine if told < r.time < reset - 0.001]
        assert not early, f"{k.label} used {reset - early[0].time:.3f}s before its reset"
        others = [r for r in log if r.credential == secret("other") and told < r.time < reset]
        assert len(others) >= 3 and all(r.status == 200 for r in others)
        assert any(r.time >= reset and r.status == 200 for r in mine), f"{k.label} never resumed"
        # A reset reported early (whole seconds, rounded down) may cost one 429, never before it.
        refused = [r for r in mine if r.status == 429]
        assert len(refused) <= 1 and all(r.time >= reset for r in refused), k.label


# -- 3. failover before the client sees anything ---------------------------------------------------

FAILING = {429: KB(fail_next=[429]), 503: KB(fail_next=[503]), 401: KB(mode="invalid")}
FAILING[529] = KB(fail_next=[529])
FAILING[0] = KB(fail_next=[0])  # the connection reset before any answer


@pytest.mark.parametrize(
    "failures", [[429], [503, 401], [529], [0, 429]], ids=lambda f: "-".join(map(str, f))
)
def test_non_streamed_failure_is_retried_on_another_key(
    failures: list[int], fakes, proxy_factory, tmp_path
):
    failing = [PoolKey(f"fail{i}", FAILING[s]) for i, s in enumerate(failures)]
    keys = [*failing, PoolKey("good1"), PoolKey("good2")]
    provider = fakes(keys)
    cfg = write_config(tmp_path / "rotor.toml", provider.port, keys)
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    if 529 in failures:  # an Anthropic client, whose overloads are 529s
        answer = an_client(m.url).messages.create(**MESSAGES)
        assert answer.content[0].text  # type: ignore[union-attr]
    else:
        answer = oa_client(m.url).chat.completions.create(**CHAT)
        assert answer.choices[0].message.content
    log = served_by(provider)
    rows = live_status(m.url)
    assert log == [(k.key, s) for k, s in zip(failing, failures, strict=True)] + [
        (secret("good1"), 200)
    ]
    assert len({key for key, _ in log}) == len(log), "a key was tried twice"
    # a retry counts on the key the request failed on, not on the one that served it
    retried = {k.label: 1 for k in failing}
    assert {label: r["retries"] for label, r in rows.items()} == {**retried, "good1": 0, "good2": 0}


# -- 4. streamed requests fail over alike: see test_stream_failover.py ----------------------------


# -- 5. when no key can serve ---------------------------------------------------------------------


def test_exhausted_pool_says_when_it_can_serve(fakes, proxy_factory, tmp_path, upstream_ca):
    _, ca_path = upstream_ca
    minute = 2.0
    keys = [PoolKey("spent", KB(mode="quota")), PoolKey("slow", KB(rpm=1, headers="openai"))]
    provider = fakes(keys, time_scale=minute / 60)
    cfg = write_config(
        tmp_path / "rotor.toml",
        provider.port,
        keys,
        sections={"limits": {"max_wait_seconds": 0}, "health": {"quota_block_seconds": 600}},
    )
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    with direct(provider, ca_path) as d:
        frees = spend(d, secret("slow"), 1) + minute
    assert status_of(lambda: oa_client(m.url).chat.completions.create(**CHAT)) == 429
    with httpx.Client(base_url=m.url, timeout=10) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        asked = time.time()
        assert r.status_code == 429, r.text
        told = asked + int(r.headers["retry-after-ms"]) / 1000
        assert frees - 0.1 <= told <= frees + 1.5
        assert int(r.headers["retry-after"]) == pytest.approx(told - asked, abs=1)
        error = r.json()["error"]
        assert error["code"] == "pool_exhausted"
        why = {k["label"]: (k["status"], k["reason"]) for k in error["keys"]}
        assert why == {
            "spent": ("blocked", "insufficient_quota"),
            "slow": ("cooling", "rate limited"),
        }
        n = len(provider.requests)
        time.sleep(max(0.0, told - time.time()))  # come back when told to
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert served_by(provider)[n:] == [(secret("slow"), 200)]


def test_every_key_disabled_is_a_503(fakes, proxy_factory, tmp_path):
    keys = [PoolKey("revoked1", KB(mode="invalid")), PoolKey("revoked2", KB(mode="invalid"))]
    provider = fakes(keys)
    cfg = write_config(tmp_path / "rotor.toml", provider.port, keys)
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    with httpx.Client(base_url=m.url, timeout=10) as c:
        # The request that finds both keys revoked sees the last 401 or already the 503.
        assert c.post("/v1/chat/completions", json=CHAT).status_code in (401, 503)
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert len(provider.requests) == 2  # one try per key, then nothing
    error = r.json()["error"]
    assert error["code"] == "all_keys_disabled"
    assert {k["label"]: k["status"] for k in error["keys"]} == {
        "revoked1": "disabled",
        "revoked2": "disabled",
    }
    assert all("401" in k["reason"] for k in error["keys"])


# -- 6. each strategy's order ---------------------------------------------------------------------


def labels(provider: Any, keys: list[PoolKey]) -> list[str]:
    """The labels of the keys that served (200) each request, in order."""
    by_key = {k.key: k.label for k in keys}
    return [by_key[r.credential] for r in provider.requests if r.status == 200]


def asker(proxy_url: str, provider: Any, keys: list[PoolKey]) -> Callable[[], str]:
    """Send one request through the proxy; returns the label of the key that served it."""
    client = oa_client(proxy_url)

    def ask() -> str:
        client.chat.completions.create(**CHAT)
        return labels(provider, keys)[-1]

    return ask


def test_round_robin_is_an_exact_cycle_over_usable_keys(fakes, proxy_factory, tmp_path):
    keys = [PoolKey(n) for n in ("alpha", "beta", "gamma", "delta")]
    provider = fakes(keys)
    m = proxy_factory(
        write_config(tmp_path / "rotor.toml", provider.port, keys),
        mode=f"reverse:{provider.url}",
    )
    client = oa_client(m.url)
    for _ in range(8):
        client.chat.completions.create(**CHAT)
    provider.set_keys({secret("gamma"): KB(mode="invalid")})
    for _ in range(9):
        client.chat.completions.create(**CHAT)
    served = labels(provider, keys)
    assert served[:8] == ["alpha", "beta", "gamma", "delta"] * 2
    assert served[8:] == ["alpha", "beta", "delta"] * 3


def test_sticky_stays_until_the_key_is_unusable(fakes, proxy_factory, tmp_path):
    keys = [PoolKey(n) for n in ("alpha", "beta", "gamma")]
    provider = fakes(keys)
    cfg = write_config(
        tmp_path / "rotor.toml",
        provider.port,
        keys,
        strategy="sticky",
        sections={"health": {"rate_limit_backoff": 0.5}},
    )
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    ask = asker(m.url, provider, keys)
    assert [ask() for _ in range(5)] == ["alpha"] * 5
    provider.set_keys({secret("alpha"): KB(fail_next=[429])})
    assert [ask() for _ in range(3)] == ["beta"] * 3
    wait_until(lambda: live_status(m.url)["alpha"]["status"] == "ready", 5, "alpha to cool")
    assert [ask() for _ in range(3)] == ["beta"] * 3  # alpha is back, the pool stays


def test_rotate_moves_a_running_sticky_pool(fakes, proxy_factory, tmp_path):
    """The running proxy moves to the next key at its next look at state.json (how soon, in
    looks, is the keeper's unit test; wall-clock bounds here would flake on a loaded machine)."""
    keys = [PoolKey(n) for n in ("alpha", "beta", "gamma")]
    provider = fakes(keys)
    cfg = write_config(tmp_path / "rotor.toml", provider.port, keys, strategy="sticky")
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    ask = asker(m.url, provider, keys)
    assert [ask() for _ in range(3)] == ["alpha"] * 3
    cli("rotate", "--config", str(cfg))
    now = wait_until(lambda: (k := ask()) != "alpha" and k, 15, "the pool leaves alpha", 0.05)
    assert now == "beta"
    assert [ask() for _ in range(3)] == ["beta"] * 3


def test_weighted_shares_follow_weights(fakes, proxy_factory, tmp_path):
    keys = [PoolKey("light", weight=1), PoolKey("middle", weight=2), PoolKey("heavy", weight=3)]
    provider = fakes(keys)
    cfg = write_config(tmp_path / "rotor.toml", provider.port, keys, strategy="weighted")
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    with httpx.Client(base_url=m.url, timeout=10) as c:
        for _ in range(60):
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    served = labels(provider, keys)
    counts = Counter(served)
    for k in keys:
        assert abs(counts[k.label] - 10 * k.weight) <= 2, counts
    # Interleaved, not in bursts: the heaviest key never serves 4 in a row.
    assert "heavy" * 4 not in "".join(served)


def test_headroom_prefers_the_key_with_most_remaining(fakes, proxy_factory, tmp_path, upstream_ca):
    _, ca_path = upstream_ca
    limit = 20
    keys = [PoolKey(n, KB(rpm=limit, headers="openai")) for n in ("drained", "half", "fresh")]
    provider = fakes(keys)  # real minutes: nothing resets during the test
    with direct(provider, ca_path) as d:
        spend(d, secret("drained"), 14)
        spend(d, secret("half"), 6)
    skip = len(provider.requests)
    cfg = write_config(tmp_path / "rotor.toml", provider.port, keys, strategy="headroom")
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    known: dict[str, float] = {}  # what the proxy was told: remaining per key
    picks: list[tuple[str, dict[str, float]]] = []
    with httpx.Client(base_url=m.url, timeout=10) as c:
        for _ in range(18):
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
            label = labels(provider, keys)[-1]
            picks.append((label, dict(known)))
            known[label] = float(r.headers["x-ratelimit-remaining-requests"])
    assert len(provider.requests) - skip == 18
    # Nothing known yet: one request each, in cyclic order, to learn what is left.
    assert [p for p, _ in picks[:3]] == ["drained", "half", "fresh"]
    for label, knew in picks[3:]:
        assert knew[label] == max(knew.values()), (label, knew)
    assert "drained" not in [p for p, _ in picks[3:]]
    assert [p for p, _ in picks[3:9]] == ["fresh"] * 6
