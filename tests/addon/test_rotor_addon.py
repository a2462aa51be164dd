"""The addon shell driven through mitmproxy's test helpers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from rotor_toml import pool, rotor_config

from kmi_rotor.addon import META, Rotor
from kmi_rotor.store import StateStore

KEYS = {
    "a": "sk-alpha-0000000000000000000000aaaa",
    "b": "sk-bravo-0000000000000000000000bbbb",
    "c": "sk-charl-0000000000000000000000cccc",
}


def write_config(tmp_path: Path, provider: str = "generic", hosts: str = '["llm.test"]') -> Path:
    """Pool `p` of KEYS, failover off (a retry would leave the test process); `hosts` is
    written as given (TOML), or left out when empty."""
    path = rotor_config(
        tmp_path / "rotor.toml",
        tmp_path / "state",
        [pool("p", json.loads(hosts) if hosts else None, KEYS, provider=provider)],
        failover={"max_attempts": 1},
    )
    return path


def req(host: str = "llm.test", path: str = "/v1/chat/completions", headers=()) -> http.Request:
    return tutils.treq(
        host=host,
        port=443,
        scheme=b"https",
        path=path.encode(),
        method=b"POST",
        headers=http.Headers([(k.encode(), v.encode()) for k, v in headers]),
    )


@pytest.fixture
def rotor(tmp_path):
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(write_config(tmp_path)))
        yield addon, tctx


async def test_round_robin_injects_bearer_in_exact_cycle(rotor):
    addon, _ = rotor
    seen = []
    for _ in range(6):
        f = tflow.tflow(req=req(headers=[("authorization", "Bearer client-placeholder")]))
        await addon.requestheaders(f)
        seen.append(f.request.headers["authorization"])
        assert f.metadata[META]["key"] in KEYS
    assert seen == [f"Bearer {KEYS[k]}" for k in "abcabc"]


@pytest.mark.parametrize(
    ("headers", "path", "where", "expected_form"),
    [
        ([("authorization", "Bearer mine")], "/v1/x", ("header", "authorization"), "Bearer {}"),
        ([("x-api-key", "mine")], "/v1/x", ("header", "x-api-key"), "{}"),
        ([("x-goog-api-key", "mine")], "/v1/x", ("header", "x-goog-api-key"), "{}"),
        ([], "/v1/x?key=mine&alt=sse", ("query", "key"), "{}"),
        ([], "/v1/x", ("header", "authorization"), "Bearer {}"),
    ],
)
async def test_credential_replaced_where_the_client_put_it(
    rotor, headers, path, where, expected_form
):
    addon, _ = rotor
    f = tflow.tflow(req=req(path=path, headers=headers))
    await addon.requestheaders(f)
    kind, name = where
    got = f.request.headers.get(name) if kind == "header" else f.request.query.get(name)
    assert got == expected_form.format(KEYS["a"])
    assert "mine" not in str(f.request.headers) and "mine" not in f.request.path
    if kind == "query":
        assert f.request.query.get("alt") == "sse"


@pytest.mark.parametrize(
    ("provider", "header", "bearer"),
    [
        ("anthropic", "x-api-key", False),
        ("gemini", "x-goog-api-key", False),
        ("openai", "authorization", True),
        ("kimi-code", "authorization", True),
    ],
)
async def test_preset_header_when_client_sent_none(tmp_path, provider, header, bearer):
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(write_config(tmp_path, provider, hosts="")))
        host = addon.settings.pools[0].hosts[0].host
        f = tflow.tflow(req=req(host=host))
        await addon.requestheaders(f)
        assert f.request.headers[header] == (f"Bearer {KEYS['a']}" if bearer else KEYS["a"])


async def test_other_hosts_pass_untouched(rotor):
    addon, _ = rotor
    f = tflow.tflow(req=req(host="example.org", headers=[("authorization", "Bearer mine")]))
    await addon.requestheaders(f)
    assert f.request.headers["authorization"] == "Bearer mine"
    assert META not in f.metadata and f.response is None


async def test_key_masked_after_the_request_went_upstream(rotor):
    addon, _ = rotor
    f = tflow.tflow(req=req(headers=[("authorization", "Bearer mine")]))
    f.response = None
    await addon.requestheaders(f)
    f.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"))
    addon.responseheaders(f)
    assert f.request.headers["authorization"] == "Bearer sk-…aaaa"
    assert callable(f.response.stream)
    for chunk in (b'data: {"choices": []}\n\n', b"data: [DONE]\n\n", b""):
        assert f.response.stream(chunk) == chunk
    await addon.response(f)
    assert f.comment == "key a · 200"
    assert all(v not in json.dumps(f.get_state(), default=repr) for v in KEYS.values())


async def test_error_masks_and_counts(rotor, tmp_path):
    addon, _ = rotor
    f = tflow.tflow(req=req())
    await addon.requestheaders(f)
    f.error = tflow.terr("Server disconnected.")
    await addon.error(f)
    assert KEYS["a"] not in str(f.request.headers)
    addon.done()
    rec = StateStore(tmp_path / "state").read().keys
    (only,) = [r for r in rec.values() if r.label == "a"]
    assert only.requests == 1 and only.errors == 1 and only.last_error == "Server disconnected."


async def test_error_responses_are_not_streamed(rotor):
    addon, _ = rotor
    f = tflow.tflow(req=req())
    await addon.requestheaders(f)
    f.response = tutils.tresp(
        status_code=429, headers=http.Headers(content_type="text/event-stream")
    )
    addon.responseheaders(f)
    assert not f.response.stream


async def test_state_counts_survive_done(rotor, tmp_path):
    addon, _ = rotor
    for _ in range(5):
        f = tflow.tflow(req=req())
        await addon.requestheaders(f)
        f.response = tutils.tresp(status_code=200)
        addon.responseheaders(f)
        await addon.response(f)
    addon.done()
    doc = StateStore(tmp_path / "state").read()
    assert sorted((r.label, r.requests, r.last_status) for r in doc.keys.values()) == [
        ("a", 2, 200),
        ("b", 2, 200),
        ("c", 1, 200),
    ]


async def test_bad_config_refuses_everything_with_one_line(tmp_path, caplog):
    bad = tmp_path / "rotor.toml"
    bad.write_text("[[pools]]\nname = 'p'\nprovider = 'nope'\n")
    addon = Rotor()
    with taddons.context(addon) as tctx, caplog.at_level(logging.ERROR):
        tctx.configure(addon, rotor_config=str(bad))
        f = tflow.tflow(req=req(headers=[("authorization", "Bearer mine")]))
        await addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 503
    assert "unknown provider" in json.loads(f.response.content)["error"]["message"]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "\n" not in lines[0] and "pools[0].provider" in lines[0]


async def test_bad_reload_keeps_last_good_config(rotor, tmp_path):
    addon, tctx = rotor
    bad = tmp_path / "bad.toml"
    bad.write_text("this is not toml")
    tctx.configure(addon, rotor_config=str(bad))
    f = tflow.tflow(req=req())
    await addon.requestheaders(f)
    assert f.request.headers["authorization"].startswith("Bearer sk-")


async def test_internal_error_fails_closed(rotor, monkeypatch):
    addon, _ = rotor

    def boom(*a, **k):
        raise RuntimeError("bug")

    # Whichever way the engine asks the strategy (its first candidate alone, or them all)
    for name in ("candidates", "start"):
        monkeypatch.setattr(addon.serving.engine.strategies["p"], name, boom)
    f = tflow.tflow(req=req(headers=[("authorization", "Bearer client-own")]))
    await addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 500
    assert json.loads(f.response.content)["error"]["code"] == "internal_error"


async def test_full_cycle_through_taddons(rotor):
    addon, tctx = rotor
    f = tflow.tflow(req=req(headers=[("x-api-key", "mine")]))
    await tctx.cycle(addon, f)
    assert f.request.headers["x-api-key"] == KEYS["a"]
    assert f.metadata[META]["key"] == "a"
    f.response = tutils.tresp()
    await tctx.cycle(addon, f)
    assert f.request.headers["x-api-key"] == "sk-…aaaa"
    assert f.comment == "key a · 200"
