#!/usr/bin/env python3
"""A fake OpenAI/Anthropic-compatible LLM provider for tests, benchmarks and the demo.

It speaks just enough of both APIs (chat completions, models, messages; plain JSON and
SSE streams) for SDK clients and a proxy in front of it to behave as they would against
the real thing, and it can be told per key to misbehave: reject the key, run out of
quota, be overloaded, enforce rate limits with the various rate-limit header dialects,
cut a stream short or fail in the middle of one.  ``GET .../usages`` answers each key's
configured Kimi Code quota document (404 for keys without one).  A key may have separate
request and token limits per model (``model_limits``), as OpenAI and Anthropic limit per model:
the rate-limit headers of an answer then describe the limits of the model asked for.  Every
API request is
recorded so tests can check what a proxy actually sent, including how many requests were
in flight per key.

Runs on loopback only.  Use it in-process (``FakeProvider`` / ``run_in_thread``) or as
``python scripts/fake_provider.py``, which prints ``fake-provider listening on URL`` once
it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import trustme
from aiohttp import web

__all__ = [
    "FakeProvider",
    "KeyBehaviour",
    "RecordedRequest",
    "extract_credential",
    "go_duration",
    "main",
    "run_in_thread",
]

Mode = Literal["ok", "invalid", "quota", "overloaded", "server_error"]
QuotaStyle = Literal["openai", "kimi", "openrouter", "gemini", "anthropic"]
HeaderDialect = Literal["openai", "anthropic", "xratelimit", "ietf", "none"]
Dialect = Literal["openai", "anthropic"]

DEFAULT_EVENTS = 5
DEFAULT_MODEL = "fake-model"
MODELS = ("fake-model", "fake-model-mini")
# Stats bucket for requests that carried no credential at all (only reachable with
# accept_any, otherwise they are 401s).
NO_CREDENTIAL = "<none>"
# Upper bound for x-fake-events so a typo cannot make a request stream for hours.
MAX_EVENTS = 100_000

_PHRASE = ("Hello", " from", " the", " fake", " provider", ".")
_NON_STREAM_TEXT = "".join(_PHRASE)
_NON_STREAM_TOKENS = len(_PHRASE)

_OPENAI_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. "
    "For more information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
_KIMI_QUOTA_MESSAGE = (
    "You've reached your usage limit for this billing cycle. "
    "Please upgrade your plan or wait for the next billing cycle."
)


@dataclass
class KeyBehaviour:
    """How the fake treats requests made with one key."""

    mode: Mode = "ok"
    quota_style: QuotaStyle = "openai"
    fail_next: list[int] = field(default_factory=list)
    """Statuses for the next requests, in order; 0 drops the connection without an answer."""
    rpm: int | None = None
    rps: int | None = None
    tpm: int | None = None
    headers: HeaderDialect = "none"
    truncate_after: int | None = None
    stream_error_after: int | None = None
    latency: float = 0.0
    usages: dict[str, Any] | None = None
    """What ``GET .../usages`` answers for this key (Kimi Code's quota endpoint); 404 if None."""
    model_limits: dict[str, dict[str, int]] | None = None
    """Per model name, its own ``rpm`` / ``rps`` / ``tpm`` (in place of the key's): requests for
    that model count against, and are told about, that model's windows only."""

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, Mode)
        _check_choice("quota_style", self.quota_style, QuotaStyle)
        _check_choice("headers", self.headers, HeaderDialect)
        # Own the list: fail_next is consumed in place and must not eat the caller's list.
        self.fail_next = [int(status) for status in self.fail_next]
        for name in ("rpm", "rps", "tpm", "truncate_after", "stream_error_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if self.latency < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency!r}")
        if self.usages is not None and not isinstance(self.usages, dict):
            raise ValueError(f"usages must be a JSON object or None, got {self.usages!r}")
        self.model_limits = _check_model_limits(self.model_limits)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str | None) -> KeyBehaviour:
        """Build from JSON-ish config; a bare string is shorthand for ``{"mode": ...}``."""
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(mode=data)  # type: ignore[arg-type]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key behaviour field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def copy(self) -> KeyBehaviour:
        return dataclasses.replace(
            self,
            fail_next=list(self.fail_next),
            usages=deepcopy(self.usages),
            model_limits=deepcopy(self.model_limits),
        )

    def limits_for(self, model: str | None) -> _Limits:
        """The limits a request for `model` counts against: the model's own, else the key's."""
        own = (self.model_limits or {}).get(model or "")
        if own is not None:
            return _Limits(model, own.get("rpm"), own.get("rps"), own.get("tpm"))
        return _Limits(None, self.rpm, self.rps, self.tpm)


