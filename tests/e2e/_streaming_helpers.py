"""Helpers for the streaming end-to-end tests: configs, timed SDK streams, state readers, and a
hand-driven HTTP/2 client (the SDKs' HTTP/2 transport never resets a stream it stops reading)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import certifi
import httpx2
import openai
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset
from proctools import BIN, Mitmdump, clean_env, wait_until
from rotor_toml import pool, rotor_config

PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_DIR")


def write_rotor_config(
    tmp_path: Path,
    hosts: list[str],
    keys: Mapping[str, str],
    *,
    provider: str = "generic",
    key_limits: Mapping[str, Mapping[str, Any]] | None = None,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A config with one pool holding `keys` (label -> key), in that order.

    `key_limits` maps a label to its `limits`; `tables` are top-level tables such as
    `{"health": {...}}`.
    """
    main = pool("main", hosts, keys, provider=provider)
    for table in main["keys"]:
        if key_limits and table["label"] in key_limits:
            table["limits"] = dict(key_limits[table["label"]])
    return rotor_config(tmp_path / "rotor.toml", tmp_path / "state", [main], **(tables or {}))


def ca_bundle(tmp_path: Path, confdir: Path) -> Path:
    """certifi's roots plus mitmproxy's CA: httpx replaces its trust store with this file."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(
        Path(certifi.where()).read_text() + (confdir / "mitmproxy-ca-cert.pem").read_text()
    )
    return bundle


def clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA settings inherited from the machine for clients created from now on."""
    for name in (*PROXY_ENV, "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def use_https_proxy(monkeypatch: pytest.MonkeyPatch, proxy_url: str, bundle: Path) -> None:
    """Point clients created from now on at the proxy, the way a user does: environment only."""
    clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", proxy_url)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))


# -- what the proxy recorded -------------------------------------------------------------------


def live_keys(m: Mitmdump, *, reverse: bool) -> dict[str, dict[str, Any]]:
    """The proxy's `/_kmi-rotor/api/status`, keys by label."""
    if reverse:
        r = httpx2.get(m.url + "/_kmi-rotor/api/status", trust_env=False, timeout=10)
    else:
        r = httpx2.get(
            "http://kmi-rotor.local/api/status", proxy=m.url, trust_env=False, timeout=10
        )
    r.raise_for_status()
    return {k["label"]: k for pool in r.json()["pools"] for k in pool["keys"]}


def trace(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "trace.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_trace(state_dir: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The first `n` trace records, once the proxy has written them."""
    records = wait_until(
        lambda: t if len(t := trace(state_dir)) >= n else None, timeout, f"{n} trace records"
    )
    return records[:n]


def cli_status(config: Path) -> dict[str, dict[str, Any]]:
    """`kmi-rotor status --json`, keys by label (read from the state file)."""
    out = subprocess.run(
        [str(BIN / "kmi-rotor"), "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
        timeout=30,
    )
    return {k["label"]: k for k in json.loads(out.stdout)["keys"]}


# -- timed SDK streams ---------------------------------------------------------------------------


@dataclass
class Timed:
    """What a client saw of one stream: content arrival times (monotonic), usage, its end."""

    arrivals: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    usage: tuple[int | None, int | None] | None = None
    error: Exception | None = None

    @property
    def spread(self) -> float:
        return self.arrivals[-1] - self.arrivals[0]


def fake_headers(events: int, delay_ms: int) -> dict[str, str]:
    return {"x-fake-events": str(events), "x-fake-delay-ms": str(delay_ms)}


def openai_stream(
    client: openai.OpenAI, prompt: str, headers: dict[str, str], **extra: Any
) -> Timed:
    """A streamed chat completion; records each content chunk's arrival and the usage chunk."""
    seen = Timed()
    try:
        stream = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            extra_headers=headers,
            **extra,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.arrivals.append(time.monotonic())
                seen.texts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                seen.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    except Exception as e:  # a cut or failed stream: the test inspects it
        seen.error = e
    return seen


def anthropic_stream(client: anthropic.Anthropic, prompt: str, headers: dict[str, str]) -> Timed:
    """A streamed message; records each text delta's arrival and the usage it reported."""
    seen = Timed()
    usage_in: int | None = None
    try:
        stream = client.messages.create(
            model="fake-model",
            max_tokens=64,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            extra_headers=headers,
        )
        for event in stream:
            if event.type == "message_start":
                usage_in = event.message.usage.input_tokens
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                seen.arrivals.append(time.monotonic())
                seen.texts.append(event.delta.text)
            elif event.type == "message_delta":
                seen.usage = (usage_in, event.usage.output_tokens)
    except Exception as e:
        seen.error = e
    return seen


# -- HTTP/2 by hand --------------------------------------------------------------------------------


class H2Tunnel:
    """One HTTP/2 connection to `target` through the proxy's CONNECT, driven frame by frame.

    `cancel` sends RST_STREAM(CANCEL), as browsers and Node's undici do when a reader stops, while
    the connection stays open. Blocking; every read is bounded by `timeout`.
    """

    def __init__(
        self, proxy: tuple[str, int], target: tuple[str, int], cafile: Path, timeout: float = 10
    ) -> None:
        host, port = target
        self.authority = f"{host}:{port}"
        raw = socket.create_connection(proxy, timeout)
        raw.sendall(f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed the tunnel")
            head += chunk
        if head.split(b" ", 2)[1] != b"200":
            raise ConnectionError(f"CONNECT refused: {head[:80]!r}")
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        if self.sock.selected_alpn_protocol() != "h2":
            raise ConnectionError("the proxy did not speak HTTP/2")
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.status: dict[int, int] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self._flush()

    def request(self, path: str, headers: Iterable[tuple[str, str]], body: bytes) -> int:
        sid = self.conn.get_next_available_stream_id()
        pseudo = [(":method", "POST"), (":scheme", "https"), (":authority", self.authority)]
        # Real clients send the length they know; without it mitmproxy may forward the body to
        # an HTTP/1.1 upstream unframed.
        length = [("content-length", str(len(body)))]
        self.conn.send_headers(sid, [*pseudo, (":path", path), *headers, *length])
        self.conn.send_data(sid, body, end_stream=True)
        self.bodies[sid] = bytearray()
        self._flush()
        return sid

    def read_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise TimeoutError("HTTP/2 read timed out")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("proxy closed the HTTP/2 connection")
            self._handle(self.conn.receive_data(data))
            self._flush()

    def cancel(self, sid: int) -> None:
        self.conn.reset_stream(sid, ErrorCodes.CANCEL)
        self._flush()

    def close(self) -> None:
        self.conn.close_connection()
        self._flush()
        self.sock.close()

    def _handle(self, events: Iterable[object]) -> None:
        for ev in events:
            if isinstance(ev, ResponseReceived):
                self.status[ev.stream_id] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, DataReceived):
                if ev.stream_id in self.bodies:
                    self.bodies[ev.stream_id] += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded | StreamReset):
                self.ended.add(ev.stream_id)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)
