"""The two ends of `bench_overhead.py`: an upstream that answers in microseconds, and a load
generator that keeps a fixed number of requests in flight.

Both are written on raw asyncio so that their own cost stays small and identical whichever
proxy sits between them:

- `serve_upstream`: HTTP/1.1 (plain or TLS), keep-alive, a precomputed answer to every
  request: a chat completion with OpenAI's rate-limit headers, or with `"stream": true` in
  the body an SSE stream of `events` events (one chunk each, then usage and `[DONE]`).
- `drive`: `concurrency` keep-alive connections, each POSTing a small chat body in a loop;
  through a reverse proxy (plain HTTP to the proxy) or a regular one (CONNECT, then TLS
  trusting the proxy's CA). It returns the completed requests' latencies inside the window.

    python scripts/bench_load.py upstream --cert-dir DIR [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY = "bench-upstream listening on"
_STREAM = re.compile(rb'"stream"\s*:\s*true')
MODEL = "gpt-4o-mini"
RATE_HEADERS = (
    b"x-ratelimit-limit-requests: 1000000\r\n"
    b"x-ratelimit-remaining-requests: 999999\r\n"
    b"x-ratelimit-reset-requests: 1ms\r\n"
    b"x-ratelimit-limit-tokens: 100000000\r\n"
    b"x-ratelimit-remaining-tokens: 99999990\r\n"
    b"x-ratelimit-reset-tokens: 1ms\r\n"
)


def chat_body(stream: bool, size: int = 0) -> bytes:
    """A chat completion request; with `size`, a conversation of about `size` bytes so far
    (turns of about 3 KB each, as an agent sends its whole history every time)."""
    turns = [{"role": "user", "content": "Say hello."}]
    if size > 0:
        turns = [_turn(i) for i in range(max(1, size // 3000))] + turns
    body: dict[str, object] = {"model": MODEL, "messages": turns}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _turn(i: int) -> dict[str, str]:
    words = " ".join(f"w{i}x{j}" for j in range(500))  # about 3 KB, no two turns alike
    return {"role": "assistant" if i % 2 else "user", "content": words[:2980]}


# -- the upstream ---------------------------------------------------------------------------------


def plain_answer() -> bytes:
    body = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
        },
        separators=(",", ":"),
    ).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + RATE_HEADERS
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def stream_answer(events: int) -> bytes:
    """An OpenAI-style chat stream of `events` content events, a usage event and `[DONE]`."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + RATE_HEADERS
    head += b"transfer-encoding: chunked\r\n\r\n"
    parts = []
    for i in range(events):
        delta = {"choices": [{"index": 0, "delta": {"content": f"w{i}"}}], "model": MODEL}
        parts.append(_chunk(b"data: " + json.dumps(delta).encode() + b"\n\n"))
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": events}}
    parts.append(_chunk(b"data: " + json.dumps(usage).encode() + b"\n\n"))
    parts.append(_chunk(b"data: [DONE]\n\n"))
    return head + b"".join(parts) + b"0\r\n\r\n"


def content_length(head: bytes) -> int:
    """The Content-Length of a lower-cased header block ending in CRLF; 0 without one."""
    at = head.find(b"content-length:")
    return int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0


class _Answering(asyncio.Protocol):
    """Reads requests (headers, then a Content-Length body) and writes a canned answer."""

    def __init__(self, plain: bytes, streamed: bytes) -> None:
        self.plain, self.streamed, self.buf = plain, streamed, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            n = content_length(self.buf[: end + 2].lower())
            if len(self.buf) < end + 4 + n:
                return
            body = self.buf[end + 4 : end + 4 + n]
            self.buf = self.buf[end + 4 + n :]
            answer = self.streamed if _STREAM.search(body) else self.plain
            self.transport.write(answer)  # type: ignore[attr-defined]


