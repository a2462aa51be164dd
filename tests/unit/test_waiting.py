"""Waiting for capacity: a wake reaches the requests waiting then, and only them."""

from __future__ import annotations

import asyncio
import time

import pytest
from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow

from kmi_rotor.waiting import Waiting


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.parametrize("wakes_before", [0, 2])
async def test_a_wake_reaches_the_request_waiting_and_not_one_that_came_after(
    wakes_before: int,
) -> None:
    waiting = Waiting(time.monotonic)
    for _ in range(wakes_before):  # nobody waits yet: these wake nobody, later or now
        waiting.wake()
    task = asyncio.create_task(waiting.capacity(tflow.tflow(), None, time.monotonic() + 60))
    await _settle()
    assert not task.done()
    waiting.wake()
    assert await asyncio.wait_for(task, 30) is True


async def test_every_request_waiting_is_woken_and_a_later_one_waits() -> None:
    waiting = Waiting(time.monotonic)
    deadline = time.monotonic() + 60
    first = [asyncio.create_task(waiting.capacity(tflow.tflow(), None, deadline)) for _ in "ab"]
    await _settle()
    waiting.wake()
    later = asyncio.create_task(waiting.capacity(tflow.tflow(), None, deadline))
    assert await asyncio.wait_for(asyncio.gather(*first), 30) == [True, True]
    await _settle()
    assert not later.done()
    waiting.wake()
    assert await asyncio.wait_for(later, 30) is True


async def test_a_connection_event_wakes_a_request_waiting_for_its_upstream() -> None:
    waiting = Waiting(time.monotonic)
    flow = tflow.tflow()
    flow.server_conn.timestamp_start = time.time()
    flow.server_conn.tls = True
    flow.server_conn.timestamp_end = None
    flow.server_conn.error = None
    flow.server_conn.timestamp_tls_setup = None
    waiting.server_connected(None)  # an earlier connection's event: not this one's
    task = asyncio.create_task(waiting.upstream_ready(flow))
    await _settle()
    assert not task.done()
    flow.server_conn.timestamp_tls_setup = time.time()
    flow.server_conn.state = ConnectionState.OPEN
    waiting.tls_established_server(None)
    await asyncio.wait_for(task, 30)
