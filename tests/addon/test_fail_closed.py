"""Failing closed: an internal error in any hook answers locally, leaks no key and holds no slot.

mitmproxy logs an exception in a hook and sends the flow on unchanged, i.e. upstream with the
client's own credential. Each test breaks one thing a hook calls, runs the flow through the
hooks in mitmproxy's order, and checks what the client got, what the flow keeps, and that the
single concurrency slot of the proxy (`concurrency = 1`, `max_wait_seconds = 0`) is free again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from rotor_toml import pool, rotor_config

import kmi_rotor.core.tokens
from kmi_rotor.addon import META, Rotor

KEYS = {
    "a": "sk-failclosed-a-000000000000000000a1a1",
    "b": "sk-failclosed-b-000000000000000000b2b2",
}
CLIENT_OWN = "client-own-credential-7777"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def write_config(tmp_path: Path) -> Path:
    return rotor_config(
        tmp_path / "rotor.toml",
        tmp_path / "state",
        [pool("p", ["llm.test"], KEYS)],
        limits={"concurrency": 1, "max_wait_seconds": 0},
    )


@pytest.fixture
def rotor(tmp_path: Path) -> Iterator[Rotor]:
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(write_config(tmp_path)))
        yield addon


def client_flow() -> http.HTTPFlow:
    req = tutils.treq(
        host="llm.test",
        port=443,
        scheme=b"https",
        path=b"/v1/chat/completions",
        method=b"POST",
        headers=http.Headers(
            [
                (b"authorization", f"Bearer {CLIENT_OWN}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BODY)).encode()),
            ]
        ),
        content=BODY,
    )
    return tflow.tflow(req=req)


def upstream_answer(stream: bool = False) -> http.Response:
    if stream:
        headers = http.Headers(content_type="text/event-stream")
        return tutils.tresp(status_code=200, headers=headers, content=b"")
    body = json.dumps({"choices": [{"message": {"content": "upstream says hi"}}]}).encode()
    return tutils.tresp(
        status_code=200, headers=http.Headers(content_type="application/json"), content=body
    )


@dataclass
class Run:
    """What one flow went through: the request as sent upstream (None: nothing was sent)."""

    flow: http.HTTPFlow
    sent: dict[str, str] | None


async def drive(addon: Rotor, *, stream: bool = False, error: str | None = None) -> Run:
    """The hooks in mitmproxy's order. A response set by a request hook ends the flow with
    `response` alone; otherwise the request goes upstream, then `error` or the answer's hooks.
    Any exception escaping a hook fails the test."""
    f = client_flow()
    body, f.request.data.content = f.request.data.content, None  # headers first, as in mitmproxy
    await addon.requestheaders(f)
    f.request.data.content = body
    if f.response is None:
        await addon.request(f)
    if f.response is not None:
        await addon.response(f)
        return Run(f, None)
    sent = dict(f.request.headers.items())
    if error is not None:
        f.error = tflow.terr(error)
        await addon.error(f)
        return Run(f, sent)
    f.response = upstream_answer(stream)
    addon.responseheaders(f)
    if stream:
        assert callable(f.response.stream)
        for chunk in (b'data: {"choices": []}\n\n', b"data: [DONE]\n\n", b""):
            f.response.stream(chunk)
    await addon.response(f)
    return Run(f, sent)


Breaker = Callable[[Rotor, pytest.MonkeyPatch], None]


def boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected failure")


def assert_no_key_kept(f: http.HTTPFlow) -> None:
    state = repr(f.get_state())
    for label, key in KEYS.items():
        assert key not in state, f"key {label} is kept in the flow"
        assert key.removeprefix("sk-") not in state, f"key {label} is kept in the flow"


async def assert_slot_free(addon: Rotor) -> None:
    """Under concurrency = 1 and no waiting, a leaked reservation means a local 429 here."""
    nxt = await drive(addon)
    assert nxt.flow.response is not None
    assert nxt.flow.response.status_code == 200, nxt.flow.response.content
    assert nxt.sent is not None and nxt.sent["authorization"].startswith("Bearer sk-failclosed-")
    assert nxt.flow.metadata[META]["key"] in KEYS


def local_error(f: http.HTTPFlow, status: int) -> dict[str, Any]:
    assert f.response is not None
    assert f.response.status_code == status
    assert f.response.headers["content-type"] == "application/json"
    err = json.loads(f.response.content or b"")["error"]
    assert err["code"] == "internal_error" and err["message"].startswith("kmi-rotor: ")
    assert f.metadata[META]["local"] is True
    return err


# -- request side: nothing goes upstream -----------------------------------------------------


async def test_requestheaders_failure_answers_locally(rotor, monkeypatch):
    assert rotor.serving is not None
    monkeypatch.setattr(rotor.serving.engine, "decide", boom)
    run = await drive(rotor)
    assert run.sent is None  # a local answer: the client's own credential never leaves
    local_error(run.flow, 500)
    assert_no_key_kept(run.flow)
    monkeypatch.undo()
    await assert_slot_free(rotor)


LATE_FAILURES: dict[str, Breaker] = {
    # The key is already in the request when these fail.
    "requestheaders-after-inject": lambda r, mp: mp.setattr(r.serving.keeper, "key", boom),
    "request": lambda r, mp: mp.setattr(kmi_rotor.core.tokens, "estimate_from_body", boom),
}


@pytest.mark.parametrize("where", LATE_FAILURES)
async def test_late_request_failure_answers_locally(rotor, monkeypatch, where):
    LATE_FAILURES[where](rotor, monkeypatch)
    run = await drive(rotor)
    assert run.sent is None
    local_error(run.flow, 500)
    assert CLIENT_OWN not in repr(run.flow.get_state())
    assert_no_key_kept(run.flow)  # masked at once: the request will never go upstream
    assert rotor.served == {}
    monkeypatch.undo()
    await assert_slot_free(rotor)


# -- response side: the upstream answer is replaced, or already with the client -------------


async def test_responseheaders_failure_replaces_the_answer_with_502(rotor, monkeypatch):
    monkeypatch.setattr(rotor, "_stream_if_wanted", boom)
    run = await drive(rotor)
    assert run.sent is not None and CLIENT_OWN not in json.dumps(run.sent)
    local_error(run.flow, 502)
    assert b"upstream says hi" not in (run.flow.response.content or b"")
    assert_no_key_kept(run.flow)
    monkeypatch.undo()
    await assert_slot_free(rotor)


async def test_response_failure_replaces_the_answer_with_502(rotor, monkeypatch):
    monkeypatch.setattr(rotor.settling, "answered", boom)
    run = await drive(rotor)
    local_error(run.flow, 502)
    assert b"upstream says hi" not in (run.flow.response.content or b"")
    assert_no_key_kept(run.flow)
    monkeypatch.undo()
    await assert_slot_free(rotor)


async def test_response_failure_on_a_streamed_answer_keeps_it(rotor, monkeypatch):
    """A streamed answer is already with the client: no 502 over it, but the slot is freed."""
    monkeypatch.setattr(rotor.settling, "answered", boom)
    run = await drive(rotor, stream=True)
    assert run.flow.response is not None and run.flow.response.status_code == 200
    assert_no_key_kept(run.flow)
    monkeypatch.undo()
    await assert_slot_free(rotor)


ERROR_REASONS = ["Client disconnected.", "Server disconnected."]


@pytest.mark.parametrize("reason", ERROR_REASONS)
async def test_error_failure_escapes_nothing(rotor, monkeypatch, reason):
    monkeypatch.setattr(rotor.settling, "failed", boom)
    run = await drive(rotor, error=reason)  # an exception escaping `error` fails here
    assert run.sent is not None
    assert run.sent["authorization"].startswith("Bearer sk-failclosed-")
    assert rotor.served == {}
    assert_no_key_kept(run.flow)


@pytest.mark.parametrize("reason", ERROR_REASONS)
async def test_error_failure_frees_the_slot(rotor, monkeypatch, reason):
    monkeypatch.setattr(rotor.settling, "failed", boom)
    await drive(rotor, error=reason)
    monkeypatch.undo()
    await assert_slot_free(rotor)


# -- the same breakages, every hook in turn, each followed by a healthy request ----------------

BREAKERS: dict[str, Breaker] = {
    "decide": lambda r, mp: mp.setattr(r.serving.engine, "decide", boom),
    "stream_if_wanted": lambda r, mp: mp.setattr(r, "_stream_if_wanted", boom),
    "settle_response": lambda r, mp: mp.setattr(r.settling, "answered", boom),
}


async def test_broken_hooks_in_a_row_leave_the_proxy_serving(rotor, monkeypatch):
    """Failures one after another never use up the single slot, and the next request runs."""
    for name, brk in BREAKERS.items():
        brk(rotor, monkeypatch)
        run = await drive(rotor)
        assert run.flow.response is not None and run.flow.response.status_code >= 500, name
        assert_no_key_kept(run.flow)
        monkeypatch.undo()
    await assert_slot_free(rotor)
    assert rotor.served == {}
