"""Helpers for the failover tests: a proxy in either mode with flows saved, streaming clients
(openai and anthropic SDKs without retries, curl), and a TCP front that resets connections."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
from mitmproxy import http, io
from proctools import Mitmdump

from ._streaming_helpers import Timed, anthropic_stream, live_keys, openai_stream

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
EVENTS, DELAY_MS = 6, 120


def stream_headers(events: int = EVENTS, delay_ms: int = DELAY_MS) -> dict[str, str]:
    return {"x-fake-events": str(events), "x-fake-delay-ms": str(delay_ms)}


@dataclass
class Proxy:
    """A running proxy, how clients reach the provider through it, and what it wrote down."""

    m: Mitmdump
    reverse: bool
    base: str
    """The URL clients use: the proxy's (reverse) or the provider's own (HTTPS_PROXY)."""
    bundle: Path | None
    state: Path
    flows_file: Path

    def keys(self) -> dict[str, dict[str, Any]]:
        return live_keys(self.m, reverse=self.reverse)

    def saved_flows(self) -> list[http.HTTPFlow]:
        """The flows mitmdump saved (`-w`); call once it has stopped."""
        with self.flows_file.open("rb") as f:
            return [fl for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]


def openai_client(p: Proxy, http2: bool = False) -> openai.OpenAI:
    transport = openai.DefaultHttpxClient(http2=True) if http2 else None
    return openai.OpenAI(
        base_url=p.base + "/v1", api_key="client-own", max_retries=0, http_client=transport
    )


def anthropic_client(p: Proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=p.base, api_key="client-own", max_retries=0)


@dataclass
class Seen:
    """What a streaming client saw: status, texts (with arrival times), usage, headers."""

    status: int
    texts: list[str]
    arrivals: list[float]
    usage: tuple[int | None, int | None] | None
    headers: dict[str, str]
    body: str = ""

    @property
    def spread(self) -> float:
        return self.arrivals[-1] - self.arrivals[0] if len(self.arrivals) > 1 else 0.0


def _from_timed(t: Timed) -> Seen:
    status, headers, body = 200, {}, ""
    if t.error is not None:
        resp = getattr(t.error, "response", None)
        status = getattr(resp, "status_code", 0) or 0
        headers = dict(resp.headers) if resp is not None else {}
        body = resp.text if resp is not None else str(t.error)
    return Seen(status, t.texts, t.arrivals, t.usage, headers, body)


def stream_with(client: str, p: Proxy, events: int = EVENTS, delay_ms: int = DELAY_MS) -> Seen:
    """One streamed request by `client` (openai, openai-h2: over HTTP/2, anthropic or curl),
    as that client saw it."""
    h = stream_headers(events, delay_ms)
    if client in ("openai", "openai-h2"):
        oa = openai_client(p, http2=client == "openai-h2")
        return _from_timed(openai_stream(oa, "hello", h))
    if client == "anthropic":
        return _from_timed(anthropic_stream(anthropic_client(p), "hello", h))
    return curl_stream(p, h)


def curl_stream(p: Proxy, headers: dict[str, str]) -> Seen:
    """curl -N: each content event's arrival is read from its stdout as it comes."""
    argv = ["curl", "-sS", "-N", "-D", "-", "-X", "POST", f"{p.base}/v1/chat/completions"]
    argv += ["-H", "content-type: application/json", "-H", "authorization: Bearer client-own"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv += ["--data", json.dumps({**CHAT, "stream": True}), "--max-time", "30"]
    if p.bundle is not None:
        argv += ["--proxy", p.m.url, "--cacert", str(p.bundle)]
    else:
        argv += ["--noproxy", "*"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[tuple[float, bytes]] = [(time.monotonic(), line) for line in proc.stdout]
    proc.wait(timeout=30)
    head, body = _split_head(lines)
    status = int(head[0].split()[1]) if head else 0
    hdrs = dict((k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in head[1:]))
    texts, arrivals, usage = [], [], None
    for at, line in body:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = (chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                texts.append(choice["delta"]["content"])
                arrivals.append(at)
    raw = b"".join(line for _, line in body).decode(errors="replace")
    return Seen(status, texts, arrivals, usage, hdrs, raw)


def _split_head(lines: list[tuple[float, bytes]]) -> tuple[list[str], list[tuple[float, bytes]]]:
    """The answer's head lines (after the proxy's CONNECT answer, if any) and its body lines."""
    head: list[str] = []
    for i, (_, line) in enumerate(lines):
        text = line.decode(errors="replace").strip()
        if text:
            head.append(text)
        elif head and not _is_connect(head):
            return head, lines[i + 1 :]
        else:
            head = []
    return head, []


def _is_connect(head: list[str]) -> bool:
    return bool(head) and "connection established" in head[0].lower()


# -- a TCP front that resets connections ---------------------------------------------------------


@contextlib.contextmanager
def resetting_front(target: int, resets: int) -> Iterator[tuple[int, list[str]]]:
    """A TCP port in front of 127.0.0.1:`target`: the first `resets` connections are reset at
    once (the peer's TLS handshake fails), the others are forwarded byte for byte. Yields the
    port and a log of what it did to each connection ("reset" or "forwarded")."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []
    stop = threading.Event()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if len(seen) < resets:
                seen.append("reset")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            seen.append("forwarded")
            up = socket.create_connection(("127.0.0.1", target))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        listener.close()
