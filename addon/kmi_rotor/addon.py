"""The mitmproxy addon: a thin shell that reads flows, asks the engine, and applies the answer.

It holds what a configured proxy runs on (`Running`, once a configuration applies) and small
parts, each given what it needs: `Admission` (a request's key chosen and put in), `Settling`
(what an answer or a failure says, recorded), `Bookkeeping` (what is written down about each
flow), `StateAdoption` (what other processes wrote), the `UsagePoller` and the
`ConfigWatcher`; `failover` re-sends a failed request on another key; the `Gatekeeper` (who may
use the proxy, and where a key may go), `Waiting` (for an upstream connection, for capacity),
the `OperatorCommands` and the status page.

`Rotor` is the only mitmproxy addon: mitmproxy walks every addon node for every event, so the
parts are plain objects and `Rotor` defines each hook a part needs and calls the part, in the
order mitmproxy would (its own work first, then the part's). The operators' commands are
registered from `OperatorCommands` when `Rotor` loads.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Coroutine
from types import CoroutineType
from typing import Any

from mitmproxy import ctx, http

from . import admission, config, failover, listening, opening, relay, request_body
from .admission import Admission
from .adoption import StateAdoption
from .answers import KEY_HEADER, answer_locally, is_labelled, label_answer
from .bookkeeping import Bookkeeping
from .cluster import wiring as cluster
from .cluster.state import LocalState
from .config import ConfigError, Pool, Settings, one_line
from .core import tokens as tk
from .core.body_json import BodyJSON, read_json
from .core.header_fields import field_value
from .core.refusal import Refusal
from .core.stream_tap import SSETap
from .engine import Engine
from .gatekeeper import Gatekeeper
from .hosting import StatusPage, on_loop
from .keeper import StateKeeper
from .masking import mask_request
from .names import ALLOW_REMOTE_OPTION, CONFIG_OPTION, KEY_HEADER_OPTION, META
from .operator_commands import OperatorCommands, Seen
from .reloader import ConfigWatcher
from .running import Running
from .served import Served
from .settling import Settling
from .status import live_snapshot
from .store import StateError, StateStore
from .trace import TraceWriter, trace_path
from .usage_poller import UsagePoller
from .waiting import Waiting

log = logging.getLogger("kmi_rotor")


class Rotor:
    """Injects a key of the matching pool into every request to a configured LLM host."""

    def __init__(self) -> None:
        self.serving: Running | None = None
        """What the proxy serves with; None while no configuration applies (`config_error`
        says why)."""
        self.config_error: str | None = "kmi-rotor is not configured yet"
        self.clock = time.time
        self.served: dict[str, Served] = {}
        """Flow id -> what the flow holds, from the choice of its key to its end."""
        self._deferred: dict[str, Pool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = time.time()

        def now() -> float:
            return self.clock()  # the clock as set now, or later by a test

        self.books = Bookkeeping(now)
        self.waiting = Waiting(now)
        self.admission = Admission(self.served, self.books, self.waiting, now)
        self.settling = Settling(self.books, now)
        seen = Seen()
        self.adoption = StateAdoption(lambda: self.serving, seen, self.waiting.wake, now)
        self._key_header = True
        """The key-header option, read at configure: reading an option deep-copies it."""
        self.page = StatusPage(lambda: on_loop(self._loop, self.snapshot))
        self.watcher = ConfigWatcher(
            self, lambda: getattr(ctx.options, CONFIG_OPTION), listening.servers
        )
        self.gatekeeper = Gatekeeper(
            self.page, lambda: self.settings, lambda: self.config_error, now
        )
        self.commands = OperatorCommands(
            lambda: self.serving,
            lambda: self.config_error,
            self.watcher,
            seen,
            self.waiting.wake,
            now,
        )
        self.poller = UsagePoller(now, lambda: ctx.options.ssl_verify_upstream_trusted_ca)
        relay.install()
        opening.install()

    @property
    def settings(self) -> Settings | None:
        """The configuration in force; None while none applies."""
        return self.serving.settings if self.serving is not None else None

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        """Add kmi-rotor's options, and the commands of `OperatorCommands` (`rotor.status`, ...):
        not an addon itself, mitmproxy would not collect them."""
        loader.master.commands.collect_commands(self.commands)
        loader.add_option(
            CONFIG_OPTION,
            str | None,
            None,
            "Path of the kmi-rotor TOML config. Without it: $KMI_ROTOR_CONFIG, then ./rotor.toml, "
            "then ~/.kmi-rotor/rotor.toml.",
        )
        loader.add_option(
            ALLOW_REMOTE_OPTION,
            bool,
            False,
            "Give pool keys to clients that are not on loopback, once they authenticate (proxyauth "
            "in regular mode, or a [[clients]] token from the config). Off: only loopback clients.",
        )
        loader.add_option(
            KEY_HEADER_OPTION,
            bool,
            True,
            f"Add {KEY_HEADER} (the label of the key that served, never the key) to every answer "
            "kmi-rotor handled, and kmi-rotor-attempt after a failover.",
        )

    def configure(self, updated: set[str]) -> None:
        """Apply the options; the gatekeeper then decides whom to serve (the configuration's
        client tokens count as authentication)."""
        self._configure(updated)
        self.gatekeeper.configure(updated)

    def _configure(self, updated: set[str]) -> None:
        if KEY_HEADER_OPTION in updated:
            self._key_header = bool(getattr(ctx.options, KEY_HEADER_OPTION))
        if CONFIG_OPTION not in updated and self.serving is not None:
            return
        try:
            self.apply(config.load(config.find_config(getattr(ctx.options, CONFIG_OPTION))))
            self.watcher.remember()
        except ConfigError as e:
            if self.serving is None:
                self.not_configured(str(e))
            else:  # a running proxy keeps serving with the last good configuration
                log.error("kmi-rotor: %s (keeping the previous configuration)", e)
                self.watcher.reload_error = str(e)
        except StateError as e:  # without its state it serves nothing (fail closed)
            self.serving, self.config_error = None, str(e)
            log.error("kmi-rotor: %s", one_line(str(e)))

    def not_configured(self, message: str) -> None:
        """No configuration applies, and the one read is broken: every request gets a 503."""
        self.config_error = message
        log.error("kmi-rotor: %s", message)

    def apply(self, settings: Settings) -> None:
        """Serve with `settings`: the engine keeps every surviving key's state; a new state
        folder (only at start-up) is opened and read."""
        run = self.serving
        if run is None or run.settings.state_dir != settings.state_dir:
            run = self._open(settings, run)
        else:
            run.settings = settings
            run.engine.reconfigure(settings)
        self.config_error = None
        run.state = cluster.share(
            run.state, settings, run.engine, self.adoption.announced, lambda: len(self.served)
        )
        if self._loop is not None:  # a reload while running
            cluster.start(run.state)
            self.poller.start(run)  # poll the new pools
            run.keeper.start()
            self.gatekeeper.check_exposure()  # client tokens may have come or gone
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

    def _open(self, settings: Settings, old: Running | None) -> Running:
        """Serve from the state folder of `settings`, its state read (blocking: start-up). With
        `old`, the same `Running` goes on (its engine with the new settings, flows in flight
        recorded in the new folder); its state folder closes first."""
        if old is not None:
            old.close()
        keeper = StateKeeper(StateStore(settings.state_dir))
        trace = TraceWriter(trace_path(settings.state_dir))
        if old is None:
            run = Running(settings, Engine(settings), keeper, trace, LocalState())
        else:
            run = old
            run.settings, run.keeper, run.trace = settings, keeper, trace
            run.engine.reconfigure(settings)
        self.serving = run
        engine = run.engine
        keeper.on_change = self.adoption.state_read
        keeper.limiter_source = lambda: engine.limiter_windows(self.clock())
        self.adoption.first = True
        try:
            keeper.load_blocking()
        except StateError:
            trace.close()
            raise
        return run

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        run = self.serving
        if run is not None:
            cluster.start(run.state)
            run.keeper.start()
            self.poller.start(run)
        self.watcher.start()
        _freeze_startup_heap()

    def done(self) -> None:
        """Every flow still holding a key is masked first: scripts run before mitmproxy's own
        `done` handlers, so a writer (`-w`) saving unfinished flows finds no key in them."""
        self.poller.stop()
        self.watcher.stop()
        for flow_id in list(self.served):
            served = self.served.pop(flow_id, None)
            if served is not None and served.flow is not None:
                mask_request(served.flow)
        run = self.serving
        if run is not None:
            cluster.stop(run.state)
            run.keeper.limiter_snapshot(run.engine.limiter_snapshot(self.clock()))
            run.close()

    def snapshot(self) -> dict[str, Any]:
        """The live state for the status page and /metrics (call on the event loop)."""
        run = self.serving
        if run is None:
            return {"error": self.config_error, "pools": [], "recent": []}
        return live_snapshot(
            run,
            self.served.values(),
            self.books.recent,
            self.clock(),
            started=self._started,
            reload_error=self.watcher.reload_error,
        )

    # -- request path -----------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        try:
            pool = self.gatekeeper.gate(flow)
            if type(pool) is CoroutineType:  # a client not on loopback: its destination checked
                pool = await pool
            run = self.serving
            if pool is None or run is None:
                return
            if flow.request.raw_content is not None:  # a replay: the body is known already
                waits = self.admission.admit(run, flow, pool, flow.request.raw_content)
                if waits is not None:
                    await waits
            elif admission.before_body(flow):
                waits = self.admission.admit(run, flow, pool, None)
                if waits is not None:
                    await waits
            else:  # the body will be there in `request`: admit with its real token estimate
                self._deferred[flow.id] = pool
        except Exception:
            log.exception("kmi-rotor: internal error while choosing a key")
            self._fail_before_sending(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        """Admit a request whose body was awaited, read its body; then the status page answers
        its own paths (after the gate in `requestheaders` let the request through). A request
        that holds a key was not the status page's in `requestheaders`: it goes upstream."""
        waits = self._request(flow)
        if waits is not None:
            await waits
        if flow.id not in self.served:
            await self.page.request(flow)

    def _request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """Admit a request whose body was awaited, and read the body of one that holds a key;
        at once, or, when its admission must wait, in the coroutine returned."""
        pool = self._deferred.pop(flow.id, None)
        if flow.response is not None:
            return None
        try:
            raw, parsed = flow.request.raw_content or b"", None
            if pool is not None:
                run = self.serving
                if run is None:  # its configuration failed meanwhile: nothing goes upstream
                    raise RuntimeError("no configuration applies any more")
                parsed = read_json(raw)  # once, for the estimate, the model and the stream flag
                waits = self.admission.admit(run, flow, pool, raw, parsed)
                if waits is not None:
                    return self._request_after(flow, waits, raw, parsed)
            self._read_body(flow, raw, parsed)
        except Exception:
            self._body_failed(flow)
        return None

    async def _request_after(
        self,
        flow: http.HTTPFlow,
        admitted: Coroutine[Any, Any, None],
        raw: bytes,
        parsed: BodyJSON,
    ) -> None:
        """`_request`, once the admission it waits for (`admitted`) is over."""
        try:
            await admitted
            self._read_body(flow, raw, parsed)
        except Exception:
            self._body_failed(flow)

    def _read_body(self, flow: http.HTTPFlow, raw: bytes, parsed: BodyJSON | None) -> None:
        """What the body of a request that holds a key says: whether it asks for a stream
        (then for its usage too, where configured), and its token estimate, corrected when it
        was admitted before the body arrived. `parsed`: `read_json(raw)`, when read."""
        served = self.served.get(flow.id)
        if served is None or flow.response is not None:
            return
        body = flow.request.raw_content if not flow.request.stream else None
        if body is None:
            return
        if parsed is None or body is not raw:  # admitted earlier, or rewritten since
            parsed = read_json(body)
        flags = request_body.parse(body, parsed)  # (a body too large to parse: its top level)
        served.stream_request = request_body.wants_stream(flow.request, body, flags)
        if served.estimated_from_size:  # admitted before the body: correct the estimate
            estimate = tk.estimate_from_body(body, parsed=parsed)
            served.run.engine.adjust(served.reservation, estimate)
        if served.stream_request and served.run.settings.streaming.include_usage:
            request_body.ask_for_usage(flow, flags)

    def _body_failed(self, flow: http.HTTPFlow) -> None:
        log.exception("kmi-rotor: internal error while reading the request body")
        self._fail_before_sending(flow)

    # -- connections: the gatekeeper's and the waiting requests' ------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await self.gatekeeper.http_connect(flow)

    async def server_connect(self, data: Any) -> None:
        await self.gatekeeper.server_connect(data)

    def tls_start_server(self, data: Any) -> None:
        self.gatekeeper.tls_start_server(data)

    def server_connected(self, data: Any) -> None:
        self.waiting.server_connected(data)

    def tls_established_server(self, data: Any) -> None:
        self.waiting.tls_established_server(data)

    def server_connect_error(self, data: Any) -> None:
        self.waiting.server_connect_error(data)

    # -- response path ----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not self._mask(flow) or flow.response is None:
            return
        served = self.served.get(flow.id)
        if served is None:
            return
        try:
            served.ttfb = time.monotonic() - served.started
            if self._key_header:
                label_answer(flow.response, served.key.label, served.attempt)
                served.labelled = flow.response
            self._stream_if_wanted(flow.response, flow.id, served)
        except Exception:
            # The body is still to come: the local answer replaces it once it is read.
            log.exception("kmi-rotor: internal error while reading response headers")
            flow.metadata[META]["internal_error"] = "responseheaders"

    def _stream_if_wanted(self, response: http.Response, flow_id: str, served: Served) -> None:
        """Successful answers of a streaming type stream; errors stay buffered to be read."""
        if not 200 <= response.status_code < 300:
            return
        ctype = field_value(response.headers.fields, b"content-type") or ""
        if ctype.startswith("text/event-stream"):
            served.tap = SSETap()
        elif not ctype.startswith(tuple(served.run.settings.streaming.content_types)):
            return
        feeds = relay.FEEDS.get(flow_id)  # a failover attempt: its answer goes to another client
        if feeds is not None:
            response.stream = feeds.tee(served.tap)
            feeds.began.set()
        else:
            response.stream = served.tap or True

    async def response(self, flow: http.HTTPFlow) -> None:
        if not self._mask(flow) or flow.response is None:
            return
        served = self.served.pop(flow.id, None)
        if served is None:
            return
        run = served.run
        try:
            if flow.metadata[META].get("internal_error"):
                raise RuntimeError("an earlier hook of this flow failed")
            sig = self.settling.answered(flow, flow.response, served)
            self.waiting.wake()  # its slot is free: let waiting requests (and its next attempt) in
            feeds = relay.FEEDS.get(flow.id)
            if feeds is not None and feeds.began.is_set():
                feeds.end()
            elif failover.wanted(run.settings, flow, served, sig.kind.value):
                await failover.run(
                    run.engine, run.settings, flow, served, sig.kind.value, sig.reason, self.clock
                )
            answer = flow.response  # a failover's, or a local one, is labelled now
            if (
                self._key_header
                and answer is not None
                and answer is not served.labelled
                and not is_labelled(answer)
            ):
                label_answer(flow.response, served.key.label, served.attempt)  # a new answer
        except Exception:
            log.exception("kmi-rotor: internal error while reading a response")
            run.engine.settle(served.key, served.reservation, None)
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
            self.waiting.wake()

    async def error(self, flow: http.HTTPFlow) -> None:
        self._deferred.pop(flow.id, None)
        if not self._mask(flow):
            return
        served = self.served.pop(flow.id, None)
        if served is None:
            return
        run = served.run
        try:
            outcome = self.settling.failed(flow, served)
            self.waiting.wake()
            feeds = relay.FEEDS.get(flow.id)
            if feeds is not None and feeds.began.is_set():
                feeds.fail(flow.error.msg if flow.error else "the stream was cut")
            elif failover.wanted(run.settings, flow, served, outcome):
                why = "the connection failed"
                await failover.run(run.engine, run.settings, flow, served, outcome, why, self.clock)
        except Exception:
            log.exception("kmi-rotor: internal error while recording a failed request")
            handed = relay.DELIVERIES.pop(flow.id, None)
            if handed is not None:
                handed.cancel()
        finally:
            # Idempotent: the slot is free whatever happened.
            run.engine.settle(served.key, served.reservation, None)
            self.waiting.wake()

    async def kmi_rotor_relay(self, feeds: relay.Relay) -> None:
        """The next part of an answer relayed to the client of a failed-over request."""
        await feeds.wait()

    # -- helpers ----------------------------------------------------------------------------

    def _fail_before_sending(self, flow: http.HTTPFlow) -> None:
        """Fail closed: free what the flow holds and answer locally; nothing goes upstream."""
        served = self.served.pop(flow.id, None)
        if served is not None:
            served.run.engine.settle(served.key, served.reservation, None)
            self.waiting.wake()
        refusal = Refusal(500, "internal_error", "failed before sending the request")
        answer_locally(flow, refusal, self.clock())

    def _mask(self, flow: http.HTTPFlow) -> bool:
        """Hide the injected key in the stored request; True for a flow this addon manages."""
        meta = flow.metadata.get(META)
        if not meta or "fingerprint" not in meta:
            return False
        mask_request(flow)
        return True


_frozen = False


def _freeze_startup_heap() -> None:
    """Once per process, when the proxy starts serving: what was loaded to start (mitmproxy,
    pydantic's schemas, the configuration) goes to the collector's permanent generation, so
    that the full collections request traffic triggers no longer walk it. Garbage is
    collected first, so none of it is kept for good."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


__all__ = ["META", "Rotor", "Served"]
