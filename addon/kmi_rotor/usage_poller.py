"""Reads Kimi Code's quota endpoint for each key in the background, off the event loop.

What it learns (remaining requests, reset times) goes into the keys' health, so traffic moves
away from a key before the provider refuses it. Only pools of provider `kimi-code` are polled,
one key at a time, spread over the interval.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable

from .config import Key, Pool
from .core.kimi import may_follow_redirect, parse_usages
from .running import Running

log = logging.getLogger("kmi_rotor")

TIMEOUT = 10.0
MAX_BODY = 256 * 1024


class _KeyedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same https origin: the request carries a key. Any other
    one is not followed and its 3xx status comes back as the answer."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not may_follow_redirect(req.full_url, newurl):
            log.warning(
                "kmi-rotor: the usage endpoint redirected elsewhere (%d); not followed with a key",
                code,
            )
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, key: Key, cafile: str | None) -> tuple[int, bytes]:
    """One blocking GET with the key (run it in a thread). Errors come back as a status; a
    redirect is followed only within the same https origin."""
    request = urllib.request.Request(
        url,
        headers={
            "Authorization": f"Bearer {key.secret.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": "kmi-rotor",
        },
    )
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _KeyedRedirects()
    )
    try:
        with opener.open(request, timeout=TIMEOUT) as resp:
            return resp.status, resp.read(MAX_BODY)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError) as e:  # URLError is an OSError; never echo the request
        log.warning("kmi-rotor: quota of key %s not read: %s", key.label, type(e).__name__)
        return 0, b""


class UsagePoller:
    """Polls the quota of every key of the pools that have a usage endpoint; what it reads goes
    to the engine (`Engine.observe_usage`), the state file and the shared state."""

    def __init__(self, clock: Callable[[], float], cafile: Callable[[], str | None]) -> None:
        """`cafile`: the CA bundle that verifies the endpoint (None: the system's)."""
        self.clock = clock
        self.cafile = cafile
        self._task: asyncio.Task[None] | None = None
        self._unsupported: set[str] = set()

    def start(self, run: Running) -> None:
        """Poll the pools of `run`'s settings (stops polling what it polled before)."""
        self.stop()
        polled = [p for p in run.settings.pools if p.usages_url and p.usage_poll_seconds > 0]
        if polled:
            self._task = asyncio.get_running_loop().create_task(
                self._run(run, polled), name="kmi-rotor-usages"
            )

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, run: Running, pools: list[Pool]) -> None:
        while True:
            interval = min(p.usage_poll_seconds for p in pools)
            for pool in pools:
                if pool.name in self._unsupported or not pool.usages_url:
                    continue
                if not await run.state.may_poll(pool.name, interval * 2):
                    continue  # another process of the cluster polls this pool
                keys = [k for k in pool.keys if not k.disabled]
                for key in keys:
                    try:
                        await self.poll_once(run, pool, key)
                    except Exception:  # one odd answer must not end the polling for good
                        log.exception("kmi-rotor: reading the quota of key %s failed", key.label)
                    await asyncio.sleep(interval / max(1, len(keys)) / 2)
            await asyncio.sleep(interval / 2)

    async def poll_once(self, run: Running, pool: Pool, key: Key) -> bool:
        """Read one key's quota and record it; True when windows were learnt."""
        if pool.usages_url is None:
            return False
        status, body = await asyncio.to_thread(fetch, pool.usages_url, key, self.cafile())
        if status == 404:
            self._unsupported.add(pool.name)
            log.info(
                "kmi-rotor: pool %s: %s is not a usage endpoint; not polling it",
                pool.name,
                pool.usages_url,
            )
            return False
        if status != 200:
            return False
        now = self.clock()
        windows = parse_usages(body, now)
        if not windows or key.fingerprint not in run.engine.keys:
            return False
        run.keeper.key(key).health = run.engine.observe_usage(key, windows, now)
        # A spent quota keeps every process of the cluster off the key.
        run.state.observed(run.engine, key, now)
        return True
