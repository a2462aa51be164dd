"""Operating a running proxy end to end: CLI actions, the status page in a real browser,
/metrics, mitmproxy commands, `kmi-rotor env` and Kimi Code's quota endpoint.

Every check is against a real mitmdump and what the fake provider saw."""

from __future__ import annotations

import json
import math
import os
import shlex
import ssl
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from proctools import Mitmdump, clean_env, wait_until
from prometheus_client.parser import text_string_to_metric_families
from web.browser import CHROMIUM, run_chromium
from web.dom import Node, parse

import fake_provider

from ._operating_helpers import (
    STATUS_PATH,
    PoolSpec,
    Traffic,
    kmi_rotor,
    live_status,
    served,
    state_rows,
    state_written_at,
    write_config,
)
from .conftest import KEYS

APPLIED = 15.0
"""How long to wait for a CLI action to show in a running proxy. The proxy applies it at its
next look at state.json (1.5 s at most, proved in polls by the keeper's unit tests); here only
that it arrives and holds is checked, not how fast, which a loaded machine would make flaky."""
TRANSIT = 0.1
"""A request admitted just before an action took effect reaches the provider a little later."""


def reverse_proxy(
    tmp_path: Path, provider: Any, proxy_factory: Any, **kw: Any
) -> tuple[Path, Mitmdump]:
    """A config with one pool of the three keys and a reverse-mode mitmdump in front."""
    tables = kw.pop("tables", {})
    pool = PoolSpec("main", [f"127.0.0.1:{provider.port}"], KEYS, **kw)
    cfg = write_config(tmp_path, [pool], **tables)
    return cfg, proxy_factory(cfg, mode=f"reverse:{provider.url}")


def cli(cfg: Path, *args: str) -> float:
    """Run an operator command; return when it finished."""
    kmi_rotor(*args, "--config", str(cfg))
    return time.time()


def status_of(m: Mitmdump, label: str) -> str:
    return live_status(m.url + STATUS_PATH)[label]["status"]


# -- 1. CLI actions reach a running proxy ---------------------------------------------------


def test_cli_disable_then_enable_reaches_the_running_proxy(tmp_path, provider, proxy_factory):
    cfg, m = reverse_proxy(tmp_path, provider, proxy_factory)
    with Traffic(m.url):
        wait_until(lambda: "beta" in served(provider, KEYS), 10, "traffic on beta")
        done = cli(cfg, "disable", "beta")
        wait_until(lambda: status_of(m, "beta") == "disabled", APPLIED, "beta disabled")
        cutoff = time.time() + TRANSIT  # applied: no request admitted from now on may use beta
        # Traffic goes on and the proxy keeps writing state.json: let it do so a few times,
        # the last one after the cutoff.
        writes: set[float] = set()

        def went_on() -> bool:
            writes.add(state_written_at(tmp_path / "state"))
            rewritten = len({w for w in writes if w > done}) >= 3 and max(writes) > cutoff
            return rewritten and len(served(provider, KEYS, since=cutoff)) >= 10

        wait_until(went_on, 15, "ten more requests, state.json rewritten three times")
        assert "beta" not in served(provider, KEYS, since=cutoff)
        assert state_rows(cfg)["beta"]["status"] == "disabled"
        assert live_status(m.url + STATUS_PATH)["beta"]["reason"] == "disabled by operator"

        done = cli(cfg, "enable", "beta")
        wait_until(lambda: "beta" in served(provider, KEYS, since=done), APPLIED, "beta serves")
        assert status_of(m, "beta") == "ready"
    wait_until(lambda: state_rows(cfg)["beta"]["status"] == "ready", 5, "enable persisted")


def test_cli_reset_all_clears_a_cooldown(tmp_path, provider, proxy_factory):
    cfg, m = reverse_proxy(
        tmp_path, provider, proxy_factory, tables={"health": {"rate_limit_backoff": 300}}
    )
    provider.set_keys({KEYS["beta"]: fake_provider.KeyBehaviour(fail_next=[429])})
    with Traffic(m.url) as traffic:
        wait_until(lambda: status_of(m, "beta") == "cooling", 10, "beta cooling after its 429")
        cooled = time.time()
        wait_until(lambda: len(served(provider, KEYS, since=cooled)) >= 6, 10, "more traffic")
        assert "beta" not in served(provider, KEYS, since=cooled)

        done = cli(cfg, "reset", "all")
        wait_until(lambda: "beta" in served(provider, KEYS, since=done), APPLIED, "beta serves")
        assert status_of(m, "beta") == "ready"
    # the 429 was failed over: no client saw it
    assert set(traffic.statuses()) == {200}


