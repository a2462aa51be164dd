"""A connection reset while mitmproxy opens it is reported as failed, not left pending."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mitmproxy import connection as mconn
from mitmproxy.proxy import commands, events, server, server_hooks

from kmi_rotor import opening


class Writer:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Handler:
    """What the wrapped step uses of mitmproxy's connection handler."""

    def __init__(self) -> None:
        self.client = mconn.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2))
        self.transports: dict[Any, server.ConnectionIO] = {}
        self.hooks: list[Any] = []
        self.events: list[Any] = []

    def log(self, message: str, level: int = 0) -> None:
        pass

    async def handle_hook(self, hook: Any) -> None:
        self.hooks.append(hook)

    async def server_event(self, event: Any) -> None:
        self.events.append(event)


def _reset_while_opening(peername: Any) -> Any:
    """mitmproxy's opening as it goes when the peer resets at once: connected, then no peer
    address to read, and its assertion fails."""

    async def original(self: Handler, command: commands.OpenConnection) -> None:
        conn = command.connection
        conn.state = mconn.ConnectionState.OPEN
        conn.peername = peername
        self.transports[conn] = server.ConnectionIO(handler=None, reader=None, writer=Writer())
        assert conn.peername

    return original


def test_a_reset_opening_is_reported_as_a_connection_error():
    handler = Handler()
    conn = mconn.Server(address=("127.0.0.1", 443))
    command = commands.OpenConnection(conn)
    writer_holder: list[Writer] = []

    async def run() -> None:
        original = _reset_while_opening(None)

        async def keep(self: Handler, cmd: commands.OpenConnection) -> None:
            try:
                await original(self, cmd)
            finally:
                writer_holder.append(self.transports[cmd.connection].writer)

        await opening._wrap(keep)(handler, command)

    asyncio.run(run())
    assert conn.error == opening.RESET
    assert conn.state is mconn.ConnectionState.CLOSED
    assert writer_holder[0].closed
    assert [type(h) for h in handler.hooks] == [server_hooks.ServerConnectErrorHook]
    (done,) = handler.events
    assert isinstance(done, events.OpenConnectionCompleted)
    assert (done.command, done.reply) == (command, opening.RESET)


def test_without_the_wrap_the_request_would_get_no_answer():
    handler = Handler()
    command = commands.OpenConnection(mconn.Server(address=("127.0.0.1", 443)))
    with pytest.raises(AssertionError):
        asyncio.run(_reset_while_opening(None)(handler, command))
    assert handler.events == []  # nothing reports back: the request waits for ever


def test_another_assertion_is_not_taken_for_a_reset():
    handler = Handler()
    command = commands.OpenConnection(mconn.Server(address=("127.0.0.1", 443)))

    async def broken(self: Handler, cmd: commands.OpenConnection) -> None:
        cmd.connection.peername = ("127.0.0.1", 443)
        raise AssertionError("something else")

    with pytest.raises(AssertionError):
        asyncio.run(opening._wrap(broken)(handler, command))
    assert handler.events == []


def test_it_is_installed_once_on_mitmproxys_handler():
    assert opening.install()
    wrapped = server.ConnectionHandler.open_connection
    assert opening.install()
    assert server.ConnectionHandler.open_connection is wrapped
    assert hasattr(wrapped, "__wrapped__")
