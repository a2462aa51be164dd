"""The addon's hooks through mitmproxy's test helpers, with a clock the tests move by hand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import pytest
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.test import taddons, tflow, tutils
from rotor_toml import pool as pool_table
from rotor_toml import rotor_config
from testkit import Clock

import kmi_rotor.request_body
from kmi_rotor.addon import META, Rotor
from kmi_rotor.config import load
from kmi_rotor.core import body_json
from kmi_rotor.core import tokens as tk
from kmi_rotor.core.secrets import mask_credential_value
from kmi_rotor.core.state import Delta, KeyRecord, Operator
from kmi_rotor.core.stream_tap import SSETap
from kmi_rotor.store import StateStore
from kmi_rotor.trace import read_trace, trace_path

KEYS = {
    "a": "sk-hooks-alpha-00000000000000000aaaa",
    "b": "sk-hooks-bravo-00000000000000000bbbb",
    "c": "sk-hooks-charl-00000000000000000cccc",
}
CLIENT = "Bearer client-own-credential"
T0 = 1_800_000_000.0


def write_config(
    path: Path,
    *,
    limits: dict[str, Any] | None = None,
    failover: dict[str, Any] | None = None,
    streaming: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
) -> Path:
    """A config of one pool `p` (hosts llm.test) holding KEYS; failover off unless asked."""
    fields = {"provider": "generic", "hosts": ["llm.test"], **(pool or {})}
    return rotor_config(
        path,
        path.parent / "state",
        [pool_table("p", fields.pop("hosts"), KEYS, **fields)],
        limits={"guard": 0, **(limits or {})},
        failover={"max_attempts": 1, **(failover or {})},
        streaming=streaming or {},
    )


class Make(Protocol):
    def __call__(self, **config: Any) -> tuple[Rotor, taddons.context, Clock]: ...


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """Build a configured addon (inside a taddons context) from `write_config`'s arguments."""
    with ExitStack() as stack:

        def build(**config: Any) -> tuple[Rotor, taddons.context, Clock]:
            addon, clock = Rotor(), Clock(T0)
            addon.clock = clock
            tctx = stack.enter_context(taddons.context(addon))
            stack.callback(addon.done)
            tctx.configure(addon, rotor_config=str(write_config(tmp_path / "rotor.toml", **config)))
            return addon, tctx, clock

        yield build


def flow(
    body: dict[str, Any] | bytes | None = None,
    *,
    path: str = "/v1/chat/completions",
    headers: tuple[tuple[str, str], ...] = (("authorization", CLIENT),),
) -> tflow.tflow:
    content = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    h = http.Headers(
        [(k.encode(), v.encode()) for k, v in headers]
        + [(b"content-length", str(len(content)).encode())]
    )
    req = tutils.treq(
        host="llm.test",
        port=443,
        scheme=b"https",
        method=b"POST",
        path=path.encode(),
        headers=h,
        content=content,
    )
    f = tflow.tflow(req=req)
    f.response = None
    return f


async def send(addon: Rotor, f: http.HTTPFlow) -> http.HTTPFlow:
    """`requestheaders` then `request`, the body arriving in between as it does in mitmproxy."""
    body, f.request.data.content = f.request.data.content, None
    await addon.requestheaders(f)
    f.request.data.content = body
    await addon.request(f)
    return f


async def answer(
    addon: Rotor,
    f: http.HTTPFlow,
    status: int = 200,
    content: bytes = b"{}",
    headers: dict[str, str] | None = None,
) -> http.HTTPFlow:
    f.response = tutils.tresp(
        status_code=status,
        headers=http.Headers(**({"content_type": "application/json"} | (headers or {}))),
        content=content,
    )
    addon.responseheaders(f)
    await addon.response(f)
    return f


async def served_by(addon: Rotor, n: int = 1) -> str:
    """Labels of the keys given to `n` requests answered 200 in turn."""
    out = ""
    for _ in range(n):
        f = await send(addon, flow())
        assert f.response is None, f.response.content if f.response else None
        out += f.metadata[META]["key"]
        await answer(addon, f)
    return out


def record(addon: Rotor, label: str) -> KeyRecord:
    assert addon.serving is not None
    for rec in addon.serving.keeper.view().keys.values():
        if rec.label == label:
            return rec
    raise AssertionError(f"no record for {label}")


def row(addon: Rotor, label: str) -> dict[str, Any]:
    snap = addon.snapshot()
    return next(k for p in snap["pools"] for k in p["keys"] if k["label"] == label)


