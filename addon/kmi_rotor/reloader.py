"""Live configuration: a running proxy applies an edited config (or key file) within 2 s.

A background task looks at the files the configuration was read from (their inode, mtime and
size, read in a thread, never on the event loop) every half second. On a change it reads the
configuration again, in a thread, and hands it to the addon, which keeps every surviving key's
state (keys are matched by fingerprint). A broken edit keeps the last good configuration; the
error goes to the log and to `<state_dir>/proxy.json`, where `kmi-rotor status` shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from . import config, presence
from .config import ConfigError, Settings

log = logging.getLogger("kmi_rotor")

INTERVAL = 0.5
"""Seconds between two looks at the files: a change applies well within 2 s."""

Signature = tuple[tuple[str, Any], ...]


class Reloadable(Protocol):
    """What the watcher reloads: kmi-rotor's addon, as far as the watcher needs it."""

    @property
    def settings(self) -> Settings | None:
        """The configuration in force; None while none applies."""
        ...

    def apply(self, settings: Settings) -> None:
        """Apply a configuration read successfully (keys that stay keep their state)."""
        ...

    def not_configured(self, message: str) -> None:
        """No configuration applies yet, and this one is broken (`message` says how)."""
        ...


def signature(paths: Iterable[Path]) -> Signature:
    """What identifies the files' current contents: inode, mtime and size of each (a folder:
    of each entry), None for a missing one. Blocking: call it from a thread."""
    out: list[tuple[str, Any]] = []
    for path in paths:
        out.append((str(path), _identity(path)))
        if path.is_dir():
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError:
                continue
            out += [(e.path, _identity(Path(e.path))) for e in entries if not e.is_dir()]
    return tuple(out)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ConfigWatcher:
    """Reloads the configuration when its files change, or when asked (`rotor.reload`)."""

    def __init__(
        self,
        rotor: Reloadable,
        explicit: Callable[[], str | None],
        servers: Callable[[], Any] = lambda: (),
    ) -> None:
        self.rotor = rotor
        self.explicit = explicit
        self.servers = servers
        self.reload_error: str | None = None
        self.loaded_at: float | None = None
        self._seen: Signature | None = None
        self._published: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wanted = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self.loaded_at = time.time() if self.rotor.settings else None
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kmi-rotor-cfg")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        settings = self.rotor.settings
        if settings is not None:
            presence.remove(settings.state_dir, os.getpid())

    def request(self) -> None:
        """Reload now, whether or not the files changed."""
        self._wanted.set()

    def remember(self) -> None:
        """Note the files as they are now, right after a configuration was read from them at
        start-up (where reading is blocking anyway), so that an edit from then on is seen."""
        self._seen = signature(self._paths())

    async def _run(self) -> None:
        if self._seen is None:
            self._seen = await asyncio.to_thread(signature, self._paths())
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), INTERVAL)
            try:
                await self.check(force=self._wanted.is_set())
            except Exception:
                log.exception("kmi-rotor: could not check the configuration for changes")

    def _paths(self) -> tuple[Path, ...]:
        settings = self.rotor.settings
        try:
            path = config.find_config(self.explicit())
        except ConfigError:
            path = None
        own = (path,) if path is not None else ()
        return tuple(dict.fromkeys(own + (settings.watched if settings else ())))

    async def check(self, *, force: bool = False) -> None:
        """Reload if the files changed (or `force`), then publish the proxy's presence."""
        self._wanted.clear()
        seen = await asyncio.to_thread(signature, self._paths())
        if force or seen != self._seen:
            self._seen = seen
            await self.reload(seen)
        await self._publish()

    async def reload(self, seen: Signature = ()) -> bool:
        """Read the configuration (in a thread) and apply it; False when it is broken. `seen`:
        the files as they were before reading them, so an edit made meanwhile is not missed."""
        try:
            path = config.find_config(self.explicit())
            settings = await asyncio.to_thread(config.load, path)
        except ConfigError as e:
            self._broken(str(e))
            return False
        old = self.rotor.settings
        if old is not None and settings.state_dir != old.state_dir:
            log.warning(
                "kmi-rotor: state_dir changes take effect at the next start (still %s)",
                old.state_dir,
            )
            settings = dataclasses.replace(settings, state_dir=old.state_dir)
        self.rotor.apply(settings)
        self.reload_error, self.loaded_at = None, time.time()
        # The new configuration may read other files: watch them from now on, keeping what was
        # seen before the load for the others.
        before = dict(seen)
        now = await asyncio.to_thread(signature, self._paths())
        self._seen = tuple((path, before.get(path, ident)) for path, ident in now)
        return True

    def _broken(self, message: str) -> None:
        if message == self.reload_error:
            return
        self.reload_error = message
        if self.rotor.settings is None:
            self.rotor.not_configured(message)
        else:
            log.error("kmi-rotor: %s (keeping the previous configuration)", message)

    async def _publish(self) -> None:
        settings = self.rotor.settings
        if settings is None:
            return
        doc = {
            "pid": os.getpid(),
            "servers": presence.listening(self.servers()),
            "config": str(settings.source),
            "config_loaded_at": self.loaded_at,
            "config_error": self.reload_error,
        }
        if doc != self._published:
            await asyncio.to_thread(presence.write, settings.state_dir, doc)
            self._published = doc
