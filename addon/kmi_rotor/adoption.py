"""What other processes wrote, taken in: the state file's newer health, operators' actions and
rotations (from the CLI or other proxies), and actions announced through the shared state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .config import Key
from .core.check import signal_of
from .core.state import Operator, StateDoc, pending_at_start
from .operator_commands import Seen, operate
from .running import Running

log = logging.getLogger("kmi_rotor")


class StateAdoption:
    """Applies to this process's engine what others did (each action once: see `Seen`)."""

    def __init__(
        self,
        running: Callable[[], Running | None],
        seen: Seen,
        wake: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        """`running`: the configured proxy it applies to; `wake`: lets waiting requests look
        again once a key may serve."""
        self._running = running
        self.seen = seen
        self._wake = wake
        self.clock = clock
        self.first = True
        """Until the state of a new state folder was read once (at start-up)."""

    def state_read(self, doc: StateDoc) -> None:
        """Take in a state document: operators' actions and newer health, rotations, and at
        start-up the limiter's stored windows."""
        run = self._running()
        if run is None:
            return
        first, self.first = self.first, False
        for fp, rec in doc.keys.items():
            key = run.engine.keys.get(fp)
            if key is None:
                continue
            run.engine.adopt(fp, rec.health)
            op = rec.operator
            if op is not None and op.at > self.seen.operators.get(fp, 0.0):
                self.seen.operators[fp] = op.at
                # On start-up, only an action no proxy applied (its writer wrote after the last
                # proxy stopped, or the proxy died first): the others are in the stored health.
                if not first or pending_at_start(op, rec.health):
                    self._operator(run, key, op)
        if doc.limiter and first:
            try:
                run.engine.restore_limiter(doc.limiter, self.clock())
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                log.warning("kmi-rotor: stored limiter windows not used (%s)", e)
        self._rotations(run, doc, first)
        self._wake()

    def _rotations(self, run: Running, doc: StateDoc, first: bool) -> None:
        for pool in run.settings.pools:
            rotations = doc.pools[pool.name].rotations if pool.name in doc.pools else 0
            seen = self.seen.rotations.get(pool.name)
            if seen is None and not first:
                seen = 0  # a pool first written by the CLI: every rotation is new
            if seen is not None and rotations > seen:
                run.engine.rotate(pool.name, rotations - seen)
            self.seen.rotations[pool.name] = rotations

    def _operator(self, run: Running, key: Key, op: Operator) -> None:
        """Apply an action another process wrote: a checked key's verdict as the answer that
        gave it would be applied, an operator's action as the operator's."""
        sig = signal_of(op)
        if sig is None:
            try:
                operate(run, key, op.action, self.clock(), None)
            except ValueError:  # written by a newer kmi-rotor: not ours to guess
                log.warning("kmi-rotor: key %s: unknown action %r ignored", key.label, op.action)
                return
        else:
            run.keeper.key(key).health = run.engine.observe(key, sig, self.clock())
            log.info("kmi-rotor: key %s: %s", key.label, sig.reason)
        # Written with the health it gave, so a restart knows the action is in that health.
        run.keeper.key(key).operator = op.model_copy(update={"applied": True})

    def announced(self, msg: dict[str, Any]) -> None:
        """An action another process or the CLI announced through the shared state."""
        run = self._running()
        if run is None:
            return
        action = msg["action"]
        for target in msg["targets"]:
            if action == "rotate":
                run.engine.rotate(target)
                continue
            key = run.engine.keys.get(target)
            if key is not None:
                operate(run, key, action, self.clock(), None)
        self._wake()