def no_secret(text: str) -> bool:
    return all(v not in text for v in KEYS.values())


def error_body(f: http.HTTPFlow) -> dict[str, Any]:
    assert f.response is not None
    return json.loads(f.response.content or b"{}")["error"]


# -- request path ----------------------------------------------------------------------------


async def test_requestheaders_injects_and_counts(make: Make) -> None:
    addon, _, _ = make()
    seen = []
    for _ in range(4):
        f = flow()
        await addon.requestheaders(f)
        seen.append(f.request.headers["authorization"])
        meta = f.metadata[META]
        assert (meta["pool"], meta["attempt"], f.comment) == ("p", 1, f"key {meta['key']}")
        assert f.response is None
    assert seen == [f"Bearer {KEYS[x]}" for x in "abca"]
    assert [record(addon, x).requests for x in "abc"] == [2, 1, 1]
    assert [row(addon, x)["inflight"] for x in "abc"] == [2, 1, 1]


ASK = {"include_usage": True}
SSE = (("accept", "text/event-stream"),)
ACCEPT_BUG = (
    'flows.wants_stream trusts `Accept: text/event-stream` over the body\'s "stream": false, '
    "so flows.ask_for_usage adds stream_options to a request that is not streamed (OpenAI answers "
    "400 to stream_options without stream)"
)


def usage_case(
    name: str,
    path: str,
    body: dict[str, Any],
    expected: Any,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    setting: bool = True,
    bug: str | None = None,
) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(path, body, headers, setting, expected, id=name, marks=marks)


CHAT = "/v1/chat/completions"
USAGE_CASES = [
    usage_case("added", CHAT, {"stream": True}, ASK),
    usage_case("empty-options", CHAT, {"stream": True, "stream_options": {}}, ASK),
    usage_case("query", CHAT + "?api-version=1", {"stream": True}, ASK),
    usage_case("sse-accept", CHAT, {"stream": True}, ASK, headers=SSE),
    usage_case(
        "client-false", CHAT, {"stream": True, "stream_options": {"include_usage": False}}, "same"
    ),
    usage_case(
        "client-true", CHAT, {"stream": True, "stream_options": {"include_usage": True}}, "same"
    ),
    usage_case("not-streamed", CHAT, {"stream": False}, "same"),
    usage_case("no-stream-field", CHAT, {"model": "m"}, "same"),
    usage_case("anthropic", "/v1/messages", {"stream": True}, "same"),
    usage_case("responses-api", "/v1/responses", {"stream": True}, "same"),
    usage_case("setting-off", CHAT, {"stream": True}, "same", setting=False),
    usage_case("sse-accept-stream-false", CHAT, {"stream": False}, "same", headers=SSE),
    usage_case("sse-accept-no-stream-field", CHAT, {"model": "m"}, "same", headers=SSE),
    usage_case("null-options", CHAT, {"stream": True, "stream_options": None}, ASK),
    usage_case("stream-not-a-bool", CHAT, {"stream": "true"}, "same", headers=SSE),
]


@pytest.mark.parametrize(("path", "body", "headers", "setting", "expected"), USAGE_CASES)
async def test_request_asks_openai_streams_for_usage_only_when_absent(
    make: Make,
    path: str,
    body: dict[str, Any],
    headers: tuple[tuple[str, str], ...],
    setting: bool,
    expected: Any,
) -> None:
    addon, _, _ = make(streaming={"include_usage": setting})
    f = flow(body, path=path, headers=(("authorization", CLIENT), *headers))
    sent = f.request.content
    await send(addon, f)
    if expected == "same":
        assert f.request.content == sent
        assert "usage_requested" not in f.metadata[META]
    else:
        assert json.loads(f.request.content or b"") == {**body, "stream_options": expected}
        assert f.metadata[META]["usage_requested"] is True
    assert f.request.headers["authorization"] == f"Bearer {KEYS['a']}"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"caf\xc3\xa9 \\u00e9"}]}',
        b' \r\n\t{ "stream" : true , "messages" : [ ] }  \n',
        b'{"stream": true, "n": 1.50, "big": 123456789012345678901234567890}',
    ],
)
async def test_asking_for_usage_keeps_the_clients_bytes(make: Make, raw: bytes) -> None:
    """`stream_options` goes in right after the object's opening brace: every byte the client
    wrote is sent as it was (its spacing, its escapes, its numbers as written)."""
    addon, _, _ = make()
    f = flow(raw)
    await send(addon, f)
    sent = f.request.content or b""
    at = raw.index(b"{") + 1
    assert sent == raw[:at] + b'"stream_options":{"include_usage":true},' + raw[at:]
    assert json.loads(sent) == {**json.loads(raw), "stream_options": ASK}
    assert f.request.headers["content-length"] == str(len(sent))
    assert f.metadata[META]["usage_requested"] is True


