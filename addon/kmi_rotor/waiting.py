"""Where a request waits before it is admitted: for its upstream connection to be set up, and
for capacity (a slot freed, a key back in service) until its deadline; never blocking, and
never for a client that has left.

A part of kmi-rotor's addon, which calls its connection hooks: they wake the requests that wait
for their upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from .failover import client_of

WAIT_SLICE = 0.5
"""A waiting request looks at its client this often, so a client that left stops waiting."""
UPSTREAM_SETUP_WAIT = 10.0


def upstream_settled(flow: http.HTTPFlow) -> bool:
    """Whether `Waiting.upstream_ready` has nothing to wait for: no connection is being set
    up, or it is set up (TLS included), or it failed or ended, or the client left."""
    server = flow.server_conn
    return (
        server.timestamp_start is None
        or server.error is not None
        or (server.connected and (not server.tls or server.tls_established))
        or server.timestamp_end is not None
        or not flow.client_conn.connected
    )


class Waiting:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # Each is set to wake whoever waits on it, and replaced by a fresh one only when the
        # next request comes to wait: most wakes find nobody waiting, and cost no new event.
        self._upstream = asyncio.Event()
        self._capacity = asyncio.Event()

    async def upstream_ready(self, flow: http.HTTPFlow) -> None:
        """Wait while the upstream connection is being set up (mitmproxy connects eagerly):
        a key's limits count a request when it is admitted, so admitting it only once it can
        leave at once keeps what the provider sees within the limits."""
        end = self.clock() + UPSTREAM_SETUP_WAIT
        while not upstream_settled(flow) and self.clock() < end:
            event = self._upstream = _unset(self._upstream)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), WAIT_SLICE)

    async def capacity(self, flow: http.HTTPFlow, until: float | None, deadline: float) -> bool:
        """Sleep until `until`, a freed slot, or the deadline; False if the client left."""
        end = min(until if until is not None else deadline, deadline)
        client = client_of(flow)
        while (left := end - self.clock()) > 0:
            if not client.connected:
                return False
            event = self._capacity = _unset(self._capacity)
            try:
                await asyncio.wait_for(event.wait(), min(left, WAIT_SLICE))
                return True
            except TimeoutError:
                continue
        return client.connected

    def wake(self) -> None:
        """Let waiting requests look again (a slot was freed or a key came back)."""
        self._capacity.set()

    # -- hooks --------------------------------------------------------------------------------

    def server_connected(self, data: Any) -> None:
        self._upstream.set()

    def tls_established_server(self, data: Any) -> None:
        self.server_connected(data)

    def server_connect_error(self, data: Any) -> None:
        self.server_connected(data)


def _unset(event: asyncio.Event) -> asyncio.Event:
    """`event`, or a fresh one if it was set: a request that comes to wait after a wake is
    not woken by it."""
    return asyncio.Event() if event.is_set() else event
