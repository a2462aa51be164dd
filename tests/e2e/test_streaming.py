"""Streaming end to end: real mitmdump (reverse mode, and HTTPS_PROXY over HTTP/1.1 and HTTP/2),
the openai and anthropic SDKs, the fake provider, and what the proxy recorded about each key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from proctools import Mitmdump, start_mitmdump

import fake_provider
from fake_provider import KeyBehaviour

from ._streaming_helpers import (
    H2Tunnel,
    Timed,
    anthropic_stream,
    ca_bundle,
    clear_proxy_env,
    cli_status,
    fake_headers,
    live_keys,
    openai_stream,
    use_https_proxy,
    wait_trace,
    write_rotor_config,
)
from .conftest import KEYS

MORE_KEYS = {
    **KEYS,
    "delta": "sk-delta-e2e-0000000000000000000000d4",
    "epsilon": "sk-epsilon-e2e-00000000000000000000e5",
}


@dataclass
class Rig:
    """A proxy in one mode, and SDK clients that reach the provider through it.

    `versions` and `sent_lengths` list, per request the clients made, the HTTP version of the
    answer and the size of the body as the client sent it.
    """

    m: Mitmdump
    config: Path
    reverse: bool
    bundle: Path | None
    versions: list[str] = field(default_factory=list)
    sent_lengths: list[int] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.config.parent / "state"

    def keys(self) -> dict[str, dict[str, Any]]:
        return live_keys(self.m, reverse=self.reverse)

    def clients(self, base: str, http2: bool) -> tuple[openai.OpenAI, anthropic.Anthropic]:
        hooks = {
            "request": [lambda req: self.sent_lengths.append(len(req.content))],
            "response": [lambda resp: self.versions.append(resp.http_version)],
        }
        common: dict[str, Any] = {"api_key": "client-placeholder", "max_retries": 0}
        oa = openai.OpenAI(
            base_url=base + "/v1",
            http_client=openai.DefaultHttpxClient(http2=http2, event_hooks=hooks),
            **common,
        )
        an = anthropic.Anthropic(
            base_url=base,
            http_client=anthropic.DefaultHttpxClient(http2=http2, event_hooks=hooks),
            **common,
        )
        return oa, an


@pytest.fixture
def rig(tmp_path, provider, proxy_factory, mitm_confdir, monkeypatch):
    """`rig(keys, mode=..., http2=..., key_limits=..., tables=...)` -> (Rig, openai, anthropic).

    Reverse mode: clients use the proxy as their base URL. Regular mode: clients reach the
    provider's own URL through HTTPS_PROXY, trusting mitmproxy's CA from SSL_CERT_FILE.
    """

    def start(
        keys: dict[str, str],
        *,
        mode: str = "reverse",
        http2: bool = False,
        key_limits: dict[str, dict[str, Any]] | None = None,
        tables: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[Rig, openai.OpenAI, anthropic.Anthropic]:
        host = f"127.0.0.1:{provider.port}"
        cfg = write_rotor_config(tmp_path, [host], keys, key_limits=key_limits, tables=tables)
        reverse = mode == "reverse"
        # The fake speaks HTTP/1.1 only; with an eager upstream connection mitmproxy mirrors
        # that ALPN to the client, so HTTP/2 to the proxy needs the lazy strategy.
        extra = ("--set", "connection_strategy=lazy") if http2 else ()
        m = proxy_factory(
            cfg, mode=f"reverse:{provider.url}" if reverse else "regular", extra=extra
        )
        r = Rig(m, cfg, reverse, None if reverse else ca_bundle(tmp_path, mitm_confdir))
        if r.bundle is None:
            clear_proxy_env(monkeypatch)
        else:
            use_https_proxy(monkeypatch, m.url, r.bundle)
        return (r, *r.clients(m.url if reverse else provider.url, http2))

    return start


TRANSPORTS = [
    pytest.param("reverse", False, id="reverse-http1"),
    pytest.param("regular", False, id="https_proxy-http1"),
    pytest.param("regular", True, id="https_proxy-http2"),
]


# -- 1. incremental delivery ----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "http2"), TRANSPORTS)
def test_events_reach_the_client_as_the_provider_sends_them(rig, provider, mode, http2):
    r, oa, an = rig(dict(KEYS), mode=mode, http2=http2)
    # 10 events 100 ms apart: buffered, they would all land together after ~1 s.
    with ThreadPoolExecutor(2) as pool:
        jobs = {
            "openai": pool.submit(openai_stream, oa, "stream please", fake_headers(10, 100)),
            "anthropic": pool.submit(anthropic_stream, an, "stream please", fake_headers(10, 100)),
        }
        runs: dict[str, Timed] = {name: job.result() for name, job in jobs.items()}
    for name, seen in runs.items():
        assert seen.error is None, (name, seen.error)
        assert len(seen.arrivals) == 10, name
        assert seen.spread >= 0.8, (name, seen.spread)
        gaps = sorted(b - a for a, b in zip(seen.arrivals, seen.arrivals[1:], strict=False))
        assert gaps[len(gaps) // 2] >= 0.06, (name, gaps)
    assert set(r.versions) == {"HTTP/2" if http2 else "HTTP/1.1"}
    reqs = provider.requests
    assert sorted(q.credential or "" for q in reqs) == sorted([KEYS["alpha"], KEYS["beta"]])
    assert all(q.stream for q in reqs)
    records = wait_trace(r.state, 2)
    assert sorted((t["key"], t["outcome"], t["stream"]) for t in records) == [
        ("alpha", "ok", True),
        ("beta", "ok", True),
    ]


# -- 2. usage of streamed answers -----------------------------------------------------------------


def test_streamed_usage_is_recorded_and_include_usage_asked_only_when_unset(rig, provider):
    r, oa, an = rig({"alpha": KEYS["alpha"]})
    cases: list[dict[str, Any]] = [
        {},
        {"stream_options": {"include_usage": False}},
        {"stream_options": {"include_usage": True}},
    ]
    # Different prompt lengths and event counts, so every request reports different usage.
    seen = [
        openai_stream(oa, "x" * (40 * (i + 1)), fake_headers(3 + i, 5), **extra)
        for i, extra in enumerate(cases)
    ]
    seen.append(anthropic_stream(an, "y" * 200, fake_headers(7, 5)))
    assert all(s.error is None for s in seen), [s.error for s in seen]

    reqs = provider.requests
    assert [q.body.get("stream_options") for q in reqs] == [
        {"include_usage": True},  # added by the proxy
        {"include_usage": False},
        {"include_usage": True},
        None,  # not an OpenAI-style request
    ]
    # What the client set went upstream byte for byte.
    for i in (1, 2, 3):
        assert int(reqs[i].headers["content-length"]) == r.sent_lengths[i]
    assert int(reqs[0].headers["content-length"]) > r.sent_lengths[0]

    reported = [s.usage for s in seen]
    assert reported[1] is None and None not in reported[:1] + reported[2:]
    records = wait_trace(r.state, 4)
    assert [(t["tokens_in"], t["tokens_out"]) for t in records] == [
        reported[0],
        (None, None),
        reported[2],
        reported[3],
    ]
    assert r.m.stop() == 0
    row = cli_status(r.config)["alpha"]
    total = sum(sum(u) for u in reported if u is not None)
    assert (row["requests"], row["errors"], row["tokens"]) == (4, 0, total)


# -- 3. streams that fail after they began --------------------------------------------------------


def test_cut_and_failed_streams_are_failures_of_their_key(rig, provider):
    """Once a stream's first byte reached the client it cannot be retried: a failure after it
    counts against its key and reaches the client. Before it, the same failure is retried."""
    provider.set_keys(
        {
            MORE_KEYS["alpha"]: KeyBehaviour(truncate_after=3),
            MORE_KEYS["beta"]: KeyBehaviour(stream_error_after=2),  # OpenRouter-style
            MORE_KEYS["gamma"]: KeyBehaviour(stream_error_after=2),  # Anthropic event: error
            MORE_KEYS["delta"]: KeyBehaviour(fail_next=[529]),  # the HTTP equivalent
            MORE_KEYS["epsilon"]: KeyBehaviour(),
        }
    )
    r, oa, an = rig(
        dict(MORE_KEYS),
        tables={"health": {"overload_backoff": 5, "overload_backoff_max": 10}},
    )
    cut = openai_stream(oa, "cut", fake_headers(10, 5))
    failed_oa = openai_stream(oa, "fail", fake_headers(10, 5))
    failed_an = anthropic_stream(an, "fail", fake_headers(10, 5))
    http_529 = anthropic_stream(an, "busy", fake_headers(10, 5))

    labels = ["alpha", "beta", "gamma", "delta"]
    sent = [q.credential for q in provider.requests]
    assert sent == [MORE_KEYS[k] for k in [*labels, "epsilon"]]  # only the 529 retried
    assert len(cut.texts) == 3 and cut.error is not None
    assert len(failed_oa.texts) == 2 and failed_oa.error is not None
    assert len(failed_an.texts) == 2 and failed_an.error is not None
    assert http_529.error is None and len(http_529.texts) == 10

    records = wait_trace(r.state, 5)
    assert [(t["key"], t["outcome"]) for t in records] == [
        ("alpha", "truncated"),
        ("beta", "stream_error"),
        ("gamma", "stream_error"),
        ("delta", "overloaded"),
        ("epsilon", "ok"),
    ]
    keys = r.keys()
    for label in labels:
        k = keys[label]
        assert (k["status"], k["errors"], k["inflight"]) == ("cooling", 1, 0), (label, k)
        assert k["last_error"], label
        # Cooling briefly, exactly as long as after an HTTP 529 (the first overload backoff).
        assert k["until"] - k["last_used"] == pytest.approx(5.0, abs=0.05), (label, k)
    assert (keys["epsilon"]["status"], keys["epsilon"]["requests"]) == ("ready", 1)


# -- 4. a client that leaves mid-stream -----------------------------------------------------------


LONG = fake_headers(200, 100)  # 20 s: a held slot would outlast the 5 s wait allowed
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
H2_HEADERS = [("content-type", "application/json"), ("authorization", "Bearer client")]


def _leave_h1(r: Rig) -> None:
    """Read two events of a long stream over HTTP/1.1, then close the connection."""
    with (
        httpx2.Client(trust_env=False, timeout=10) as c,
        c.stream(
            "POST",
            r.m.url + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"authorization": "Bearer client", **LONG},
        ) as resp,
    ):
        _read_events(resp.iter_raw(), 2)


def _read_events(chunks: Any, n: int) -> None:
    buf = b""
    for chunk in chunks:
        buf += chunk
        if buf.count(b"\n\n") >= n:
            return
    raise AssertionError("the stream ended early")


def _leave_h2(r: Rig, provider: fake_provider.FakeProvider) -> H2Tunnel:
    """Read two events over HTTP/2, then cancel the stream (RST_STREAM); the connection stays."""
    assert r.bundle is not None
    tunnel = H2Tunnel((r.m.host, r.m.port), ("127.0.0.1", provider.port), r.bundle)
    sid = tunnel.request(
        "/v1/chat/completions",
        [*H2_HEADERS, *LONG.items()],
        json.dumps({**CHAT, "stream": True}).encode(),
    )
    tunnel.read_until(lambda: tunnel.bodies[sid].count(b"\n\n") >= 2)
    tunnel.cancel(sid)
    return tunnel


def _leave_then_ask(r: Rig, provider: fake_provider.FakeProvider) -> float:
    """Abandon a long stream, then time the next request on the same (only) key.

    Over HTTP/1.1 the leaving client closes its connection; over HTTP/2 it resets the stream
    and asks again on the same connection.
    """
    if r.reverse:
        _leave_h1(r)
        start = time.monotonic()
        httpx2.post(
            r.m.url + "/v1/chat/completions", json=CHAT, headers=dict(H2_HEADERS), trust_env=False
        ).raise_for_status()
        return time.monotonic() - start
    tunnel = _leave_h2(r, provider)
    start = time.monotonic()
    sid = tunnel.request("/v1/chat/completions", H2_HEADERS, json.dumps(CHAT).encode())
    tunnel.read_until(lambda: sid in tunnel.ended)
    took = time.monotonic() - start
    assert tunnel.status[sid] == 200
    tunnel.close()
    return took


@dataclass(frozen=True)
class Left:
    """After a client left mid-stream: how long the next request took, what the provider saw,
    the proxy's two trace records and its live view of the key."""

    took: float
    credentials: list[str | None]
    records: list[dict[str, Any]]
    alpha: dict[str, Any]


