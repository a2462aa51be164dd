"""The foundation, end to end: real mitmdump, real SDKs and curl, real TLS, real files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import certifi
import openai
from proctools import BIN, clean_env

import fake_provider

from .conftest import KEYS, write_config

CYCLE = [KEYS["alpha"], KEYS["beta"], KEYS["gamma"]]


def chat(client: openai.OpenAI, **extra) -> str:
    r = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], **extra
    )
    return r.choices[0].message.content or ""


def test_reverse_mode_openai_sdk_exact_rotation_state_and_no_leak(
    tmp_path, provider, proxy_factory
):
    cfg = write_config(tmp_path, [f"127.0.0.1:{provider.port}"])
    flows = tmp_path / "flows.mitm"
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}", extra=("-w", str(flows)))
    client = openai.OpenAI(base_url=m.url + "/v1", api_key="client-placeholder", max_retries=0)

    for _ in range(9):
        assert chat(client)

    seen = [r.credential for r in provider.requests]
    assert seen == CYCLE * 3
    assert all(r.credential_source == "authorization" for r in provider.requests)

    assert m.stop() == 0
    status = subprocess.run(
        [str(BIN / "kmi-rotor"), "status", "--json", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    rows = {r["label"]: r for r in json.loads(status.stdout)["keys"]}
    assert {k: (r["requests"], r["last_status"]) for k, r in rows.items()} == {
        "alpha": (3, 200),
        "beta": (3, 200),
        "gamma": (3, 200),
    }
    artefacts = {
        "flow file": flows.read_bytes(),
        "mitmdump output": m.process.output.encode(),
        "status output": status.stdout.encode(),
        "state": (tmp_path / "state" / "state.json").read_bytes(),
    }
    assert len(artefacts["flow file"]) > 1000
    for name, blob in artefacts.items():
        for key in KEYS.values():
            assert key.encode() not in blob, f"{name} holds a key"
    assert b"Bearer sk-\xe2\x80\xa6" in artefacts["flow file"]  # masked, UTF-8 ellipsis


ANTHROPIC_CLIENT = """
import sys, anthropic
kind, base = sys.argv[1], sys.argv[2]
cred = {kind: "client-own-" + kind}
c = anthropic.Anthropic(base_url=base, max_retries=0, **cred)
r = c.messages.create(model="fake-model", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
print(r.content[0].text)
"""


def test_regular_mode_https_proxy_anthropic_sdk(tmp_path, provider, proxy_factory, mitm_confdir):
    cfg = write_config(tmp_path, [f"127.0.0.1:{provider.port}"], provider="anthropic")
    m = proxy_factory(cfg)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(
        Path(certifi.where()).read_text() + (mitm_confdir / "mitmproxy-ca-cert.pem").read_text()
    )
    env = clean_env(HTTPS_PROXY=m.url, SSL_CERT_FILE=str(bundle))
    # Recent SDKs send `Authorization: Bearer` for api_key and auth_token alike.
    for kind in ("api_key", "auth_token"):
        out = subprocess.run(
            [sys.executable, "-c", ANTHROPIC_CLIENT, kind, provider.url],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip()
    # A client that sends x-api-key gets the pool key in x-api-key.
    body = json.dumps(
        {"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    )
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "-x",
            m.url,
            "--cacert",
            str(bundle),
            "-H",
            "x-api-key: client-own-key",
            "-H",
            "anthropic-version: 2023-06-01",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            f"{provider.url}/v1/messages",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["type"] == "message"
    reqs = provider.requests
    assert [r.credential for r in reqs] == CYCLE
    assert [r.credential_source for r in reqs] == ["authorization", "authorization", "x-api-key"]
    for r in reqs:
        assert "client-own" not in json.dumps(r.headers)


def test_other_hosts_pass_untouched_with_curl(tmp_path, provider, proxy_factory):
    cfg = write_config(tmp_path, [f"127.0.0.1:{provider.port}"])
    m = proxy_factory(cfg)
    other = fake_provider.FakeProvider(accept_any=True)
    with fake_provider.run_in_thread(other):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "-x",
                m.url,
                "-H",
                "Authorization: Bearer client-own",
                f"{other.url}/v1/models",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["data"]
        (req,) = other.requests
    assert req.credential == "client-own"
    assert provider.requests == []


def test_streamed_completion_arrives_incrementally(tmp_path, provider, proxy_factory):
    cfg = write_config(tmp_path, [f"127.0.0.1:{provider.port}"])
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    client = openai.OpenAI(base_url=m.url + "/v1", api_key="client-placeholder", max_retries=0)
    start = time.monotonic()
    arrivals = []
    stream = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        extra_headers={"x-fake-events": "8", "x-fake-delay-ms": "150"},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 8
    # 8 events 150 ms apart: buffered, they would all land together after ~1.2 s.
    assert arrivals[-1] - arrivals[0] > 0.7
    assert arrivals[0] < arrivals[-1] - 0.7
    assert provider.requests[0].credential == KEYS["alpha"]
