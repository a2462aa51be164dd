"""Streamed requests fail over inside the proxy, as non-streamed ones do: real mitmdump in
reverse and regular (HTTPS_PROXY) mode, a TLS fake provider whose first key fails before the
answer's first byte, and real clients without retries of their own (the openai and anthropic
SDKs with max_retries=0, curl). Every check reads what really happened: what the clients got,
the provider's request log, the proxy's trace, live status and saved flows."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2 as httpx
import pytest
from proctools import Mitmdump

import fake_provider
from fake_provider import KeyBehaviour as KB

from ._failover_helpers import CHAT, Proxy, Seen, resetting_front, stream_headers, stream_with
from ._steering_helpers import PoolKey, fake, served_by, write_config
from ._streaming_helpers import (
    ca_bundle,
    clear_proxy_env,
    use_https_proxy,
    wait_trace,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ProxyStarter = Callable[..., tuple[Proxy, fake_provider.FakeProvider]]


@pytest.fixture
def rotor(
    tmp_path, upstream_ca, mitm_confdir, proxy_factory, monkeypatch
) -> Iterator[ProxyStarter]:
    """`rotor(keys, mode=..., sections=..., front=...)`: a fake provider serving `keys` and a
    proxy in front of it (flows saved), clients' environment set for the mode. `front`, a
    function of the provider's port, gives another port to send the pool's traffic to."""
    ca, _ = upstream_ca
    with contextlib.ExitStack() as stack:

        def start(
            keys: list[PoolKey],
            *,
            mode: str = "reverse",
            sections: dict[str, dict[str, Any]] | None = None,
            front: Callable[[int], int] | None = None,
            extra: tuple[str, ...] = (),
            strategy: str = "round-robin",
        ) -> tuple[Proxy, fake_provider.FakeProvider]:
            provider = stack.enter_context(fake(ca, keys))
            port = front(provider.port) if front else provider.port
            cfg = write_config(
                tmp_path / "rotor.toml", port, keys, sections=sections, strategy=strategy
            )
            flows = tmp_path / "flows.mitm"
            upstream = f"https://127.0.0.1:{port}"
            reverse = mode == "reverse"
            m: Mitmdump = proxy_factory(
                cfg,
                mode=f"reverse:{upstream}" if reverse else "regular",
                extra=("--set", f"save_stream_file={flows}", *extra),
            )
            bundle = None if reverse else ca_bundle(tmp_path, mitm_confdir)
            if bundle is None:
                clear_proxy_env(monkeypatch)
            else:
                use_https_proxy(monkeypatch, m.url, bundle)
            base = m.url if reverse else upstream
            return Proxy(m, reverse, base, bundle, tmp_path / "rotor-state", flows), provider

        yield start


def keys_failing_first(first: KB) -> list[PoolKey]:
    return [PoolKey("alpha", first), PoolKey("beta"), PoolKey("gamma")]


def secret(label: str) -> str:
    return PoolKey(label).key


def assert_streamed_whole(seen: Seen, client: str) -> None:
    """All events, arriving one by one (6 events 120 ms apart), and the usage."""
    assert seen.status == 200, (seen.status, seen.body[:300])
    assert len(seen.texts) == 6, seen.texts
    assert seen.spread >= 0.3, f"arrived within {seen.spread:.3f}s: buffered"
    assert seen.usage is not None and seen.usage[1] == 6, seen.usage
    if client == "curl":
        assert "data: [DONE]" in seen.body


# -- 1. a stream whose first key fails before its first byte ---------------------------------------

FAILURES = {
    "429": (KB(fail_next=[429]), 429, "rate_limited", "cooling"),
    "401": (KB(mode="invalid"), 401, "auth", "disabled"),
    "402": (KB(mode="quota", quota_style="openrouter"), 402, "quota", "blocked"),
    "insufficient_quota": (KB(mode="quota", quota_style="openai"), 429, "quota", "blocked"),
    "503": (KB(fail_next=[503]), 503, "overloaded", "cooling"),
    "529": (KB(fail_next=[529]), 529, "overloaded", "cooling"),
    "reset": (KB(fail_next=[0]), 0, "error", None),
}
CASES = [
    ("429", "openai", "reverse"),
    ("429", "anthropic", "regular"),
    ("429", "curl", "reverse"),
    ("429", "curl", "regular"),
    ("401", "anthropic", "reverse"),
    ("401", "openai", "regular"),
    ("402", "curl", "reverse"),
    ("insufficient_quota", "openai", "reverse"),
    ("insufficient_quota", "curl", "regular"),
    ("503", "openai", "regular"),
    ("503", "curl", "reverse"),
    ("529", "anthropic", "reverse"),
    ("529", "anthropic", "regular"),
    ("reset", "openai", "reverse"),
    ("reset", "curl", "regular"),
    ("429", "openai-h2", "regular"),
    ("reset", "openai-h2", "regular"),
]


@pytest.mark.parametrize(("failure", "client", "mode"), CASES, ids=["-".join(c) for c in CASES])
def test_a_stream_fails_over_before_its_first_byte(rotor, failure, client, mode):
    behaviour, status, outcome, state = FAILURES[failure]
    # The fake speaks HTTP/1.1: to offer HTTP/2 to the client, mitmproxy connects lazily.
    lazy = ("--set", "connection_strategy=lazy") if client.endswith("h2") else ()
    # Cooldowns long enough to still run when the status is read, on a machine however busy.
    slow = {
        "health": {
            "rate_limit_backoff": 600.0,
            "overload_backoff": 600.0,
            "overload_backoff_max": 600.0,
        }
    }
    p, provider = rotor(keys_failing_first(behaviour.copy()), mode=mode, extra=lazy, sections=slow)
    seen = stream_with(client, p)
    assert_streamed_whole(seen, client)
    assert served_by(provider) == [(secret("alpha"), status), (secret("beta"), 200)]
    first, second = wait_trace(p.state, 2)
    assert (first["key"], first["outcome"], first["attempt"]) == ("alpha", outcome, 1)
    assert (second["key"], second["outcome"], second["attempt"]) == ("beta", "ok", 2)
    assert second["stream"] is True
    keys = p.keys()
    if state is not None:
        assert keys["alpha"]["status"] == state, keys["alpha"]
    assert (keys["alpha"]["errors"], keys["alpha"]["retries"]) == (1, 1)  # retried after it
    assert (keys["beta"]["requests"], keys["beta"]["retries"], keys["beta"]["inflight"]) == (
        1,
        0,
        0,
    )
    if p.reverse:  # the metrics count the retry on the key that failed, one request each
        text = httpx.get(p.m.url + "/_kmi-rotor/metrics", timeout=10).text
        assert re.search(r'kmi_rotor_retries_total\{[^}]*key="alpha"[^}]*\} 1\.0', text), text
        assert re.search(r'kmi_rotor_requests_total\{[^}]*key="alpha"[^}]*\} 1\.0', text)
    assert p.m.stop() == 0
    # mitmweb: each attempt a flow of its own, annotated as a non-streamed failover is.
    chats = [f for f in p.saved_flows() if "key" in f.metadata.get("kmi_rotor", {})]
    first_flow, second_flow = sorted(chats, key=lambda f: f.timestamp_created)
    assert first_flow.comment.startswith("key alpha")
    assert "retried on beta (200, streamed)" in first_flow.comment
    assert first_flow.metadata["kmi_rotor"]["failover"] == ["retried on beta (200, streamed)"]
    assert second_flow.comment.startswith("key beta · 200 · attempt 2")
    assert second_flow.metadata["kmi_rotor"]["retry"]["of"] == first_flow.id
    if client.endswith("h2"):
        assert first_flow.request.http_version == "HTTP/2.0"


def test_a_connection_reset_at_connect_fails_over(rotor):
    """The first attempt's connection fails before anything was sent (its TLS handshake is
    reset); the pool connects lazily, per request, as mitmproxy does with
    `connection_strategy=lazy` (eagerly, a failed connection is the client's before any
    request exists)."""
    with contextlib.ExitStack() as stack:
        log: list[str] = []

        def front(port: int) -> int:
            fport, seen = stack.enter_context(resetting_front(port, resets=1))
            log.append("started")
            front.seen = seen  # type: ignore[attr-defined]
            return fport

        p, provider = rotor(
            keys_failing_first(KB()), extra=("--set", "connection_strategy=lazy"), front=front
        )
        seen = stream_with("openai", p)
        assert_streamed_whole(seen, "openai")
        assert front.seen[0] == "reset"  # type: ignore[attr-defined]
        # alpha's request never reached the provider; beta served it.
        assert served_by(provider) == [(secret("beta"), 200)]
        first, second = wait_trace(p.state, 2)
        assert (first["key"], first["outcome"]) == ("alpha", "error")
        assert (second["key"], second["outcome"], second["attempt"]) == ("beta", "ok", 2)


# -- 2. when no key can serve ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_a_pool_where_every_key_fails_says_when_to_come_back(rotor, mode):
    keys = [PoolKey(k, KB(fail_next=[429])) for k in ("alpha", "beta", "gamma")]
    p, provider = rotor(keys, mode=mode, sections={"health": {"rate_limit_backoff": 3.0}})
    asked = time.time()
    seen = stream_with("curl", p)
    answered = time.time()
    assert [s for _, s in served_by(provider)] == [429, 429, 429]
    assert seen.status == 429, seen.body
    assert int(seen.headers["retry-after"]) >= 2  # the keys cool about 3 s
    # Pool-accurate: when the first key to come back does, as the proxy's status says.
    frees = min(k["until"] for k in p.keys().values())
    wait = int(seen.headers["retry-after-ms"]) / 1000
    assert asked + wait - 0.1 <= frees <= answered + wait + 0.1, (wait, frees - asked)
    error = fake_json(seen.body)["error"]
    assert error["code"] == "pool_exhausted"
    assert {k["label"]: k["status"] for k in error["keys"]} == dict.fromkeys(
        ("alpha", "beta", "gamma"), "cooling"
    )


def test_a_pool_whose_keys_are_all_revoked_answers_503(rotor):
    keys = [PoolKey(k, KB(mode="invalid")) for k in ("alpha", "beta", "gamma")]
    p, provider = rotor(keys)
    seen = stream_with("openai", p)
    assert seen.status == 503, seen.body
    assert "retry-after" not in seen.headers
    error = fake_json(seen.body)["error"]
    assert error["code"] == "all_keys_disabled"
    assert {k["label"]: k["status"] for k in error["keys"]} == dict.fromkeys(
        ("alpha", "beta", "gamma"), "disabled"
    )
    assert len(provider.requests) == 3  # one try per key


def fake_json(body: str) -> dict[str, Any]:
    return json.loads(body)


# -- 3. the last allowed attempt ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_a_failure_on_the_last_allowed_attempt(rotor, mode):
    keys = [PoolKey("alpha", KB(fail_next=[429])), PoolKey("beta", KB(fail_next=[429]))]
    keys.append(PoolKey("gamma"))
    p, provider = rotor(keys, mode=mode, sections={"failover": {"max_attempts": 2}})
    seen = stream_with("openai", p)
    # Two attempts allowed: gamma, ready, is not tried; the client is told to come back in
    # a second (never 0: SDKs ignore it), when gamma serves it.
    assert served_by(provider) == [(secret("alpha"), 429), (secret("beta"), 429)]
    assert seen.status == 429, seen.body
    assert (seen.headers["retry-after"], seen.headers["retry-after-ms"]) == ("1", "1000")
    assert fake_json(seen.body)["error"]["code"] == "retry_on_another_key"
    time.sleep(1.0)
    again = stream_with("curl", p)
    assert_streamed_whole(again, "curl")
    assert served_by(provider)[2:] == [(secret("gamma"), 200)]


# -- 4. what a failover costs the stream's first byte -----------------------------------------------


def test_a_failed_over_stream_starts_later_only_by_the_failed_attempt(rotor, capsys):
    slow_fail = 0.3
    keys = [PoolKey("alpha"), PoolKey("beta")]
    # Sticky: every request on the key in use, until it fails and the pool moves on.
    p, provider = rotor(keys, sections={"health": {"rate_limit_backoff": 0.05}}, strategy="sticky")

    def first_byte() -> float:
        start = time.monotonic()
        seen = stream_with("openai", p, events=3, delay_ms=1)
        assert seen.status == 200 and seen.arrivals, seen.body
        return seen.arrivals[0] - start

    plain = [first_byte() for _ in range(6)]
    failed_over = []
    for i in range(6):
        # The key in use fails, slowly; the other serves at once.
        failing, other = ("alpha", "beta") if i % 2 == 0 else ("beta", "alpha")
        provider.set_keys(
            {secret(failing): KB(fail_next=[429], latency=slow_fail), secret(other): KB()}
        )
        wait_until(lambda o=other: p.keys()[o]["status"] == "ready", 5, f"{other} ready")
        failed_over.append(first_byte())
    added = statistics.median(failed_over) - statistics.median(plain)
    statuses = [s for _, s in served_by(provider)]
    assert statuses.count(429) == 6 and statuses.count(200) == 12
    with capsys.disabled():
        print(
            f"\nfirst byte: {statistics.median(plain) * 1000:.1f} ms plain, "
            f"{statistics.median(failed_over) * 1000:.1f} ms after one failed attempt of "
            f">= {slow_fail * 1000:.0f} ms: +{added * 1000:.1f} ms"
        )
    # The failed attempt's own time, plus little: the answer is not waited for. (The failed
    # attempt alone takes `slow_fail`; `added` less than that only says the plain streams were
    # slow, as on a loaded machine, so the lower bound is on the failed-over streams.)
    assert statistics.median(failed_over) >= slow_fail, failed_over
    assert added < slow_fail + 0.25, added


# -- 5. a client that leaves while its failed-over stream is relayed ---------------------------------


def test_a_client_leaving_a_relayed_stream_stops_the_attempt(rotor):
    keys = [PoolKey("alpha", KB(fail_next=[429])), PoolKey("beta")]
    p, provider = rotor(keys)
    body = {**CHAT, "stream": True}
    with (
        httpx.Client(trust_env=False, timeout=10) as c,
        c.stream(
            "POST",
            p.base + "/v1/chat/completions",
            json=body,
            headers=stream_headers(events=200, delay_ms=100),  # 20 s if nobody stops it
        ) as resp,
    ):
        assert resp.status_code == 200
        got = b""
        for chunk in resp.iter_raw():
            got += chunk
            if got.count(b"\n\n") >= 2:
                break
    left = time.monotonic()
    # The provider sees beta's stream end long before its 20 s, the slot is free, and
    # leaving is not the key's fault.
    wait_until(lambda: provider.requests[-1].ended is not None, 10, "beta's stream to stop")
    assert time.monotonic() - left < 5
    records = wait_trace(p.state, 2)
    assert [(t["key"], t["outcome"]) for t in records] == [
        ("alpha", "rate_limited"),
        ("beta", "client_gone"),
    ]
    beta = p.keys()["beta"]
    assert (beta["inflight"], beta["status"], beta["errors"]) == (0, "ready", 0), beta
