"""Admission control end to end: proxy-wide and per-key limits through a real mitmdump.

What counts is what the fake provider saw (its request log, its in-flight counters) and what
real clients got (status codes, headers, bodies); the proxy's own word is checked against both.
"""

from __future__ import annotations

import json
import math
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import httpx2
import openai
import pytest
from proctools import BIN, Mitmdump, clean_env, start_mitmdump, wait_until

import fake_provider

from ._admission_helpers import (
    admitted_probe,
    chat_body,
    max_in_window,
    read_admitted,
    run_concurrently,
    windows_by,
    write_limits_config,
)
from .conftest import KEYS

BURST = 20
KEY_RPS, GLOBAL_RPS = 2, 4
# The provider stamps a request when it arrives, a little after the proxy admitted it; under a
# burst of new connections that delay varies by tens of milliseconds (more on a busy machine).
TRANSIT = 0.25
GUARD = 0.015
"""kmi-rotor's default `[limits] guard`."""


def limited_proxy(tmp_path: Path, provider: Any, proxy_factory: Any, **kw: Any) -> Mitmdump:
    """mitmdump in reverse mode in front of the provider, with the given limits."""
    cfg = write_limits_config(tmp_path, f"127.0.0.1:{provider.port}", kw.pop("keys", KEYS), **kw)
    return proxy_factory(cfg, mode=f"reverse:{provider.url}")


def sdk(m: Mitmdump, timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=m.url + "/v1", api_key="client-placeholder", max_retries=0, timeout=timeout
    )


def sdk_chat(client: openai.OpenAI, marker: str, **extra: Any) -> int:
    """Status of one chat completion (200, or the error's status)."""
    try:
        r = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": marker}], **extra
        )
    except openai.APIStatusError as e:
        return e.status_code
    assert r.choices[0].message.content
    return 200


def raw_chat(m: Mitmdump, marker: str, timeout: float = 30.0, **extra: Any) -> httpx2.Response:
    return httpx2.post(
        m.url + "/v1/chat/completions",
        content=chat_body(marker, **extra),
        headers={"authorization": "Bearer client-placeholder", "content-type": "application/json"},
        timeout=timeout,
    )


def marker(request: Any) -> str:
    """The first message of a request the provider logged (what tells requests apart)."""
    return request.body["messages"][0]["content"]


def markers(provider: Any) -> list[str]:
    return [marker(r) for r in provider.requests]


def status_json(m: Mitmdump) -> dict[str, Any]:
    """`kmi-rotor status --json` once the proxy has stopped (and written its state)."""
    assert m.stop() == 0
    config = next(a.split("=", 1)[1] for a in m.process.proc.args if a.startswith("rotor_config="))
    out = subprocess.run(
        [str(BIN / "kmi-rotor"), "status", "--json", "--config", config],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
        timeout=30,
    )
    return json.loads(out.stdout)


def api_status(m: Mitmdump) -> dict[str, Any]:
    r = httpx2.get(m.url + "/_kmi-rotor/api/status", timeout=5)
    r.raise_for_status()
    return r.json()


# -- 1. waiting: every request goes, never faster than the limits -------------------------------


class Burst(NamedTuple):
    """What the provider logged of a burst, and when the proxy admitted each request (by
    marker)."""

    reqs: list[Any]
    admitted: dict[str, float]