_MODEL_LIMIT_FIELDS = ("rpm", "rps", "tpm")


def _check_model_limits(value: Any) -> dict[str, dict[str, int]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"model_limits must be an object of model -> limits, got {value!r}")
    out: dict[str, dict[str, int]] = {}
    for model, limits in value.items():
        if not isinstance(model, str) or not model or not isinstance(limits, dict):
            raise ValueError(f"model_limits: {model!r} must name a model and map to limits")
        unknown = sorted(set(limits) - set(_MODEL_LIMIT_FIELDS))
        if unknown:
            raise ValueError(f"model_limits[{model!r}]: unknown field(s): {', '.join(unknown)}")
        for name, n in limits.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"model_limits[{model!r}].{name} must be a non-negative integer")
        out[model] = dict(limits)
    return out


@dataclass(frozen=True)
class _Limits:
    """The windows one request counts against: a model's own (`model` set) or the key's."""

    model: str | None
    rpm: int | None
    rps: int | None
    tpm: int | None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.rps is not None or self.tpm is not None


def _check_choice(name: str, value: object, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _remember_sni(conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
    """Keep the server name of a handshake on its connection, for the requests that follow."""
    conn.fake_provider_sni = name  # type: ignore[attr-defined]


def _sni_of(request: web.Request) -> str | None:
    transport = request.transport
    conn = transport.get_extra_info("ssl_object") if transport is not None else None
    return getattr(conn, "fake_provider_sni", None)


@dataclass
class RecordedRequest:
    """One API request as the fake saw it, and what it answered."""

    time: float
    method: str
    path: str
    host: str | None
    credential: str | None
    credential_source: str | None
    headers: dict[str, str]
    body: Any
    sni: str | None = None
    """The TLS server name the client's handshake gave (None: plain HTTP or no SNI)."""
    status: int = 0
    stream: bool = False
    started: float = 0.0
    ended: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Windows:
    # Monotonic times of requests admitted by the limiter; rejected ones do not use up
    # capacity, as with real providers.
    admitted: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)

    def clear(self) -> None:
        self.admitted.clear()
        self.tokens.clear()


@dataclass
class _KeyState(_Windows):
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    inflight: int = 0
    max_inflight: int = 0
    models: dict[str, _Windows] = field(default_factory=dict)
    """The windows of models that have limits of their own."""

    def windows(self, limits: _Limits) -> _Windows:
        if limits.model is None:
            return self
        return self.models.setdefault(limits.model, _Windows())


@dataclass(frozen=True)
class _Usage:
    limit: int
    remaining: int
    reset: float
    window: float


def extract_credential(
    headers: Mapping[str, str], query: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """Return ``(credential, source)`` using the precedence real gateways apply."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip(), "authorization"
    for name in ("x-api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value:
            return value, name
    value = query.get("key")
    if value:
        return value, "query:key"
    return None, None


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String`` (``12ms``, ``1s``, ``6m0s``, ``2m59.56s``)."""
    if seconds <= 0:
        return "0s"
    if round(seconds * 1000, 2) < 1000:
        return f"{_trim(seconds * 1000)}ms"
    # Round once, in centiseconds, so 59.999 s becomes 1m0s and never 60s.
    centis = round(seconds * 100)
    hours, centis = divmod(centis, 360_000)
    minutes, centis = divmod(centis, 6_000)
    out = ""
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{_trim(centis / 100)}s"


def _trim(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _prompt_tokens(body: Any) -> int:
    texts: list[str] = []
    if isinstance(body, dict):
        texts.extend(_texts(body.get("system")))
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, dict):
                    texts.extend(_texts(message.get("content")))
    return max(1, sum(len(text) for text in texts) // 4)


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


_ERRORS: dict[int, tuple[str, str | None, str, str]] = {
    # status: (openai type, openai code, anthropic type, message)
    400: ("invalid_request_error", None, "invalid_request_error", "Bad request"),
    401: ("invalid_request_error", "invalid_api_key", "authentication_error", "Invalid API key"),
    402: ("insufficient_quota", "insufficient_quota", "billing_error", "Payment required"),
    403: ("permission_error", None, "permission_error", "Forbidden"),
    404: ("invalid_request_error", "not_found", "not_found_error", "Not found"),
    405: ("invalid_request_error", None, "invalid_request_error", "Method not allowed"),
    408: ("timeout", None, "timeout_error", "Request timed out"),
    429: ("requests", "rate_limit_exceeded", "rate_limit_error", "Rate limit reached"),
    500: ("server_error", None, "api_error", "The server had an error processing your request"),
    502: ("server_error", None, "api_error", "Bad gateway"),
    503: ("server_error", "overloaded", "overloaded_error", "The engine is currently overloaded"),
    504: ("timeout", None, "timeout_error", "Gateway timeout"),
    529: ("server_error", "overloaded", "overloaded_error", "Overloaded"),
}


def _error_body(status: int, dialect: Dialect, message: str | None = None) -> dict[str, Any]:
    openai_type, code, anthropic_type, default_message = _ERRORS.get(
        status, ("server_error", None, "api_error", f"Error {status}")
    )
    text = message or default_message
    if dialect == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": text}}
    return {"error": {"message": text, "type": openai_type, "param": None, "code": code}}


def _unauthorized_body(dialect: Dialect) -> dict[str, Any]:
    if dialect == "anthropic":
        return {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
    return {
        "error": {
            "message": "Incorrect API key provided",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }


def _quota_error(style: QuotaStyle) -> tuple[int, dict[str, Any]]:
    if style == "kimi":
        return 403, {
            "error": {"message": _KIMI_QUOTA_MESSAGE, "type": "exceeded_current_quota_error"}
        }
    if style == "openrouter":
        return 402, {
            "error": {
                "code": 402,
                "message": "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
            }
        }
    if style == "gemini":
        return 429, {
            "error": {
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "message": "You exceeded your current quota, please check your plan and billing "
                "details.",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}
                        ],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"},
                ],
            }
        }
    if style == "anthropic":
        return 400, {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "Your credit balance is too low to access the Anthropic API.",
            },
        }
    return 429, {
        "error": {
            "message": _OPENAI_QUOTA_MESSAGE,
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }


def _count_usage(times: deque[float], limit: int, window: float, now: float) -> _Usage:
    while times and times[0] <= now - window:
        times.popleft()
    # As real providers mean it: the time until the window is fully replenished.
    reset = times[-1] + window - now if times else 0.0
    return _Usage(limit, max(0, limit - len(times)), reset, window)


def _token_usage(
    entries: deque[tuple[float, int]], limit: int, window: float, now: float
) -> _Usage:
    while entries and entries[0][0] <= now - window:
        entries.popleft()
    used = sum(n for _, n in entries)
    reset = entries[-1][0] + window - now if entries else 0.0
    return _Usage(limit, max(0, limit - used), reset, window)


def _count_wait(times: deque[float], limit: int, window: float, now: float) -> float:
    """Seconds until one more request fits, given the window is full."""
    if limit == 0 or len(times) < limit:
        return window
    return times[len(times) - limit] + window - now


def _token_wait(
    entries: deque[tuple[float, int]], limit: int, need: int, window: float, now: float
) -> float:
    used = sum(n for _, n in entries)
    for at, n in entries:
        used -= n
        if used + need <= limit:
            return at + window - now
    return window


def _ratelimit_headers(
    dialect: HeaderDialect, requests: _Usage | None, tokens: _Usage | None, wall: float
) -> dict[str, str]:
    out: dict[str, str] = {}
    if dialect == "openai":
        for kind, usage in (("requests", requests), ("tokens", tokens)):
            if usage is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(usage.limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(usage.remaining)
                out[f"x-ratelimit-reset-{kind}"] = go_duration(usage.reset)
    elif dialect == "anthropic":
        for kind, usage in (("requests", requests), ("tokens", tokens)):
            if usage is not None:
                out[f"anthropic-ratelimit-{kind}-limit"] = str(usage.limit)
                out[f"anthropic-ratelimit-{kind}-remaining"] = str(usage.remaining)
                out[f"anthropic-ratelimit-{kind}-reset"] = _rfc3339(wall + usage.reset)
    elif dialect == "xratelimit" and requests is not None:
        out["X-RateLimit-Limit"] = str(requests.limit)
        out["X-RateLimit-Remaining"] = str(requests.remaining)
        out["X-RateLimit-Reset"] = str(int((wall + requests.reset) * 1000))
    elif dialect == "ietf" and requests is not None:
        window = max(1, math.ceil(requests.window))
        out["RateLimit-Policy"] = f'"default";q={requests.limit};w={window}'
        out["RateLimit"] = f'"default";r={requests.remaining};t={math.ceil(requests.reset)}'
    return out


def _sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _cut_connection(request: web.Request) -> None:
    # close(), not abort(): already written events must still reach the client; what
    # matters is that the chunked body never gets its terminator.
    transport = request.transport
    if transport is not None:
        transport.close()


def _drop_connection(request: web.Request) -> web.StreamResponse:
    """Reset the connection before any answer (a provider that fails mid-request); the
    request is recorded with status 0."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:  # SO_LINGER 0: the peer sees a reset, not an orderly close
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise asyncio.CancelledError


class FakeProvider:
    """The fake provider server; see the module docstring."""

    def __init__(
        self,
        keys: Mapping[str, KeyBehaviour] | None = None,
        *,
        accept_any: bool = False,
        event_delay: float = 0.02,
        tls: trustme.CA | None = None,
        tls_hostnames: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        dialect_default: Dialect = "openai",
        time_scale: float = 1.0,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.accept_any = accept_any
        self.event_delay = event_delay
        self.tls = tls
        self.tls_hostnames = tuple(tls_hostnames)
        self.host = host
        self.dialect_default: Dialect = dialect_default
        self.time_scale = time_scale
        self._requested_port = port
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        # Handlers run on the server loop while tests read from their own thread.
        self._lock = threading.Lock()
        self._keys: dict[str, KeyBehaviour] = {}
        self._log: list[RecordedRequest] = []
        self._states: dict[str, _KeyState] = {}
        self._inflight = 0
        self._max_inflight = 0
        if keys:
            self.set_keys(keys)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("already started")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # access_log=None: the access log would be the one place credentials could leak.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, ssl_context=self._ssl_context())
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert = self.tls.issue_cert("127.0.0.1", "localhost", *self.tls_hostnames)
        cert.configure_cert(ctx)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = _remember_sni
        return ctx

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("provider is not started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    # -- inspection and control (safe from any thread) -------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [dataclasses.replace(r) for r in self._log]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": len(self._log),
                "inflight": self._inflight,
                "max_inflight": self._max_inflight,
                "keys": {
                    label: {
                        "requests": state.requests,
                        "inflight": state.inflight,
                        "max_inflight": state.max_inflight,
                        "statuses": {str(k): v for k, v in sorted(state.statuses.items())},
                    }
                    for label, state in self._states.items()
                },
            }

    def set_keys(
        self,
        keys: Mapping[str, KeyBehaviour | Mapping[str, Any] | str | None],
        *,
        replace: bool = False,
    ) -> None:
        """Add or overwrite key behaviours; with ``replace`` drop all others first."""
        parsed = {
            key: value.copy() if isinstance(value, KeyBehaviour) else KeyBehaviour.from_dict(value)
            for key, value in keys.items()
        }
        with self._lock:
            if replace:
                self._keys.clear()
            self._keys.update(parsed)

    def reset(self) -> None:
        """Forget recorded requests, counters and rate-limit windows; keep key behaviours."""
        with self._lock:
            self._log.clear()
            self._max_inflight = self._inflight
            for state in self._states.values():
                # In-flight requests still decrement on completion, so keep that count.
                state.requests = 0
                state.statuses.clear()
                state.max_inflight = state.inflight
                state.clear()
                state.models.clear()

    # -- HTTP ------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_fake/"):
            return await self._admin(request, path.removeprefix("/_fake/"))
        trimmed = path.rstrip("/")
        if trimmed.endswith("/chat/completions"):
            return await self._api(request, "openai", "chat", "POST")
        if trimmed.endswith("/messages"):
            return await self._api(request, "anthropic", "messages", "POST")
        if trimmed.endswith("/models"):
            # Anthropic's SDK lists models too, and expects its own error shape.
            dialect: Dialect = "anthropic" if "anthropic-version" in request.headers else "openai"
            return await self._api(request, dialect, "models", "GET")
        if trimmed.endswith("/usages"):
            return await self._api(request, "openai", "usages", "GET")
        return await self._api(request, self.dialect_default, None, None)

    async def _admin(self, request: web.Request, name: str) -> web.StreamResponse:
        method = request.method
        if name == "health" and method == "GET":
            return web.Response(text="ok")
        if name == "requests" and method == "GET":
            return web.json_response([r.to_dict() for r in self.requests])
        if name == "stats" and method == "GET":
            return web.json_response(self.stats())
        if name == "reset" and method == "POST":
            self.reset()
            return web.json_response({"ok": True})
        if name == "keys" and method == "POST":
            try:
                data = await request.json()
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of key -> behaviour")
                self.set_keys(data)
            except (ValueError, TypeError) as exc:
                return web.json_response({"ok": False, "error": str(exc)}, status=400)
            return web.json_response({"ok": True, "keys": len(data)})
        return web.json_response({"ok": False, "error": "no such admin endpoint"}, status=404)

    async def _api(
        self, request: web.Request, dialect: Dialect, kind: str | None, method: str | None
    ) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lower = name.lower()
            headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
        credential, source = extract_credential(headers, request.query)
        stream = (
            kind in ("chat", "messages") and isinstance(body, dict) and body.get("stream") is True
        )
        now = time.time()
        record = RecordedRequest(
            time=now,
            method=request.method,
            path=request.path,
            host=request.headers.get("Host"),
            credential=credential,
            credential_source=source,
            headers=headers,
            body=body,
            sni=_sni_of(request),
            stream=stream,
            started=now,
        )
        label = credential if credential is not None else NO_CREDENTIAL
        with self._lock:
            self._log.append(record)
            state = self._states.setdefault(label, _KeyState())
            state.requests += 1
            state.inflight += 1
            state.max_inflight = max(state.max_inflight, state.inflight)
            self._inflight += 1
            self._max_inflight = max(self._max_inflight, self._inflight)
        try:
            if kind is None:
                return await self._reply_error(request, record, 404, dialect)
            if request.method != method:
                return await self._reply_error(request, record, 405, dialect)
            return await self._serve(request, record, state, dialect, kind, credential, body)
        finally:
            with self._lock:
                state.inflight -= 1
                self._inflight -= 1
                record.ended = time.time()
                state.statuses[record.status] = state.statuses.get(record.status, 0) + 1

    async def _serve(
        self,
        request: web.Request,
        record: RecordedRequest,
        state: _KeyState,
        dialect: Dialect,
        kind: str,
        credential: str | None,
        body: Any,
    ) -> web.StreamResponse:
        with self._lock:
            behaviour = self._keys.get(credential) if credential is not None else None
        if behaviour is None:
            if not self.accept_any:
                return await self._reply_json(request, record, 401, _unauthorized_body(dialect))
            behaviour = KeyBehaviour()
        if behaviour.latency:
            await asyncio.sleep(behaviour.latency)
        if kind == "usages":
            return await self._usages(request, record, behaviour, dialect)

        events = self._events(request)
        prompt_tokens = _prompt_tokens(body)
        completion_tokens = events if record.stream else _NON_STREAM_TOKENS
        asked = body.get("model") if isinstance(body, dict) else None
        limits = behaviour.limits_for(asked if isinstance(asked, str) else None)
        mono, wall = time.monotonic(), time.time()
        with self._lock:
            windows = state.windows(limits)
            forced = behaviour.fail_next.pop(0) if behaviour.fail_next else None
            if (forced is not None and forced >= 400) or behaviour.mode != "ok":
                rejected: float | None = None
            else:
                rejected = self._admit(limits, windows, prompt_tokens + completion_tokens, mono)
            rl_headers = self._usage_headers(behaviour.headers, limits, windows, mono, wall)

        if forced == 0:
            return _drop_connection(request)
        if forced is not None and forced >= 400:
            return await self._reply_json(
                request, record, forced, _error_body(forced, dialect), rl_headers
            )
        if behaviour.mode != "ok":
            status, error = self._mode_error(behaviour, dialect)
            return await self._reply_json(request, record, status, error, rl_headers)
        if rejected is not None:
            rl_headers["retry-after"] = str(max(1, math.ceil(rejected)))
            message = f"Rate limit reached for {limits.model}" if limits.model else None
            return await self._reply_json(
                request, record, 429, _error_body(429, dialect, message), rl_headers
            )

        model = body.get("model") if isinstance(body, dict) else None
        model = model if isinstance(model, str) and model else DEFAULT_MODEL
        if kind == "models":
            listing = {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake-provider"}
                    for m in MODELS
                ],
            }
            return await self._reply_json(request, record, 200, listing, rl_headers)
        if not record.stream:
            answer = (
                self._anthropic_message(model, prompt_tokens)
                if kind == "messages"
                else self._openai_completion(model, prompt_tokens)
            )
            return await self._reply_json(request, record, 200, answer, rl_headers)

        delay = self._delay(request)
        with self._lock:
            record.status = 200
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **rl_headers,
            },
        )
        try:
            await response.prepare(request)
            if kind == "messages":
                await self._stream_anthropic(
                    request, response, behaviour, model, prompt_tokens, events, delay
                )
            else:
                options = body.get("stream_options") if isinstance(body, dict) else None
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                await self._stream_openai(
                    request,
                    response,
                    behaviour,
                    model,
                    prompt_tokens,
                    events,
                    delay,
                    include_usage,
                )
        except ConnectionError:
            # The client went away mid-stream; nothing left to tell it.
            pass
        return response

    async def _usages(
        self,
        request: web.Request,
        record: RecordedRequest,
        behaviour: KeyBehaviour,
        dialect: Dialect,
    ) -> web.StreamResponse:
        """Kimi Code's quota endpoint: the key's configured document, verbatim.

        It sits outside the API's rate limits and ``fail_next``: a background poller must not
        eat failures meant for the requests a test makes.
        """
        if behaviour.mode == "invalid":
            return await self._reply_json(request, record, 401, _unauthorized_body(dialect))
        if behaviour.usages is None:
            return await self._reply_error(request, record, 404, dialect)
        return await self._reply_json(request, record, 200, deepcopy(behaviour.usages))

    def _admit(self, behaviour: _Limits, state: _Windows, tokens: int, now: float) -> float | None:
        """Admit the request into its windows (the key's or its model's), or return seconds
        until it would fit."""
        minute = 60.0 * self.time_scale
        waits: list[float] = []
        if behaviour.rps is not None:
            second = 1.0 * self.time_scale
            # rps and rpm share the admitted log; the rps window only looks at its tail.
            recent = deque(t for t in state.admitted if t > now - second)
            if len(recent) >= behaviour.rps:
                waits.append(_count_wait(recent, behaviour.rps, second, now))
        if behaviour.rpm is not None:
            usage = _count_usage(state.admitted, behaviour.rpm, minute, now)
            if usage.remaining <= 0:
                waits.append(_count_wait(state.admitted, behaviour.rpm, minute, now))
        if behaviour.tpm is not None:
            usage = _token_usage(state.tokens, behaviour.tpm, minute, now)
            if usage.remaining < tokens:
                waits.append(_token_wait(state.tokens, behaviour.tpm, tokens, minute, now))
        if waits:
            return max(waits)
        if behaviour.rpm is not None or behaviour.rps is not None:
            state.admitted.append(now)
            # Keep only what the longest configured window can still see, so keys that
            # serve many requests do not grow the log without bound.
            horizon = minute if behaviour.rpm is not None else 1.0 * self.time_scale
            while state.admitted and state.admitted[0] <= now - horizon:
                state.admitted.popleft()
        if behaviour.tpm is not None:
            state.tokens.append((now, tokens))
        return None

    def _usage_headers(
        self, dialect: HeaderDialect, behaviour: _Limits, state: _Windows, mono: float, wall: float
    ) -> dict[str, str]:
        """The dialect's rate-limit headers, describing the windows the request counted against."""
        if dialect == "none":
            return {}
        minute = 60.0 * self.time_scale
        requests = (
            _count_usage(state.admitted, behaviour.rpm, minute, mono)
            if behaviour.rpm is not None
            else None
        )
        tokens = (
            _token_usage(state.tokens, behaviour.tpm, minute, mono)
            if behaviour.tpm is not None
            else None
        )
        return _ratelimit_headers(dialect, requests, tokens, wall)

    @staticmethod
    def _mode_error(behaviour: KeyBehaviour, dialect: Dialect) -> tuple[int, dict[str, Any]]:
        if behaviour.mode == "invalid":
            return 401, _unauthorized_body(dialect)
        if behaviour.mode == "quota":
            return _quota_error(behaviour.quota_style)
        if behaviour.mode == "overloaded":
            status = 529 if dialect == "anthropic" else 503
            return status, _error_body(status, dialect)
        return 500, _error_body(500, dialect)

    def _events(self, request: web.Request) -> int:
        value = _int_header(request, "x-fake-events")
        return DEFAULT_EVENTS if value is None else min(max(1, value), MAX_EVENTS)

    def _delay(self, request: web.Request) -> float:
        value = _int_header(request, "x-fake-delay-ms")
        return self.event_delay if value is None else value / 1000

    async def _reply_error(
        self, request: web.Request, record: RecordedRequest, status: int, dialect: Dialect
    ) -> web.StreamResponse:
        return await self._reply_json(request, record, status, _error_body(status, dialect))

    async def _reply_json(
        self,
        request: web.Request,
        record: RecordedRequest,
        status: int,
        payload: Any,
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        with self._lock:
            record.status = status
        response = web.json_response(payload, status=status, headers=dict(headers or {}))
        # Send it here rather than after the handler returns, so the in-flight count
        # covers the whole exchange.
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write_eof()
        return response

    @staticmethod
    def _openai_completion(model: str, prompt_tokens: int) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _NON_STREAM_TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": _NON_STREAM_TOKENS,
                "total_tokens": prompt_tokens + _NON_STREAM_TOKENS,
            },
        }

    @staticmethod
    def _anthropic_message(model: str, prompt_tokens: int) -> dict[str, Any]:
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": _NON_STREAM_TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": _NON_STREAM_TOKENS},
        }

    async def _stream_openai(
        self,
        request: web.Request,
        response: web.StreamResponse,
        behaviour: KeyBehaviour,
        model: str,
        prompt_tokens: int,
        events: int,
        delay: float,
        include_usage: bool,
    ) -> None:
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        # One pass more than there are events so a limit equal to ``events`` still cuts
        # or fails before the terminal frames.
        for i in range(events + 1):
            if behaviour.truncate_after is not None and i >= behaviour.truncate_after:
                _cut_connection(request)
                return
            if behaviour.stream_error_after is not None and i >= behaviour.stream_error_after:
                await response.write(
                    _sse(
                        {
                            **base,
                            "error": {"code": 502, "message": "Provider returned error"},
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {"content": ""},
                                    "finish_reason": "error",
                                    "native_finish_reason": "error",
                                }
                            ],
                        }
                    )
                )
                await response.write(_sse("[DONE]"))
                await response.write_eof()
                return
            if i == events:
                break
            await asyncio.sleep(delay)
            delta: dict[str, Any] = {"content": _PHRASE[i % len(_PHRASE)]}
            if i == 0:
                delta = {"role": "assistant", **delta}
            finish = "stop" if i == events - 1 else None
            await response.write(
                _sse(
                    {
                        **base,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    }
                )
            )
        if include_usage:
            await response.write(
                _sse(
                    {
                        **base,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": events,
                            "total_tokens": prompt_tokens + events,
                        },
                    }
                )
            )
        await response.write(_sse("[DONE]"))
        await response.write_eof()

    async def _stream_anthropic(
        self,
        request: web.Request,
        response: web.StreamResponse,
        behaviour: KeyBehaviour,
        model: str,
        prompt_tokens: int,
        events: int,
        delay: float,
    ) -> None:
        await response.write(
            _sse(
                {
                    "type": "message_start",
                    "message": {
                        "id": f"msg_{uuid.uuid4().hex[:24]}",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": prompt_tokens, "output_tokens": 1},
                    },
                },
                "message_start",
            )
        )
        await response.write(
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            )
        )
        for i in range(events + 1):
            if behaviour.truncate_after is not None and i >= behaviour.truncate_after:
                _cut_connection(request)
                return
            if behaviour.stream_error_after is not None and i >= behaviour.stream_error_after:
                await response.write(
                    _sse(
                        {
                            "type": "error",
                            "error": {"type": "overloaded_error", "message": "Overloaded"},
                        },
                        "error",
                    )
                )
                await response.write_eof()
                return
            if i == events:
                break
            await asyncio.sleep(delay)
            await response.write(
                _sse(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": _PHRASE[i % len(_PHRASE)]},
                    },
                    "content_block_delta",
                )
            )
        await response.write(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        await response.write(
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": events},
                },
                "message_delta",
            )
        )
        await response.write(_sse({"type": "message_stop"}, "message_stop"))
        await response.write_eof()


