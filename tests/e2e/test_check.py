"""`kmi-rotor check` end to end: the CLI as a process, against the fake provider over TLS, and a
running mitmdump that acts on what the check found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from proctools import ROOT, clean_env, wait_until

import fake_provider
from kmi_rotor.config import load
from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.state import Delta
from kmi_rotor.store import StateStore

from ._operating_helpers import (
    CHAT_BODY,
    STATUS_PATH,
    PoolSpec,
    live_status,
    served,
    write_config,
)

pytestmark = pytest.mark.e2e

CHECKED = {
    "valid": "sk-check-valid-000000000000000000a1",
    "revoked": "sk-check-revoked-0000000000000000b2",
    "empty": "sk-check-empty-000000000000000000c3",
    "busy": "sk-check-busy-0000000000000000000d4",
}
KIMI = {"plan": "sk-check-kimi-plan-00000000000000e5"}
APPLY_WITHIN = 2.0
"""A running proxy applies what the CLI wrote within this many seconds (the README's promise)."""


def behave(provider: Any) -> None:
    """valid answers with its quota, revoked is a 401, empty has no quota, busy's one request
    per minute is used up by the time it is checked."""
    provider.set_keys(
        {
            CHECKED["valid"]: fake_provider.KeyBehaviour(rpm=100, headers="openai"),
            CHECKED["revoked"]: fake_provider.KeyBehaviour(mode="invalid"),
            CHECKED["empty"]: fake_provider.KeyBehaviour(mode="quota"),
            CHECKED["busy"]: fake_provider.KeyBehaviour(rpm=1, headers="openai"),
            KIMI["plan"]: fake_provider.KeyBehaviour(
                usages={"usage": {"limit": 100, "used": 40, "reset_in": 3600}}
            ),
        }
    )
    with httpx.Client(trust_env=False, verify=False) as c:
        r = c.get(
            provider.url + "/v1/models", headers={"authorization": f"Bearer {CHECKED['busy']}"}
        )
    assert r.status_code == 200


def pools(provider: Any, keys: dict[str, str] = CHECKED) -> list[PoolSpec]:
    """An OpenAI pool on 127.0.0.1 and a Kimi Code pool on localhost, both the fake provider."""
    kimi = f"https://localhost:{provider.port}/coding/v1/usages"
    return [
        PoolSpec("main", [f"127.0.0.1:{provider.port}"], keys, provider="openai"),
        PoolSpec(
            "kimi",
            [f"localhost:{provider.port}"],
            KIMI,
            provider="kimi-code",
            extra={"usages_url": kimi, "usage_poll_seconds": 0},
        ),
    ]


def check(cfg: Path, *args: str, ca: Path | None) -> subprocess.CompletedProcess[str]:
    """`kmi-rotor check` from this tree, trusting `ca` (the fake provider's) when given."""
    env = clean_env(PYTHONPATH=str(ROOT / "addon"))
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca)
    return subprocess.run(
        [sys.executable, "-m", "kmi_rotor.cli", "check", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def by_label(out: str) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in json.loads(out)["keys"]}


def api_requests(provider: Any, secret: str, since: float = 0.0) -> list[str]:
    return [r.path for r in provider.requests if r.credential == secret and r.started >= since]


def no_secret(*texts: str) -> bool:
    return not any(s in t for s in (*CHECKED.values(), *KIMI.values()) for t in texts)


def test_check_tells_each_keys_state(tmp_path, provider, upstream_ca):
    behave(provider)
    cfg = write_config(tmp_path, pools(provider))
    started = time.time()
    done = check(cfg, "--json", ca=upstream_ca[1])
    assert done.returncode == 1, done.stderr
    rows = by_label(done.stdout)
    assert {k: (r["result"], r["asked"]) for k, r in rows.items()} == {
        "valid": ("works", True),
        "revoked": ("bad credential", True),
        "empty": ("no quota", True),
        "busy": ("rate-limited", True),
        "plan": ("works", True),
    }
    assert {k for k, r in rows.items() if r["broken"]} == {"revoked", "empty"}
    assert rows["valid"]["quota"][0] | {"resets_at": None} == {
        "name": "requests",
        "limit": 100,
        "remaining": 99,
        "resets_at": None,
    }
    assert [(q["name"], q["remaining"], q["limit"]) for q in rows["plan"]["quota"]] == [
        ("requests:plan", 60, 100)
    ]
    assert 50 < rows["busy"]["until"] - time.time() <= 61  # the provider's Retry-After
    assert rows["valid"]["masked"] == "sk-…00a1"
    # one request per key, each to the cheapest endpoint of its provider
    for label, secret in CHECKED.items():
        assert api_requests(provider, secret, since=started) == ["/v1/models"], label
    assert api_requests(provider, KIMI["plan"], since=started) == ["/coding/v1/usages"]
    state = (tmp_path / "state" / "state.json").read_text()
    assert no_secret(done.stdout, done.stderr, state)
    ops = {r["label"]: r.get("operator") for r in json.loads(state)["keys"].values()}
    assert ops["revoked"]["reason"] == "check: bad credential"
    assert (ops["empty"]["action"], ops["empty"]["reason"]) == ("block", "check: no quota")
    assert set(ops) == {"revoked", "empty"}


def test_check_prints_a_table_and_passes_when_every_key_works(tmp_path, provider, upstream_ca):
    behave(provider)
    cfg = write_config(tmp_path, pools(provider, {"valid": CHECKED["valid"]}))
    done = check(cfg, ca=upstream_ca[1])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["POOL", "KEY", "MASKED", "RESULT"]
    assert lines[1].split()[:4] == ["main", "valid", "sk-…00a1", "works"]
    assert "99/100 requests" in lines[1]
    assert lines[2].split()[:4] == ["kimi", "plan", "sk-…00e5", "works"]
    assert "60/100 requests:plan" in lines[2]
    assert no_secret(done.stdout, done.stderr)

    only = check(cfg, "kimi", "--json", ca=upstream_ca[1])
    assert only.returncode == 0 and set(by_label(only.stdout)) == {"plan"}
    unknown = check(cfg, "nope", ca=upstream_ca[1])
    assert unknown.returncode == 2 and "no pool named 'nope'" in unknown.stderr


def test_an_untrusted_host_gets_no_key(tmp_path, provider):
    behave(provider)
    cfg = write_config(tmp_path, pools(provider))
    started = time.time()
    done = check(cfg, "--json", ca=None)  # the fake provider's CA is not trusted
    assert done.returncode == 1
    rows = by_label(done.stdout)
    assert {r["result"] for r in rows.values()} == {"unreachable"}
    assert all("certificate" in r["detail"] for r in rows.values())
    assert [r for r in provider.requests if r.started >= started] == []
    assert not (tmp_path / "state" / "state.json").exists()


def test_a_key_the_state_says_is_cooling_is_not_asked(tmp_path, provider, upstream_ca):
    behave(provider)
    cfg = write_config(tmp_path, pools(provider, {"valid": CHECKED["valid"]}))
    key = load(cfg, os.environ).keys[0]
    now = time.time()
    delta = Delta()
    delta.key(key.fingerprint, key.label, key.pool).health = KeyHealth(
        cooling_until=now + 300, cooling_reason="rate limited", updated_at=now
    )
    StateStore(tmp_path / "state").commit(delta, now)
    done = check(cfg, "main", "--json", ca=upstream_ca[1])
    row = by_label(done.stdout)["valid"]
    assert (row["result"], row["asked"], row["until"]) == ("rate-limited", False, now + 300)
    assert done.returncode == 0  # a rate limit passes: the key is good, just busy
    assert api_requests(provider, CHECKED["valid"], since=now) == []


def test_a_key_check_times_out_on_is_unreachable(tmp_path, provider, upstream_ca):
    provider.set_keys({CHECKED["valid"]: fake_provider.KeyBehaviour(latency=5.0)})
    cfg = write_config(tmp_path, pools(provider, {"valid": CHECKED["valid"]}))
    done = check(cfg, "main", "--json", "--timeout", "0.5", ca=upstream_ca[1])
    row = by_label(done.stdout)["valid"]
    assert (row["result"], row["detail"], done.returncode) == (
        "unreachable",
        "no answer within 0.5 s",
        1,
    )


@pytest.mark.parametrize("proxy_first", [True, False], ids=["running proxy", "proxy started after"])
def test_the_proxy_disables_and_blocks_what_check_found(
    tmp_path, provider, proxy_factory, upstream_ca, proxy_first
):
    behave(provider)
    keys = {k: CHECKED[k] for k in ("valid", "revoked", "empty")}
    cfg = write_config(tmp_path, pools(provider, keys)[:1])
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}") if proxy_first else None
    done = check(cfg, ca=upstream_ca[1])
    assert done.returncode == 1, done.stdout + done.stderr
    finished = time.time()
    if m is None:
        m = proxy_factory(cfg, mode=f"reverse:{provider.url}")

    def applied() -> bool:
        live = live_status(m.url + STATUS_PATH)
        return live["revoked"]["status"] == "disabled" and live["empty"]["status"] == "blocked"

    wait_until(applied, APPLY_WITHIN, "the check's verdicts applied")
    live = live_status(m.url + STATUS_PATH)
    assert live["revoked"]["reason"] == "check: bad credential"
    assert live["empty"]["reason"] == "check: no quota"
    with httpx.Client(trust_env=False, timeout=30.0) as c:
        statuses = [
            c.post(m.url + "/v1/chat/completions", json=CHAT_BODY).status_code for _ in range(6)
        ]
    assert statuses == [200] * 6
    # no traffic ever went to the revoked or the empty key: the check found them first
    assert served(provider, keys, since=finished) == ["valid"] * 6


