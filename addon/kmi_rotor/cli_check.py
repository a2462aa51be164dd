"""`kmi-rotor check [POOL]`: ask every key's provider the cheapest question, all at once.

Each key is asked at most once, within the limits configured for it (and the proxy's), and not
at all while the state says it is cooling or blocked. Keys found bad or empty are written to
the state as operator actions, so a running proxy disables or blocks them as if its own
traffic had found them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
from filelock import Timeout

from . import config, status
from .config import ConfigError, Key, Pool, Settings
from .core import check as ck
from .core.check import Outcome, Probe, Verdict
from .core.health import KeyHealth
from .core.limiter import Admitted, Limiter, Limits, Reservation
from .core.secrets import mask
from .core.state import Delta, StateDoc
from .store import StateError, StateStore

DEFAULT_TIMEOUT = 10.0
MAX_BODY = 256 * 1024
READ_SIZE = 64 * 1024
MAX_PARALLEL = 16
"""Probes in flight at once: enough for a large pool, few enough not to look like a flood."""


@dataclass(frozen=True)
class Checked:
    key: Key
    verdict: Verdict


# -- one GET, with the key, to the pool's own host -------------------------------------------------


async def fetch(
    probe: Probe, secret: str, timeout: float
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One GET of `probe.url` with the key in its place; raises OSError, TimeoutError,
    ssl.SSLError or h11.ProtocolError when there is no usable answer. Never follows a
    redirect nor uses a proxy from the environment: the key goes to this host only."""
    parts = urlsplit(probe.url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    if not tls and not ck.is_loopback(host):  # probe_for never builds one; a last guard
        raise ValueError("plain http to a host that is not loopback")
    context = ssl.create_default_context() if tls else None
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    value = f"Bearer {secret}" if probe.bearer else secret
    headers = [
        ("Host", parts.netloc.rpartition("@")[2]),
        ("User-Agent", "kmi-rotor-check"),
        ("Accept", "application/json"),
        ("Connection", "close"),
        (probe.header, value),
        *probe.extra,
    ]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if tls else None
        )
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=READ_SIZE)
            writer.write(conn.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return await _answer(conn, reader)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _answer(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[int, list[tuple[str, str]], bytes]:
    status, headers, body = 0, [], bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            body += event.data[: MAX_BODY - len(body)]
            if len(body) >= MAX_BODY:  # more than any answer worth reading
                return status, headers, bytes(body)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if not status:
                raise h11.RemoteProtocolError("closed before an answer")
            return status, headers, bytes(body)


# -- every key, concurrently, within its limits ------------------------------------------------


def _limits(cfg: Any) -> Limits:
    return Limits(**cfg.model_dump(exclude_none=True, include=set(Limits.__dataclass_fields__)))


def limiter_for(settings: Settings, doc: StateDoc, now: float) -> Limiter:
    """The configured limits, with the daily windows the proxies left in the state."""
    limiter = Limiter(
        _limits(settings.limits),
        {k.fingerprint: _limits(k.limits) for k in settings.keys},
        guard=settings.limits.guard,
    )
    if doc.limiter:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            limiter.restore(doc.limiter, now)
    return limiter


async def _admit(limiter: Limiter, key: Key, patience: float) -> Reservation | str:
    """A slot within the key's limits and the proxy's, waiting up to `patience` seconds;
    otherwise the limit that stands in the way."""
    deadline = time.time() + patience
    while True:
        now = time.time()
        got = limiter.try_admit([key.fingerprint], 0, now)
        if isinstance(got, Admitted):
            return got.reservation
        free = got.retry_at if got.retry_at is not None else now + 0.05
        if not got.possible or free > deadline:
            names = ", ".join(
                f"{e.limit} ({'the key' if e.scope.startswith('key:') else 'the proxy'})"
                for e in got.exhausted
            )
            return f"your limit is used up: {names or 'a limit'}; not asked"
        await asyncio.sleep(max(0.0, free - now))


async def check_key(
    pool: Pool, key: Key, health: KeyHealth | None, limiter: Limiter, timeout: float
) -> Verdict:
    """The verdict on one key: from the state when it must not be asked, else from its answer."""
    known = ck.from_state(key.disabled, health, time.time())
    if known is not None:
        return known
    probe = ck.probe_for(pool.preset, pool.hosts, pool.usages_url)
    if isinstance(probe, str):
        return Verdict(Outcome.SKIPPED, f"cannot check: {probe}", probed=False)
    slot = await _admit(limiter, key, timeout)
    if isinstance(slot, str):
        return Verdict(Outcome.RATE_LIMITED, slot, probed=False)
    try:
        code, headers, body = await fetch(probe, key.secret.get_secret_value(), timeout)
    except TimeoutError:
        return ck.unreachable(f"no answer within {timeout:g} s")
    except ssl.SSLCertVerificationError:
        return ck.unreachable("TLS: the host's certificate is not trusted")
    except (OSError, ssl.SSLError, h11.ProtocolError, ValueError) as e:
        return ck.unreachable(_why(e))
    finally:
        limiter.release(slot)
    v = ck.verdict(code, headers, body, time.time(), provider=pool.preset.name, usages=probe.usages)
    return ck.against_state(v, health)


def _why(e: BaseException) -> str:
    """The kind of failure, never the request (which holds the key)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return type(e).__name__


async def check_all(
    settings: Settings, pools: list[Pool], doc: StateDoc, timeout: float
) -> list[Checked]:
    """Every key of `pools`, in their configured order, asked concurrently."""
    limiter = limiter_for(settings, doc, time.time())
    gate = asyncio.Semaphore(MAX_PARALLEL)

    async def one(pool: Pool, key: Key) -> Checked:
        rec = doc.keys.get(key.fingerprint)
        async with gate:
            return Checked(
                key, await check_key(pool, key, rec.health if rec else None, limiter, timeout)
            )

    return list(await asyncio.gather(*(one(p, k) for p in pools for k in p.keys)))


def share(store: StateStore, results: list[Checked], now: float) -> list[Checked]:
    """Write the verdicts a running proxy acts on (operator actions); returns those keys."""
    delta, shared = Delta(), []
    for c in results:
        op = ck.action_for(c.verdict, now)
        if op is not None:
            delta.key(c.key.fingerprint, c.key.label, c.key.pool).operator = op
            shared.append(c)
    if delta:
        store.commit(delta, now)
    return shared


# -- output ------------------------------------------------------------------------------------


def row(c: Checked) -> dict[str, Any]:
    v = c.verdict
    return {
        "pool": c.key.pool,
        "label": c.key.label,
        "masked": mask(c.key.secret.get_secret_value()),
        "fingerprint": c.key.fingerprint,
        "result": v.outcome.value,
        "broken": v.broken,
        "asked": v.probed,
        "http_status": v.status,
        "detail": v.detail,
        "until": v.until,
        "quota": [
            {
                "name": w.dimension if w.period is None else f"{w.dimension}:{w.period}",
                "limit": w.limit,
                "remaining": w.remaining,
                "resets_at": w.reset_at,
            }
            for w in v.windows
        ],
    }


HEAD = ("POOL", "KEY", "MASKED", "RESULT", "RESETS IN", "QUOTA", "DETAIL")


def render(rows: list[dict[str, Any]], now: float) -> str:
    body = [
        (
            r["pool"],
            r["label"],
            r["masked"],
            r["result"],
            status._span(r["until"] - now) if r["until"] else "-",
            _quota(r["quota"]),
            r["detail"],
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(HEAD, *body, strict=False)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (HEAD, *body)
    )


def _quota(quota: list[dict[str, Any]]) -> str:
    parts = [
        f"{q['remaining']:g}"
        + (f"/{q['limit']:g}" if q["limit"] is not None else "")
        + f" {q['name']}"
        for q in quota
        if q["remaining"] is not None
    ]
    return ", ".join(parts[:3]) or "-"


# -- the command ------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Run `kmi-rotor check`: exit 1 when a key is broken (bad credential, no quota or
    unreachable), 0 otherwise."""
    settings = config.load(config.find_config(args.config))
    pools = [p for p in settings.pools if args.pool in (None, p.name)]
    if not pools:
        raise ConfigError(f"no pool named {args.pool!r}")
    if not args.timeout > 0:
        raise ConfigError("--timeout must be more than 0 seconds")
    store = StateStore(settings.state_dir)
    try:
        doc = store.read()
    except StateError as e:
        raise ConfigError(f"state: {e}") from None
    results = asyncio.run(check_all(settings, pools, doc, args.timeout))
    now = time.time()
    try:
        shared = share(store, results, now)
    except (OSError, StateError, Timeout) as e:  # the verdicts are still worth printing
        print(f"kmi-rotor: verdicts not written to the state: {e}", file=sys.stderr)
        shared = []
    rows = [row(c) for c in results]
    broken = sum(1 for r in rows if r["broken"])
    if args.json:
        print(
            json.dumps(
                {"keys": rows, "broken": broken, "shared": [c.key.label for c in shared]}, indent=2
            )
        )
    else:
        print(render(rows, now))
        if shared:
            print(
                f"written to the state: {', '.join(c.key.label for c in shared)} "
                "(a running proxy applies it within 2 s)"
            )
    sys.stdout.flush()
    return 1 if broken else 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the `check` subcommand to the `kmi-rotor` parser's subcommands."""
    p = sub.add_parser(
        "check",
        help="ask each key's provider whether it works (exit 1 when one is broken)",
        description=__doc__,
    )
    p.add_argument("pool", nargs="?", help="only this pool (default: every pool)")
    p.add_argument("--config", metavar="PATH", help="config file (default: as the addon)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for one key's answer (default {DEFAULT_TIMEOUT:g})",
    )
    p.set_defaults(func=cmd_check)
