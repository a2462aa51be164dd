"""Who is in the cluster: heartbeats, the processes' records, and reading them back."""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any

from .limits import _script, _text

ALIVE = 60.0
"""A process heard from within this many seconds counts as alive."""


def process_id() -> str:
    """Unique for this process: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Registry:
    """Heartbeats in, the list of processes out."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._beat = client.register_script(_script("beat.lua"))

    async def beat(self, pid: str, record: dict[str, Any]) -> int:
        """Register this process now; returns how many were alive in the last minute."""
        out = await self._beat(args=[self.prefix, pid, json.dumps(record)])
        return max(1, int(out[1]))

    async def processes(self) -> list[dict[str, Any]]:
        """Every process heard from in the last hour, most recent first, with `last_seen_s`
        (seconds ago by Redis's clock) and `alive`."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(f"{self.prefix}:procs", 0, -1, withscores=True)
            pipe.hgetall(f"{self.prefix}:proc")
            (sec, usec), seen, records = await pipe.execute()
        now = sec * 1000 + usec / 1000
        out = []
        for member, score in seen:
            pid = _text(member)
            try:
                rec = json.loads(_text(records.get(member) or records.get(pid) or "{}"))
            except ValueError:
                rec = {}
            ago = round(max(0.0, now - score) / 1000.0, 1)
            out.append({**_clean(rec), "id": pid, "last_seen_s": ago, "alive": ago <= ALIVE})
        return sorted(out, key=lambda r: r["last_seen_s"])


def _clean(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        return {}
    keep = ("host", "listen", "in_flight", "mode", "started")
    return {k: rec[k] for k in keep if isinstance(rec.get(k), str | int | float)}