async def serve_upstream(cert_dir: Path, events: int) -> None:
    """TLS with `cert_dir/server.pem` (key and chain) when it exists; prints READY and port."""
    context = None
    pem = cert_dir / "server.pem"
    if pem.exists():
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pem)
    plain, streamed = plain_answer(), stream_answer(events)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Answering(plain, streamed), "127.0.0.1", 0, ssl=context, backlog=512
    )
    print(READY, server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


# -- the load generator ---------------------------------------------------------------------------


@dataclass
class Target:
    """Where the load goes: `proxy` (host, port); `tunnel_to` (host, port) and `ca` for a
    regular proxy (CONNECT, then TLS trusting `ca`); otherwise plain HTTP to a reverse proxy."""

    proxy: tuple[str, int]
    tunnel_to: tuple[str, int] | None = None
    ca: Path | None = None


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0


async def _open(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    reader, writer = await asyncio.open_connection(*target.proxy)
    if target.tunnel_to is None:
        return reader, writer, f"{target.proxy[0]}:{target.proxy[1]}"
    authority = f"{target.tunnel_to[0]}:{target.tunnel_to[1]}"
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    context = ssl.create_default_context(cafile=str(target.ca))
    await writer.start_tls(context, server_hostname=target.tunnel_to[0])
    return reader, writer, authority


async def _read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"content-length:" in lower:
        await reader.readexactly(content_length(lower))
    elif b"chunked" in lower:
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n") and data != b"0\r\n\r\n":
            got = await reader.read(65536)
            if not got:
                raise ConnectionError("the answer was cut")
            data = data[-8:] + got
    return status


def _request(authority: str, body: bytes) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {authority}\r\n"
        f"authorization: Bearer sk-client-placeholder\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _worker(target: Target, body: bytes, until: list[float], load: Load) -> None:
    reader, writer, authority = await _open(target)
    request = _request(authority, body)
    clock = time.perf_counter
    try:
        while (t0 := clock()) < until[1]:
            writer.write(request)
            status = await _read_answer(reader)
            t1 = clock()
            if t0 >= until[0]:
                if status == 200:
                    load.latencies.append(t1 - t0)
                else:
                    load.errors += 1
    finally:
        writer.close()


async def drive(
    target: Target,
    *,
    seconds: float,
    warmup: float,
    concurrency: int,
    stream: bool,
    body_size: int = 0,
) -> Load:
    """Keep `concurrency` requests in flight for `warmup + seconds`; the latencies of the
    requests started after the warm-up (each worker finishes the one it has in flight).
    `body_size`: `chat_body`'s `size`."""
    load, body = Load(), chat_body(stream, body_size)
    start = time.perf_counter()
    until = [start + warmup, start + warmup + seconds]
    results = await asyncio.gather(
        *(_worker(target, body, until, load) for _ in range(concurrency)), return_exceptions=True
    )
    load.errors += sum(isinstance(r, BaseException) for r in results)
    load.seconds = seconds
    return load


class Clients:
    """Keep-alive connections held open between batches of a fixed number of requests, so
    that a batch costs the proxy its requests alone (no connection set-up)."""

    def __init__(
        self, conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], request: bytes
    ):
        self.conns, self.request = conns, request

    @classmethod
    async def open(cls, target: Target, n: int, stream: bool = False) -> Clients:
        opened = [await _open(target) for _ in range(n)]
        request = _request(opened[0][2], chat_body(stream))
        return cls([(r, w) for r, w, _ in opened], request)

    async def send(self, count: int) -> int:
        """Send `count` requests, spread over the connections (each keeps one in flight); the
        number answered 200."""
        left, ok = [count], [0]

        async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while left[0] > 0:
                left[0] -= 1
                writer.write(self.request)
                status = await _read_answer(reader)  # before `ok` is read: no lost count
                ok[0] += status == 200

        await asyncio.gather(*(one(r, w) for r, w in self.conns))
        return ok[0]

    def close(self) -> None:
        for _, writer in self.conns:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upstream", help="serve the fast upstream and print its port")
    up.add_argument("--cert-dir", type=Path, required=True)
    up.add_argument("--events", type=int, default=50)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_upstream(args.cert_dir, args.events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