@pytest.mark.parametrize("options", [None, {}, {"include_obfuscation": False}])
async def test_a_long_conversation_asked_for_usage_keeps_its_bytes(
    make: Make, options: dict[str, Any] | None
) -> None:
    """A client's own `stream_options` (null, or without `include_usage`) is written again
    with `include_usage` in it; the conversation around it is sent as the client wrote it."""
    addon, _, _ = make()
    turns = [{"role": "user", "content": f"turn {i} \u00e9 " + "w" * 3000} for i in range(30)]
    body = {"model": "m", "stream": True, "stream_options": options, "messages": turns}
    raw = json.dumps(body, indent=1).encode()
    f = flow(raw)
    await send(addon, f)
    sent = f.request.content or b""
    assert json.loads(sent) == {**body, "stream_options": {**(options or {}), **ASK}}
    at = raw.index(b'"messages"')
    assert raw[raw.index(b"[", at) : raw.rindex(b"]") + 1] in sent
    assert f.metadata[META]["usage_requested"] is True


@pytest.mark.parametrize(
    "raw",
    [
        b"\x1f\x8b\x08\x00 compressed or garbage",
        b'{"stream": true',
        b'["stream", true]',
        b"",
    ],
)
async def test_a_body_that_is_not_an_object_is_not_rewritten(make: Make, raw: bytes) -> None:
    """A streamed request (by its Accept) whose body is not a JSON object is sent as it came:
    nothing is put in place of a body kmi-rotor cannot read."""
    addon, _, _ = make()
    f = flow(raw, headers=(("authorization", CLIENT), *SSE))
    await send(addon, f)
    assert f.request.content == raw
    assert "usage_requested" not in f.metadata[META]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
async def test_a_body_in_another_encoding_is_asked_for_usage_whole(make: Make, codec: str) -> None:
    """A body `json.loads` reads in another encoding is not spliced (bytes of UTF-8 in a UTF-16
    text would break it): it is written again, as JSON, with `stream_options` in it. Its
    `"stream": true` is read from its parse, as from any body's."""
    addon, _, _ = make()
    body = {"stream": True, "messages": [{"role": "user", "content": "h\u00e9"}]}
    f = flow(json.dumps(body).encode(codec))
    await send(addon, f)
    assert json.loads(f.request.content or b"") == {**body, "stream_options": ASK}
    assert f.metadata[META]["usage_requested"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "max_tokens": 5000, "messages": [{"role": "user", "content": "x" * 999}]},
        {"model": "m", "messages": []},
        b"not json " * 300,
    ],
)
async def test_request_corrects_the_token_reservation_to_the_body(
    make: Make, body: dict[str, Any] | bytes
) -> None:
    addon, _, clock = make(limits={"tokens_per_minute": 1_000_000})
    f = flow(body)
    raw = f.request.content or b""
    assert addon.serving is not None
    usage = addon.serving.engine.usage
    f.request.data.content = None  # as in mitmproxy: headers first, the body later
    await addon.requestheaders(f)
    assert usage("global", clock())["tokens_per_minute"]["used"] == 0  # admitted with the body
    assert f.request.headers.get("authorization", "").startswith("Bearer client")
    f.request.data.content = raw
    await addon.request(f)
    assert usage("global", clock())["tokens_per_minute"]["used"] == tk.estimate_from_body(raw)
    assert f.request.headers["authorization"].startswith("Bearer sk-")


async def test_a_streamed_request_body_is_admitted_on_its_size_then_corrected(make: Make) -> None:
    addon, _, clock = make(limits={"tokens_per_minute": 1_000_000})
    f = flow({"model": "m", "max_tokens": 5000, "messages": []})
    raw = f.request.content or b""
    assert addon.serving is not None
    f.request.data.content = None
    f.request.stream = True  # stream_large_bodies: the headers leave before `request`
    await addon.requestheaders(f)
    used = addon.serving.engine.usage("global", clock())["tokens_per_minute"]["used"]
    assert used == tk.estimate_from_length(len(raw))
    assert f.request.headers["authorization"].startswith("Bearer sk-")


async def test_request_ignores_flows_it_did_not_admit(make: Make) -> None:
    addon, _, _ = make()
    f = flow({"stream": True})
    await addon.request(f)  # no requestheaders: not ours
    assert json.loads(f.request.content or b"") == {"stream": True}