def test_cli_rotate_on_a_fresh_state_moves_the_active_key(tmp_path, provider, proxy_factory):
    _, m = reverse_proxy(tmp_path, provider, proxy_factory, strategy="sticky")
    _rotate_and_check(tmp_path / "rotor.toml", m, provider)


def test_cli_rotate_moves_a_sticky_pools_active_key(tmp_path, provider, proxy_factory):
    pool = PoolSpec("main", [f"127.0.0.1:{provider.port}"], KEYS, strategy="sticky")
    cfg = write_config(tmp_path, [pool])
    cli(cfg, "rotate")  # before the proxy runs: the pool has a record in state.json
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    _rotate_and_check(cfg, m, provider)


def _rotate_and_check(cfg: Path, m: Mitmdump, provider: Any) -> None:
    """With traffic on the sticky pool's active key, `rotate` moves it to the next key."""
    with Traffic(m.url):
        wait_until(lambda: len(served(provider, KEYS)) >= 3, 10, "traffic")
        (first,) = set(served(provider, KEYS))
        done = cli(cfg, "rotate")
        moved = wait_until(
            lambda: set(served(provider, KEYS, since=done)) - {first},
            APPLIED,
            "the active key moves on",
        )
        order = list(KEYS)
        assert moved == {order[(order.index(first) + 1) % len(order)]}
        settled = time.time() + TRANSIT
        wait_until(lambda: len(served(provider, KEYS, since=settled)) >= 3, 10, "traffic")
        assert set(served(provider, KEYS, since=settled)) == moved


# -- 2, 3. the status page in a real browser, /metrics ---------------------------------------

SLOW_COOLING = {"health": {"rate_limit_backoff": 300}}


def report_quotas(provider: Any) -> None:
    """Every key sends OpenAI's rate-limit headers; gamma answers once, then a 429 (which cools
    it for long with SLOW_COOLING; its request fails over to another key)."""
    for label, secret in KEYS.items():
        fail = [200, 429] if label == "gamma" else []
        provider.set_keys(
            {
                secret: fake_provider.KeyBehaviour(
                    rpm=600, tpm=100_000, headers="openai", fail_next=fail
                )
            }
        )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def browse(url: str, shot: Path, *flags: str) -> Node:
    """Load the page in headless Chromium: its DOM once the script ran, and a screenshot."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    dom = run_chromium(url, *flags, "--dump-dom", f"--screenshot={shot}", "--window-size=1280,900")
    return parse(dom)


def check_page(page: Node, live: dict[str, dict[str, Any]], provider: Any, shot: Path) -> None:
    """Every key's label, status badge (as the live status says) and quota bars are there."""
    assert page.find(attrs={"id": "conn"}).attrs["data-state"] == "live"
    assert live["gamma"]["status"] == "cooling"
    for label, row in live.items():
        tr = page.find("tr", "key-row", {"data-key": label})
        assert tr.find(cls="key-label").text() == label
        badge = tr.find(cls="badge")
        assert badge.text() == row["status"] and f"status-{row['status']}" in badge.classes
        quotas = tr.find_all(cls="quota")
        assert {q.attrs["data-quota"] for q in quotas} >= {"requests", "tokens"}, label
        assert all(q.attrs.get("data-source") == "provider" for q in quotas)
        assert all(q.find(cls="quota-bar").find(cls="quota-fill") for q in quotas)
    tiles = page.find_all(cls="tile")
    totals = {t.attrs["data-total"]: t.find(cls="tile-value").text() for t in tiles}
    assert totals["requests"] == str(len(provider.requests))
    assert totals["keys_ready"] == "2 / 3"
    assert png_size(shot) == (1280, 900)
    assert shot.stat().st_size > 40_000  # a blank or error page is a few KB


def metric_samples(text: str) -> dict[str, dict[tuple[str, ...], float]]:
    """{sample name: {(key label[, status]): value}} from a Prometheus exposition."""
    samples: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(s.labels[k] for k in ("key", "status") if k in s.labels)
            samples.setdefault(s.name, {})[labels] = s.value
    return samples


