"""The end of a flow that held a key, recorded: what its answer (or its failure) says of the
key goes to the engine, the state file and the shared state; its tokens correct the
reservation and its slot is freed; the flow gets its notes and its trace line."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Final

from mitmproxy import http

from . import relay
from .bookkeeping import Bookkeeping
from .core import outcome as oc
from .core import tokens as tk
from .core.scrub import Scrubber, only_own_words
from .core.signals import FailureKind, Signal, parse_signal
from .scrubbing import scrubber
from .served import Served

OWN_OK = "ok"
"""The reason `parse_signal` gives every success: kmi-rotor's own word, nothing to scrub."""


class Settling:
    def __init__(self, books: Bookkeeping, clock: Callable[[], float]) -> None:
        self.books = books
        self.clock = clock

    def answered(self, flow: http.HTTPFlow, resp: http.Response, served: Served) -> Signal:
        """Record an answer: what it says of the key (to the engine, the state, the shared
        state), its tokens (correcting the reservation), the flow's notes and trace line."""
        run, now = served.run, self.clock()
        body = None if served.tap else resp.raw_content
        status = resp.status_code
        sig = parse_signal(  # the raw pairs: reading Headers by name is quadratic
            status, resp.headers.fields, body, now, provider=served.pool.preset.name
        )
        outcome = _OUTCOMES[sig.kind]
        if served.tap is not None:
            stream = served.tap.finish()
            served.tokens = tokens = oc.stream_tokens(stream)
            sig, outcome = oc.stream_signal(sig, stream)
        else:
            served.tokens = tokens = tk.reported_usage(body)
        if sig.reason != OWN_OK or sig.detail:  # a success's reason is our own word: no secret
            sig = _scrubbed(sig, scrubber(run.settings))
        engine, key, reservation, scope = run.engine, served.key, served.reservation, served.scope
        h = engine.observe(key, sig, now, reservation, scope)
        engine.settle(key, reservation, oc.total(tokens))
        run.state.observed(engine, key, now, scope)
        books = self.books
        counters = books.counters(run, key)
        delta = counters.delta
        delta.health = h
        delta.observe(now, status, None if sig.kind is FailureKind.OK else sig.reason)
        counters.answer(sig, tokens)
        books.annotate(flow, served, sig, outcome)
        books.trace(run, flow, served.pool, served, outcome, served.wall)
        return sig

    def failed(self, flow: http.HTTPFlow, served: Served) -> str:
        """Record a flow that ended in an error; its outcome (`error` before the answer's
        headers, `truncated` mid-stream, `client_gone`)."""
        run, now = served.run, self.clock()
        # mitmproxy's message may quote what the upstream sent: scrubbed for this flow and the
        # key's last error; the key's reason, which other clients may see, quotes nothing.
        reason = scrubber(run.settings)(flow.error.msg if flow.error else "unknown error")
        feeds = relay.FEEDS.get(flow.id)
        client_left = oc.client_left(reason) or bool(feeds and feeds.cancelled)
        stream = served.tap.finish() if served.tap else None
        served.tokens = oc.stream_tokens(stream) if stream else (None, None)
        run.engine.settle(served.key, served.reservation, oc.total(served.tokens))
        counters = self.books.counters(run, served.key)
        if client_left:  # a client that leaves is not the key's fault
            outcome = "client_gone"
            counters.tokens(served.tokens)
        else:
            outcome = "truncated" if stream is not None else "error"
            counters.add("errors")
            status = flow.response.status_code if flow.response else None
            counters.delta.observe(now, status, reason)
            counters.delta.health = run.engine.network_error(
                served.key, now, only_own_words(reason)
            )
            run.state.observed(run.engine, served.key, now)
            flow.marked = ":warning:"
        self.books.failed(flow, served, outcome, reason)
        self.books.trace(run, flow, served.pool, served, outcome, served.wall)
        return outcome


_OUTCOMES: Final = {kind: kind.value for kind in FailureKind}
"""Each kind's value, the outcome of an answer of that kind: found without the enum's
`value` property."""


def _scrubbed(sig: Signal, scrub: Scrubber) -> Signal:
    """`sig` with its reason and detail scrubbed (itself when they had nothing to hide)."""
    reason, detail = scrub(sig.reason, 120), scrub(sig.detail)
    if reason != sig.reason or detail != sig.detail:  # most answers have nothing to hide
        return dataclasses.replace(sig, reason=reason, detail=detail)
    return sig
