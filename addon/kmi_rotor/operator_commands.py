"""The commands of mitmweb's command bar (and `mitmproxy`'s): `rotor.status`, `rotor.reload`,
`rotor.rotate`, `rotor.disable`, `rotor.enable`, `rotor.reset`; and how an operator's action
applies to a key, here or announced by another process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import command

from . import status
from .config import Key
from .core.state import Operator
from .reloader import ConfigWatcher
from .running import Running

log = logging.getLogger("kmi_rotor")


@dataclass
class Seen:
    """What this process has applied of the actions recorded in the state, so that each applies
    once: operators' actions by key (their time), rotations by pool (their count)."""

    operators: dict[str, float] = field(default_factory=dict)
    rotations: dict[str, int] = field(default_factory=dict)


def operate(run: Running, key: Key, action: str, now: float, seen: Seen | None) -> None:
    """Apply an operator's action (`disable`, `enable`, `reset`; ValueError for another).
    With `seen`, the action is this process's own: recorded in the state, told to the others."""
    d = run.keeper.key(key)
    d.health = run.engine.operate(key, action, now)
    if seen is not None:
        d.operator = Operator(action=action, at=now, applied=True)
        seen.operators[key.fingerprint] = now
        run.state.operated(key, action)
    log.info("kmi-rotor: key %s: %s", key.label, action)


class OperatorCommands:
    """The operators' commands; kmi-rotor's addon registers them with mitmproxy when it loads."""

    def __init__(
        self,
        running: Callable[[], Running | None],
        not_serving: Callable[[], str | None],
        watcher: ConfigWatcher,
        seen: Seen,
        wake: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        """`running`: the configured proxy (None: not serving, `not_serving` says why);
        `wake`: lets waiting requests look again once a key may serve."""
        self._running = running
        self._not_serving = not_serving
        self.watcher = watcher
        self.seen = seen
        self._wake = wake
        self.clock = clock

    def _run(self) -> Running:
        run = self._running()
        if run is None:
            raise ValueError(f"kmi-rotor is not serving: {self._not_serving()}")
        return run

    def _key_named(self, run: Running, label: str) -> Key:
        for key in run.settings.keys:
            if key.label == label:
                return key
        raise ValueError(f"no key labelled {label!r}")

    @command.command("rotor.status")
    def cmd_status(self) -> str:
        """Each key's status, remaining quota and counters, as a table."""
        run = self._running()
        if run is None:
            return f"kmi-rotor is not serving: {self._not_serving()}"
        doc = run.keeper.view()
        rows = status.rows(run.settings, doc, self.clock(), run.engine)
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
        run = self._run()
        pools = {p.name: p for p in run.settings.pools}
        names = [pool] if pool else [p.name for p in pools.values() if p.strategy == "sticky"]
        for name in names:
            if not run.engine.rotate(name):
                raise ValueError(f"pool {name!r} does not exist or is not sticky")
            run.keeper.pool_add(name, "rotations")
            self.seen.rotations[name] = self.seen.rotations.get(name, 0) + 1
            run.state.rotated(pools[name])

    @command.command("rotor.disable")
    def cmd_disable(self, label: str) -> None:
        """Stop using a key until it is enabled again."""
        run = self._run()
        operate(run, self._key_named(run, label), "disable", self.clock(), self.seen)

    @command.command("rotor.enable")
    def cmd_enable(self, label: str) -> None:
        """Use a key again (clears its disable, cooldown and block)."""
        run = self._run()
        operate(run, self._key_named(run, label), "enable", self.clock(), self.seen)
        self._wake()

    @command.command("rotor.reset")
    def cmd_reset(self, label: str) -> None:
        """Clear the cooldowns and blocks of a key, or of `all` keys."""
        run = self._run()
        keys = list(run.settings.keys) if label == "all" else [self._key_named(run, label)]
        for key in keys:
            operate(run, key, "reset", self.clock(), self.seen)
        self._wake()