def test_reverse_mode_status_page_and_metrics(tmp_path, provider, proxy_factory):
    report_quotas(provider)
    _, m = reverse_proxy(tmp_path, provider, proxy_factory, tables=SLOW_COOLING)
    with Traffic(m.url) as traffic:
        wait_until(lambda: len(traffic.statuses()) >= 9, 15, "nine answers")
    assert set(traffic.statuses()) == {200}  # gamma's 429 was failed over
    live = live_status(m.url + STATUS_PATH)
    shot = tmp_path / "status.png"
    check_page(browse(m.url + "/_kmi-rotor/", shot), live, provider, shot)

    r = httpx.get(m.url + "/_kmi-rotor/metrics", trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    stats = provider.stats()["keys"]
    for label, secret in KEYS.items():
        assert samples["kmi_rotor_requests_total"][(label,)] == stats[secret]["requests"]
        seen_429 = stats[secret]["statuses"].get("429", 0)
        assert samples["kmi_rotor_upstream_429_total"][(label,)] == seen_429
    assert sum(samples["kmi_rotor_requests_total"].values()) == len(provider.requests)
    assert samples["kmi_rotor_upstream_429_total"][("gamma",)] == 1
    assert sum(samples["kmi_rotor_retries_total"].values()) == 1  # the 429's failover
    assert samples["kmi_rotor_key_status"] == {
        ("alpha", "ready"): 1.0,
        ("beta", "ready"): 1.0,
        ("gamma", "cooling"): 1.0,
    }
    assert 200 < samples["kmi_rotor_key_cooldown_seconds"][("gamma",)] <= 300


# -- 5 (and 2 in regular mode). `kmi-rotor env` for the openai SDK, the page at kmi-rotor.local -

OPENAI_CLIENT = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="client-placeholder", max_retries=0)
r = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
print(r.choices[0].message.content)
"""


def run_in_env_shell(m: Mitmdump, confdir: Path, bundle: Path, script: Path, *args: str) -> str:
    """`eval "$(kmi-rotor env ...)"` in bash, then run `script`; its standard output."""
    env_cmd = ["kmi-rotor", "env", "--port", str(m.port), "--confdir", str(confdir)]
    env_cmd += ["--bundle", str(bundle)]
    line = " ".join(shlex.quote(a) for a in env_cmd)
    run = " ".join(shlex.quote(a) for a in (sys.executable, str(script), *args))
    out = subprocess.run(
        ["bash", "-c", f'eval "$({line})" && exec {run}'],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_regular_mode_env_for_the_openai_sdk_and_the_page_at_kmi_rotor_local(
    tmp_path, provider, proxy_factory, mitm_confdir
):
    report_quotas(provider)
    cfg = write_config(
        tmp_path, [PoolSpec("main", [f"127.0.0.1:{provider.port}"], KEYS)], **SLOW_COOLING
    )
    m = proxy_factory(cfg)
    bundle, script = tmp_path / "bundle.pem", tmp_path / "client.py"
    script.write_text(OPENAI_CLIENT)
    out = run_in_env_shell(m, mitm_confdir, bundle, script, provider.url + "/v1")
    assert out.strip() == "Hello from the fake provider."
    (req,) = provider.requests
    assert req.credential == KEYS["alpha"]
    assert "client-placeholder" not in json.dumps(req.headers)
    ca = (mitm_confdir / "mitmproxy-ca-cert.pem").read_text()
    assert bundle.read_text().endswith(ca) and bundle.read_text().count("BEGIN CERTIFICATE") > 50

    trust = ssl.create_default_context(cafile=str(bundle))
    with Traffic(provider.url, proxy=m.url, verify=trust) as traffic:
        wait_until(lambda: len(traffic.statuses()) >= 8, 15, "eight answers")
    assert set(traffic.statuses()) == {200}
    live = live_status("http://kmi-rotor.local/api/status", proxy=m.url)
    shot = tmp_path / "status.png"
    page = browse("http://kmi-rotor.local/", shot, f"--proxy-server={m.url}")
    check_page(page, live, provider, shot)


# -- 4. mitmproxy commands in a real mitmdump ------------------------------------------------

PROBE = """
import logging
from mitmproxy import ctx


class Probe:
    def running(self):
        before = ctx.master.commands.call("rotor.status")
        ctx.master.commands.call("rotor.disable", "gamma")
        after = ctx.master.commands.call("rotor.status")
        logging.warning("PROBE before\\n%s\\nPROBE after\\n%s\\nPROBE end", before, after)


