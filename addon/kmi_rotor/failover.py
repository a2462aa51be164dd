"""After a failure another key would not have had: the same request on another key, before the
client has seen anything; or the pool's answer when no key can serve.

Streamed or not, a request fails over alike. Every attempt after the first is a copy of the
client's flow re-sent through mitmproxy's replay machinery, so that each attempt is a flow of
its own (in mitmweb, saved flows, the trace and the metrics). The first answer that is not such
a failure goes to the client: whole, or, when it streams, relayed as it is generated (see
`relay`), so that its time to first byte grows only by the failed attempts' own time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.addons.clientplayback import ReplayHandler
from mitmproxy.connection import Client

from .config import Settings
from .core import failover as fo
from .core.refusal import Refusal, render
from .engine import Engine
from .names import META
from .relay import DELIVERIES, FEEDS, Delivery, Relay
from .served import Served

log = logging.getLogger("kmi_rotor")

CLIENTS: dict[str, Client] = {}
"""Attempt flow id -> the client its answer is for (an attempt's own client is a stand-in)."""


def client_of(flow: http.HTTPFlow) -> Client:
    """The client that waits for `flow`'s answer: its own, or for an attempt, the original's."""
    return CLIENTS.get(flow.id, flow.client_conn)


def wanted(settings: Settings, flow: http.HTTPFlow, served: Served, outcome: str) -> bool:
    """Whether the client's own attempt, which ended in `outcome`, may be followed by others:
    nothing of its answer reached the client, and its request body is there to send again."""
    if served.tap is not None or flow.request.raw_content is None:
        return False
    if flow.metadata.get(META, {}).get("retry"):  # an attempt of another flow
        return False
    return fo.retry(outcome, served.attempt, settings.failover.max_attempts, True)


async def run(
    engine: Engine,
    settings: Settings,
    flow: http.HTTPFlow,
    served: Served,
    outcome: str,
    why: str,
    clock: Callable[[], float],
) -> None:
    """Attempts on other keys while the last one failed as another key may not, up to
    `[failover] max_attempts`; then the client gets the first answer that did not fail so
    (whole or relayed), or the pool's answer (`why`: what failed first). The attempts are
    admitted by the addon (each is a flow of its own); `engine` says when the pool can serve."""
    tried = {served.key.fingerprint}
    failed = served.key.fingerprint  # the key the next attempt is a retry of
    notes: list[str] = []
    shown = outcome if flow.response is not None else None
    last, attempt, replaced = outcome, served.attempt, False
    handed: Delivery | None = None
    deadline = served.wall + settings.limits.max_wait_seconds
    while True:
        now = clock()
        avoid = frozenset(tried)
        at = engine.pool_available_at(served.pool, now, avoid, served.scope)
        ready = at is not None and at <= max(now, deadline)
        if not fo.retry(last, attempt, settings.failover.max_attempts, ready):
            break
        attempt += 1
        relay = Relay() if served.stream_request else None
        copy = await _attempt(flow, attempt, avoid, relay, deadline, failed)
        meta = copy.metadata.get(META, {})
        if meta.get("local") or "fingerprint" not in meta:  # no key could take it after all
            break
        tried.add(meta["fingerprint"])
        failed = meta["fingerprint"]
        if relay is not None and relay.began.is_set() and copy.response is not None:
            flow.response = _head(copy.response)
            handed, replaced = Delivery(relay), True
            notes.append(f"retried on {meta['key']} ({flow.response.status_code}, streamed)")
            break
        last = meta.get("outcome", "error")
        if copy.response is None:
            notes.append(f"retried on {meta['key']} ({last})")
            continue
        flow.response, shown, replaced = copy.response, last, True
        notes.append(f"retried on {meta['key']} ({copy.response.status_code})")
    if notes:
        flow.comment += " · " + " · ".join(notes)
        flow.metadata[META]["failover"] = notes
    if handed is None and fo.closing(shown) == "pool":
        point_to_pool(engine, flow, served, why, clock())
        replaced = True
    if flow.error is not None and replaced:  # in place of the connection error
        flow.error = None
        handed = handed or Delivery()
    if handed is not None:
        DELIVERIES[flow.id] = handed


async def _attempt(
    flow: http.HTTPFlow,
    attempt: int,
    avoid: frozenset[str],
    relay: Relay | None,
    deadline: float,
    after: str,
) -> http.HTTPFlow:
    """Re-send a copy of `flow` (the addon picks a key outside `avoid`, waiting for one until
    `deadline`; `after`: the key it is a retry of). With a relay: return as soon as its answer
    streams (it goes on, feeding the relay), or once it ended."""
    copy = flow.copy()
    copy.response = None
    copy.error = None
    copy.is_replay = "request"
    copy.comment = ""
    copy.marked = ""
    retry = {
        "attempt": attempt,
        "exclude": sorted(avoid),
        "of": flow.id,
        "deadline": deadline,
        "after": after,
    }
    copy.metadata[META] = {"retry": retry}
    handler = ReplayHandler(copy, ctx.options)
    CLIENTS[copy.id] = flow.client_conn
    try:
        return await _run(handler, copy, relay)
    finally:
        CLIENTS.pop(copy.id, None)


async def _run(handler: ReplayHandler, copy: http.HTTPFlow, relay: Relay | None) -> http.HTTPFlow:
    if relay is None:
        await handler.replay()
        return copy
    FEEDS[copy.id] = relay
    relay.on_cancel = lambda: _stop(handler)
    task = asyncio.ensure_future(handler.replay())
    began = asyncio.ensure_future(relay.began.wait())
    try:
        await asyncio.wait({task, began}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        began.cancel()
    if relay.began.is_set():
        relay.task = task
        task.add_done_callback(lambda _: FEEDS.pop(copy.id, None))
    else:
        FEEDS.pop(copy.id, None)
        await task
    return copy


def _stop(handler: ReplayHandler) -> None:
    """Close the attempt's upstream connection: its client left."""
    for io in list(handler.transports.values()):
        if io.handler is not None:
            io.handler.cancel()


def _head(response: http.Response) -> http.Response:
    """The answer's status and headers for the client's flow; its body is relayed."""
    head = http.Response(
        response.data.http_version,
        response.status_code,
        response.data.reason,
        response.headers.copy(),
        None,
        None,
        response.timestamp_start,
        None,
    )
    return head


def point_to_pool(
    engine: Engine, flow: http.HTTPFlow, served: Served, why: str, now: float
) -> None:
    """Answer 429 with when the pool can serve again (at least a second from now: SDKs ignore
    0), or 503 when every key is disabled; each key's state in the body."""
    pool_at = engine.pool_available_at(served.pool, now, frozenset(), served.scope)
    at = fo.retry_at(pool_at, now)
    keys = tuple(engine.key_status(k, now, served.scope) for k in served.pool.keys)
    if at is None or pool_at is None:
        refusal = Refusal(503, "all_keys_disabled", "every key of the pool is disabled", keys=keys)
    else:
        code = "retry_on_another_key" if pool_at <= now else "pool_exhausted"
        refusal = Refusal(429, code, f"key {served.key.label}: {why}", at, keys=keys)
    status, headers, body = render(refusal, now)
    body["error"]["upstream_status"] = flow.response.status_code if flow.response else None
    flow.response = http.Response.make(status, json.dumps(body).encode(), headers)
    flow.metadata[META]["answered"] = refusal.code
    flow.comment += f" · client told {status} {refusal.code}" + (
        f", retry in {headers['retry-after']}s" if "retry-after" in headers else ""
    )
