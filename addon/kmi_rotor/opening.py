"""An upstream connection reset while it opens is reported as a connection error.

mitmproxy (12.3) opens an upstream connection in a task of the client's connection handler:
it connects, then reads the socket's peer address and asserts it is there. A connection the
server resets right after accepting it (a TLS front that drops it, an overloaded listener)
has no peer address any more by then: the assertion fails, the task dies without reporting
back, and the request that asked for the connection waits for ever (its client gets no
answer). That step is wrapped (once) so that such a connection is closed and reported as
what it is, a connection error: the `error` hook then fails the request over as any other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import connection as mconn
from mitmproxy.proxy import commands, events, server, server_hooks

log = logging.getLogger("kmi_rotor")

RESET = "connection reset by the server while it was opened"


def _wrap(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def open_connection(self: Any, command: commands.OpenConnection) -> None:
        try:
            await original(self, command)
        except AssertionError:
            conn = command.connection
            if conn.peername is not None or conn.error is not None:
                raise  # not the reset this guards against
            await _report_reset(self, command)

    open_connection.__wrapped__ = original  # type: ignore[attr-defined]
    return open_connection


async def _report_reset(handler: Any, command: commands.OpenConnection) -> None:
    """Close the half-opened connection and report it failed, as mitmproxy reports a
    connection that could not be opened."""
    conn = command.connection
    io = handler.transports.get(conn)
    if io is not None and io.writer is not None:
        io.writer.close()
        handler.transports[conn] = server.ConnectionIO(handler=io.handler)
    conn.error = RESET
    conn.state = mconn.ConnectionState.CLOSED
    handler.log(f"error establishing server connection: {RESET}")
    data = server_hooks.ServerConnectionHookData(client=handler.client, server=conn)
    await handler.handle_hook(server_hooks.ServerConnectErrorHook(data))
    await handler.server_event(events.OpenConnectionCompleted(command, RESET))


def install() -> bool:
    """Wrap mitmproxy's connection opening once; False (and a warning) if it is not there."""
    cls = server.ConnectionHandler
    if getattr(cls, "_kmi_rotor_opening", False):
        return True
    if not callable(getattr(cls, "open_connection", None)) or not hasattr(server, "ConnectionIO"):
        log.warning("kmi-rotor: this mitmproxy's connection opening is not the expected one")
        return False
    cls.open_connection = _wrap(cls.open_connection)  # type: ignore[method-assign]
    cls._kmi_rotor_opening = True  # type: ignore[attr-defined]
    return True
