"""Secrets never leak: one run with traffic of every kind through a real mitmdump (`-w` and
`flow_detail=3`), then every artefact searched for every pool key and client token.

The run is shared by the tests of this module: it starts two fake providers (pool `main` with
keys that fail in every way, pool `tight` with one key allowed one request a minute), a pool
`dead` whose host refuses connections, and mitmdump in regular mode; clients are the openai and
anthropic SDKs and curl, using client tokens as their API keys; then the operator CLI.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import certifi
import openai
import pytest
from proctools import BIN, Mitmdump, clean_env, start_mitmdump
from rotor_toml import pool, rotor_config

import fake_provider
from fake_provider import KeyBehaviour

from ._netns import curl


def _key(tag: str) -> str:
    return f"sk-{tag}-{secrets.token_hex(16)}"


# Fresh secrets each run: nothing else on this machine can hold them by chance.
GOOD = {f"good{i}": _key(f"good{i}") for i in (1, 2, 3)}
BAD = {
    "limited": _key("limited"),  # 429 with retry-after on every request
    "quota": _key("quota"),  # 429 insufficient_quota
    "invalid": _key("invalid"),  # 401
    "flaky5xx": _key("flaky5xx"),  # one 500
    "flaky529": _key("flaky529"),  # one 529
}
# Interleaved so that failover (up to 4 attempts) always reaches a good key.
ORDER = ("good1", "limited", "quota", "good2", "invalid", "flaky5xx", "good3", "flaky529")
MAIN = {label: {**GOOD, **BAD}[label] for label in ORDER}
# Keys serving normally once their one failure is spent (the others stay cooled or blocked).
SERVING = [*GOOD.values(), BAD["flaky5xx"], BAD["flaky529"]]
TIGHT = {"tight": _key("tight")}
DEAD = {"dead": _key("dead")}
POOL_KEYS = {**MAIN, **TIGHT, **DEAD}
TOKENS = {
    "inline": f"kmirot-tok-{secrets.token_hex(16)}",
    "env": f"kmirot-tok-{secrets.token_hex(16)}",
    "file": f"kmirot-tok-{secrets.token_hex(16)}",
}
ENV = {"LEAK_KEY_FROM_ENV": MAIN["good3"], "LEAK_TOKEN_FROM_ENV": TOKENS["env"]}
ARTEFACTS = (
    "mitmdump output",
    "state files",
    "flow file",
    "status",
    "status --json",
    "trace",
    "trace --json",
    "trace --summary",
    "operator commands",
    "status page json",
    "metrics",
)


# -- finding a secret in any form --------------------------------------------------------------


def _b64_cores(secret: bytes) -> list[bytes]:
    """What base64 of any text containing `secret` must contain: for each of the three
    alignments, the characters whose six bits all come from the secret."""
    cores = []
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + secret)
        first = -(-8 * shift // 6)  # the first character past the bits of the bytes in front
        end = 8 * (shift + len(secret)) // 6  # characters before the bits of what follows
        cores.append(enc[first:end])
    return [c for c in cores if len(c) >= 16]


def secret_forms(secret: str) -> dict[str, bytes]:
    """The secret as text, the part after `sk-`, and in base64 (standard and URL-safe)."""
    raw = secret.encode()
    forms = {"raw": raw}
    if secret.startswith("sk-"):
        forms["after sk-"] = raw.removeprefix(b"sk-")
    for i, core in enumerate(_b64_cores(raw)):
        forms[f"base64/{i}"] = core
        forms[f"base64url/{i}"] = core.replace(b"+", b"-").replace(b"/", b"_")
    return forms


def found(blob: bytes, named: dict[str, str]) -> list[str]:
    """`label (form)` for every secret of `named` that `blob` holds in any form."""
    return [
        f"{label} ({form})"
        for label, secret in named.items()
        for form, value in secret_forms(secret).items()
        if value in blob
    ]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: "Bearer " + s,
        lambda s: s.removeprefix("sk-"),
        lambda s: base64.b64encode(s.encode()).decode(),
        lambda s: base64.b64encode(f"user:{s}".encode()).decode(),
        lambda s: base64.b64encode(f"ab{s}xyz".encode()).decode(),
        lambda s: base64.urlsafe_b64encode(f"x{s}".encode()).decode().rstrip("="),
    ],
)
def test_the_search_finds_every_form(wrap: Callable[[str], str]) -> None:
    key = _key("probe")
    blob = f"noise {wrap(key)} noise".encode()
    assert found(blob, {"probe": key})
    assert not found(b"noise sk-\xe2\x80\xa6" + key[-4:].encode(), {"probe": key})


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    tmp: Path
    config: Path
    state_dir: Path
    flows: Path
    main: fake_provider.FakeProvider
    tight: fake_provider.FakeProvider
    dead_port: int
    artefacts: dict[str, bytes] = field(default_factory=dict)
    answers: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, main_port: int, tight_port: int, dead_port: int) -> Path:
    (tmp / "key.txt").write_text(MAIN["limited"] + "\n")
    (tmp / "token.txt").write_text(TOKENS["file"] + "\n")
    main = pool("main", [f"127.0.0.1:{main_port}"], {})
    for label, key in MAIN.items():
        if label == "good3":
            main["keys"].append({"label": label, "key_env": "LEAK_KEY_FROM_ENV"})
        elif label == "limited":
            main["keys"].append({"label": label, "key_file": str(tmp / "key.txt")})
        else:
            main["keys"].append({"label": label, "key": key})
    tight = pool("tight", [f"127.0.0.1:{tight_port}"], TIGHT, key_limits={"requests_per_minute": 1})
    dead = pool("dead", [f"127.0.0.1:{dead_port}"], DEAD)
    clients = [
        {"label": "inline", "token": TOKENS["inline"]},
        {"label": "env", "token_env": "LEAK_TOKEN_FROM_ENV"},
        {"label": "file", "token_file": str(tmp / "token.txt")},
    ]
    return rotor_config(
        tmp / "rotor.toml",
        tmp / "state",
        [main, tight, dead],
        health={"auth_recheck_seconds": 3600},
        failover={"max_attempts": 4},
        clients=clients,
    )


def behaviours() -> dict[str, KeyBehaviour]:
    out = {k: KeyBehaviour() for k in GOOD.values()}
    out[BAD["limited"]] = KeyBehaviour(rpm=0, headers="openai")
    out[BAD["quota"]] = KeyBehaviour(mode="quota")
    out[BAD["invalid"]] = KeyBehaviour(mode="invalid")
    out[BAD["flaky5xx"]] = KeyBehaviour(fail_next=[500])
    out[BAD["flaky529"]] = KeyBehaviour(fail_next=[529])
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, upstream_ca, mitm_confdir) -> Iterator[Run]:
    ca, ca_path = upstream_ca
    tmp = tmp_path_factory.mktemp("leaks")
    main = fake_provider.FakeProvider(behaviours(), tls=ca, event_delay=0.005)
    tight = fake_provider.FakeProvider({TIGHT["tight"]: KeyBehaviour()}, tls=ca)
    with fake_provider.run_in_thread(main), fake_provider.run_in_thread(tight):
        dead_port = _free_port()  # nothing listens there: the upstream connection fails
        config = write_config(tmp, main.port, tight.port, dead_port)
        r = Run(tmp, config, tmp / "state", tmp / "flows.mitm", main, tight, dead_port)
        m = start_mitmdump(
            config,
            mitm_confdir,
            tmp / "mitmdump.log",
            extra=(
                "--set",
                f"ssl_verify_upstream_trusted_ca={ca_path}",
                "-w",
                str(r.flows),
                "--set",
                "flow_detail=3",
            ),
            env=clean_env(**ENV),
        )
        try:
            traffic(r, m, bundle(tmp, mitm_confdir))
            r.artefacts["operator commands"] = operator_commands(r.config)
        finally:
            assert m.stop() == 0
        collect(r)
        yield r


def bundle(tmp: Path, confdir: Path) -> Path:
    path = tmp / "bundle.pem"
    path.write_text(
        Path(certifi.where()).read_text() + (confdir / "mitmproxy-ca-cert.pem").read_text()
    )
    return path


def traffic(r: Run, m: Mitmdump, ca: Path) -> None:
    """Every kind of request the proxy handles, each client with a client token as its key."""
    trust = ssl.create_default_context(cafile=str(ca))
    oai = openai.OpenAI(
        base_url=r.main.url + "/v1",
        api_key=TOKENS["inline"],
        max_retries=2,
        http_client=openai.DefaultHttpxClient(proxy=m.url, verify=trust, trust_env=False),
    )
    ant = anthropic.Anthropic(
        base_url=r.main.url,
        api_key=TOKENS["env"],
        max_retries=2,
        http_client=anthropic.DefaultHttpxClient(proxy=m.url, verify=trust, trust_env=False),
    )
    messages = [{"role": "user", "content": "hello"}]
    answers: dict[str, Any] = {"chat": [], "messages": [], "streams": []}
    # Failing keys take turns in the rotation: failover hides them from the clients.
    for _ in range(8):
        c = oai.chat.completions.create(model="fake-model", messages=messages)
        answers["chat"].append(c.choices[0].message.content)
    for _ in range(4):
        a = ant.messages.create(model="fake-model", max_tokens=16, messages=messages)
        answers["messages"].append(a.content[0].text)
    for _ in range(2):
        s = oai.chat.completions.create(model="fake-model", messages=messages, stream=True)
        answers["streams"].append("".join(c.choices[0].delta.content or "" for c in s if c.choices))
        with ant.messages.stream(model="fake-model", max_tokens=16, messages=messages) as st:
            answers["streams"].append(st.get_final_text())
    answers["broken streams"] = broken_streams(r, oai)
    answers["local"] = local_answers(r, m, ca)
    answers["page"] = status_page(r, m)
    r.answers = answers


def broken_streams(r: Run, oai: openai.OpenAI) -> list[str]:
    """A stream cut short, then one failing in the middle, on whichever key comes next."""
    outcomes = []
    for behaviour in ({"truncate_after": 2}, {"stream_error_after": 2}):
        r.main.set_keys({k: behaviour for k in SERVING})
        try:
            s = oai.with_options(max_retries=0).chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True
            )
            outcomes.append("".join(c.choices[0].delta.content or "" for c in s if c.choices))
        except Exception as e:  # the SDK raises on both: what matters is what the proxy kept
            outcomes.append(type(e).__name__)
    r.main.set_keys({k: KeyBehaviour() for k in SERVING})
    return outcomes


def local_answers(r: Run, m: Mitmdump, ca: Path) -> list[int]:
    """The `tight` pool: one served, then local 429s; the `dead` pool: no upstream at all."""
    statuses = []
    for _ in range(3):
        a = curl(
            [
                "-x",
                m.url,
                "--cacert",
                str(ca),
                "-H",
                f"Authorization: Bearer {TOKENS['file']}",
                f"{r.tight.url}/v1/models",
            ]
        )
        statuses.append(a.status)
    dead = f"http://127.0.0.1:{r.dead_port}/v1/models"
    a = curl(["-x", m.url, "-H", f"x-api-key: {TOKENS['inline']}", dead])
    statuses.append(a.status)
    return statuses


def status_page(r: Run, m: Mitmdump) -> dict[str, int]:
    """The status JSON and /metrics, as a remote client would ask: with its token."""
    got = {}
    for name, path in (("status page json", "/api/status"), ("metrics", "/metrics")):
        a = curl(
            [
                "-x",
                m.url,
                "-H",
                f"Authorization: Bearer {TOKENS['inline']}",
                f"http://kmi-rotor.local{path}",
            ]
        )
        r.artefacts[name] = a.body.encode()
        got[name] = a.status
    return got


def kmi_rotor(config: Path, *args: str) -> bytes:
    out = subprocess.run(
        [str(BIN / "kmi-rotor"), *args, "--config", str(config)],
        capture_output=True,
        env=clean_env(**ENV),
        timeout=30,
    )
    return out.stdout + out.stderr


def operator_commands(config: Path) -> bytes:
    return b"".join(
        kmi_rotor(config, *cmd)
        for cmd in (("disable", "good2"), ("enable", "good2"), ("reset", "all"), ("rotate",))
    )


def collect(r: Run) -> None:
    """Everything the run left behind, read after mitmdump stopped."""
    a = r.artefacts
    a["mitmdump output"] = (r.tmp / "mitmdump.log").read_bytes()  # every line it printed
    a["state files"] = b"\n".join(
        p.read_bytes() for p in sorted(r.state_dir.rglob("*")) if p.is_file()
    )
    a["flow file"] = r.flows.read_bytes()
    a["status"] = kmi_rotor(r.config, "status")
    a["status --json"] = kmi_rotor(r.config, "status", "--json")
    a["trace"] = kmi_rotor(r.config, "trace", "-n", "1000")
    a["trace --json"] = kmi_rotor(r.config, "trace", "--json", "-n", "1000")
    a["trace --summary"] = kmi_rotor(r.config, "trace", "--summary")


# -- the checks --------------------------------------------------------------------------------


def trace_records(r: Run) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in r.artefacts["trace --json"].splitlines()
        if line.startswith(b"{")
    ]


def test_the_run_had_traffic_of_every_kind(run: Run) -> None:
    """Guards the leak checks against testing nothing: each kind really happened."""
    ans = run.answers
    assert all(ans["chat"]) and all(ans["messages"]) and all(ans["streams"]), ans
    assert ans["local"] == [200, 429, 429, 502], ans
    assert ans["page"] == {"status page json": 200, "metrics": 200}
    upstream = {req.status for req in run.main.requests}
    assert {200, 401, 429, 500, 529} <= upstream, upstream
    outcomes = {t["outcome"] for t in trace_records(run)}
    want = {"ok", "rate_limited", "quota", "auth", "overloaded", "truncated", "stream_error"}
    assert want | {"local_429", "error"} <= outcomes, outcomes
    assert any(t["attempt"] > 1 for t in trace_records(run)), "no failover happened"
    status = json.loads(run.artefacts["status --json"])
    assert {k["label"] for k in status["keys"]} == set(POOL_KEYS)
    assert json.loads(run.artefacts["status page json"])["pools"]
    assert b"# TYPE" in run.artefacts["metrics"]
    # Masked forms are there: the search below looks at the places keys would be.
    assert b"sk-\xe2\x80\xa6" in run.artefacts["flow file"]
    assert b"sk-\xe2\x80\xa6" in run.artefacts["mitmdump output"]
    assert len(run.artefacts["flow file"]) > 10_000


@pytest.mark.parametrize("artefact", ARTEFACTS)
def test_no_pool_key_anywhere(run: Run, artefact: str) -> None:
    assert run.artefacts[artefact], f"{artefact} is empty"
    assert found(run.artefacts[artefact], POOL_KEYS) == []


@pytest.mark.parametrize("artefact", ARTEFACTS)
def test_no_client_token_anywhere(run: Run, artefact: str) -> None:
    assert found(run.artefacts[artefact], TOKENS) == []


def test_state_files_are_private(run: Run) -> None:
    def mode(p: Path) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(run.state_dir) == 0o700
    assert mode(run.state_dir / "state.json") == 0o600
    traces = sorted(run.state_dir.glob("trace.jsonl*"))
    assert traces and traces[0].name == "trace.jsonl"
    assert {p.name: mode(p) for p in traces} == {p.name: 0o600 for p in traces}
