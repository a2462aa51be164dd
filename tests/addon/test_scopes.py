"""The addon reads each request's model once and steers by its scope: a 429 for one model
cools the key for that model only."""

from __future__ import annotations

import json

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from rotor_toml import pool, rotor_config

from kmi_rotor.addon import META, Rotor

KEYS = {
    "a": "sk-alpha-0000000000000000000000aaaa",
    "b": "sk-bravo-0000000000000000000000bbbb",
    "c": "sk-charl-0000000000000000000000cccc",
}


def flow_for(model: str) -> http.HTTPFlow:
    body = json.dumps({"model": model, "messages": []}).encode()
    r = tutils.treq(host="llm.test", port=443, scheme=b"https", path=b"/v1/chat/completions")
    r.method = "POST"
    r.content = body
    return tflow.tflow(req=r)


async def serve(addon: Rotor, model: str, status: int = 200) -> http.HTTPFlow:
    f = flow_for(model)
    await addon.requestheaders(f)
    await addon.request(f)
    headers = http.Headers(content_type="application/json", retry_after="60")
    f.response = tutils.tresp(status_code=status, headers=headers, content=b"{}")
    addon.responseheaders(f)
    await addon.response(f)
    return f


async def test_a_429_for_one_model_leaves_the_key_to_the_others(tmp_path):
    pools = [pool("p", ["llm.test"], KEYS, provider="openai")]
    config = rotor_config(
        tmp_path / "rotor.toml", tmp_path / "state", pools, failover={"max_attempts": 1}
    )
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(config))
        first = await serve(addon, "gpt-4o-mini", 429)
        assert first.metadata[META]["key"] == "a"
        assert first.metadata[META]["scope"] == "model:gpt-4o-mini"
        big = [(await serve(addon, "gpt-4o")).metadata[META]["key"] for _ in range(3)]
        mini = [(await serve(addon, "gpt-4o-mini")).metadata[META]["key"] for _ in range(3)]
        assert "".join(big) == "bca"  # the key cooling for mini still serves gpt-4o
        assert "a" not in mini
        assert addon.serving is not None
        engine = addon.serving.engine
        a = next(k for k in engine.keys.values() if k.label == "a")
        assert engine.key_status(a, addon.clock(), "model:gpt-4o-mini")["status"] == "cooling"
        addon.done()


async def test_a_key_scoped_pool_cools_the_key_for_every_model(tmp_path):
    pools = [pool("p", ["llm.test"], KEYS, provider="openai", limit_scope="key")]
    config = rotor_config(
        tmp_path / "rotor.toml", tmp_path / "state", pools, failover={"max_attempts": 1}
    )
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(config))
        first = await serve(addon, "gpt-4o-mini", 429)
        assert "scope" not in first.metadata[META]
        big = [(await serve(addon, "gpt-4o")).metadata[META]["key"] for _ in range(3)]
        assert "a" not in big
        addon.done()


async def test_the_trace_records_each_requests_scope_refusals_included(tmp_path):
    pools = [pool("p", ["llm.test"], KEYS, provider="openai")]
    config = rotor_config(
        tmp_path / "rotor.toml", tmp_path / "state", pools, failover={"max_attempts": 1}
    )
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(config))
        for _ in KEYS:  # each key cools for the mini model
            await serve(addon, "gpt-4o-mini", 429)
        refused = flow_for("gpt-4o-mini")
        await addon.requestheaders(refused)
        await addon.request(refused)
        assert refused.metadata[META].get("key") is None
        assert refused.response is not None and refused.response.status_code == 429
        await addon.response(refused)  # mitmproxy's next hook for a locally answered request
        await serve(addon, "gpt-4o")
        recent = addon.snapshot()["recent"]
        addon.done()
    lines = [
        json.loads(line) for line in (tmp_path / "state" / "trace.jsonl").read_text().splitlines()
    ]
    for records in (sorted(recent, key=lambda r: r["ts"]), lines):
        assert [(r["outcome"], r["scope"]) for r in records] == [
            ("rate_limited", "model:gpt-4o-mini"),
            ("rate_limited", "model:gpt-4o-mini"),
            ("rate_limited", "model:gpt-4o-mini"),
            ("local_429", "model:gpt-4o-mini"),
            ("ok", "model:gpt-4o"),
        ]


async def test_a_key_wide_request_has_no_scope_in_the_trace(tmp_path):
    pools = [pool("p", ["llm.test"], KEYS, provider="openai", limit_scope="key")]
    config = rotor_config(tmp_path / "rotor.toml", tmp_path / "state", pools)
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(config))
        await serve(addon, "gpt-4o")
        assert [r["scope"] for r in addon.snapshot()["recent"]] == [None]
        addon.done()