@pytest.fixture(scope="module")
def waited_burst(tmp_path_factory, upstream_ca, mitm_confdir) -> Iterator[Burst]:
    """The provider's log of 20 concurrent requests (SDK) through a proxy allowing 2/s per key
    and 4/s in all, each free to wait up to 10 s, and when the proxy admitted each. Run once
    for the tests that read it."""
    tmp = tmp_path_factory.mktemp("waited-burst")
    ca, ca_path = upstream_ca
    probe, admitted_file = admitted_probe(tmp)
    fake = fake_provider.FakeProvider(
        {k: fake_provider.KeyBehaviour() for k in KEYS.values()}, tls=ca
    )
    with fake_provider.run_in_thread(fake) as provider:
        cfg = write_limits_config(
            tmp,
            f"127.0.0.1:{provider.port}",
            KEYS,
            limits={"requests_per_second": GLOBAL_RPS, "max_wait_seconds": 10},
            key_limits={"requests_per_second": KEY_RPS},
        )
        m = start_mitmdump(
            cfg,
            mitm_confdir,
            tmp / "mitmdump.log",
            mode=f"reverse:{provider.url}",
            extra=("--set", f"ssl_verify_upstream_trusted_ca={ca_path}", "-s", str(probe)),
        )
        try:
            client = sdk(m)
            started = time.monotonic()
            statuses = run_concurrently(lambda i: sdk_chat(client, f"wait-{i}"), BURST)
            elapsed = time.monotonic() - started
        finally:
            assert m.stop() == 0
        reqs = provider.requests
    assert statuses == [200] * BURST
    assert sorted(marker(r) for r in reqs) == sorted(f"wait-{i}" for i in range(BURST))
    # 20 requests at 4/s cannot all be served in under 4 s: the limit did slow them down.
    assert elapsed >= (BURST - GLOBAL_RPS) / GLOBAL_RPS
    assert {r.credential for r in reqs} == set(KEYS.values())
    admitted = read_admitted(admitted_file)
    assert sorted(admitted) == sorted(f"wait-{i}" for i in range(BURST))
    yield Burst(reqs, admitted)


def test_waiting_requests_all_served_within_limits_up_to_transit(waited_burst):
    """All 20 succeed (the fixture checks it), and no second of the moments the proxy admitted
    them holds more than the limits: exact where they are enforced, before any transit."""
    reqs, admitted = waited_burst
    assert max_in_window(admitted.values()) <= GLOBAL_RPS
    for k in KEYS.values():
        assert max_in_window([admitted[marker(r)] for r in reqs if r.credential == k]) <= KEY_RPS


def test_waiting_requests_never_exceed_limits_at_the_provider(waited_burst):
    """Each provider stamp is the request's admission plus its transit, so the provider's
    windows hold the limits once shortened by how much the measured transit varied beyond the
    guard the proxy keeps for it (on a loaded machine, by far more than the guard)."""
    reqs, admitted = waited_burst
    transit = [r.time - admitted[marker(r)] for r in reqs]
    assert min(transit) >= 0  # one clock: received after it was admitted, never before
    window = 1.0 + GUARD - (max(transit) - min(transit))
    assert max_in_window([r.time for r in reqs], window) <= GLOBAL_RPS, transit
    assert max(windows_by(reqs, window=window).values()) <= KEY_RPS, transit


# -- 2. never waiting: local 429s that say when to come back -----------------------------------


def _check_refusal(r: httpx2.Response, admitted: list[float]) -> float:
    """Headers and body of one local 429; returns when it says capacity frees."""
    assert r.headers["content-type"] == "application/json"
    retry_after, retry_ms = int(r.headers["retry-after"]), int(r.headers["retry-after-ms"])
    # The window is enforced 2% longer than a second (the guard against transit jitter).
    assert retry_after >= 1 and 0 < retry_ms <= 1000 * (1 + GUARD)
    assert retry_after == math.ceil(retry_ms / 1000)
    assert r.headers["ratelimit-policy"] == f'"requests-per-second";q={GLOBAL_RPS};w=1'
    assert r.headers["ratelimit"] == f'"requests-per-second";r=0;t={retry_after}'
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "local_rate_limit"
    assert (err["limit"], err["scope"], err["retry_after"]) == (
        "requests_per_second",
        "the proxy",
        retry_after,
    )
    frees_at = datetime.fromisoformat(err["frees_at"]).timestamp()
    # The full global window frees one second after the oldest admission in it, which the
    # provider saw a moment later (its stamp is after the admission, never before).
    window = 1.0 * (1 + GUARD)
    assert any(t + window - TRANSIT <= frees_at <= t + window + 0.002 for t in admitted), (
        frees_at,
        admitted,
    )
    return frees_at


