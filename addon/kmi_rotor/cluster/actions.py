"""Operators' actions through Redis: applied to the shared cooldowns at once and announced to
every process (pub/sub), so that each applies it to its own engine within a round trip."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

ACTIONS = ("disable", "enable", "reset", "rotate")
ROTATE = """
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], (c + 1) % tonumber(ARGV[1]))
"""
"""A sticky pool's shared active key moves on by one, within the pool."""


def channel(prefix: str) -> str:
    return f"{prefix}:actions"


async def announce(
    client: Any,
    prefix: str,
    action: str,
    targets: Sequence[str],
    origin: str,
    *,
    pool_size: int = 0,
) -> None:
    """`targets`: key fingerprints (a pool name for rotate). One transaction, one round trip."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    async with client.pipeline(transaction=True) as pipe:
        for target in targets:
            if action == "disable":
                pipe.set(f"{prefix}:cool:{target}:", "inf")
            elif action == "rotate":
                if pool_size > 0:
                    pipe.eval(ROTATE, 1, f"{prefix}:rr:{target}", pool_size)
            else:
                pipe.delete(f"{prefix}:cool:{target}:")
        message = {"action": action, "targets": list(targets), "origin": origin, "at": time.time()}
        pipe.publish(channel(prefix), json.dumps(message))
        await pipe.execute()


def parse(data: Any) -> dict[str, Any] | None:
    """A message from the channel, or None when it is not one of ours."""
    try:
        msg = json.loads(data.decode() if isinstance(data, bytes) else data)
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(msg, dict) or msg.get("action") not in ACTIONS:
        return None
    targets = msg.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return None
    return msg
