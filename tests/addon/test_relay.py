"""The relay of a failed-over answer: its buffer, and the wrapped steps of mitmproxy's HTTP
stream (driven here as mitmproxy drives them: a generator of commands, replies sent back)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from mitmproxy.proxy.layers import http as lhttp
from mitmproxy.proxy.layers.http import _events as hev
from mitmproxy.test import tflow

from kmi_rotor import relay as rl


async def test_a_relay_hands_over_what_the_attempt_streamed_then_its_end():
    r = rl.Relay()
    tap_saw: list[bytes] = []
    stream = r.tee(lambda chunk: tap_saw.append(chunk) or chunk)
    assert stream(b"data: 1\n\n") == b"data: 1\n\n"
    stream(b"data: 2\n\n")
    await r.wait(0.01)
    assert r.answered and r.take() == [b"data: 1\n\n", b"data: 2\n\n"]
    assert r.take() == []
    stream(b"")  # the end of the stream: nothing to relay
    r.end()
    await r.wait(0.01)
    assert r.ended and r.take() == [] and tap_saw[-1] == b""


async def test_waiting_returns_when_a_chunk_arrives_or_after_its_slice():
    r = rl.Relay()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, r.feed, b"x")
    start = loop.time()
    await r.wait(5)
    assert loop.time() - start < 2 and r.take() == [b"x"]
    start = loop.time()
    await r.wait(0.05)  # nothing comes: back after the slice, to look at the client
    assert 0.04 <= loop.time() - start < 2


def test_cancelling_stops_the_attempt_once_and_drops_what_is_left():
    r = rl.Relay()
    stopped: list[int] = []
    r.on_cancel = lambda: stopped.append(1)
    r.feed(b"late")
    r.cancel()
    r.cancel()
    r.feed(b"later")
    assert stopped == [1] and r.take() == [] and r.cancelled


def test_a_cut_attempt_is_a_failure_with_its_reason():
    r = rl.Relay()
    r.fail("")
    assert r.failed == "the stream was cut"


# -- the wrapped steps ---------------------------------------------------------------------------


def _step(*commands: Any):
    """A stand-in for an HttpStream step: yields `commands`, records the replies it got."""
    got: list[Any] = []

    def step(self: Any, *args: Any, **kwargs: Any):
        for c in commands:
            got.append((yield c))
        return "done"

    return step, got


def _drive(gen, replies: list[Any]) -> tuple[list[Any], Any]:
    out, value = [], None
    try:
        out.append(next(gen))
        for reply in replies:
            out.append(gen.send(reply))
    except StopIteration as stop:
        value = stop.value
    return out, value


def test_without_a_delivery_the_step_runs_unchanged():
    flow = tflow.tflow(resp=True)
    hook, other = lhttp.HttpResponseHook(flow), object()
    step, got = _step(hook, other)
    wrapped = rl._after_hook(step, lhttp.HttpResponseHook, rl._buffered)
    stream = SimpleNamespace(flow=flow)
    out, value = _drive(wrapped(stream), ["r1", "r2"])
    assert out == [hook, other] and got == ["r1", "r2"] and value == "done"


def test_a_delivery_after_the_hook_replaces_the_rest_of_the_step():
    flow = tflow.tflow(resp=True)
    hook, never = lhttp.HttpResponseHook(flow), object()
    step, got = _step(hook, never)
    wrapped = rl._after_hook(step, lhttp.HttpResponseHook, rl._buffered)
    done: list[bool] = []

    def no_kill(_: bool):
        return False
        yield

    def flow_done():
        done.append(True)
        yield lhttp.DropStream(1)

    stream = SimpleNamespace(
        flow=flow,
        stream_id=1,
        context=SimpleNamespace(client="client"),
        state_done="done",
        server_state=None,
        check_killed=no_kill,
        flow_done=flow_done,
    )
    rl.DELIVERIES[flow.id] = rl.Delivery()
    out, _ = _drive(wrapped(stream), [None, None, None, None])
    assert never not in out and got == []
    sent = [c.event for c in out if isinstance(c, lhttp.SendHttp)]
    assert isinstance(sent[0], hev.ResponseHeaders) and sent[0].response is flow.response
    assert isinstance(sent[1], hev.ResponseData) and sent[1].data == flow.response.raw_content
    assert done == [True] and flow.id not in rl.DELIVERIES
    assert stream.server_state == "done"


def test_a_delivery_is_not_sent_after_an_answer_that_already_streamed():
    flow = tflow.tflow(resp=True)
    hook = lhttp.HttpResponseHook(flow)
    step, _ = _step(hook)
    wrapped = rl._after_hook(step, lhttp.HttpResponseHook, rl._buffered)
    r = rl.Relay()
    rl.DELIVERIES[flow.id] = rl.Delivery(r)
    out, value = _drive(wrapped(SimpleNamespace(flow=flow), already_streamed=True), [None])
    assert out == [hook] and value == "done" and r.cancelled


def test_installing_twice_wraps_once():
    assert rl.install() and rl.install()
    step = lhttp.HttpStream.send_response
    assert getattr(step, "__wrapped__", None) is not None
    assert getattr(step.__wrapped__, "__wrapped__", None) is None