def test_no_waiting_excess_gets_local_429_with_retry_headers(tmp_path, provider, proxy_factory):
    m = limited_proxy(
        tmp_path,
        provider,
        proxy_factory,
        limits={"requests_per_second": GLOBAL_RPS, "max_wait_seconds": 0},
        key_limits={"requests_per_second": KEY_RPS},
    )
    answers = run_concurrently(lambda i: raw_chat(m, f"now-{i}"), BURST)
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(refused) == BURST and refused
    reqs = provider.requests
    assert len(reqs) == len(ok)  # nothing went upstream for the refusals
    # Counted where it matters, at the provider, window by window (a loaded machine may spread
    # the burst over more than one second): the limit is reached, and never exceeded.
    admitted = sorted(r.time for r in reqs)
    assert len(ok) >= GLOBAL_RPS
    assert max_in_window(admitted) <= GLOBAL_RPS
    assert max(windows_by(reqs).values()) <= KEY_RPS
    frees = {round(_check_refusal(r, admitted), 3) for r in refused}
    if len(ok) == GLOBAL_RPS:
        assert len(frees) == 1  # every refusal names the same moment
    frees_at = max(frees)

    # Before that moment the proxy still refuses; from it on, it serves again.
    early = time.time() < frees_at - 0.2
    if early:
        assert raw_chat(m, "early").status_code == 429
    time.sleep(max(0.0, frees_at - time.time()) + 0.05)
    assert raw_chat(m, "on-time").status_code == 200
    assert markers(provider)[-1] == "on-time"

    state = status_json(m)
    assert state["local_429"] == {"main": len(refused) + early}
    keys = {k["label"]: k for k in state["keys"]}
    assert sum(k["requests"] for k in keys.values()) == len(ok) + 1
    assert all(k["upstream_429"] == 0 for k in keys.values())


# -- 3. concurrency per key, with streamed answers -----------------------------------------------


def test_key_concurrency_holds_while_many_clients_stream(tmp_path, provider, proxy_factory):
    m = limited_proxy(
        tmp_path,
        provider,
        proxy_factory,
        limits={"max_wait_seconds": 30},
        key_limits={"concurrency": 1},
    )
    client = sdk(m)
    events = 5

    def stream(i: int) -> str:
        chunks = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": f"stream-{i}"}],
            stream=True,
            extra_headers={"x-fake-events": str(events), "x-fake-delay-ms": "80"},
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    texts = run_concurrently(stream, 9)
    assert all(texts) and len(set(texts)) == 1
    stats = provider.stats()
    per_key = {k: stats["keys"][k] for k in KEYS.values()}
    assert all(s["max_inflight"] == 1 for s in per_key.values()), per_key
    assert sum(s["requests"] for s in per_key.values()) == 9
    assert stats["max_inflight"] >= 2  # the keys did serve side by side
    assert all(r.stream for r in provider.requests)


# -- 4. a client that leaves while waiting gives its place back ----------------------------------


def _raw_request(m: Mitmdump, marker: str) -> socket.socket:
    body = chat_body(marker)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {m.host}:{m.port}\r\n"
        "Authorization: Bearer client-placeholder\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection((m.host, m.port), timeout=5)
    sock.sendall(head.encode() + body)
    return sock


def test_client_leaving_while_waiting_releases_its_place(tmp_path, provider, proxy_factory):
    m = limited_proxy(
        tmp_path, provider, proxy_factory, limits={"concurrency": 1, "max_wait_seconds": 30}
    )
    client = sdk(m)
    events, progress = 12, threading.Semaphore(0)
    first_done = threading.Event()

    def hold() -> None:
        chunks = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "holder"}],
            stream=True,
            extra_headers={"x-fake-events": str(events), "x-fake-delay-ms": "100"},
        )
        for c in chunks:
            if c.choices and c.choices[0].delta.content:
                progress.release()
        first_done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert progress.acquire(timeout=10)  # the holder is upstream and streaming
    waiter = _raw_request(m, "abandoned")
    # It waits: no answer while the holder streams, and it is not in flight.
    assert select.select([waiter], [], [], 0.4)[0] == []
    assert api_status(m)["totals"]["inflight"] == 1
    # Leave just before the holder's slot frees, so the freed slot wakes the waiter first.
    for _ in range(events - 2):
        assert progress.acquire(timeout=10)
    waiter.close()
    holder.join(10)
    assert first_done.is_set()

    started = time.monotonic()
    assert sdk_chat(sdk(m, timeout=20), "after") == 200
    assert time.monotonic() - started < 15.0  # a leaked place would hold it for 30 s
    wait_until(lambda: api_status(m)["totals"]["inflight"] == 0, 5, "inflight back to 0")
    assert markers(provider) == ["holder", "after"]