@pytest.fixture(scope="module")
def left(request, tmp_path_factory, upstream_ca, mitm_confdir) -> Iterator[Left]:
    """The leaving scenario, run once per transport (`request.param`) for the tests below:
    one key of concurrency 1, and at most 5 s of waiting for it."""
    reverse = request.param == "reverse"
    tmp = tmp_path_factory.mktemp(f"left-{request.param}")
    ca, ca_path = upstream_ca
    fp = fake_provider.FakeProvider({KEYS["alpha"]: KeyBehaviour()}, tls=ca)
    with fake_provider.run_in_thread(fp) as provider:
        cfg = write_rotor_config(
            tmp,
            [f"127.0.0.1:{provider.port}"],
            {"alpha": KEYS["alpha"]},
            key_limits={"alpha": {"concurrency": 1}},
            tables={"limits": {"max_wait_seconds": 5}},
        )
        extra = ["--set", f"ssl_verify_upstream_trusted_ca={ca_path}"]
        if not reverse:
            extra += ["--set", "connection_strategy=lazy"]
        mode = f"reverse:{provider.url}" if reverse else "regular"
        m = start_mitmdump(cfg, mitm_confdir, tmp / "mitmdump.log", mode=mode, extra=extra)
        try:
            r = Rig(m, cfg, reverse, None if reverse else ca_bundle(tmp, mitm_confdir))
            took = _leave_then_ask(r, provider)
            records = wait_trace(r.state, 2)
            creds = [q.credential for q in provider.requests]
            yield Left(took, creds, records, r.keys()["alpha"])
        finally:
            m.stop()