# -- local refusals ------------------------------------------------------------------------------


async def test_local_refusal_answers_429_with_headers_and_never_injects(make: Make) -> None:
    addon, _, clock = make(limits={"requests_per_minute": 1, "max_wait_seconds": 0})
    await served_by(addon)
    clock.now += 12.5
    f = await send(addon, flow())
    assert f.response is not None and f.response.status_code == 429
    h = f.response.headers
    assert (h["retry-after"], h["retry-after-ms"]) == ("48", "47500")
    assert h["ratelimit-policy"] == '"requests-per-minute";q=1;w=60'
    assert h["ratelimit"] == '"requests-per-minute";r=0;t=48'
    err = error_body(f)
    assert (err["code"], err["limit"], err["scope"]) == (
        "local_rate_limit",
        "requests_per_minute",
        "the proxy",
    )
    assert f.request.headers["authorization"] == mask_credential_value(CLIENT)  # never a pool key
    assert no_secret(json.dumps(f.get_state(), default=repr))
    assert f.metadata[META]["local"] is True and "fingerprint" not in f.metadata[META]
    await addon.response(f)  # the hook still fires for a local answer: nothing to settle
    assert record(addon, "a").requests == 1
    snap = addon.snapshot()
    assert snap["totals"]["local_429"] == 1 and snap["totals"]["requests"] == 1
    assert snap["recent"][0]["outcome"] == "local_429"
    clock.now = T0 + 60
    assert await served_by(addon) == "b"


# -- responses -----------------------------------------------------------------------------------


async def test_upstream_429_cools_the_key_and_shows_in_trace_and_snapshot(
    make: Make, tmp_path: Path
) -> None:
    addon, _, clock = make()
    f = await send(addon, flow())
    body = b'{"error": {"type": "rate_limit_error", "message": "slow down"}}'
    await answer(addon, f, 429, body, {"retry-after": "30"})
    assert f.comment == "key a · 429 · cooling 30s"
    assert f.metadata[META]["outcome"] == "rate_limited"
    a = row(addon, "a")
    assert (a["status"], a["until"], a["upstream_429"], a["errors"], a["last_status"]) == (
        "cooling",
        T0 + 30,
        1,
        1,
        429,
    )
    recent = addon.snapshot()["recent"][0]
    assert (recent["key"], recent["status"], recent["outcome"]) == ("a", 429, "rate_limited")
    assert await served_by(addon, 4) == "bcbc"
    clock.now = T0 + 30
    assert await served_by(addon, 3) == "abc"
    addon.done()
    traced = list(read_trace(trace_path(tmp_path / "state")))
    assert [(r["key"], r["status"], r["outcome"]) for r in traced][:2] == [
        ("a", 429, "rate_limited"),
        ("b", 200, "ok"),
    ]


async def test_response_settles_tokens_reported_in_the_body(make: Make) -> None:
    addon, _, clock = make(limits={"tokens_per_minute": 1_000_000})
    f = await send(addon, flow({"model": "m", "messages": []}))
    usage = b'{"usage": {"prompt_tokens": 40, "completion_tokens": 2}}'
    await answer(addon, f, 200, usage)
    assert addon.serving is not None
    assert addon.serving.engine.usage("global", clock())["tokens_per_minute"]["used"] == 42
    rec = record(addon, "a")
    assert (rec.tokens_in, rec.tokens_out) == (40, 2)


@pytest.mark.parametrize("ending", ["error", "response", "upstream-500"])
async def test_every_ending_releases_the_slot(make: Make, ending: str) -> None:
    addon, _, _ = make(limits={"concurrency": 1, "max_wait_seconds": 0})
    first = await send(addon, flow())
    busy = await send(addon, flow())
    assert busy.response is not None and error_body(busy)["limit"] == "concurrency"
    if ending == "error":
        first.error = tflow.terr("Connection killed.")
        await addon.error(first)
    else:
        await answer(addon, first, 500 if ending == "upstream-500" else 200)
    later = await send(addon, flow())
    assert later.response is None and later.metadata[META]["key"] in KEYS


async def test_a_waiting_request_is_admitted_when_an_error_frees_the_slot(make: Make) -> None:
    addon, _, _ = make(limits={"concurrency": 1, "max_wait_seconds": 30})
    first = await send(addon, flow())
    waiting = flow()
    task = asyncio.create_task(addon.requestheaders(waiting))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    first.error = tflow.terr("Client disconnected.")
    await addon.error(first)
    await asyncio.wait_for(task, 5)
    assert waiting.response is None
    assert waiting.request.headers["authorization"] == f"Bearer {KEYS['b']}"