# -- 5. token limits -----------------------------------------------------------------------------


def token_proxy(tmp_path: Path, provider: Any, proxy_factory: Any, wait: float) -> Mitmdump:
    return limited_proxy(
        tmp_path,
        provider,
        proxy_factory,
        keys={"alpha": KEYS["alpha"]},
        limits={"max_wait_seconds": wait},
        own_limits={"alpha": {"tokens_per_minute": 1000}},
    )


def _start_holder(client: openai.OpenAI, max_tokens: int) -> tuple[threading.Thread, list[str]]:
    """A slow stream on the key whose reservation holds `max_tokens`; returns once it streams."""
    started, text = threading.Event(), []

    def run() -> None:
        chunks = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "holder"}],
            max_tokens=max_tokens,
            stream=True,
            extra_headers={"x-fake-events": "10", "x-fake-delay-ms": "100"},
        )
        for c in chunks:
            started.set()
            text.append(c.choices[0].delta.content or "" if c.choices else "")

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(10)
    return t, text


def _check_token_refusal(r: httpx2.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["limit"], err["scope"]) == ("tokens_per_minute", "key 'alpha'")
    return err


def test_token_limit_refusals_413_then_429(tmp_path, provider, proxy_factory):
    """With 1,000 tokens a minute on the key and up to 10 s of waiting allowed:
    - a prompt of ~1,500 tokens can never fit: a local 413 at once, nothing upstream;
    - while a holder reserves ~900 tokens, the next request (~280 tokens by its size) gets a
      local 429 at once naming the token limit: the window frees only a minute after the
      holder, beyond max_wait_seconds."""
    m = token_proxy(tmp_path, provider, proxy_factory, wait=10)
    started = time.monotonic()
    r = raw_chat(m, "x" * 6000)
    err = _check_token_refusal(r, 413)
    assert err["code"] == "request_too_large" and "retry-after" not in r.headers
    assert time.monotonic() - started < 5.0  # answered at once, not after the 10 s wait
    assert provider.requests == []

    holder, _ = _start_holder(sdk(m), max_tokens=900)
    started = time.monotonic()
    r = raw_chat(m, "refused")
    assert time.monotonic() - started < 5.0  # answered at once, not after the 10 s wait
    err = _check_token_refusal(r, 429)
    assert err["code"] == "local_rate_limit"
    frees_in = datetime.fromisoformat(err["frees_at"]).timestamp() - provider.requests[0].time
    assert 60 - TRANSIT <= frees_in <= 60 + 60 * GUARD  # the guard lengthens it by <= 0.25 s
    assert 59 <= int(r.headers["retry-after"]) <= 61  # 60 s and the guard, rounded up
    assert r.headers["ratelimit-policy"] == '"tokens-per-minute";q=1000;w=60'
    holder.join(10)
    assert markers(provider) == ["holder"]


def test_tokens_left_too_few_wait_for_the_holder(tmp_path, provider, proxy_factory):
    """Allowed to wait past the moment the window frees, the request goes as soon as the
    holder ends and its reservation is corrected to what it really used (a few tokens)."""
    m = token_proxy(tmp_path, provider, proxy_factory, wait=70)
    holder, text = _start_holder(sdk(m), max_tokens=900)
    assert raw_chat(m, "waited").status_code == 200
    holder.join(10)
    assert "".join(text)
    held, waited = provider.requests
    # As soon as the holder ended: its window would only have freed a minute later.
    assert held.ended is not None and held.ended <= waited.time <= held.ended + 10.0


def test_max_tokens_counts_at_admission(tmp_path, provider, proxy_factory):
    """The completion budget a request asks for counts before it is admitted: beyond what is
    left it is refused (429), beyond the limit itself it can never go (413)."""
    m = token_proxy(tmp_path, provider, proxy_factory, wait=0)
    holder, _ = _start_holder(sdk(m), max_tokens=700)
    too_big_now = raw_chat(m, "too-big-now", max_tokens=600)
    too_big_ever = raw_chat(m, "too-big-ever", max_tokens=5000)
    holder.join(10)
    assert markers(provider) == ["holder"]
    _check_token_refusal(too_big_now, 429)
    assert _check_token_refusal(too_big_ever, 413)["code"] == "request_too_large"