addons = [Probe()]
"""


def test_rotor_commands_from_a_script_in_a_running_mitmdump(tmp_path, provider, proxy_factory):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cfg = write_config(tmp_path, [PoolSpec("main", [f"127.0.0.1:{provider.port}"], KEYS)])
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}", extra=("-s", str(probe)))
    m.process.wait_for("PROBE end", timeout=15)
    out = m.process.output
    before = out[out.index("PROBE before") : out.index("PROBE after")]
    after = out[out.index("PROBE after") : out.index("PROBE end")]
    for label in KEYS:
        assert any(label in line and "ready" in line for line in before.splitlines()), label
    gamma = next(line for line in after.splitlines() if " gamma " in f" {line} ")
    assert "disabled" in gamma and "disabled by operator" in gamma
    with Traffic(m.url) as traffic:
        wait_until(lambda: len(traffic.statuses()) >= 6, 10, "six answers")
    assert set(served(provider, KEYS)) == {"alpha", "beta"}
    assert live_status(m.url + STATUS_PATH)["gamma"]["status"] == "disabled"


# -- 6. Kimi Code's quota endpoint ---------------------------------------------------------

OTHER = {"delta": "sk-delta-e2e-000000000000000000000d4"}


def usages(remaining: int, reset_at: float) -> dict[str, Any]:
    """A `/usages` answer in both documented shapes; the plan window runs out first."""
    stamp = datetime.fromtimestamp(reset_at, UTC).isoformat().replace("+00:00", "Z")
    return {
        "usage": {"used": 100 - remaining, "limit": 100, "remaining": remaining, "reset_at": stamp},
        "limits": [
            {
                "name": "rate",
                "detail": {"used": 1, "limit": 50, "remaining": 49, "reset_in": 240},
                "window": {"duration": 5, "timeUnit": "MINUTE"},
            }
        ],
    }


def test_kimi_usages_steer_traffic_until_the_reset(tmp_path, provider, proxy_factory):
    later = time.time() + 3600
    provider.set_keys(
        {k: fake_provider.KeyBehaviour(usages=usages(80, later)) for k in KEYS.values()}
    )
    # gamma's answer is malformed: the poller must shrug it off and keep reading the others
    provider.set_keys({KEYS["gamma"]: fake_provider.KeyBehaviour(usages={"limits": 5})})
    provider.set_keys({OTHER["delta"]: fake_provider.KeyBehaviour()})  # its /usages is a 404
    fake = f"https://127.0.0.1:{provider.port}"
    kimi = {"usages_url": f"{fake}/coding/v1/usages", "usage_poll_seconds": 1}
    pools = [
        PoolSpec("kimi", [f"127.0.0.1:{provider.port}"], KEYS, "kimi-code", extra=kimi),
        PoolSpec(
            "open",
            [f"localhost:{provider.port}"],
            OTHER,
            "kimi-code",
            extra={"usages_url": f"{fake}/open/v1/usages", "usage_poll_seconds": 1},
        ),
    ]
    m = proxy_factory(write_config(tmp_path, pools), mode=f"reverse:{provider.url}")
    api = m.url + STATUS_PATH
    wait_until(lambda: live_status(api)["beta"]["quota"], 5, "beta's quota polled")

    reset = math.ceil(time.time()) + 4.0
    provider.set_keys({KEYS["alpha"]: fake_provider.KeyBehaviour(usages=usages(0, reset))})
    wait_until(lambda: live_status(api)["alpha"]["status"] == "cooling", 4, "alpha cooling")
    seen = time.time()
    alpha = live_status(api)["alpha"]
    assert alpha["reason"] == "provider reports no remaining quota"
    assert alpha["until"] == pytest.approx(reset, abs=0.01)
    assert {q["name"]: q["remaining"] for q in alpha["quota"]}["requests:plan"] == 0
    with Traffic(m.url, path="/coding/v1/chat/completions") as traffic:
        wait_until(
            lambda: "alpha" in served(provider, KEYS, since=reset),
            reset - time.time() + 3,
            "alpha serves after its reset",
        )
    assert set(traffic.statuses()) == {200}
    during = served(provider, KEYS, since=seen, until=reset)
    assert "alpha" not in during and len(during) >= 10
    assert live_status(api)["alpha"]["status"] == "ready"

    polls = [r for r in provider.requests if r.path.endswith("/usages")]
    for label in ("alpha", "gamma"):
        assert sum(r.credential == KEYS[label] and r.status == 200 for r in polls) >= 4, label
    assert {r.path for r in polls if r.credential in KEYS.values()} == {"/coding/v1/usages"}
    assert [(r.path, r.status) for r in polls if r.credential == OTHER["delta"]] == [
        ("/open/v1/usages", 404)
    ]
    assert "is not a usage endpoint; not polling it" in m.process.output
