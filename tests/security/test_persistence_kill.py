"""A daily limit survives SIGKILL: the limiter's windows reach the state file as promptly as
the request counters, so a proxy killed and restarted again and again never serves more than
`requests_per_day` in total."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

import fake_provider

from ._harden_helpers import CHAT, make_confdir, run_provider, start_proxy, write_config

DAILY = 20
PER_RUN = 3  # requests each proxy serves before it is killed
LABELS = ("solo",)


@pytest.fixture(scope="module")
def harden_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_confdir(tmp_path_factory)


@pytest.fixture
def provider() -> Iterator[fake_provider.FakeProvider]:
    yield from run_provider(LABELS)


def _counted(state: Path) -> int:
    """Requests the state file holds (0 while there is none or it is being replaced)."""
    try:
        doc = json.loads((state / "state.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return 0
    return sum(k.get("requests", 0) for k in doc.get("keys", {}).values())


def _wait_counted(state: Path, n: int, proxy_output: object) -> None:
    end = time.monotonic() + 20
    while _counted(state) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"the state never counted {n} requests: {proxy_output}")
        time.sleep(0.02)


@pytest.mark.e2e
@pytest.mark.long(13)
def test_sigkill_loop_never_serves_more_than_the_daily_limit(
    tmp_path: Path, harden_confdir: Path, provider: fake_provider.FakeProvider
) -> None:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "rotor.toml",
        f"127.0.0.1:{provider.port}",
        state,
        LABELS,
        key_limits={"requests_per_day": DAILY},
        extra="[limits]\nmax_wait_seconds = 0",
    )
    served, refused_runs, run = 0, 0, 0
    # Each run serves a few requests, waits until the counters are on disk (what a kill may
    # not lose), and is killed; the limit must hold across every restart.
    while refused_runs < 2 and run < 3 * DAILY // PER_RUN:
        run += 1
        proxy = start_proxy(config, harden_confdir, tmp_path / f"mitmdump-{run}.log", provider.url)
        try:
            statuses = [
                httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code
                for _ in range(PER_RUN)
            ]
            assert set(statuses) <= {200, 429}, statuses
            served += statuses.count(200)
            _wait_counted(state, served, proxy.process.output[-1000:])
        finally:
            proxy.stop(signal.SIGKILL)
        if 200 not in statuses:
            refused_runs += 1
    assert len(provider.requests) == DAILY
    assert served == DAILY
