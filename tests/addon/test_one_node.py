"""kmi-rotor is one mitmproxy addon node: its parts' hooks and commands are reached through it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from mitmproxy import hooks
from mitmproxy.addonmanager import traverse
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils
from rotor_toml import pool, rotor_config

from kmi_rotor.addon import Rotor

KEYS = {"a": "sk-alpha-0000000000000000000000aaaa", "b": "sk-bravo-0000000000000000000000bbbb"}
COMMANDS = {"rotor.status", "rotor.reload", "rotor.rotate", "rotor.disable", "rotor.enable"}
COMMANDS |= {"rotor.reset"}
ROTOR_SCRIPT = Path(__file__).resolve().parents[2] / "addon" / "rotor.py"


@pytest.fixture
def rotor(tmp_path):
    cfg = rotor_config(
        tmp_path / "rotor.toml",
        tmp_path / "state",
        [pool("p", ["llm.test"], KEYS)],
        failover={"max_attempts": 1},
    )
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(cfg))
        yield addon, tctx


def parts(addon: Rotor) -> list[object]:
    return [addon.page, addon.gatekeeper, addon.waiting, addon.commands]


def test_mitmproxy_walks_one_node(rotor):
    addon, tctx = rotor
    nodes = list(traverse(tctx.master.addons.chain))
    assert addon in nodes
    assert not any(part in nodes for part in parts(addon))
    assert not hasattr(addon, "addons")


def test_the_script_holds_one_node():
    with taddons.context() as tctx:
        loaded = tctx.script(str(ROTOR_SCRIPT))
        assert [type(a).__name__ for a in traverse([loaded])] == ["module", "Rotor"]
        assert set(tctx.master.commands.commands) >= COMMANDS


def test_every_hook_of_a_part_is_a_hook_of_the_addon(rotor):
    addon, _ = rotor
    for part in parts(addon):
        for name in hooks.all_hooks:
            if callable(getattr(part, name, None)):
                assert callable(getattr(addon, name, None)), (type(part).__name__, name)


@pytest.mark.parametrize(
    ("part", "name"),
    [
        ("gatekeeper", "http_connect"),
        ("gatekeeper", "server_connect"),
        ("gatekeeper", "tls_start_server"),
        ("waiting", "server_connected"),
        ("waiting", "tls_established_server"),
        ("waiting", "server_connect_error"),
    ],
)
async def test_mitmproxy_dispatch_reaches_the_part(rotor, monkeypatch, part, name):
    addon, tctx = rotor
    target = getattr(addon, part)
    calls: list[object] = []
    if inspect.iscoroutinefunction(getattr(target, name)):

        async def record(data: object) -> None:
            calls.append(data)
    else:

        def record(data: object) -> None:
            calls.append(data)

    monkeypatch.setattr(target, name, record)
    data = object()
    event = hooks.all_hooks[name](data)  # type: ignore[call-arg]
    await tctx.master.addons.invoke_addon(addon, event)
    assert calls == [data]


async def test_server_connected_wakes_those_waiting_for_their_connection(rotor):
    addon, tctx = rotor
    before = addon.waiting._upstream
    data = server_hooks.ServerConnectionHookData(
        client=tflow.tclient_conn(), server=tflow.tserver_conn()
    )
    await tctx.master.addons.invoke_addon(addon, server_hooks.ServerConnectedHook(data))
    assert before.is_set()


def test_configure_reaches_the_gatekeeper(rotor):
    addon, tctx = rotor
    tctx.options.update(listen_host="127.0.0.1")
    assert addon.gatekeeper.exposure.state == "local"
    tctx.options.update(listen_host="0.0.0.0")
    assert addon.gatekeeper.exposure.state == "exposed"


async def test_status_page_answers_after_the_gate(rotor):
    addon, tctx = rotor
    f = tflow.tflow(req=tutils.treq(host="llm.test", port=443, path=b"/_kmi-rotor/api/status"))
    f.request.scheme = "https"
    await tctx.master.addons.invoke_addon(addon, hooks.all_hooks["requestheaders"](f))
    assert f.response is None  # the gate let it through, nothing answered yet
    await tctx.master.addons.invoke_addon(addon, hooks.all_hooks["request"](f))
    assert f.response is not None and f.response.status_code == 200
    assert [p["name"] for p in json.loads(f.response.content)["pools"]] == ["p"]


def test_commands_are_mitmproxy_commands(rotor):
    _, tctx = rotor
    assert set(tctx.master.commands.commands) >= COMMANDS
    tctx.master.commands.call("rotor.disable", "a")
    assert "disabled" in tctx.master.commands.call("rotor.status")
    tctx.master.commands.call("rotor.enable", "a")
    assert "disabled" not in tctx.master.commands.call("rotor.status")