def test_keys_are_asked_within_the_configured_limits(tmp_path, provider, upstream_ca):
    behave(provider)
    two = {"valid": CHECKED["valid"], "busy": CHECKED["busy"]}
    provider.set_keys({CHECKED["busy"]: fake_provider.KeyBehaviour()})
    cfg = write_config(tmp_path, pools(provider, two)[:1], limits={"requests_per_second": 1})
    started = time.monotonic()
    paced = check(cfg, "--json", ca=upstream_ca[1])
    assert time.monotonic() - started >= 1.0  # the second key waited for the proxy's limit
    assert {r["result"] for r in by_label(paced.stdout).values()} == {"works"}

    since = time.time()
    hurried = check(cfg, "--json", "--timeout", "0.3", ca=upstream_ca[1])
    rows = by_label(hurried.stdout)
    asked = [label for label, r in rows.items() if r["asked"]]
    assert len(asked) == 1 and rows[asked[0]]["result"] == "works"
    (waiting,) = set(rows) - set(asked)
    assert rows[waiting]["result"] == "rate-limited"
    assert rows[waiting]["detail"].startswith("your limit is used up: requests_per_second")
    assert "the proxy" in rows[waiting]["detail"]
    assert api_requests(provider, two[waiting], since=since) == []
    assert hurried.returncode == 0
