"""The scripts every request runs in Redis (its admission, its settling), on one connection of
their own: commands pipelined, replies parsed by hiredis and handed out in order.

A request's admission and its settling are one script call each. Through the redis package's
client a call costs about as much CPU as the rest of kmi-rotor's work on the request together
(a pooled connection taken and given back under a lock, a retry wrapper, a timeout context
for the write and another for the read); here it is a future, and a share of one write: the
commands of one turn of the event loop are written together at its end (a write to a socket
costs more than the rest of a call). A call bounded in time (`within`) needs no timer of its
own: one timer fails the calls in flight whose time is up. The heartbeat's counters and its
read of the shared windows are scripts too; everything else (the registry, actions, cooldowns)
stays with the redis package's client.

Only for `redis://`: a `rediss://` URL's TLS options are the redis package's to read, and its
client carries every call then.

Failures are the ones the caller maps to SharedDown (`limits._down`): OSError or ConnectionError
when the connection cannot be made or is lost (every call in flight on it fails; the next call
connects again; a connection whose oldest call waits for its reply longer than STALLED counts
as lost), the redis package's ResponseError for an error reply, AuthenticationError
when the credentials are refused, TimeoutError when a call's `within` is up. A call given up
(by its caller, or timed out) leaves its reply to be read and dropped, so the replies that
follow still go to their own calls.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import AuthenticationError, ResponseError

CONNECT_TIMEOUT = 0.5
"""Seconds a connection may take to open (the callers' own bound is shorter: they give up
waiting, the connection goes on opening for the next call)."""
STALLED = 1.0
"""Seconds without the reply to the oldest call after which the connection is given up (a
peer that vanished without closing it, a half-open connection): the next call opens another."""


def pack(*parts: bytes) -> bytes:
    """One command in Redis's protocol (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _Replies(asyncio.Protocol):
    """One connection: each command sent waits for the next reply in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[Any], float, float]] = deque()
        """Each call's future, when it was sent and when its caller stops waiting for it (loop
        time; inf: its caller bounds the wait itself), oldest first."""
        self.lost: Exception | None = None
        self._out: list[bytes] = []
        """Commands sent in this turn of the event loop, written together at its end."""
        self._watch: asyncio.TimerHandle | None = None
        """When the next bounded call runs out of time (`_expire`): one timer for every call
        in flight, not one per call."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                if not self.waiting:  # a reply nobody asked for: the stream is not ours
                    raise hiredis.ProtocolError("a reply to no command")
                fut, _, _ = self.waiting.popleft()
                if not fut.done():  # a call given up (timed out) keeps its place
                    fut.set_result(reply)
        except hiredis.ProtocolError as e:
            self._close(ConnectionError(f"Redis sent what is not its protocol ({e})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(ConnectionError("the connection to Redis was lost"))

    def _close(self, why: Exception) -> None:
        if self.lost is None:
            self.lost = why
        if self.transport is not None:
            self.transport.close()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        while self.waiting:
            fut, _, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(self.lost)

    def stalled(self, now: float) -> bool:
        """Whether the oldest call has waited for its reply longer than STALLED (then the
        connection is closed, and its calls fail)."""
        if self.waiting and now - self.waiting[0][1] > STALLED:
            self._close(ConnectionError(f"Redis sent no reply for {STALLED:.0f} s"))
        return self.lost is not None

    def send(self, command: bytes, within: float | None = None) -> asyncio.Future[Any]:
        """The future of `command`'s reply; with `within`, it fails with TimeoutError when the
        reply has not come after that many seconds (the reply is still read in its turn)."""
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise self.lost or ConnectionError("the connection to Redis is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        sent = loop.time()
        if within is None:
            self.waiting.append((fut, sent, math.inf))
        else:
            deadline = sent + within
            self.waiting.append((fut, sent, deadline))
            watch = self._watch
            if watch is None or deadline < watch.when():
                if watch is not None:
                    watch.cancel()
                self._watch = loop.call_at(deadline, self._expire)
        out = self._out
        out.append(command)
        if len(out) == 1:  # the first of this turn: the turn's commands go in one write
            loop.call_soon(self._write)
        return fut

    def _write(self) -> None:
        out, self._out = self._out, []
        transport = self.transport
        if self.lost is None and transport is not None and not transport.is_closing():
            transport.write(b"".join(out))

    def _expire(self) -> None:
        """Fail the calls whose time is up; wake again when the next one's is."""
        self._watch = None
        loop = asyncio.get_running_loop()
        now, later = loop.time(), math.inf
        for fut, _, deadline in self.waiting:
            if deadline > now:
                later = min(later, deadline)
            elif not fut.done():
                fut.set_exception(TimeoutError("no reply from Redis in time"))
        if later < math.inf:
            self._watch = loop.call_at(later, self._expire)


class ScriptChannel:
    """Script calls on one pipelined connection to the Redis of a `redis://` URL."""

    def __init__(
        self,
        host: str,
        port: int = 6379,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self._hello: list[tuple[bytes, type[Exception]]] = []
        """What a new connection sends first, each with the error its refusal raises."""
        if password is not None:
            creds = [username, password] if username else [password]
            self._hello.append((pack(b"AUTH", *(c.encode() for c in creds)), AuthenticationError))
        if db:
            self._hello.append((pack(b"SELECT", str(db).encode()), ResponseError))
        self._conn: _Replies | None = None
        self._opening: asyncio.Task[_Replies] | None = None

    @classmethod
    def for_url(cls, url: str) -> ScriptChannel | None:
        """The channel for a `redis://` URL (as `settings.check_url` lets through); None for
        any other scheme."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            return None
        db = parts.path.strip("/")
        return cls(
            parts.hostname,
            parts.port or 6379,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            db=int(db) if db.isdigit() else 0,
        )

    async def evalsha(
        self,
        script: str,
        sha: bytes,
        keys: Sequence[bytes],
        args: Sequence[bytes],
        within: float | None = None,
    ) -> Any:
        """The reply of `script` (whose SHA-1 is `sha`) run on `keys` and `args`; loaded
        first when Redis does not know it (a restarted Redis). `within`: seconds to wait for
        each reply, at most (then TimeoutError)."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        if conn is None or conn.stalled(loop.time()):
            if within is None:
                conn = await self.connect()
            else:  # the time to connect counts in the call's
                started = loop.time()
                conn = await asyncio.wait_for(self.connect(), within)
                within = max(0.0, within - (loop.time() - started))
        count = b"%d" % len(keys)
        reply = await conn.send(pack(b"EVALSHA", sha, count, *keys, *args), within)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            command = pack(b"EVAL", script.encode("utf-8"), count, *keys, *args)
            reply = await conn.send(command, within)
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply

    async def connect(self) -> _Replies:
        """The open connection, opened now if there is none (one opening for every caller;
        a caller that stops waiting does not stop it)."""
        if self._conn is not None and self._conn.lost is None:
            return self._conn
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(self._open())
            self._opening.add_done_callback(_retrieved)
        return await asyncio.shield(self._opening)

    async def _open(self) -> _Replies:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Replies, self.host, self.port), CONNECT_TIMEOUT
        )
        try:
            for command, refused in self._hello:
                reply = await asyncio.wait_for(conn.send(command), CONNECT_TIMEOUT)
                if isinstance(reply, hiredis.ReplyError):
                    # Redis's own words ("WRONGPASS ..."): they never quote the password.
                    raise refused(str(reply))
        except BaseException:
            conn._close(ConnectionError("closed while opening"))
            raise
        self._conn = conn
        return conn

    async def aclose(self) -> None:
        """Close the connection (calls in flight on it fail); its socket is closed on return."""
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._conn is not None:
            self._conn._close(ConnectionError("the channel was closed"))
            self._conn = None
            await asyncio.sleep(0)  # the transport closes its socket at the loop's next turn


def _retrieved(task: asyncio.Task[Any]) -> None:
    """An opening that failed after its callers gave up: its error is theirs to have seen
    (the next call tries again), not one to report as never retrieved."""
    if not task.cancelled():
        task.exception()


__all__ = ["ScriptChannel", "pack"]
