"""Tests for scripts/fake_provider.py, the fake LLM provider used by tests and benchmarks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import fake_provider  # noqa: E402
from fake_provider import (  # noqa: E402
    FakeProvider,
    KeyBehaviour,
    extract_credential,
    go_duration,
    run_in_thread,
)

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
PROMPT = {"model": "m-1", "messages": [{"role": "user", "content": "x" * 40}]}

Event = tuple[float, str | None, str]


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Everything here talks to loopback; an inherited proxy setting must not reroute it.
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    fp = FakeProvider({"good": KeyBehaviour()}, event_delay=0.01)
    async with fp:
        yield fp


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def collect_sse(resp: aiohttp.ClientResponse, out: list[Event]) -> None:
    """Append ``(arrival time, event name, data)`` per SSE event; raises if the body breaks."""
    event: str | None = None
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                out.append((time.monotonic(), event, "\n".join(data)))
            event, data = None, []
        elif line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())
        else:
            raise AssertionError(f"malformed SSE line: {line!r}")
    assert not data, "stream ended inside an event"


async def read_sse(resp: aiohttp.ClientResponse) -> list[Event]:
    events: list[Event] = []
    await collect_sse(resp, events)
    return events


# -- pure helpers ----------------------------------------------------------------------


def test_extract_credential_precedence() -> None:
    everything = {"authorization": "Bearer A", "x-api-key": "B", "x-goog-api-key": "C"}
    assert extract_credential(everything, {"key": "D"}) == ("A", "authorization")
    assert extract_credential({"authorization": "Basic zzz", "x-api-key": "B"}, {}) == (
        "B",
        "x-api-key",
    )
    assert extract_credential({"x-goog-api-key": "C"}, {"key": "D"}) == ("C", "x-goog-api-key")
    assert extract_credential({}, {"key": "D"}) == ("D", "query:key")
    assert extract_credential({}, {}) == (None, None)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (1, "1s"),
        (360, "6m0s"),
        (179.56, "2m59.56s"),
        (59.999, "1m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_key_behaviour_from_dict() -> None:
    kb = KeyBehaviour.from_dict({"mode": "quota", "quota_style": "kimi", "fail_next": [500]})
    assert (kb.mode, kb.quota_style, kb.fail_next) == ("quota", "kimi", [500])
    assert KeyBehaviour.from_dict("overloaded").mode == "overloaded"
    assert KeyBehaviour.from_dict(None) == KeyBehaviour()
    with pytest.raises(ValueError):
        KeyBehaviour.from_dict({"mode": "nope"})
    with pytest.raises(ValueError):
        KeyBehaviour.from_dict({"bogus": 1})


# -- credentials and recording ---------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "source"),
    [
        ({"Authorization": "Bearer good"}, "", "authorization"),
        ({"x-api-key": "good"}, "", "x-api-key"),
        ({"x-goog-api-key": "good"}, "", "x-goog-api-key"),
        ({}, "?key=good", "query:key"),
    ],
)
async def test_credential_positions_are_recorded(
    provider: FakeProvider,
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    query: str,
    source: str,
) -> None:
    headers = {**headers, "X-Custom": "yes"}
    async with session.post(provider.url + CHAT + query, json=PROMPT, headers=headers) as r:
        assert r.status == 200
    [rec] = provider.requests
    assert (rec.credential, rec.credential_source) == ("good", source)
    assert rec.method == "POST" and rec.path == CHAT and rec.status == 200
    assert rec.host == f"127.0.0.1:{provider.port}"
    assert rec.headers["x-custom"] == "yes"
    assert all(name == name.lower() for name in rec.headers)
    assert rec.body == PROMPT and rec.stream is False
    assert rec.ended is not None and rec.ended >= rec.started


async def test_unknown_key_gets_401_in_each_dialect(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("bad")) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "invalid_api_key"
    async with session.post(
        provider.url + MESSAGES, json=PROMPT, headers={"x-api-key": "bad"}
    ) as r:
        assert r.status == 401
        assert await r.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
    async with session.get(provider.url + "/v1/models") as r:
        assert r.status == 401
    assert [rec.status for rec in provider.requests] == [401, 401, 401]
    assert provider.requests[2].credential is None


async def test_accept_any(session: aiohttp.ClientSession) -> None:
    async with (
        FakeProvider(accept_any=True) as fp,
        session.post(fp.url + CHAT, json=PROMPT, headers=bearer("whatever")) as r,
    ):
        assert r.status == 200


# -- response shapes -------------------------------------------------------------------


async def test_openai_non_stream(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    async with session.post(
        provider.url + "/coding/v1/chat/completions", json=PROMPT, headers=bearer("good")
    ) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "chat.completion" and body["model"] == "m-1"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_anthropic_non_stream(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    async with session.post(
        provider.url + MESSAGES, json=PROMPT, headers={"x-api-key": "good"}
    ) as r:
        assert r.status == 200
        body = await r.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"][0]["type"] == "text" and body["content"][0]["text"]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["input_tokens"] == 10 and body["usage"]["output_tokens"] > 0


async def test_models_listing(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    async with session.get(provider.url + "/api/v1/models", headers=bearer("good")) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"


async def test_unknown_path_and_wrong_method(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    async with session.post(provider.url + "/v1/embeddings", headers=bearer("good")) as r:
        assert r.status == 404
    async with session.get(provider.url + CHAT, headers=bearer("good")) as r:
        assert r.status == 405


async def test_openai_stream_timing_and_shape(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    headers = {**bearer("good"), "x-fake-events": "6", "x-fake-delay-ms": "30"}
    async with session.post(
        provider.url + CHAT, json={**PROMPT, "stream": True}, headers=headers
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(r)
    assert events[-1][2] == "[DONE]"
    chunks = [json.loads(data) for _, _, data in events[:-1]]
    assert len(chunks) == 6
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # Five gaps of 30 ms between six chunks; only a lower bound is stable on busy hosts.
    assert events[5][0] - events[0][0] >= 5 * 0.030 * 0.8
    assert provider.requests[0].stream is True


async def test_openai_stream_include_usage(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    body = {**PROMPT, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(provider.url + CHAT, json=body, headers=bearer("good")) as r:
        events = await read_sse(r)
    assert [data for _, _, data in events][-1] == "[DONE]"
    chunks = [json.loads(data) for _, _, data in events[:-1]]
    assert len(chunks) == 6
    final = chunks[-1]
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


async def test_anthropic_stream(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    headers = {"x-api-key": "good", "x-fake-events": "4", "x-fake-delay-ms": "25"}
    async with session.post(
        provider.url + MESSAGES, json={**PROMPT, "stream": True}, headers=headers
    ) as r:
        assert r.status == 200
        events = await read_sse(r)
    names = [name for _, name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(data) for _, _, data in events]
    assert all(p["type"] == name for p, name in zip(payloads, names, strict=True))
    assert payloads[0]["message"]["usage"]["input_tokens"] == 10
    assert payloads[-2]["usage"]["output_tokens"] == 4
    deltas = [t for t, name, _ in events if name == "content_block_delta"]
    assert deltas[-1] - deltas[0] >= 3 * 0.025 * 0.8


async def test_sdk_clients_parse_the_streams(provider: FakeProvider) -> None:
    import anthropic
    import openai

    oai = openai.AsyncOpenAI(api_key="good", base_url=provider.url + "/v1", max_retries=0)
    stream = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text and usage is not None and usage.completion_tokens == 5
    await oai.close()

    ant = anthropic.AsyncAnthropic(api_key="good", base_url=provider.url, max_retries=0)
    async with ant.messages.stream(
        model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        message = await s.get_final_message()
    assert message.content[0].text and message.usage.output_tokens == 5  # type: ignore[union-attr]
    await ant.close()


# -- rate-limit headers and limits -----------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [
        (
            "openai",
            {
                "x-ratelimit-limit-requests": "3",
                "x-ratelimit-remaining-requests": "2",
                "x-ratelimit-limit-tokens": "1000",
            },
        ),
        (
            "anthropic",
            {
                "anthropic-ratelimit-requests-limit": "3",
                "anthropic-ratelimit-requests-remaining": "2",
                "anthropic-ratelimit-tokens-limit": "1000",
            },
        ),
        ("xratelimit", {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2"}),
        ("ietf", {"RateLimit-Policy": '"default";q=3;w=60'}),
    ],
)
async def test_header_dialects(
    provider: FakeProvider,
    session: aiohttp.ClientSession,
    dialect: str,
    expected: dict[str, str],
) -> None:
    provider.set_keys({"k": {"rpm": 3, "tpm": 1000, "headers": dialect}})
    async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("k")) as r:
        assert r.status == 200
        for name, value in expected.items():
            assert r.headers[name] == value
        if dialect == "openai":
            assert re.fullmatch(
                r"(\d+m)?\d+(\.\d+)?s|\d+(\.\d+)?ms", r.headers["x-ratelimit-reset-requests"]
            )
        elif dialect == "anthropic":
            reset = r.headers["anthropic-ratelimit-requests-reset"]
            assert reset.endswith("Z")
            assert datetime.fromisoformat(reset).timestamp() > time.time()
        elif dialect == "xratelimit":
            assert int(r.headers["X-RateLimit-Reset"]) > time.time() * 1000
        else:
            assert re.fullmatch(r'"default";r=2;t=\d+', r.headers["RateLimit"])


async def test_no_headers_without_rpm_or_dialect(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_keys({"plain": {"headers": "openai"}, "quiet": {"rpm": 5}})
    for key in ("plain", "quiet"):
        async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer(key)) as r:
            assert r.status == 200
            assert not any("ratelimit" in name.lower() for name in r.headers)


async def test_rpm_enforced_with_retry_after(session: aiohttp.ClientSession) -> None:
    # time_scale 0.01 squeezes the minute into 0.6 s.
    keys = {"k": KeyBehaviour(rpm=2, headers="openai")}
    async with FakeProvider(keys, time_scale=0.01) as fp:
        statuses = []
        for _ in range(3):
            async with session.post(fp.url + CHAT, json=PROMPT, headers=bearer("k")) as r:
                statuses.append(r.status)
                last = r
        assert statuses == [200, 200, 429]
        assert last.headers["retry-after"] == "1"
        assert last.headers["x-ratelimit-remaining-requests"] == "0"
        assert [rec.status for rec in fp.requests] == [200, 200, 429]
        await asyncio.sleep(0.65)
        async with session.post(fp.url + CHAT, json=PROMPT, headers=bearer("k")) as r:
            assert r.status == 200


async def test_rps_and_tpm_enforced(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    provider.set_keys({"rps": {"rps": 1}, "tpm": {"tpm": 20}})
    statuses = []
    for _ in range(2):
        async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("rps")) as r:
            statuses.append(r.status)
    assert statuses == [200, 429]
    assert r.headers["retry-after"] == "1"
    # Each request costs 10 prompt + 6 completion tokens, so the second overflows 20.
    statuses = []
    for _ in range(2):
        async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("tpm")) as r:
            statuses.append(r.status)
    assert statuses == [200, 429]
    assert int(r.headers["retry-after"]) == 60


# -- limits per model ---------------------------------------------------------------------

MODEL_HEADERS = {
    "openai": ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"),
    "anthropic": ("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining"),
}


def asking(model: str) -> dict[str, Any]:
    return {**PROMPT, "model": model}


@pytest.mark.parametrize(("dialect", "path"), [("openai", CHAT), ("anthropic", MESSAGES)])
async def test_model_limits_are_separate_and_headers_describe_the_model_asked_for(
    provider: FakeProvider, session: aiohttp.ClientSession, dialect: str, path: str
) -> None:
    provider.set_keys(
        {
            "k": {
                "rpm": 100,
                "headers": dialect,
                "model_limits": {"small": {"rpm": 2}, "large": {"rpm": 5}},
            }
        }
    )
    limit_h, remaining_h = MODEL_HEADERS[dialect]
    seen: list[tuple[str, int, str, str]] = []
    for model in ("small", "small", "small", "large", "other", "large"):
        async with session.post(provider.url + path, json=asking(model), headers=bearer("k")) as r:
            seen.append(
                (model, r.status, r.headers.get(limit_h, ""), r.headers.get(remaining_h, ""))
            )
            if r.status == 429:
                error = (await r.json())["error"]
                assert "small" in error["message"]
                assert int(r.headers["retry-after"]) >= 1
    assert seen == [
        ("small", 200, "2", "1"),
        ("small", 200, "2", "0"),
        ("small", 429, "2", "0"),
        # the 429 on "small" costs "large" nothing, and the key-wide limit is apart from both
        ("large", 200, "5", "4"),
        ("other", 200, "100", "99"),
        ("large", 200, "5", "3"),
    ]


async def test_a_model_without_limits_of_its_own_shares_the_keys(
    session: aiohttp.ClientSession,
) -> None:
    keys = {"k": KeyBehaviour(rpm=2, headers="openai", model_limits={"own": {"rpm": 1}})}
    async with FakeProvider(keys) as fp:
        statuses = []
        for model in ("a", "b", "c", "own", "own"):
            async with session.post(fp.url + CHAT, json=asking(model), headers=bearer("k")) as r:
                statuses.append(r.status)
    assert statuses == [200, 200, 429, 200, 429]


async def test_model_token_limits_and_reset_forgets_model_windows(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    # Each request costs 10 prompt + 6 completion tokens.
    provider.set_keys({"k": {"model_limits": {"m": {"tpm": 20}}}})
    statuses = []
    for _ in range(2):
        async with session.post(provider.url + CHAT, json=asking("m"), headers=bearer("k")) as r:
            statuses.append(r.status)
    assert statuses == [200, 429]
    provider.reset()
    async with session.post(provider.url + CHAT, json=asking("m"), headers=bearer("k")) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "bad",
    [
        ["m"],
        {"m": 3},
        {"": {"rpm": 1}},
        {"m": {"rpd": 1}},
        {"m": {"rpm": -1}},
        {"m": {"rpm": "1"}},
        {"m": {"rpm": True}},
    ],
)
def test_model_limits_are_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"model_limits.+"):
        KeyBehaviour.from_dict({"model_limits": bad})


def test_model_limits_are_copied() -> None:
    limits = {"m": {"rpm": 1}}
    behaviour = KeyBehaviour(model_limits=limits)
    limits["m"]["rpm"] = 99
    copy = behaviour.copy()
    assert behaviour.model_limits == {"m": {"rpm": 1}}
    assert copy.model_limits == behaviour.model_limits
    assert copy.model_limits is not behaviour.model_limits


async def test_models_listing_answers_in_the_anthropic_shape_to_anthropic_clients(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    headers = {"x-api-key": "nope", "anthropic-version": "2023-06-01"}
    async with session.get(provider.url + "/v1/models", headers=headers) as r:
        assert r.status == 401
        assert (await r.json())["error"]["type"] == "authentication_error"


# -- failure behaviours ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "status", "marker"),
    [
        ("openai", 429, "insufficient_quota"),
        ("kimi", 403, "usage limit for this billing cycle"),
        ("openrouter", 402, "credits"),
        ("gemini", 429, "RESOURCE_EXHAUSTED"),
    ],
)
async def test_quota_styles(
    provider: FakeProvider,
    session: aiohttp.ClientSession,
    style: str,
    status: int,
    marker: str,
) -> None:
    provider.set_keys({"q": {"mode": "quota", "quota_style": style}})
    async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("q")) as r:
        assert r.status == status
        text = await r.text()
    assert marker in text
    if style == "gemini":
        details = json.loads(text)["error"]["details"]
        assert details[0]["violations"][0]["quotaId"].endswith("PerDayPerProjectPerModel-FreeTier")
        assert details[1]["retryDelay"] == "37s"


@pytest.mark.parametrize(
    ("mode", "path", "status"),
    [
        ("overloaded", MESSAGES, 529),
        ("overloaded", CHAT, 503),
        ("server_error", CHAT, 500),
        ("invalid", CHAT, 401),
    ],
)
async def test_error_modes(
    provider: FakeProvider, session: aiohttp.ClientSession, mode: str, path: str, status: int
) -> None:
    provider.set_keys({"m": {"mode": mode}})
    async with session.post(provider.url + path, json=PROMPT, headers={"x-api-key": "m"}) as r:
        assert r.status == status
        body = await r.json()
    if path == MESSAGES:
        assert body["type"] == "error"
    else:
        assert "message" in body["error"]


async def test_fail_next_is_consumed_in_order(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_keys({"f": KeyBehaviour(fail_next=[500, 429])})
    statuses = []
    for _ in range(3):
        async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("f")) as r:
            statuses.append(r.status)
            body = await r.json()
            assert ("error" in body) == (r.status != 200)
    assert statuses == [500, 429, 200]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_truncate_after_breaks_the_body(
    provider: FakeProvider, session: aiohttp.ClientSession, path: str
) -> None:
    provider.set_keys({"t": {"truncate_after": 2}})
    events: list[Event] = []
    async with session.post(
        provider.url + path, json={**PROMPT, "stream": True}, headers={"x-api-key": "t"}
    ) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await collect_sse(r, events)
    datas = [data for _, _, data in events]
    assert "[DONE]" not in datas
    assert not any(name == "message_stop" for _, name, _ in events)
    deltas = [e for e in events if e[1] == "content_block_delta" or '"delta"' in e[2]]
    assert len(deltas) == 2


async def test_stream_error_after(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    provider.set_keys({"e": {"stream_error_after": 1}})
    async with session.post(
        provider.url + MESSAGES, json={**PROMPT, "stream": True}, headers={"x-api-key": "e"}
    ) as r:
        events = await read_sse(r)
    assert [name for _, name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert json.loads(events[-1][2])["error"]["type"] == "overloaded_error"

    async with session.post(
        provider.url + CHAT, json={**PROMPT, "stream": True}, headers=bearer("e")
    ) as r:
        events = await read_sse(r)
    assert events[-1][2] == "[DONE]"
    failed = json.loads(events[-2][2])
    assert failed["choices"][0]["finish_reason"] == "error" and "message" in failed["error"]
    assert len(events) == 3


async def test_latency_delays_headers(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_keys({"slow": {"latency": 0.1}})
    start = time.monotonic()
    async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("slow")) as r:
        assert r.status == 200
    assert time.monotonic() - start >= 0.1


# -- concurrency, admin ----------------------------------------------------------------


async def test_max_inflight_per_key(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    provider.set_keys({"other": {}})

    async def stream(key: str) -> None:
        async with session.post(
            provider.url + CHAT, json={**PROMPT, "stream": True}, headers=bearer(key)
        ) as r:
            await read_sse(r)

    await asyncio.gather(stream("good"), stream("good"), stream("other"))
    await stream("other")
    keys = provider.stats()["keys"]
    assert keys["good"]["max_inflight"] == 2 and keys["good"]["inflight"] == 0
    assert keys["other"]["max_inflight"] == 1 and keys["other"]["requests"] == 2
    assert keys["good"]["statuses"] == {"200": 2}


async def test_admin_endpoints(provider: FakeProvider, session: aiohttp.ClientSession) -> None:
    url = provider.url + "/_fake"
    async with session.get(url + "/health") as r:
        assert r.status == 200 and await r.text() == "ok"
    async with session.post(url + "/keys", json={"new": {"mode": "server_error"}}) as r:
        assert r.status == 200
    async with session.post(url + "/keys", json={"bad": {"mode": "nonsense"}}) as r:
        assert r.status == 400
    async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("new")) as r:
        assert r.status == 500
    async with session.get(url + "/requests") as r:
        recorded = await r.json()
    assert [(x["credential"], x["status"]) for x in recorded] == [("new", 500)]
    async with session.get(url + "/stats") as r:
        assert (await r.json())["keys"]["new"]["statuses"] == {"500": 1}
    async with session.post(url + "/reset") as r:
        assert r.status == 200
    assert provider.requests == []
    assert provider.stats()["keys"]["new"]["requests"] == 0


# -- Kimi Code's usage endpoint ----------------------------------------------------------

USAGES = "/coding/v1/usages"
KIMI_USAGES = {
    "usage": {"used": 40, "limit": 100, "remaining": 60, "reset_at": "2030-01-01T00:00:00Z"},
    "limits": [
        {
            "name": "5h",
            "detail": {"used": 3, "limit": 10, "remaining": 7, "reset_in": 120},
            "window": {"duration": 300, "timeUnit": "MINUTE"},
        }
    ],
}


async def test_usages_answers_each_keys_document_or_404(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    doc = json.loads(json.dumps(KIMI_USAGES))
    provider.set_keys({"kimi": KeyBehaviour(usages=doc, fail_next=[500]), "bad": "invalid"})
    doc["usage"]["remaining"] = 0  # the provider keeps its own copy
    for key, status in (("kimi", 200), ("good", 404), ("bad", 401), ("stranger", 401)):
        async with session.get(provider.url + USAGES, headers=bearer(key)) as r:
            assert r.status == status, key
            body = await r.json()
        assert body == KIMI_USAGES if status == 200 else "error" in body
    async with session.post(provider.url + USAGES, headers=bearer("kimi")) as r:
        assert r.status == 405
    recorded = [(r.path, r.credential, r.status) for r in provider.requests]
    assert recorded[0] == (USAGES, "kimi", 200)
    assert [s for _, _, s in recorded] == [200, 404, 401, 401, 405]
    # polling the quota does not consume failures meant for API requests
    async with session.post(provider.url + CHAT, json=PROMPT, headers=bearer("kimi")) as r:
        assert r.status == 500


def test_usages_behaviour_is_validated_and_copied() -> None:
    kb = KeyBehaviour.from_dict({"usages": KIMI_USAGES})
    assert kb.usages == KIMI_USAGES
    clone = kb.copy()
    assert clone.usages is not None and kb.usages is not None
    clone.usages["usage"]["remaining"] = 0
    assert kb.usages["usage"]["remaining"] == 60
    with pytest.raises(ValueError):
        KeyBehaviour(usages=[1, 2])  # type: ignore[arg-type]


# -- TLS, threads, CLI -----------------------------------------------------------------


async def test_https_with_trustme() -> None:
    ca = trustme.CA()
    keys = {"good": KeyBehaviour()}
    async with FakeProvider(keys, tls=ca, tls_hostnames=["api.openai.test"]) as fp:
        assert fp.url.startswith("https://127.0.0.1:")
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx)) as s:
            async with s.post(
                fp.url + CHAT, json={**PROMPT, "stream": True}, headers=bearer("good")
            ) as r:
                assert r.status == 200
                events = await read_sse(r)
            assert events[-1][2] == "[DONE]"
            # The extra name is on the certificate: reach the same socket under it.
            resolver_url = f"https://api.openai.test:{fp.port}/_fake/health"
            conn = aiohttp.TCPConnector(ssl=client_ctx, resolver=_LoopbackResolver())
            async with aiohttp.ClientSession(connector=conn) as s2, s2.get(resolver_url) as r:
                assert await r.text() == "ok"


class _LoopbackResolver(aiohttp.abc.AbstractResolver):
    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[Any]:
        import socket

        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


def test_run_in_thread() -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with run_in_thread(FakeProvider({"good": KeyBehaviour()})) as fp:
        request = urllib.request.Request(
            fp.url + CHAT,
            data=json.dumps(PROMPT).encode(),
            headers=bearer("good"),
            method="POST",
        )
        with opener.open(request, timeout=5) as resp:
            assert resp.status == 200
        assert [r.status for r in fp.requests] == [200]
        url = fp.url
    with pytest.raises(OSError):
        opener.open(url + "/_fake/health", timeout=2)


def _start_cli(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "fake_provider.py"), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.fullmatch(r"fake-provider listening on (https?://127\.0\.0\.1:\d+)\n", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"unexpected readiness line {line!r}: {proc.communicate()[1]}")
    return proc, match.group(1)


def _stop_cli(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return out + err


async def test_cli_readiness_and_sigterm(session: aiohttp.ClientSession) -> None:
    proc, url = _start_cli("--keys", '{"sk-secret-cli": {}}', "--event-delay", "0")
    try:
        async with session.post(url + CHAT, json=PROMPT, headers=bearer("sk-secret-cli")) as r:
            assert r.status == 200
    finally:
        output = _stop_cli(proc)
    assert "sk-secret-cli" not in output


async def test_cli_tls(tmp_path: Path) -> None:
    proc, url = _start_cli("--tls-dir", str(tmp_path), "--accept-any")
    try:
        assert url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.get(url + "/v1/models", headers=bearer("anything")) as r,
        ):
            assert r.status == 200
    finally:
        _stop_cli(proc)


def test_module_exports() -> None:
    assert set(fake_provider.__all__) >= {"FakeProvider", "KeyBehaviour", "run_in_thread"}
