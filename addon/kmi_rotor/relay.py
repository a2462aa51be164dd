"""Handing a failover attempt's answer to the client of the flow whose attempt failed.

An attempt that failed before its answer reached the client (an error answer, kept whole to be
classified; or a connection that failed before the answer's headers) is followed by another on
a different key: a flow of its own, replayed through mitmproxy. Its answer must reach the
client of the first flow. mitmproxy sends a flow's answer right after that flow's `response`
hook, and whole; after its `error` hook it sends an error. Two steps of mitmproxy's HTTP
stream are therefore wrapped (once): right after the `response` or `error` hook of a flow for
which kmi-rotor registered a `Delivery`, the stream sends the delivery instead:

- a whole answer put in place of a connection error;
- or a streamed answer: its headers at once, then its body as the attempt produces it, each
  batch fetched through the `kmi_rotor_relay` hook (which the addon answers by waiting on the
  `Relay`), then its end; or a cut, when the attempt's stream was cut.

A client that leaves while its answer is relayed cancels the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as lhttp
from mitmproxy.proxy.layers.http import _events as hev

log = logging.getLogger("kmi_rotor")

WAIT_SLICE = 0.5
"""A relayed stream looks at its client this often while its attempt is silent."""


class Relay:
    """The body of a streamed answer, from the attempt that produces it to the client's flow.

    Filled synchronously by the attempt's stream callable, emptied by the client's stream
    between two `kmi_rotor_relay` hooks. `began` is set once the attempt's answer streams.
    """

    def __init__(self) -> None:
        self.began = asyncio.Event()
        self.ended = False
        self.failed: str | None = None
        self.cancelled = False
        self.answered = False
        """Set by the hook's handler: False after a hook nobody answered (addon unloaded)."""
        self.on_cancel: Callable[[], None] | None = None
        self.task: asyncio.Future[Any] | None = None
        """The attempt's replay, kept referenced while it streams."""
        self._chunks: list[bytes] = []
        self._more = asyncio.Event()

    def feed(self, data: bytes | Iterable[bytes]) -> None:
        if self.cancelled:
            return
        if isinstance(data, bytes | bytearray):
            if data:
                self._chunks.append(bytes(data))
        else:
            self._chunks.extend(bytes(d) for d in data if d)
        self._more.set()

    def end(self) -> None:
        self.ended = True
        self._more.set()

    def fail(self, reason: str) -> None:
        self.failed = reason or "the stream was cut"
        self._more.set()

    def cancel(self) -> None:
        """The client left: stop the attempt (once)."""
        if self.cancelled:
            return
        self.cancelled = True
        self._chunks.clear()
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except Exception:
                log.exception("kmi-rotor: could not stop a relayed attempt")

    async def wait(self, timeout: float = WAIT_SLICE) -> None:
        """Until there is something to send, the end, or `timeout` (to look at the client)."""
        self.answered = True
        if self._chunks or self.ended or self.failed is not None:
            return
        self._more.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._more.wait(), timeout)

    def take(self) -> list[bytes]:
        chunks, self._chunks = self._chunks, []
        return chunks

    def tee(self, inner: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        """A stream callable for the attempt: `inner` (the SSE tap) sees every chunk as before,
        and what it hands back is also fed to this relay."""

        def stream(chunk: bytes) -> Any:
            out = inner(chunk) if inner is not None else chunk
            self.feed(out)
            return out

        return stream


@dataclass
class Delivery:
    """What a client's flow sends after its hook: its `response` whole, or relayed."""

    relay: Relay | None = None

    def cancel(self) -> None:
        if self.relay is not None:
            self.relay.cancel()


FEEDS: dict[str, Relay] = {}
"""Attempt flow id -> the relay its streamed answer feeds."""
DELIVERIES: dict[str, Delivery] = {}
"""Client flow id -> what its stream sends after its `response` or `error` hook."""


@dataclass
class KmiRotorRelayHook(commands.StartHook):
    """Wait for the next part of a relayed answer (answered by kmi-rotor's addon). Its one
    argument is not a flow, so mitmweb is not told of an update per part."""

    relay: Relay
    name = "kmi_rotor_relay"


# -- inside mitmproxy's HTTP stream -----------------------------------------------------------

Commands = Generator[commands.Command, Any, Any]


Guard = Callable[[Any, tuple[Any, ...], dict[str, Any]], bool]


def _after_hook(
    original: Callable[..., Commands], hook: type, guard: Guard
) -> Callable[..., Commands]:
    """Run `original` (a step of HttpStream); right after it yields `hook` and the hook
    returned, send a registered delivery instead of going on, where `guard` allows it."""

    def step(self: Any, *args: Any, **kwargs: Any) -> Commands:
        gen = original(self, *args, **kwargs)
        try:
            command = next(gen)
        except StopIteration as stop:
            return stop.value
        while True:
            reply = yield command
            if isinstance(command, hook):
                delivery = DELIVERIES.pop(self.flow.id, None)
                if delivery is not None:
                    if self.flow.response is not None and guard(self, args, kwargs):
                        gen.close()
                        yield from _deliver(self, delivery)
                        return None
                    delivery.cancel()
            try:
                command = gen.send(reply)
            except StopIteration as stop:
                return stop.value

    step.__wrapped__ = original  # type: ignore[attr-defined]
    return step


def _buffered(stream: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """After `response`: only an answer that was not streamed already is replaced."""
    return not (kwargs.get("already_streamed") or (args and args[0]))


def _server_failed(stream: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """After `error`: only a failure of the server side, for a request fully read."""
    failure = args[0] if args else None
    return isinstance(failure, hev.ResponseProtocolError) and (
        stream.client_state == stream.state_done
    )


def _deliver(stream: Any, delivery: Delivery) -> Commands:
    """Send the flow's `response`: whole, or its headers and then the relayed body."""
    flow, client, sid = stream.flow, stream.context.client, stream.stream_id
    stream.server_state = stream.state_done
    if (yield from stream.check_killed(False)):
        delivery.cancel()
        return
    resp = flow.response
    relay = delivery.relay
    content = None if relay is not None else resp.raw_content
    done_after_headers = relay is None and not content and not resp.trailers
    yield lhttp.SendHttp(hev.ResponseHeaders(sid, resp, done_after_headers), client)
    if content:
        yield lhttp.SendHttp(hev.ResponseData(sid, content), client)
    if relay is not None and not (yield from _pump(stream, relay)):
        return
    if resp.trailers:
        yield lhttp.SendHttp(hev.ResponseTrailers(sid, resp.trailers), client)
    yield from stream.flow_done()


def _pump(stream: Any, relay: Relay) -> Generator[commands.Command, Any, bool]:
    """Relay the body until its end (True), or until the attempt is cut or the client leaves."""
    flow, client, sid = stream.flow, stream.context.client, stream.stream_id
    while True:
        relay.answered = False
        yield KmiRotorRelayHook(relay)
        if (yield from stream.check_killed(False)):
            relay.cancel()
            return False
        for chunk in relay.take():
            yield lhttp.SendHttp(hev.ResponseData(sid, chunk), client)
        if relay.failed is None and not relay.answered and not relay.ended:
            relay.cancel()
            relay.failed = "kmi-rotor stopped relaying this answer"
        if relay.failed is not None:
            flow.error = mflow.Error(relay.failed)
            code = hev.ErrorCode.GENERIC_SERVER_ERROR
            yield lhttp.SendHttp(hev.ResponseProtocolError(sid, relay.failed, code), client)
            flow.live = False
            stream.client_state = stream.server_state = stream.state_errored
            yield lhttp.DropStream(sid)
            return False
        if relay.ended:
            return True


def install() -> bool:
    """Wrap mitmproxy's HTTP stream steps once; False (and a warning) if they are not there."""
    cls = lhttp.HttpStream
    if getattr(cls, "_kmi_rotor_relay", False):
        return True
    needed = ("send_response", "handle_protocol_error", "flow_done", "check_killed")
    if not all(callable(getattr(cls, n, None)) for n in needed):
        log.warning("kmi-rotor: this mitmproxy cannot hand failover answers over; failover is off")
        return False
    after_response = _after_hook(cls.send_response, lhttp.HttpResponseHook, _buffered)
    after_error = _after_hook(cls.handle_protocol_error, lhttp.HttpErrorHook, _server_failed)
    cls.send_response = after_response  # type: ignore[method-assign]
    cls.handle_protocol_error = after_error  # type: ignore[method-assign]
    cls._kmi_rotor_relay = True  # type: ignore[attr-defined]
    return True
