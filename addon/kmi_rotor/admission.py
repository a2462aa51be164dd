"""Admission of a request: its tokens estimated, its key chosen by the engine (waiting for
capacity within its deadline) and put where the client put its own credential; or a local
answer that says why not (and when to come back)."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from mitmproxy import ctx, http

from . import request_body
from .answers import answer_locally
from .bookkeeping import Bookkeeping
from .cluster.state import Ask, LocalState
from .config import Pool
from .core import tokens as tk
from .core.body_json import BodyJSON, read_json
from .core.credentials import Writes, writes_of_fields
from .core.header_fields import with_fields
from .core.refusal import Refusal
from .core.scope import model_of_request, scope_of
from .engine import Chosen, Decision, Wait
from .masking import put_all
from .names import META
from .running import Running
from .served import Served
from .waiting import Waiting, upstream_settled

_NONE: frozenset[str] = frozenset()


def put_key(request: http.Request, writes: Writes, secret: str) -> None:
    """`put_all` of `secret` rendered for each of `writes.placements`; for header slots of
    lower-case names (the usual ones), their values made and written in one pass."""
    headers = writes.headers
    if headers is None:
        put_all(request, [(p, p.render(secret)) for p in writes.placements])
        return
    raw = secret.encode("utf-8", "surrogateescape")
    updates = {name: b"Bearer " + raw if bearer else raw for name, bearer in headers}
    held = request.data.headers  # `request.headers`, without its property
    held.fields = with_fields(held.fields, updates)


def before_body(flow: http.HTTPFlow) -> bool:
    """Whether the key must be chosen before the body arrives: a request body that streams
    (stream_large_bodies) leaves with its headers, before the `request` hook."""
    if flow.request.stream:
        return True
    for name, _ in flow.request.data.headers.fields:  # `has_field`, inline: every request
        if name.lower() == b"content-length":
            return False  # not chunked
    return bool(getattr(ctx.options, "stream_large_bodies", None))


class Admission:
    def __init__(
        self,
        served: dict[str, Served],
        books: Bookkeeping,
        waiting: Waiting,
        clock: Callable[[], float],
    ) -> None:
        """`served`: the table of flows holding a key, where an admitted flow goes."""
        self.served = served
        self.books = books
        self.waiting = waiting
        self.clock = clock

    def admit(
        self,
        run: Running,
        flow: http.HTTPFlow,
        pool: Pool,
        body: bytes | None,
        parsed: BodyJSON | None = None,
    ) -> Coroutine[Any, Any, None] | None:
        """Choose the request's key (waiting for capacity within its deadline) and put it in,
        or answer locally why not. `body`: None before it arrived; `parsed`: its parse
        (`read_json(body)`) when the caller has it.

        Done at once when there is nothing to wait for (the usual case: the upstream
        connection is ready, the state is this process's own and the engine does not say to
        wait), and None is returned; else what is left is a coroutine for the caller to await
        (no coroutine is made for every request)."""
        retry = flow.metadata.get(META, {}).get("retry") if flow.is_replay else None
        exclude = frozenset(retry["exclude"]) if retry else _NONE
        arrived = self.clock()
        # A failover attempt may wait as long as what is left of its request's own wait.
        deadline = retry.get("deadline", arrived) if retry else arrived
        if not retry:
            deadline += run.settings.limits.max_wait_seconds
        if body is None:
            tokens = tk.estimate_from_length(request_body.content_length(flow.request))
        else:
            if parsed is None:
                parsed = read_json(body)
            try:
                tokens = tk.estimate_from_body(body, strict=True, parsed=parsed)
            except tk.Unreadable as e:  # refused before a key is chosen: nothing is spent
                answer_locally(flow, Refusal(400, "unreadable_body", str(e)), arrived)
                return None
        affinity = flow.request.headers.get(pool.affinity_header) if pool.affinity_header else None
        # Read once: the budgets and cooldowns this request is admitted against and reports to.
        model = model_of_request(flow.request.path, body, parsed)
        scope = scope_of(pool.limit_scope, pool.preset.name, model)
        attempt = retry["attempt"] if retry else 1
        # In one process the state's `decide` is the engine's, asked without a coroutine.
        local = type(run.state) is LocalState
        if local and upstream_settled(flow):
            now = self.clock()
            d = run.engine.decide(
                pool,
                tokens,
                now,
                deadline=deadline,
                exclude=exclude,
                affinity=affinity,
                scope=scope,
                model=model,
            )
            if not isinstance(d, Wait):
                self._conclude(run, flow, pool, d, attempt, arrived, body is None, scope)
                return None
            first: tuple[Wait, float] | None = (d, now)
        else:
            first = None
        ask = Ask(pool, tokens, arrived, deadline, exclude, affinity, scope, model)
        return self._admit_waiting(run, flow, ask, attempt, arrived, body is None, first)

    async def _admit_waiting(
        self,
        run: Running,
        flow: http.HTTPFlow,
        ask: Ask,
        attempt: int,
        arrived: float,
        before_body: bool,
        first: tuple[Wait, float] | None,
    ) -> None:
        """`admit` once it must wait: for the upstream connection, then for capacity as long
        as the engine says to. `ask`: what the engine is asked (its `now` aside); `first`: the
        engine's first answer, a wait, and when it was asked (the upstream was ready then)."""
        if first is None and not upstream_settled(flow):
            await self.waiting.upstream_ready(flow)
        local = type(run.state) is LocalState
        while True:
            d: Decision
            if first is not None:
                (d, now), first = first, None
            else:
                now = self.clock()
                asked = ask.at(now)
                d = (
                    asked.locally(run.engine)
                    if local
                    else await run.state.decide(run.engine, asked)
                )
            if isinstance(d, Wait):
                if not await self.waiting.capacity(flow, d.until, ask.deadline):
                    answer_locally(
                        flow, Refusal(499, "client_gone", "the client left while waiting"), now
                    )
                    return
                continue
            self._conclude(run, flow, ask.pool, d, attempt, arrived, before_body, ask.scope)
            return

    def _conclude(
        self,
        run: Running,
        flow: http.HTTPFlow,
        pool: Pool,
        d: Chosen | Refusal,
        attempt: int,
        arrived: float,
        before_body: bool,
        scope: str,
    ) -> None:
        """The engine's last word on the request: its key put in (`before_body`: its tokens
        were estimated from its size), or the refusal answered."""
        if isinstance(d, Chosen):
            served = self._inject(run, flow, pool, d, attempt, arrived)
            served.estimated_from_size = before_body
            served.scope = scope
            if scope:
                flow.metadata[META]["scope"] = scope
            return
        self._refused(run, flow, pool, d, arrived, scope)

    def _inject(
        self,
        run: Running,
        flow: http.HTTPFlow,
        pool: Pool,
        chosen: Chosen,
        attempt: int,
        arrived: float,
    ) -> Served:
        key = chosen.key
        # Held first: whatever fails below, the error path finds the reservation and frees it.
        served = Served(
            run, pool, key, chosen.reservation, attempt, time.monotonic(), arrived, flow=flow
        )
        self.served[flow.id] = served
        req = flow.request
        query = req.query.keys() if b"?" in req.data.path else ()  # `"?" in req.path`
        writes = writes_of_fields(req.data.headers.fields, query, pool.preset)
        meta = flow.metadata.setdefault(META, {})
        meta["pool"] = pool.name
        meta["key"] = key.label
        meta["fingerprint"] = key.fingerprint
        meta["attempt"] = attempt
        meta["placements"] = [[kind, name] for kind, name in writes.shown]
        put_key(req, writes, key.secret.get_secret_value())
        flow.comment = f"key {key.label}" + (f" · attempt {attempt}" if attempt > 1 else "")
        self.books.counters(run, key).add("requests")
        if attempt > 1:  # counted on the key the request failed on
            failed = run.engine.keys.get(meta.get("retry", {}).get("after", ""))
            if failed is not None:
                self.books.counters(run, failed).add("retries")
        return served

    def _refused(
        self, run: Running, flow: http.HTTPFlow, pool: Pool, r: Refusal, arrived: float, scope: str
    ) -> None:
        answer_locally(flow, r, self.clock())
        flow.metadata[META]["pool"] = pool.name
        if scope:
            flow.metadata[META]["scope"] = scope
        flow.marked = ":no_entry:"
        if r.status == 429:
            run.keeper.pool_add(pool.name, "local_429")
        outcome = "local_429" if r.status == 429 else "error"
        self.books.trace(run, flow, pool, None, outcome, arrived)
