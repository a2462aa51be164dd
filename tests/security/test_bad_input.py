"""Bad input gets a clear answer: odd folders and files, absurd settings, a state file that is
no file, a request body no parser can read. Real files and processes throughout."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from proctools import MITMDUMP, ROOT, clean_env, spawn

import fake_provider
from kmi_rotor.config import ConfigError, from_dict
from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.refusal import Refusal, render
from kmi_rotor.engine import Engine
from kmi_rotor.keeper import StateKeeper
from kmi_rotor.store import StateError, StateStore
from kmi_rotor.trace import TraceRecord, TraceWriter

from ._harden_helpers import CHAT, make_confdir, run_provider, start_proxy, write_config

NOW = 1_800_000_000.0
SOURCE = Path("/tmp/harden/rotor.toml")


def _raw(**extra: Any) -> dict[str, Any]:
    pool = {"name": "p", "provider": "generic", "hosts": ["llm.test"]}
    pool["keys"] = [{"label": "a", "key": "sk-bad-input-000000000000000000a"}]
    return {"state_dir": "/tmp/harden/state", "pools": [pool], **extra}


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"limits": {"concurrency": True}}, "limits.concurrency"),
        ({"limits": {"requests_per_day": False}}, "limits.requests_per_day"),
        ({"limits": {"max_wait_seconds": True}}, "limits.max_wait_seconds"),
        ({"health": {"quota_block_seconds": 1e300}}, "health.quota_block_seconds"),
        ({"health": {"max_cooldown_seconds": 1e12}}, "health.max_cooldown_seconds"),
        ({"failover": {"max_attempts": True}}, "failover.max_attempts"),
        ({"clients": [{"label": "c", "token": "x"}]}, "clients[0]"),
        ({"clients": [{"label": "c", "token": "fifteen-chars!!"}]}, "clients[0]"),
    ],
)
def test_config_values_are_strictly_typed_and_bounded(extra: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(_raw(**extra), SOURCE, env={})
    assert names in str(e.value) and "\n" not in str(e.value)


def test_a_token_of_sixteen_characters_is_enough() -> None:
    s = from_dict(_raw(clients=[{"label": "c", "token": "x" * 16}]), SOURCE, env={})
    assert len(s.clients) == 1


# -- refusals with absurd times ----------------------------------------------------------------


@pytest.mark.parametrize("until", [1e300, 1e18, float(10**20)])
def test_a_refusal_with_an_absurd_time_is_a_429_not_an_overflow(until: float) -> None:
    settings = from_dict(_raw(limits={"max_wait_seconds": 0}), SOURCE, env={})
    engine = Engine(settings)
    key = settings.keys[0]
    # As a state file written by hand (or by a version without bounds) may hold it.
    engine.adopt(key.fingerprint, KeyHealth(blocked_until=until, blocked_reason="quota"))
    d = engine.decide(settings.pools[0], 10, NOW, deadline=NOW)
    assert isinstance(d, Refusal) and d.status == 429
    status, headers, body = render(d, NOW)
    assert status == 429
    assert 0 < int(headers["retry-after"]) <= 366 * 86400
    assert body["error"]["keys"][0]["status"] == "blocked"


def test_render_survives_any_float() -> None:
    for at in (float("inf"), float("-inf"), float("nan"), -1e300, 1e300):
        status, _, _ = render(Refusal(429, "x", "y", at, keys=({"until": at},)), NOW)
        assert status == 429


# -- files and folders -------------------------------------------------------------------------


def test_an_existing_state_folder_is_tightened_to_0700(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    StateStore(folder).read()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_trace_is_not_written_through_a_symbolic_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "state").mkdir(mode=0o700)
    link = tmp_path / "state" / "trace.jsonl"
    link.symlink_to(victim)
    writer = TraceWriter(link)
    writer.write(
        TraceRecord(NOW, "id", "p", "a", "fp", "POST", "/v1", 200, 1.0, 2.0, 1, 1, "ok", 1, False)
    )
    writer.close()
    assert victim.read_text() == "precious\n"
    assert writer.dropped == 1


def test_the_state_file_is_not_read_through_a_symbolic_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    (folder / "state.json").symlink_to(victim)
    with pytest.raises(StateError, match="symbolic link"):
        StateStore(folder).read()
    assert victim.read_text() == "{}"


async def test_an_unwritable_state_folder_warns_at_most_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")  # fails for root too
    keeper = StateKeeper(StateStore(blocker), debounce=0.0)
    caplog.set_level(logging.WARNING, logger="kmi_rotor")
    for _ in range(10):
        keeper._pending.pool_add("p", "local_429")
        keeper._dirty.set()
        await keeper.sync()
    warnings = [r for r in caplog.records if "could not write state" in r.getMessage()]
    assert len(warnings) == 1
    assert keeper._pending  # nothing was lost meanwhile


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmi_rotor.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(ROOT / "addon")),
        timeout=60,
    )


def _config(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    config = write_config(tmp_path / "rotor.toml", "llm.test", state, ["a"])
    return config, state


@pytest.mark.e2e
def test_status_changes_nothing_on_disk_for_an_unparsable_state_file(tmp_path: Path) -> None:
    config, state = _config(tmp_path)
    state.mkdir(mode=0o700)
    (state / "state.json").write_bytes(b"{not json")
    before = sorted(p.name for p in state.iterdir())
    out = _cli(config, "status", "--json")
    assert out.returncode == 1
    assert "not valid kmi-rotor state" in out.stderr and len(out.stderr.splitlines()) == 1
    assert sorted(p.name for p in state.iterdir()) == before  # no rename, no lock file
    assert (state / "state.json").read_bytes() == b"{not json"


@pytest.mark.e2e
def test_a_state_file_that_is_a_folder_is_one_line_for_the_cli(tmp_path: Path) -> None:
    config, state = _config(tmp_path)
    state.mkdir(mode=0o700)
    (state / "state.json").mkdir()
    for args in (("status",), ("disable", "a")):
        out = _cli(config, *args)
        assert out.returncode == 1, out
        assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
        assert "not a regular file" in out.stderr


@pytest.fixture(scope="module")
def harden_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_confdir(tmp_path_factory)


@pytest.mark.e2e
def test_a_state_file_that_is_a_folder_stops_the_proxy_with_one_line(
    tmp_path: Path, harden_confdir: Path
) -> None:
    config, state = _config(tmp_path)
    (state / "state.json").mkdir(parents=True)
    argv = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--set", f"confdir={harden_confdir}"]
    argv += ["--set", f"rotor_config={config}", "-s", str(ROOT / "addon" / "rotor.py")]
    p = spawn(argv, clean_env(), tmp_path / "mitmdump.log")
    try:
        p.wait_for("not a regular file")
        assert p.proc.wait(30) != 0
    finally:
        p.stop(signal.SIGKILL)
    assert "Traceback" not in p.output


# -- a request body no parser can read ---------------------------------------------------------


@pytest.fixture
def provider() -> Iterator[fake_provider.FakeProvider]:
    yield from run_provider(["a"])


@pytest.mark.e2e
def test_a_deeply_nested_body_gets_a_local_400_and_spends_nothing(
    tmp_path: Path, harden_confdir: Path, provider: fake_provider.FakeProvider
) -> None:
    config = write_config(
        tmp_path / "rotor.toml",
        f"127.0.0.1:{provider.port}",
        tmp_path / "state",
        ["a"],
        key_limits={"requests_per_day": 1},
        extra="[limits]\nmax_wait_seconds = 0",
    )
    proxy = start_proxy(config, harden_confdir, tmp_path / "mitmdump.log", provider.url)
    try:
        nested = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(
            proxy.url + "/v1/chat/completions",
            content=nested,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "unreadable_body"
        # The key's one request of the day is still there.
        ok = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        proxy.stop()
    assert len(provider.requests) == 1
    assert "Traceback" not in proxy.process.output
