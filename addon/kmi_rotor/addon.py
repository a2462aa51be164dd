"""The mitmproxy addon: a thin shell that reads flows, asks the engine, and applies the answer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http

from . import config, failover, flows, opening, relay
from .answers import (
    KEY_HEADER,
    answer_locally,
    label_answer,
    mask_request,
    put,
)
from .cluster import wiring as cluster
from .cluster.state import EngineState, LocalState
from .commands import OperatorCommands
from .config import ConfigError, Key, Pool, Settings, one_line
from .core import access
from .core import tokens as tk
from .core.credentials import placements
from .core.refusal import Refusal
from .core.scrub import only_own_words
from .core.signals import FailureKind, Signal, parse_signal
from .core.stream_tap import SSETap
from .engine import Chosen, Engine, Wait
from .flows import META, Served
from .gatekeeper import EXPOSURE_OPTIONS, Gatekeeper
from .hosting import StatusPage, on_loop
from .keeper import StateKeeper
from .records import Bookkeeping
from .reloader import ConfigWatcher
from .status import scrubber
from .store import StateError, StateStore
from .trace import TraceWriter, trace_path
from .usage_poller import UsagePoller

log = logging.getLogger("kmi_rotor")

WAIT_SLICE = 0.5
"""A waiting request looks at its client this often, so a client that left stops waiting."""
UPSTREAM_SETUP_WAIT = 10.0


class Rotor(Gatekeeper, Bookkeeping, OperatorCommands):
    """Injects a key of the matching pool into every request to a configured LLM host."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.config_error: str | None = "kmi-rotor is not configured yet"
        self.engine: Engine | None = None
        self.keeper: StateKeeper | None = None
        self.state: EngineState = LocalState()
        self.trace: TraceWriter | None = None
        self._served: dict[str, Served] = {}
        self._deferred: dict[str, Pool] = {}
        self._upstream = asyncio.Event()
        self.exposure = access.Exposure("local")
        self._capacity = asyncio.Event()
        self._rotations_seen: dict[str, int] = {}
        self._operator_seen: dict[str, float] = {}
        self._state_read = False
        self._recent: deque[dict[str, Any]] = deque(maxlen=200)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = time.time()
        self.clock = time.time
        self.page = StatusPage(lambda: on_loop(self._loop, self.snapshot))
        self.poller = UsagePoller(self, lambda: ctx.options.ssl_verify_upstream_trusted_ca)
        self.watcher = ConfigWatcher(self, lambda: ctx.options.rotor_config, _servers)
        self.addons = [self.page]
        relay.install()
        opening.install()

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "rotor_config",
            str | None,
            None,
            "Path of the kmi-rotor TOML config. Without it: $KMI_ROTOR_CONFIG, then ./rotor.toml, "
            "then ~/.kmi-rotor/rotor.toml.",
        )
        loader.add_option(
            "rotor_allow_remote",
            bool,
            False,
            "Give pool keys to clients that are not on loopback, once they authenticate (proxyauth "
            "in regular mode, or a [[clients]] token from the config). Off: only loopback clients.",
        )
        loader.add_option(
            "rotor_key_header",
            bool,
            True,
            f"Add {KEY_HEADER} (the label of the key that served, never the key) to every answer "
            "kmi-rotor handled, and kmi-rotor-attempt after a failover.",
        )

    def configure(self, updated: set[str]) -> None:
        if "rotor_config" in updated or self.settings is None:
            try:
                self._apply(config.load(config.find_config(ctx.options.rotor_config)))
                self.watcher.remember()
            except ConfigError as e:
                self._config_failed(str(e))
            except StateError as e:  # without its state it serves nothing (fail closed)
                self.settings, self.config_error = None, str(e)
                log.error("kmi-rotor: %s", one_line(str(e)))
        # After the config: its client tokens count as authentication.
        if updated & EXPOSURE_OPTIONS:
            self._check_exposure()

    def _config_failed(self, message: str) -> None:
        if self.settings is None:
            self.config_error = message
            log.error("kmi-rotor: %s", message)
        else:  # a running proxy keeps serving with the last good configuration
            log.error("kmi-rotor: %s (keeping the previous configuration)", message)
            self.watcher.reload_error = message

    def _apply(self, settings: Settings) -> None:
        old_dir = self.settings.state_dir if self.settings else None
        self.settings, self.config_error = settings, None
        if self.engine is None:
            self.engine = Engine(settings)
        else:
            self.engine.reconfigure(settings)
        if self.keeper is None or old_dir != settings.state_dir:
            self._open_state(settings)
        self._share_state(settings)
        if self._loop is not None:  # a reload while running: poll the new pools
            self.poller.start(settings.pools)
            self.keeper.start()
            self._check_exposure()  # client tokens may have come or gone
        n = len(settings.keys)
        log.info(
            "kmi-rotor: %d pool%s, %d key%s from %s; state in %s",
            len(settings.pools),
            "" if len(settings.pools) == 1 else "s",
            n,
            "" if n == 1 else "s",
            settings.source,
            settings.state_dir,
        )

    def _open_state(self, settings: Settings) -> None:
        if self.keeper is not None:
            self.keeper.close_blocking()
        if self.trace is not None:
            self.trace.close()
        self._state_read = False
        self.keeper = StateKeeper(StateStore(settings.state_dir))
        self.keeper.on_change = self._adopt_state
        self.keeper.limiter_source = self._limiter_windows
        self.keeper.load_blocking()
        self.trace = TraceWriter(trace_path(settings.state_dir))

    def _limiter_windows(self) -> Callable[[], dict[str, Any]]:
        """The limiter's windows as they are now, for the state file (rendered later)."""
        assert self.engine is not None
        return self.engine.limiter.capture(self.clock())

    def _share_state(self, settings: Settings) -> None:
        """Where the engine's state lives: in Redis with `[cluster]`, here without."""
        assert self.engine is not None
        self.state = cluster.share(
            self.state, settings, self.engine, self._cluster_action, lambda: len(self._served)
        )
        if self._loop is not None:
            cluster.start(self.state)

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        cluster.start(self.state)
        if self.keeper is not None:
            self.keeper.start()
        if self.settings is not None:
            self.poller.start(self.settings.pools)
        self.watcher.start()

    def done(self) -> None:
        """Every flow still holding a key is masked first: scripts run before mitmproxy's own
        `done` handlers, so a writer (`-w`) saving unfinished flows finds no key in them."""
        self.poller.stop()
        self.watcher.stop()
        cluster.stop(self.state)
        for flow_id in list(self._served):
            served = self._served.pop(flow_id, None)
            if served is not None and served.flow is not None:
                mask_request(served.flow)
        if self.keeper is not None and self.engine is not None:
            self.keeper.limiter_snapshot(self.engine.limiter.snapshot(self.clock()))
            self.keeper.close_blocking()
        if self.trace is not None:
            self.trace.close()

    # -- request path -----------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        try:
            pool = await self._gate(flow)
            if pool is None:
                return
            if flow.request.raw_content is not None:  # a replay: the body is known already
                await self._admit(flow, pool, flow.request.raw_content)
            elif self._admit_now(flow):
                await self._admit(flow, pool, None)
            else:  # the body will be there in `request`: admit with its real token estimate
                self._deferred[flow.id] = pool
        except Exception:
            log.exception("kmi-rotor: internal error while choosing a key")
            self._fail_before_sending(flow)

    def _admit_now(self, flow: http.HTTPFlow) -> bool:
        """Whether the key must be chosen before the body arrives: a request body that streams
        (stream_large_bodies) leaves with its headers, before the `request` hook."""
        if flow.request.stream:
            return True
        chunked = "content-length" not in flow.request.headers
        return bool(getattr(ctx.options, "stream_large_bodies", None)) and chunked

    async def _admit(self, flow: http.HTTPFlow, pool: Pool, body: bytes | None) -> None:
        assert self.settings is not None and self.engine is not None
        retry = flow.metadata.get(META, {}).get("retry") if flow.is_replay else None
        exclude = frozenset(retry["exclude"]) if retry else frozenset()
        arrived = self.clock()
        # A failover attempt may wait as long as what is left of its request's own wait.
        deadline = retry.get("deadline", arrived) if retry else arrived
        if not retry:
            deadline += self.settings.limits.max_wait_seconds
        if body is None:
            tokens = tk.estimate_from_length(flows.content_length(flow.request))
        else:
            try:
                tokens = tk.estimate_from_body(body, strict=True)
            except tk.Unreadable as e:  # refused before a key is chosen: nothing is spent
                answer_locally(flow, Refusal(400, "unreadable_body", str(e)), arrived)
                return
        affinity = flow.request.headers.get(pool.affinity_header) if pool.affinity_header else None
        await self._upstream_ready(flow)
        while True:
            now = self.clock()
            d = await self.state.decide(
                self.engine,
                pool,
                tokens,
                now,
                deadline=deadline,
                exclude=exclude,
                affinity=affinity,
            )
            if isinstance(d, Chosen):
                self._inject(flow, pool, d, retry["attempt"] if retry else 1, arrived)
                self._served[flow.id].estimated_from_size = body is None
                return
            if isinstance(d, Wait):
                if not await self._wait(flow, d.until, deadline):
                    answer_locally(
                        flow, Refusal(499, "client_gone", "the client left while waiting"), now
                    )
                    return
                continue
            self._refused(flow, pool, d, arrived)
            return

    async def _upstream_ready(self, flow: http.HTTPFlow) -> None:
        """Wait while the upstream connection is being set up (mitmproxy connects eagerly):
        a key's limits count a request when it is admitted, so admitting it only once it can
        leave at once keeps what the provider sees within the limits."""
        server = flow.server_conn
        end = self.clock() + UPSTREAM_SETUP_WAIT
        while server.timestamp_start is not None and server.error is None and self.clock() < end:
            if server.connected and (not server.tls or server.tls_established):
                return
            if server.timestamp_end is not None or not flow.client_conn.connected:
                return
            event = self._upstream
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), WAIT_SLICE)

    def server_connected(self, data: Any) -> None:
        self._upstream.set()
        self._upstream = asyncio.Event()

    def tls_established_server(self, data: Any) -> None:
        self.server_connected(data)

    def server_connect_error(self, data: Any) -> None:
        self.server_connected(data)

    async def _wait(self, flow: http.HTTPFlow, until: float | None, deadline: float) -> bool:
        """Sleep until `until`, a freed slot, or the deadline; False if the client left."""
        end = min(until if until is not None else deadline, deadline)
        client = failover.client_of(flow)
        while (left := end - self.clock()) > 0:
            if not client.connected:
                return False
            event = self._capacity
            try:
                await asyncio.wait_for(event.wait(), min(left, WAIT_SLICE))
                return True
            except TimeoutError:
                continue
        return client.connected

    def _wake(self) -> None:
        """Let waiting requests look again (a slot was freed or a key came back)."""
        self._capacity.set()
        self._capacity = asyncio.Event()

    def _inject(
        self, flow: http.HTTPFlow, pool: Pool, chosen: Chosen, attempt: int, arrived: float
    ) -> None:
        key = chosen.key
        # Held first: whatever fails below, the error path finds the reservation and frees it.
        self._served[flow.id] = Served(
            pool, key, chosen.reservation, attempt, time.monotonic(), arrived, flow=flow
        )
        where = placements(flow.request.headers.keys(), flow.request.query.keys(), pool.preset)
        meta = flow.metadata.setdefault(META, {})
        meta.update(
            {
                "pool": pool.name,
                "key": key.label,
                "fingerprint": key.fingerprint,
                "attempt": attempt,
                "placements": [[p.kind, p.name] for p in where],
            }
        )
        secret = key.secret.get_secret_value()
        for p in where:
            put(flow.request, p, p.render(secret))
        flow.comment = f"key {key.label}" + (f" · attempt {attempt}" if attempt > 1 else "")
        assert self.keeper is not None
        self._counters(key).add("requests")
        failed = (
            self.engine.keys.get(meta.get("retry", {}).get("after", "")) if self.engine else None
        )
        if attempt > 1 and failed is not None:  # counted on the key the request failed on
            self._counters(failed).add("retries")

    def _refused(self, flow: http.HTTPFlow, pool: Pool, r: Refusal, arrived: float) -> None:
        answer_locally(flow, r, self.clock())
        flow.metadata[META]["pool"] = pool.name
        flow.marked = ":no_entry:"
        if r.status == 429 and self.keeper is not None:
            self.keeper.pool_add(pool.name, "local_429")
        self._trace(flow, pool, None, "local_429" if r.status == 429 else "error", arrived)

    async def request(self, flow: http.HTTPFlow) -> None:
        pool = self._deferred.pop(flow.id, None)
        if flow.response is not None:
            return
        try:
            if pool is not None:
                body = flow.request.raw_content or b""
                await self._admit(flow, pool, body)
            served = self._served.get(flow.id)
            if served is None or flow.response is not None:
                return
            body = flow.request.raw_content if not flow.request.stream else None
            if body is None:
                return
            served.stream_request = flows.wants_stream(flow.request, body)
            assert self.engine is not None and self.settings is not None
            if served.estimated_from_size:  # admitted before the body: correct the estimate
                self.engine.adjust(served.reservation, tk.estimate_from_body(body))
            if served.stream_request and self.settings.streaming.include_usage:
                flows.ask_for_usage(flow)
        except Exception:
            log.exception("kmi-rotor: internal error while reading the request body")
            self._fail_before_sending(flow)

    # -- response path ----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not self._mask(flow) or flow.response is None:
            return
        served = self._served.get(flow.id)
        if served is None:
            return
        try:
            served.ttfb = time.monotonic() - served.started
            if ctx.options.rotor_key_header:
                label_answer(flow.response, served.key.label, served.attempt)
            self._stream_if_wanted(flow, served)
        except Exception:
            # The body is still to come: the local answer replaces it once it is read.
            log.exception("kmi-rotor: internal error while reading response headers")
            flow.metadata[META]["internal_error"] = "responseheaders"

    def _stream_if_wanted(self, flow: http.HTTPFlow, served: Served) -> None:
        """Successful answers of a streaming type stream; errors stay buffered to be read."""
        assert self.settings is not None and flow.response is not None
        ctype = flow.response.headers.get("content-type", "")
        if not 200 <= flow.response.status_code < 300:
            return
        if ctype.startswith("text/event-stream"):
            served.tap = SSETap()
        elif not any(ctype.startswith(t) for t in self.settings.streaming.content_types):
            return
        feeds = relay.FEEDS.get(flow.id)  # a failover attempt: its answer goes to another client
        if feeds is not None:
            flow.response.stream = feeds.tee(served.tap)
            feeds.began.set()
        else:
            flow.response.stream = served.tap or True

    async def response(self, flow: http.HTTPFlow) -> None:
        if not self._mask(flow) or flow.response is None:
            return
        served = self._served.pop(flow.id, None)
        if served is None:
            return
        try:
            if flow.metadata[META].get("internal_error"):
                raise RuntimeError("an earlier hook of this flow failed")
            sig = self._settle_response(flow, served)
            self._wake()  # its slot is free: let waiting requests (and its next attempt) see it
            feeds = relay.FEEDS.get(flow.id)
            if feeds is not None and feeds.began.is_set():
                feeds.end()
            elif failover.wanted(self, flow, served, sig.kind.value):
                await failover.run(self, flow, served, sig.kind.value, sig.reason)
            if (
                ctx.options.rotor_key_header
                and flow.response is not None
                and KEY_HEADER not in flow.response.headers
            ):
                label_answer(flow.response, served.key.label, served.attempt)  # a new answer
        except Exception:
            log.exception("kmi-rotor: internal error while reading a response")
            if self.engine is not None:
                self.engine.settle(served.key, served.reservation, None)
            handed = relay.DELIVERIES.pop(flow.id, None)
            if handed is not None:
                handed.cancel()
            if not served.tap:  # a streamed answer is already with the client
                answer_locally(
                    flow,
                    Refusal(502, "internal_error", "failed while reading the answer"),
                    self.clock(),
                )
        finally:
            self._wake()

    def _settle_response(self, flow: http.HTTPFlow, served: Served) -> Signal:
        assert self.engine is not None and self.keeper is not None and flow.response is not None
        now = self.clock()
        resp = flow.response
        body = None if served.tap else resp.raw_content
        sig = parse_signal(
            resp.status_code, resp.headers.items(), body, now, provider=served.pool.preset.name
        )
        outcome = sig.kind.value
        if served.tap is not None:
            stream = served.tap.finish()
            served.tokens = flows.stream_tokens(stream)
            sig, outcome = flows.stream_signal(sig, stream)
        else:
            served.tokens = tk.reported_usage(body)
        scrub = scrubber(self.settings)  # type: ignore[arg-type]
        sig = dataclasses.replace(sig, reason=scrub(sig.reason, 120), detail=scrub(sig.detail))
        h = self.engine.observe(served.key, sig, now, served.reservation)
        self.engine.settle(served.key, served.reservation, flows.total(served.tokens))
        self.state.observed(self.engine, served.key, now)
        d = self._counters(served.key)
        d.health = h
        d.observe(now, resp.status_code, None if sig.kind is FailureKind.OK else sig.reason)
        flows.count_outcome(d, sig, served.tokens)
        self._annotate(flow, served, sig, outcome)
        self._trace(flow, served.pool, served, outcome, served.wall)
        return sig

    async def error(self, flow: http.HTTPFlow) -> None:
        self._deferred.pop(flow.id, None)
        if not self._mask(flow):
            return
        served = self._served.pop(flow.id, None)
        if served is None:
            return
        try:
            outcome = self._settle_error(flow, served)
            self._wake()
            feeds = relay.FEEDS.get(flow.id)
            if feeds is not None and feeds.began.is_set():
                feeds.fail(flow.error.msg if flow.error else "the stream was cut")
            elif failover.wanted(self, flow, served, outcome):
                await failover.run(self, flow, served, outcome, "the connection failed")
        except Exception:
            log.exception("kmi-rotor: internal error while recording a failed request")
            handed = relay.DELIVERIES.pop(flow.id, None)
            if handed is not None:
                handed.cancel()
        finally:
            if self.engine is not None:  # idempotent: the slot is free whatever happened
                self.engine.settle(served.key, served.reservation, None)
            self._wake()

    async def kmi_rotor_relay(self, feeds: relay.Relay) -> None:
        """The next part of an answer relayed to the client of a failed-over request."""
        await feeds.wait()

    def _settle_error(self, flow: http.HTTPFlow, served: Served) -> str:
        """Record a flow that ended in an error; its outcome (`error` before the answer's
        headers, `truncated` mid-stream, `client_gone`)."""
        assert self.engine is not None and self.keeper is not None
        now = self.clock()
        # mitmproxy's message may quote what the upstream sent: scrubbed for this flow and the
        # key's last error; the key's reason, which other clients may see, quotes nothing.
        reason = scrubber(self.settings)(flow.error.msg if flow.error else "unknown error")  # type: ignore[arg-type]
        feeds = relay.FEEDS.get(flow.id)
        client_left = flows.client_left(reason) or bool(feeds and feeds.cancelled)
        stream = served.tap.finish() if served.tap else None
        served.tokens = flows.stream_tokens(stream) if stream else (None, None)
        self.engine.settle(served.key, served.reservation, flows.total(served.tokens))
        d = self._counters(served.key)
        if client_left:  # a client that leaves is not the key's fault
            outcome = "client_gone"
            flows.count_tokens(d, served.tokens)
        else:
            outcome = "truncated" if stream is not None else "error"
            d.add("errors")
            d.observe(now, flow.response.status_code if flow.response else None, reason)
            d.health = self.engine.network_error(served.key, now, only_own_words(reason))
            self.state.observed(self.engine, served.key, now)
            flow.marked = ":warning:"
        flow.comment = f"key {served.key.label} · {outcome}: {reason[:80]}"
        if served.attempt > 1:
            flow.comment += f" · attempt {served.attempt}"
        flow.metadata[META].update({"outcome": outcome, "error": reason})
        self._trace(flow, served.pool, served, outcome, served.wall)
        return outcome

    # -- bookkeeping ------------------------------------------------------------------------

    def _fail_before_sending(self, flow: http.HTTPFlow) -> None:
        """Fail closed: free what the flow holds and answer locally; nothing goes upstream."""
        self._release(flow)
        refusal = Refusal(500, "internal_error", "failed before sending the request")
        answer_locally(flow, refusal, self.clock())

    def _release(self, flow: http.HTTPFlow) -> None:
        served = self._served.pop(flow.id, None)
        if served is not None and self.engine is not None:
            self.engine.settle(served.key, served.reservation, None)
            self._wake()

    def _counters(self, key: Key) -> flows.Counters:
        """Where a key's counters go: the state file, and the shared state when there is one."""
        assert self.keeper is not None
        return flows.Counters(self.keeper.key(key), key.fingerprint, self.state.count)

    def _mask(self, flow: http.HTTPFlow) -> bool:
        """Hide the injected key in the stored request; True for a flow this addon manages."""
        meta = flow.metadata.get(META)
        if not meta or "fingerprint" not in meta:
            return False
        mask_request(flow)
        return True


# -- helpers -------------------------------------------------------------------------------------


def _servers() -> Any:
    """mitmproxy's running servers (their modes and addresses), for `<state_dir>/proxy.json`."""
    server = ctx.master.addons.get("proxyserver") if hasattr(ctx, "master") else None
    return getattr(server, "servers", ())


__all__ = ["META", "Rotor", "Served"]
