"""After a failure that another key would not have had: try that other key, or say when to.

A request that was not streamed is re-sent on another key before the client sees anything
(through mitmproxy's replay machinery, so each attempt is a flow of its own, in mitmweb and in
saved flows). A streamed request is not replayed (a replayed answer comes back buffered): its
client gets a 429 saying when the pool can serve again, 0 s when another key is ready, so the
SDK's own retry lands on a healthy key with streaming intact.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from mitmproxy import ctx, http
from mitmproxy.addons.clientplayback import ReplayHandler

from .core.refusal import Refusal, render
from .core.signals import FailureKind, Signal
from .engine import pool_available_at

if TYPE_CHECKING:
    from .addon import Rotor, Served

log = logging.getLogger("kmi_rotor")

META = "kmi_rotor"
KEY_UNUSABLE = (FailureKind.RATE_LIMITED, FailureKind.QUOTA, FailureKind.AUTH)


async def run(rotor: Rotor, flow: http.HTTPFlow, served: Served, sig: Signal) -> None:
    """Fail over, or answer with the pool's next availability."""
    if served.stream_request:
        _point_to_pool(rotor, flow, served, sig)
        return
    assert rotor.settings is not None and rotor.engine is not None
    tried = {served.key.fingerprint}
    failed = served.key.fingerprint  # the key the next attempt is a retry of
    notes: list[str] = []
    last = sig.kind.value
    for attempt in range(served.attempt + 1, rotor.settings.failover.max_attempts + 1):
        now = rotor.clock()
        if pool_available_at(rotor.engine, served.pool, now, frozenset(tried)) != now:
            break
        copy = await _replay(flow, attempt, tried, failed)
        meta = copy.metadata.get(META, {})
        if copy.response is None or meta.get("local") or "fingerprint" not in meta:
            break
        tried.add(meta["fingerprint"])
        failed = meta["fingerprint"]
        flow.response = copy.response
        notes.append(f"retried on {meta['key']} ({copy.response.status_code})")
        last = meta.get("outcome", "")
        if last not in {k.value for k in (*KEY_UNUSABLE, FailureKind.OVERLOADED)}:
            break
    if notes:
        flow.comment += " · " + " · ".join(notes)
        flow.metadata[META]["failover"] = notes
    if last in {k.value for k in KEY_UNUSABLE}:
        # Out of attempts on a failure another key would not have: say when the pool can
        # serve (0 s when a key is ready), rather than pass on, say, a 401 nobody retries.
        _point_to_pool(rotor, flow, served, sig)


async def _replay(flow: http.HTTPFlow, attempt: int, tried: set[str], after: str) -> http.HTTPFlow:
    copy = flow.copy()
    copy.response = None
    copy.error = None
    copy.is_replay = "request"
    copy.comment = ""
    copy.marked = ""
    retry = {"attempt": attempt, "exclude": sorted(tried), "of": flow.id, "after": after}
    copy.metadata[META] = {"retry": retry}
    await ReplayHandler(copy, ctx.options).replay()
    return copy


def _point_to_pool(rotor: Rotor, flow: http.HTTPFlow, served: Served, sig: Signal) -> None:
    """Answer 429 with when the pool can serve again (0 s when another key is ready now)."""
    assert rotor.engine is not None and flow.response is not None
    now = rotor.clock()
    at = pool_available_at(rotor.engine, served.pool, now, frozenset())
    keys = tuple(rotor.engine.key_status(k, now) for k in served.pool.keys)
    if at is None:
        refusal = Refusal(503, "all_keys_disabled", "every key of the pool is disabled", keys=keys)
    else:
        why = f"key {served.key.label}: {sig.reason}"
        refusal = Refusal(429, "retry_on_another_key", why, at, keys=keys)
    status, headers, body = render(refusal, now)
    body["error"]["upstream_status"] = flow.response.status_code
    flow.response = http.Response.make(status, json.dumps(body).encode(), headers)
    flow.comment += f" · client told to retry in {headers.get('retry-after', '?')}s"
