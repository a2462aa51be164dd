"""Operating a running proxy: its live status and the commands of mitmweb's command bar."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from mitmproxy import command

from . import status
from .config import Key, Settings
from .core.check import signal_of
from .core.state import Operator, pending_at_start
from .engine import Engine
from .keeper import StateKeeper
from .reloader import ConfigWatcher

log = logging.getLogger("kmi_rotor")


class OperatorCommands:
    """`rotor.status`, `rotor.rotate`, `rotor.disable`, `rotor.enable`, `rotor.reset`."""

    settings: Settings | None
    config_error: str | None
    engine: Engine | None
    keeper: StateKeeper | None
    _served: dict[str, Any]
    _recent: deque[dict[str, Any]]
    _rotations_seen: dict[str, int]
    _operator_seen: dict[str, float]
    _started: float
    _state_read: bool
    clock: Any
    state: Any

    watcher: ConfigWatcher

    def _wake(self) -> None:
        raise NotImplementedError

    # -- status and operator commands ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The live state for the status page and /metrics (call on the event loop)."""
        if self.settings is None or self.keeper is None:
            return {"error": self.config_error, "pools": [], "recent": []}
        inflight: dict[str, int] = {}
        for served in self._served.values():
            inflight[served.key.fingerprint] = inflight.get(served.key.fingerprint, 0) + 1
        snap = status.snapshot(
            self.settings,
            self.keeper.view(),
            self.clock(),
            engine=self.engine,
            recent=list(reversed(self._recent)),
            inflight=inflight,
            started=self._started,
        )
        snap["config_error"] = self.watcher.reload_error
        snap["cluster"] = self.state.status()
        return snap

    def _key_named(self, label: str) -> Key:
        assert self.settings is not None
        for key in self.settings.keys:
            if key.label == label:
                return key
        raise ValueError(f"no key labelled {label!r}")

    @command.command("rotor.status")
    def cmd_status(self) -> str:
        """Each key's status, remaining quota and counters, as a table."""
        if self.settings is None or self.keeper is None:
            return f"kmi-rotor is not serving: {self.config_error}"
        doc = self.keeper.view()
        rows = status.rows(self.settings, doc, self.clock(), self.engine)
        table = status.render_table(rows, self.clock(), status.local_429(doc))
        log.info("kmi-rotor status\n%s", table)
        return table

    @command.command("rotor.reload")
    def cmd_reload(self) -> str:
        """Read the configuration file again now (it is also reloaded within 2 s of a change)."""
        self.watcher.request()
        return "kmi-rotor: reloading the configuration (the log says the outcome)"

    @command.command("rotor.rotate")
    def cmd_rotate(self, pool: str = "") -> None:
        """Move a sticky pool (all sticky pools without an argument) on to its next key."""
        assert self.settings is not None and self.engine is not None and self.keeper is not None
        names = [pool] if pool else [p.name for p in self.settings.pools if p.strategy == "sticky"]
        for name in names:
            if not self.engine.rotate(name):
                raise ValueError(f"pool {name!r} does not exist or is not sticky")
            self.keeper.pool_add(name, "rotations")
            self._rotations_seen[name] = self._rotations_seen.get(name, 0) + 1
            pool = next(p for p in self.settings.pools if p.name == name)
            self.state.rotated(pool)

    @command.command("rotor.disable")
    def cmd_disable(self, label: str) -> None:
        """Stop using a key until it is enabled again."""
        self._operate(self._key_named(label), "disable")

    @command.command("rotor.enable")
    def cmd_enable(self, label: str) -> None:
        """Use a key again (clears its disable, cooldown and block)."""
        self._operate(self._key_named(label), "enable")
        self._wake()

    @command.command("rotor.reset")
    def cmd_reset(self, label: str) -> None:
        """Clear the cooldowns and blocks of a key, or of `all` keys."""
        assert self.settings is not None
        keys = list(self.settings.keys) if label == "all" else [self._key_named(label)]
        for key in keys:
            self._operate(key, "reset")
        self._wake()

    def _operate(self, key: Key, action: str, *, record: bool = True) -> None:
        """Apply an operator's action; `record` shares it with other processes."""
        assert self.engine is not None and self.keeper is not None
        now = self.clock()
        d = self.keeper.key(key)
        d.health = self.engine.operate(key, action, now)
        if record:
            d.operator = Operator(action=action, at=now, applied=True)
            self._operator_seen[key.fingerprint] = now
            self.state.operated(key, action)
        log.info("kmi-rotor: key %s: %s", key.label, action)

    def _adopt_operator(self, key: Key, op: Operator) -> None:
        """Apply an action another process wrote: a checked key's verdict as the answer that
        gave it would be applied, an operator's action as the operator's."""
        assert self.engine is not None and self.keeper is not None
        sig = signal_of(op)
        if sig is None:
            try:
                self._operate(key, op.action, record=False)
            except ValueError:  # written by a newer kmi-rotor: not ours to guess
                log.warning("kmi-rotor: key %s: unknown action %r ignored", key.label, op.action)
                return
        else:
            self.keeper.key(key).health = self.engine.observe(key, sig, self.clock())
            log.info("kmi-rotor: key %s: %s", key.label, sig.reason)
        # Written with the health it gave, so a restart knows the action is in that health.
        self.keeper.key(key).operator = op.model_copy(update={"applied": True})

    def _cluster_action(self, msg: dict[str, Any]) -> None:
        """An action another process or the CLI announced through the shared state."""
        if self.engine is None:
            return
        action = msg["action"]
        for target in msg["targets"]:
            if action == "rotate":
                self.engine.rotate(target)
                continue
            key = self.engine.keys.get(target)
            if key is not None:
                self._operate(key, action, record=False)
        self._wake()

    def _adopt_state(self, doc: Any) -> None:
        """Take in what other processes wrote: operators' actions and newer health."""
        assert self.engine is not None and self.keeper is not None
        first, self._state_read = not self._state_read, True
        for fp, rec in doc.keys.items():
            key = self.engine.keys.get(fp)
            if key is None:
                continue
            self.engine.adopt(fp, rec.health)
            op = rec.operator
            if op is not None and op.at > self._operator_seen.get(fp, 0.0):
                self._operator_seen[fp] = op.at
                # On start-up, only an action no proxy applied (its writer wrote after the last
                # proxy stopped, or the proxy died first): the others are in the stored health.
                if not first or pending_at_start(op, rec.health):
                    self._adopt_operator(key, op)
        if doc.limiter and first:
            try:
                self.engine.limiter.restore(doc.limiter, self.clock())
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                log.warning("kmi-rotor: stored limiter windows not used (%s)", e)
        for pool in self.engine.settings.pools:
            rotations = doc.pools[pool.name].rotations if pool.name in doc.pools else 0
            seen = self._rotations_seen.get(pool.name)
            if seen is None and not first:
                seen = 0  # a pool first written by the CLI: every rotation is new
            if seen is not None and rotations > seen:
                self.engine.rotate(pool.name, rotations - seen)
            self._rotations_seen[pool.name] = rotations
        self._wake()