def _int_header(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


@contextlib.contextmanager
def run_in_thread(provider: FakeProvider, *, timeout: float = 10.0) -> Iterator[FakeProvider]:
    """Serve ``provider`` from a background thread with its own event loop.

    Returns once the server accepts connections and stops it on exit.
    """
    ready = threading.Event()
    failure: list[BaseException] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    stop_box: list[asyncio.Event] = []

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            await provider.start()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        loop_box.append(asyncio.get_running_loop())
        stop_box.append(stop)
        ready.set()
        try:
            await stop.wait()
        finally:
            await provider.stop()

    thread = threading.Thread(
        target=asyncio.run, args=(serve(),), name="fake-provider", daemon=True
    )
    thread.start()
    if not ready.wait(timeout):
        raise TimeoutError("fake provider did not start in time")
    if failure:
        thread.join()
        raise failure[0]
    try:
        yield provider
    finally:
        loop_box[0].call_soon_threadsafe(stop_box[0].set)
        thread.join(timeout)


def _load_keys(spec: str | None) -> dict[str, KeyBehaviour]:
    if not spec:
        return {}
    text = Path(spec[1:]).read_text(encoding="utf-8") if spec.startswith("@") else spec
    data = json.loads(text)
    if isinstance(data, list):
        return {str(key): KeyBehaviour() for key in data}
    if not isinstance(data, dict):
        raise ValueError("--keys must be a JSON object (key -> behaviour) or a list of keys")
    return {str(key): KeyBehaviour.from_dict(value) for key, value in data.items()}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="serve HTTPS with a fresh CA whose certificate goes to DIR/ca.pem",
    )
    parser.add_argument(
        "--tls-hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="extra name for the server certificate (repeatable)",
    )
    parser.add_argument(
        "--keys",
        default=None,
        metavar="JSON|@FILE",
        help='key behaviours, e.g. \'{"sk-a": {}, "sk-b": {"mode": "quota"}}\'',
    )
    parser.add_argument(
        "--accept-any", action="store_true", help="accept unknown credentials as well-behaved keys"
    )
    parser.add_argument(
        "--event-delay",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="delay between streamed events",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="rate-limit windows are X times their real length",
    )
    return parser.parse_args(argv)


async def _serve_cli(args: argparse.Namespace) -> None:
    ca: trustme.CA | None = None
    if args.tls_dir is not None:
        ca = trustme.CA()
        args.tls_dir.mkdir(parents=True, exist_ok=True)
        ca.cert_pem.write_to_path(str(args.tls_dir / "ca.pem"))
    provider = FakeProvider(
        _load_keys(args.keys),
        accept_any=args.accept_any,
        event_delay=args.event_delay,
        tls=ca,
        tls_hostnames=args.tls_hostname,
        host=args.host,
        port=args.port,
        time_scale=args.time_scale,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await provider.start()
    try:
        print(f"fake-provider listening on {provider.url}", flush=True)
        await stop.wait()
    finally:
        await provider.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        asyncio.run(_serve_cli(args))
    except (ValueError, OSError) as exc:
        print(f"fake-provider: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
