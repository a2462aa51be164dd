"""Nothing saved holds a key: a `-w` flow file written at shutdown, with requests still in
flight at the provider and a stream still running, is searched byte by byte for every key."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from mitmproxy import io

import fake_provider

from ._harden_helpers import (
    CHAT,
    leaks,
    make_confdir,
    run_provider,
    secret,
    start_proxy,
    write_config,
)

LABELS = ("a", "b", "c")
HELD = 6  # requests the provider holds when the proxy stops


@pytest.fixture(scope="module")
def harden_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_confdir(tmp_path_factory)


@pytest.fixture
def slow_provider() -> Iterator[fake_provider.FakeProvider]:
    """Answers nothing for a minute: every request is still in flight when the proxy stops."""
    yield from run_provider(LABELS, latency=60.0)


def _send(url: str, stream: bool, errors: list[BaseException]) -> None:
    body = {**CHAT, "stream": stream}
    headers = {"authorization": "Bearer placeholder-client-credential"}
    try:
        httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=90)
    except httpx.HTTPError:
        pass  # the proxy went away under it: that is the point
    except BaseException as e:  # anything else is a broken test
        errors.append(e)


def _wait_held(provider: fake_provider.FakeProvider, n: int) -> None:
    done = threading.Event()
    for _ in range(600):
        if provider.stats()["inflight"] >= n:
            return
        done.wait(0.05)
    raise TimeoutError(f"the provider never held {n} requests: {provider.stats()}")


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_flows_saved_at_shutdown_hold_no_key(
    tmp_path: Path, harden_confdir: Path, slow_provider: fake_provider.FakeProvider, sig: int
) -> None:
    config = write_config(
        tmp_path / "rotor.toml",
        f"127.0.0.1:{slow_provider.port}",
        tmp_path / "state",
        LABELS,
        extra="[limits]\nmax_wait_seconds = 0",
    )
    saved = tmp_path / "flows.out"
    proxy = start_proxy(
        config, harden_confdir, tmp_path / "mitmdump.log", slow_provider.url, "-w", str(saved)
    )
    errors: list[BaseException] = []
    clients = [
        threading.Thread(target=_send, args=(proxy.url, i % 2 == 0, errors), daemon=True)
        for i in range(HELD)
    ]
    try:
        for t in clients:
            t.start()
        _wait_held(slow_provider, HELD)
        # Every key went out (round robin over three keys): the file has something to leak.
        sent = {r.credential for r in slow_provider.requests}
        assert sent == {secret(label) for label in LABELS}
    finally:
        code = proxy.stop(sig)
    for t in clients:
        t.join(30)
    assert not errors, errors
    assert code == 0, proxy.process.output[-2000:]

    data = saved.read_bytes()
    with saved.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert len(flows) == HELD  # the unfinished flows were saved...
    for flow in flows:
        # ...each with the key it was sent with, masked, in the slot the client used.
        assert flow.request.headers["authorization"].startswith("Bearer sk-…")
        assert flow.metadata["kmi_rotor"]["key"] in LABELS
    assert leaks(data, [secret(label) for label in LABELS]) == []
    assert leaks(proxy.process.output.encode(), [secret(label) for label in LABELS]) == []


def test_scripts_are_done_before_mitmproxys_writers() -> None:
    """kmi-rotor masks in its `done`; that is early enough only while mitmproxy loads scripts
    ahead of its writers (an upgrade that changed this would fail here first)."""
    from mitmproxy.addons import default_addons, save, savehar, script

    kinds = [type(a) for a in default_addons()]
    loader = kinds.index(script.ScriptLoader)
    assert loader < kinds.index(save.Save) and loader < kinds.index(savehar.SaveHar)
