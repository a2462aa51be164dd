"""Operator actions in the state when the proxy starts: the CLI's hold until a proxy applied
them, even when the proxy wrote a newer observation of the key before it died; those a proxy
applied are not applied again over what happened since."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons
from rotor_toml import pool, rotor_config
from testkit import Clock

from kmi_rotor.addon import Rotor
from kmi_rotor.config import load
from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.state import Delta, KeyRecord, Operator
from kmi_rotor.store import StateStore

KEYS = {"a": "sk-restart-alpha-0000000000000aaaa", "b": "sk-restart-bravo-0000000000000bbbb"}
T0 = 1_800_000_000.0


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return rotor_config(
        tmp_path / "rotor.toml", tmp_path / "state", [pool("p", ["llm.test"], KEYS)]
    )


def write_state(config: Path, label: str, op: Operator, health: KeyHealth) -> None:
    """What the last proxy and the CLI left on disk for key `label`."""
    settings = load(config)
    key = next(k for k in settings.keys if k.label == label)
    d = Delta()
    kd = d.key(key.fingerprint, key.label, key.pool)
    kd.operator, kd.health = op, health
    StateStore(settings.state_dir).commit(d, max(op.at, health.updated_at))


@pytest.fixture
def started(config: Path) -> Iterator[Any]:
    """Start the proxy on the state written so far, at T0 + 60; returns the addon."""
    with ExitStack() as stack:

        async def start() -> Rotor:
            addon = Rotor()
            addon.clock = Clock(T0 + 60)
            tctx = stack.enter_context(taddons.context(addon))
            stack.callback(addon.done)
            tctx.configure(addon, rotor_config=str(config))
            assert addon.serving is not None
            await addon.serving.keeper.sync()
            return addon

        yield start


def status(addon: Rotor, label: str) -> str:
    snap = addon.snapshot()
    return next(k for p in snap["pools"] for k in p["keys"] if k["label"] == label)["status"]


def record(addon: Rotor, label: str) -> KeyRecord:
    assert addon.serving is not None
    return next(r for r in addon.serving.keeper.view().keys.values() if r.label == label)


async def test_a_cli_action_holds_over_a_later_observation(config: Path, started: Any) -> None:
    # `kmi-rotor disable b` at T0 + 5; the proxy wrote a success of b at T0 + 8 and was killed
    # before it read the action.
    write_state(
        config,
        "b",
        Operator(action="disable", at=T0 + 5, applied=False),
        KeyHealth(updated_at=T0 + 8),
    )
    addon = await started()
    assert status(addon, "b") == "disabled"
    assert status(addon, "a") == "ready"
    await addon.serving.keeper.sync()  # type: ignore[union-attr]
    assert record(addon, "b").operator == Operator(action="disable", at=T0 + 5, applied=True)


async def test_an_applied_action_is_not_applied_again(config: Path, started: Any) -> None:
    # b enabled at T0 + 5 and applied; it then cooled down on a 429 at T0 + 8.
    cooling = KeyHealth(cooling_until=T0 + 600, cooling_reason="429", updated_at=T0 + 8)
    write_state(config, "b", Operator(action="enable", at=T0 + 5, applied=True), cooling)
    addon = await started()
    assert status(addon, "b") == "cooling"


async def test_the_proxy_marks_an_action_it_applied(config: Path, started: Any) -> None:
    addon = await started()
    write_state(config, "a", Operator(action="disable", at=T0 + 70, applied=False), KeyHealth())
    await addon.serving.keeper.sync()  # type: ignore[union-attr]
    assert status(addon, "a") == "disabled"
    await addon.serving.keeper.sync()  # type: ignore[union-attr]
    on_disk = StateStore(load(config).state_dir).read()
    rec = next(r for r in on_disk.keys.values() if r.label == "a")
    assert rec.operator is not None and rec.operator.applied is True
    assert rec.health.disabled_reason == "disabled by operator"