@pytest.mark.parametrize(
    ("message", "penalised"),
    [
        ("Client disconnected.", False),
        ("client disconnected while the answer streamed", False),
        ("Server disconnected.", True),
        ("peer closed connection without sending complete message body", True),
        ("Connection killed.", True),
    ],
)
async def test_client_leaving_does_not_penalise_the_key_but_an_upstream_abort_does(
    make: Make, message: str, penalised: bool
) -> None:
    addon, _, _ = make()
    f = await send(addon, flow())
    f.error = tflow.terr(message)
    await addon.error(f)
    a = row(addon, "a")
    assert a["status"] == ("cooling" if penalised else "ready")
    assert a["errors"] == (1 if penalised else 0)
    assert f.metadata[META]["outcome"] == ("error" if penalised else "client_gone")
    assert f.request.headers["authorization"].endswith("…aaaa")
    assert await served_by(addon, 3) == ("bcb" if penalised else "bca")


# -- streams ----------------------------------------------------------------------------------

OPENAI_STREAM = [
    b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n',
    b'data: {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}\n\n',
    b"data: [DONE]\n\n",
]
ANTHROPIC_STREAM = [
    b'event: message_start\ndata: {"type": "message_start", "message": '
    b'{"usage": {"input_tokens": 11, "output_tokens": 1}}}\n\n',
    b'event: content_block_delta\ndata: {"type": "content_block_delta", '
    b'"delta": {"type": "text_delta", "text": "hi"}}\n\n',
    b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 7}}\n\n',
    b'event: message_stop\ndata: {"type": "message_stop"}\n\n',
]


@pytest.mark.parametrize("chunks", [OPENAI_STREAM, ANTHROPIC_STREAM], ids=["openai", "anthropic"])
async def test_streamed_answer_is_tapped_and_its_usage_reaches_the_key(
    make: Make, chunks: list[bytes]
) -> None:
    addon, _, clock = make(limits={"tokens_per_minute": 1_000_000})
    f = await send(addon, flow({"model": "m", "stream": True, "messages": []}))
    f.response = tutils.tresp(
        status_code=200, headers=http.Headers(content_type="text/event-stream"), content=None
    )
    addon.responseheaders(f)
    tap = f.response.stream
    assert isinstance(tap, SSETap)
    for chunk in [*chunks, b""]:
        assert tap(chunk) == chunk
    await addon.response(f)
    rec = record(addon, "a")
    assert (rec.tokens_in, rec.tokens_out) == (11, 7)
    assert row(addon, "a")["tokens"] == 18
    assert (f.metadata[META]["tokens_in"], f.metadata[META]["tokens_out"]) == (11, 7)
    assert addon.serving is not None
    assert addon.serving.engine.usage("global", clock())["tokens_per_minute"]["used"] == 18
    assert addon.snapshot()["recent"][0]["stream"] is True


async def test_a_stream_cut_short_is_a_failure_of_its_key(make: Make) -> None:
    addon, _, _ = make()
    f = await send(addon, flow({"stream": True}))
    f.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"), content=None)
    addon.responseheaders(f)
    assert callable(f.response.stream)
    f.response.stream(OPENAI_STREAM[0])
    f.response.stream(b"")
    await addon.response(f)
    assert f.metadata[META]["outcome"] == "truncated"
    assert row(addon, "a")["status"] == "cooling"


@pytest.mark.parametrize(
    ("status", "ctype"), [(429, "text/event-stream"), (200, "application/json")]
)
async def test_only_successful_event_streams_are_tapped(
    make: Make, status: int, ctype: str
) -> None:
    addon, _, _ = make()
    f = await send(addon, flow())
    f.response = tutils.tresp(status_code=status, headers=http.Headers(content_type=ctype))
    addon.responseheaders(f)
    assert not f.response.stream


# -- operators ---------------------------------------------------------------------------------


async def test_disable_and_enable_change_what_the_next_request_gets(make: Make) -> None:
    addon, tctx, _ = make()
    tctx.command(addon.commands.cmd_disable, "a")
    assert row(addon, "a")["status"] == "disabled"
    assert await served_by(addon, 4) == "bcbc"
    assert "disabled" in tctx.command(addon.commands.cmd_status)
    tctx.command(addon.commands.cmd_enable, "a")
    assert await served_by(addon, 3) == "abc"


