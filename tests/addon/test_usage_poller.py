"""The usage poller alone, without the addon: given what a configured proxy runs on, it reads
a real HTTP usage endpoint and reports the key's windows through the engine, the state and
the shared state."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from testkit import Clock

from kmi_rotor.cluster.state import LocalState
from kmi_rotor.config import from_dict
from kmi_rotor.engine import Engine
from kmi_rotor.keeper import StateKeeper
from kmi_rotor.running import Running
from kmi_rotor.store import StateStore
from kmi_rotor.trace import TraceWriter, trace_path
from kmi_rotor.usage_poller import UsagePoller

SPENT = {"usage": {"limit": 100, "used": 100, "reset_in": 60}}


class Usages(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("authorization", ""))
        if not self.path.endswith("/usages"):
            self.send_error(404)
            return
        body = json.dumps(SPENT).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Usages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Shared(LocalState):
    """The in-process state, noting what it is told (as the Redis one would share it)."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def observed(self, engine: Engine, key: object, now: float, scope: str = "") -> None:
        self.told.append(getattr(key, "label", "?"))


def running(tmp_path: Path, url: str) -> Running:
    pool = {
        "name": "kimi",
        "provider": "kimi-code",
        "hosts": ["127.0.0.1"],
        "usages_url": url,
        "keys": [{"label": "a", "key": "sk-usage-poller-aaaaaaaaaaaaaaaa"}],
    }
    settings = from_dict({"state_dir": str(tmp_path / "state"), "pools": [pool]}, tmp_path, env={})
    keeper = StateKeeper(StateStore(settings.state_dir))
    trace = TraceWriter(trace_path(settings.state_dir))
    return Running(settings, Engine(settings), keeper, trace, Shared())


async def test_a_spent_quota_reaches_the_engine_the_state_and_the_shared_state(
    tmp_path: Path, endpoint: str
) -> None:
    run = running(tmp_path, f"{endpoint}/usages")
    try:
        clock = Clock(1000.0)
        poller = UsagePoller(clock, lambda: None)
        pool, key = run.settings.pools[0], run.settings.keys[0]
        assert run.engine.key_status(key, clock())["status"] == "ready"
        assert await poller.poll_once(run, pool, key) is True
        assert Usages.seen[-1] == "Bearer sk-usage-poller-aaaaaaaaaaaaaaaa"
        status = run.engine.key_status(key, clock())
        assert (status["status"], status["until"]) == ("cooling", 1060.0)
        health = run.keeper.view().keys[key.fingerprint].health
        assert [w.remaining for w in health.windows.values()] == [0]
        assert isinstance(run.state, Shared) and run.state.told == ["a"]
    finally:
        run.close()


async def test_a_pool_without_the_endpoint_is_polled_no_more(tmp_path: Path, endpoint: str) -> None:
    run = running(tmp_path, f"{endpoint}/elsewhere")
    try:
        poller = UsagePoller(Clock(), lambda: None)
        pool, key = run.settings.pools[0], run.settings.keys[0]
        assert await poller.poll_once(run, pool, key) is False
        assert run.engine.key_status(key, 1000.0)["status"] == "ready"
        assert pool.name in poller._unsupported
    finally:
        run.close()