LEAVERS = [pytest.param("reverse", id="reverse-http1"), pytest.param("regular", id="http2-rst")]


@pytest.mark.parametrize("left", LEAVERS, indirect=True)
def test_a_client_leaving_mid_stream_frees_its_slot(left: Left):
    assert left.took < 2.0, f"the next request waited {left.took:.1f}s for the abandoned stream"
    assert left.credentials == [KEYS["alpha"]] * 2
    assert left.records[1]["outcome"] == "ok"
    assert (left.alpha["inflight"], left.alpha["status"]) == (0, "ready"), left.alpha


NOT_AN_ERROR = [
    pytest.param("reverse", id="reverse-http1"),
    pytest.param("regular", id="http2-rst"),
]


@pytest.mark.parametrize("left", NOT_AN_ERROR, indirect=True)
def test_a_client_leaving_mid_stream_is_not_an_error_of_the_key(left: Left):
    assert left.records[0]["outcome"] not in ("truncated", "stream_error", "overloaded")
    a = left.alpha
    assert (a["status"], a["errors"], a["error_score"]) == ("ready", 0, 0.0), a


# -- 5. error answers to streaming requests -------------------------------------------------------


def test_an_error_answer_to_a_streaming_request_is_not_streamed(rig, provider):
    provider.set_keys({KEYS["alpha"]: KeyBehaviour(fail_next=[429])})
    r, oa, _ = rig(dict(KEYS), tables={"failover": {"max_attempts": 1}})
    with pytest.raises(openai.RateLimitError) as caught:
        oa.chat.completions.create(**CHAT, stream=True)
    resp = caught.value.response
    assert resp.status_code == 429
    assert resp.headers["content-type"].startswith("application/json")
    assert isinstance(json.loads(resp.content)["error"], dict)
    (req,) = provider.requests
    assert (req.credential, req.status, req.stream) == (KEYS["alpha"], 429, True)
    (record,) = wait_trace(r.state, 1)
    assert (record["key"], record["outcome"], record["stream"]) == ("alpha", "rate_limited", False)
    alpha = r.keys()["alpha"]
    assert (alpha["upstream_429"], alpha["status"]) == (1, "cooling")
    assert "Streaming response" not in r.m.process.output