@pytest.mark.parametrize("target", ["a", "all"])
async def test_reset_brings_a_cooling_key_back(make: Make, target: str) -> None:
    addon, tctx, _ = make()
    f = await send(addon, flow())
    await answer(addon, f, 429, b"{}", {"retry-after": "600"})
    assert await served_by(addon, 1) == "b"
    tctx.command(addon.commands.cmd_reset, target)
    assert row(addon, "a")["status"] == "ready"
    assert await served_by(addon, 3) == "cab"


async def test_rotate_moves_a_sticky_pool_on(make: Make) -> None:
    addon, tctx, _ = make(pool={"strategy": "sticky"})
    assert await served_by(addon, 2) == "aa"
    tctx.command(addon.commands.cmd_rotate)
    assert await served_by(addon, 2) == "bb"
    tctx.command(addon.commands.cmd_rotate, "p")
    assert await served_by(addon, 1) == "c"
    assert addon.serving is not None and addon.serving.keeper.view().pools["p"].rotations == 2


async def test_rotate_refuses_a_round_robin_pool(make: Make) -> None:
    addon, tctx, _ = make()
    with pytest.raises(ValueError, match="not sticky"):
        tctx.command(addon.commands.cmd_rotate, "p")
    assert await served_by(addon, 2) == "ab"


@pytest.mark.parametrize("command", ["cmd_disable", "cmd_enable", "cmd_reset"])
async def test_commands_refuse_an_unknown_label(make: Make, command: str) -> None:
    addon, tctx, _ = make()
    with pytest.raises(ValueError, match="no key labelled"):
        tctx.command(getattr(addon.commands, command), "zz")


async def test_status_lists_every_key_without_secrets(make: Make) -> None:
    addon, tctx, _ = make()
    await served_by(addon, 2)
    table = tctx.command(addon.commands.cmd_status)
    assert all(f"p     {x}" in table for x in "abc")
    assert no_secret(table)


# -- failing closed, secrets ------------------------------------------------------------------


