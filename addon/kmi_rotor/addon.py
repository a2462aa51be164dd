"""The mitmproxy addon: a thin shell that reads flows, asks the core, and applies the answer."""

from __future__ import annotations

import json
import logging
from typing import Any

from mitmproxy import ctx, http

from . import config
from .config import ConfigError, Key, Settings
from .core import rotation
from .core.credentials import Placement, placements
from .core.secrets import mask_credential_value
from .keeper import StateKeeper
from .store import StateStore

log = logging.getLogger("kmi_rotor")

META = "kmi_rotor"


class Rotor:
    """Injects a key of the matching pool into every request to a configured LLM host."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.config_error: str | None = "kmi-rotor is not configured yet"
        self.strategies: dict[str, rotation.Strategy] = {}
        self.keys_by_fp: dict[str, Key] = {}
        self.keeper: StateKeeper | None = None
        self._inflight: dict[str, http.HTTPFlow] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "rotor_config",
            str | None,
            None,
            "Path of the kmi-rotor TOML config. Without it: $KMI_ROTOR_CONFIG, then ./rotor.toml, "
            "then ~/.kmi-rotor/rotor.toml.",
        )

    def configure(self, updated: set[str]) -> None:
        if "rotor_config" not in updated and self.settings is not None:
            return
        try:
            path = config.find_config(ctx.options.rotor_config)
            settings = config.load(path)
        except ConfigError as e:
            self._config_failed(str(e))
            return
        self._apply(settings)

    def _config_failed(self, message: str) -> None:
        if self.settings is None:
            self.config_error = message
            log.error("kmi-rotor: %s", message)
        else:  # a running proxy keeps serving with the last good configuration
            log.error("kmi-rotor: %s (keeping the previous configuration)", message)

    def _apply(self, settings: Settings) -> None:
        old_state_dir = self.settings.state_dir if self.settings else None
        self.settings = settings
        self.config_error = None
        self.keys_by_fp = {k.fingerprint: k for k in settings.keys}
        self.strategies = {p.name: rotation.make(p.strategy) for p in settings.pools}
        if self.keeper is None or old_state_dir != settings.state_dir:
            if self.keeper is not None:
                self.keeper.close_blocking()
            self.keeper = StateKeeper(StateStore(settings.state_dir))
            self.keeper.load_blocking()
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

    def running(self) -> None:
        if self.keeper is not None:
            self.keeper.start()

    def done(self) -> None:
        for flow in list(self._inflight.values()):
            self._mask(flow)
        if self.keeper is not None:
            self.keeper.close_blocking()

    # -- request path -----------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        try:
            self._inject(flow)
        except Exception:
            log.exception("kmi-rotor: internal error while choosing a key")
            _local_error(flow, 500, "internal_error", "kmi-rotor failed before sending the request")

    def _inject(self, flow: http.HTTPFlow) -> None:
        if self.settings is None:
            _local_error(
                flow, 503, "not_configured", f"kmi-rotor is not serving: {self.config_error}"
            )
            return
        pool = self.settings.pool_for(flow.request.host, flow.request.port)
        if pool is None:
            return
        key = self.strategies[pool.name].pick(pool.keys, _usable)
        if key is None:
            _local_error(flow, 503, "no_usable_key", f"no usable key in pool {pool.name!r}")
            return
        where = placements(flow.request.headers.keys(), flow.request.query.keys(), pool.preset)
        secret = key.secret.get_secret_value()
        for p in where:
            _put(flow.request, p, p.render(secret))
        flow.metadata[META] = {
            "pool": pool.name,
            "key": key.label,
            "fingerprint": key.fingerprint,
            "attempt": 1,
            "placements": [[p.kind, p.name] for p in where],
        }
        flow.comment = f"key {key.label}"
        self._inflight[flow.id] = flow
        assert self.keeper is not None
        self.keeper.sent(key)

    # -- response path ----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not self._mask(flow):
            return
        assert flow.response is not None
        ctype = flow.response.headers.get("content-type", "")
        if 200 <= flow.response.status_code < 300 and ctype.startswith("text/event-stream"):
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        if not self._mask(flow) or flow.response is None:
            return
        self._inflight.pop(flow.id, None)
        key = self._key_of(flow)
        if key is not None and self.keeper is not None:
            self.keeper.answered(key, flow.response.status_code)
        flow.comment = f"key {flow.metadata[META]['key']} · {flow.response.status_code}"

    def error(self, flow: http.HTTPFlow) -> None:
        if not self._mask(flow):
            return
        self._inflight.pop(flow.id, None)
        key = self._key_of(flow)
        reason = flow.error.msg if flow.error else "unknown error"
        if key is not None and self.keeper is not None:
            self.keeper.failed(key, reason[:200])
        flow.comment = f"key {flow.metadata[META]['key']} · error: {reason[:80]}"

    def _key_of(self, flow: http.HTTPFlow) -> Key | None:
        return self.keys_by_fp.get(flow.metadata[META]["fingerprint"])

    def _mask(self, flow: http.HTTPFlow) -> bool:
        """Hide the injected key in the stored request; True for a flow this addon manages."""
        meta = flow.metadata.get(META)
        if not meta or "fingerprint" not in meta:
            return False
        for kind, name in meta.pop("placements", ()):
            value = (
                flow.request.headers.get(name) if kind == "header" else flow.request.query.get(name)
            )
            if value is not None:
                _put(flow.request, Placement(kind, name), mask_credential_value(value))
        return True


def _usable(key: Key) -> bool:
    return not key.disabled


def _put(request: http.Request, placement: Placement, value: str) -> None:
    if placement.kind == "header":
        request.headers[placement.name] = value
    else:
        request.query[placement.name] = value


def _local_error(flow: http.HTTPFlow, status: int, code: str, message: str) -> None:
    body = {"error": {"type": "kmi_rotor_error", "code": code, "message": message}}
    flow.response = http.Response.make(
        status, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    flow.metadata[META] = {"local": True, "code": code}
    flow.comment = f"kmi-rotor: {code}"