async def test_an_internal_error_answers_500_and_never_sends_the_client_credential(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    addon, _, _ = make(limits={"concurrency": 1})
    assert addon.serving is not None
    monkeypatch.setattr(addon.serving.engine, "decide", boom)
    f = await send(addon, flow())
    assert f.response is not None and f.response.status_code == 500
    assert f.response.headers["content-type"] == "application/json"
    assert error_body(f)["code"] == "internal_error"
    assert f.metadata[META]["local"] is True
    # answered here: the request, still holding the client's credential, never goes upstream
    assert f.request.headers["authorization"] == mask_credential_value(CLIENT)  # never a pool key
    assert no_secret(json.dumps(f.get_state(), default=repr))
    monkeypatch.undo()
    assert await served_by(addon, 1) == "a"  # nothing was left holding the only slot


def break_inject(addon: Rotor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail inside `_inject`, after the key was written into the request."""
    assert addon.serving is not None
    monkeypatch.setattr(addon.serving.keeper, "key", boom)


def break_request(addon: Rotor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail in the `request` hook, while reading the body of an admitted request."""
    monkeypatch.setattr(kmi_rotor.request_body, "wants_stream", boom)


BREAKS = {"inject": break_inject, "request": break_request}


def boom(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("bug")


@pytest.mark.parametrize("where", BREAKS)
async def test_an_error_after_choosing_a_key_answers_500_and_frees_the_slot(
    make: Make, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    addon, _, _ = make(limits={"concurrency": 1, "max_wait_seconds": 0})
    BREAKS[where](addon, monkeypatch)
    f = await send(addon, flow({"stream": True}))
    assert f.response is not None and f.response.status_code == 500
    assert error_body(f)["code"] == "internal_error"
    monkeypatch.undo()
    await addon.response(f)
    assert await served_by(addon, 1) in KEYS  # the only slot was given back


@pytest.mark.parametrize("where", BREAKS)
async def test_an_error_after_choosing_a_key_leaves_no_key_in_the_flow(
    make: Make, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    addon, _, _ = make()
    BREAKS[where](addon, monkeypatch)
    f = await send(addon, flow({"stream": True}))
    assert f.response is not None and f.response.status_code == 500
    await addon.response(f)
    assert no_secret(json.dumps(f.get_state(), default=repr))


async def test_snapshot_holds_no_secret(make: Make) -> None:
    addon, _, clock = make(limits={"requests_per_minute": 5, "max_wait_seconds": 0})
    await served_by(addon, 2)
    f = await send(addon, flow())
    await answer(addon, f, 429, b"{}", {"retry-after": "5"})
    f = await send(addon, flow())
    f.error = tflow.terr("Server disconnected.")
    await addon.error(f)
    await send(addon, flow())  # in flight
    await send(addon, flow())  # refused locally
    clock.now += 1
    snap = addon.snapshot()
    text = json.dumps(snap, default=repr)
    assert no_secret(text) and "client-own" not in text
    assert snap["totals"]["requests"] == 5 and snap["totals"]["local_429"] == 1
    assert {k["key"] for p in snap["pools"] for k in p["keys"]} == {
        f"sk-…{v[-4:]}" for v in KEYS.values()
    }


# -- which key served; requests that are not API calls -----------------------------------------


async def test_every_answer_names_the_serving_key_never_the_key(make: Make) -> None:
    addon, _, _ = make()
    labels = []
    for upstream in ({}, {"kmi-rotor-key": "forged", "kmi-rotor-attempt": "9"}):
        f = await answer(addon, await send(addon, flow()), headers=upstream)
        assert f.response is not None
        labels.append(f.response.headers["kmi-rotor-key"])
        assert "kmi-rotor-attempt" not in f.response.headers
        assert no_secret(str(f.response.headers))
    assert labels == ["a", "b"]


async def test_the_key_header_can_be_turned_off(make: Make) -> None:
    addon, tctx, _ = make()
    tctx.options.rotor_key_header = False
    f = await answer(addon, await send(addon, flow()))
    assert f.response is not None and "kmi-rotor-key" not in f.response.headers


@pytest.mark.parametrize(
    ("method", "path"), [("HEAD", "/"), ("OPTIONS", "/v1/messages"), ("GET", "/")]
)
async def test_a_probe_goes_out_without_a_key_and_counts_on_none(
    make: Make, method: str, path: str
) -> None:
    addon, _, _ = make()
    f = flow(path=path, headers=(("authorization", CLIENT), ("x-api-key", "client-own")))
    f.request.method = method
    await send(addon, f)
    assert f.response is None  # it goes upstream as it is...
    assert "authorization" not in f.request.headers and "x-api-key" not in f.request.headers
    assert META not in f.metadata or "key" not in f.metadata[META]
    f.response = tutils.tresp(status_code=404, content=b"")
    addon.responseheaders(f)
    await addon.response(f)
    assert "kmi-rotor-key" not in f.response.headers
    assert (
        addon.serving is not None and addon.serving.keeper.view().keys == {}
    )  # ...and counts on no key
    assert await served_by(addon, 1) == "a"  # nor did it take a turn of the rotation


# -- verdicts of `kmi-rotor check`, read from the state ----------------------------------------


def write_actions(tmp_path: Path, actions: dict[str, Any]) -> None:
    """Write operator actions into the state as another process (the CLI) does."""
    settings = load(tmp_path / "rotor.toml")
    delta = Delta()
    for key in settings.keys:
        if key.label in actions:
            delta.key(key.fingerprint, key.label, key.pool).operator = actions[key.label]
    StateStore(settings.state_dir).commit(delta, T0)


async def test_check_verdicts_are_applied_as_traffic_would_apply_them(
    make: Make, tmp_path: Path
) -> None:
    addon, _, clock = make()
    clock.now = T0 + 10
    write_actions(
        tmp_path,
        {
            "b": Operator(action="disable", at=T0 + 5, reason="check: bad credential"),
            "c": Operator(action="block", at=T0 + 5, reason="check: no quota", until=T0 + 600),
        },
    )
    assert addon.serving is not None
    await addon.serving.keeper.sync()
    assert row(addon, "b")["status"] == "disabled"
    assert row(addon, "b")["reason"] == "check: bad credential"
    assert (row(addon, "c")["status"], row(addon, "c")["until"]) == ("blocked", T0 + 600)
    assert row(addon, "c")["reason"] == "check: no quota"
    assert await served_by(addon, 3) == "aaa"
    # what the proxy made of it is written back, as health, for the CLI and other proxies
    await addon.serving.keeper.sync()
    assert record(addon, "b").health.disabled_reason == "check: bad credential"
    clock.now = T0 + 601
    assert await served_by(addon, 2) == "ca"


async def test_a_quota_verdict_without_a_reset_blocks_for_the_configured_time(
    make: Make, tmp_path: Path
) -> None:
    addon, _, _ = make()
    write_actions(tmp_path, {"a": Operator(action="block", at=T0 + 1, reason="check: no quota")})
    assert addon.serving is not None
    await addon.serving.keeper.sync()
    assert row(addon, "a")["status"] == "blocked"
    assert row(addon, "a")["until"] == T0 + 3600  # health.quota_block_seconds


async def test_an_unknown_action_in_the_state_is_ignored_and_the_others_applied(
    make: Make, tmp_path: Path
) -> None:
    addon, _, _ = make()
    write_actions(
        tmp_path,
        {
            "a": Operator(action="explode", at=T0 + 1),
            "b": Operator(action="disable", at=T0 + 1, reason="check: bad credential"),
        },
    )
    assert addon.serving is not None
    await addon.serving.keeper.sync()
    assert row(addon, "a")["status"] == "ready"
    assert (row(addon, "b")["status"], row(addon, "b")["reason"]) == (
        "disabled",
        "check: bad credential",
    )


async def test_the_request_body_is_parsed_once(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate, the model (its scope), the stream flag and the usage request all read one
    parse of the body."""
    addon, _, _ = make(pool={"provider": "openai"})
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    f = flow(body)
    parses = 0
    loads = json.loads

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal parses
        parses += 1
        return loads(*args, **kwargs)

    read = body_json._READ

    def counting_read(body: bytes) -> Any:  # what `read_json` reads a body with
        nonlocal parses
        parses += 1
        return read(body)

    monkeypatch.setattr(json, "loads", counting)
    monkeypatch.setattr(body_json, "_READ", counting_read)
    await send(addon, f)
    monkeypatch.undo()
    assert f.response is None
    assert parses == 1
    assert f.metadata[META]["scope"] == "model:gpt-4o-mini"
    assert f.metadata[META]["usage_requested"] is True
    sent = json.loads(f.request.content or b"")
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == body["messages"]


def _count_top_level_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each body `request_body` reads one level deep from now on, in order."""
    passes: list[int] = []
    top_level = kmi_rotor.request_body.top_level

    def counting(body: bytes) -> Any:
        passes.append(len(body))
        return top_level(body)

    monkeypatch.setattr(kmi_rotor.request_body, "top_level", counting)
    return passes


async def test_a_body_too_large_to_parse_is_read_once_for_its_stream_flag(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `MAX_BODY`, the stream flag and the usage request read one top-level pass of the
    body between them (each pass is one more walk over megabytes on the event loop)."""
    addon, _, _ = make()
    f = flow({"model": "m", "stream": True, "pad": "x" * body_json.MAX_BODY})
    passes = _count_top_level_passes(monkeypatch)
    await send(addon, f)
    assert len(passes) == 1
    assert f.metadata[META]["usage_requested"] is True
    assert (f.request.content or b"").startswith(b'{"stream_options":{"include_usage":true},')


async def test_a_body_too_large_to_parse_whose_top_level_fails_is_tried_once(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `MAX_BODY`, a `"stream"` in bytes that are not a JSON object is looked at once:
    the stream flag (here from its Accept) and the usage request do not walk it again."""
    addon, _, _ = make()
    raw = b'{"model": "m", "stream": true, "pad": "' + b"x" * body_json.MAX_BODY  # cut short
    f = flow(raw, headers=(("authorization", CLIENT), *SSE))
    passes = _count_top_level_passes(monkeypatch)
    await send(addon, f)
    assert len(passes) == 1
    assert "usage_requested" not in f.metadata[META]
    assert f.request.content == raw


@pytest.mark.parametrize("connecting", [False, True])
async def test_a_request_is_admitted_alike_at_once_or_once_its_upstream_is_ready(
    make: Make, connecting: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission decides at once when the upstream connection is ready, and in a coroutine
    after waiting for it otherwise: the same key, headers, metadata and comment either way."""
    addon, _, _ = make()
    waited = []
    general = addon.admission._admit_waiting
    monkeypatch.setattr(
        addon.admission, "_admit_waiting", lambda *a: waited.append(1) or general(*a)
    )
    f = flow()
    if connecting:  # a connection being opened: started, neither open nor ended yet
        f.server_conn.timestamp_end = None

        def opened() -> None:
            f.server_conn.state = ConnectionState.OPEN
            addon.server_connected(None)

        asyncio.get_running_loop().call_later(0.05, opened)
    await send(addon, f)
    assert f.response is None
    assert f.request.headers["authorization"] == f"Bearer {KEYS['a']}"
    meta = f.metadata[META]
    assert {k: meta[k] for k in ("pool", "key", "attempt", "placements")} == {
        "pool": "p",
        "key": "a",
        "attempt": 1,
        "placements": [["header", "authorization"]],
    }
    assert f.comment == "key a"
    assert addon.served[f.id].key.label == "a"
    assert waited == ([1] if connecting else [])
