"""What the engine keeps, behind one interface: in this process, or shared through Redis.

The engine (`engine.py`) holds the decisions; an `EngineState` decides where what they act on
lives: limiter windows with their token entries and concurrency slots, key cooldowns (per key
and scope; "" is the whole key), strategy cursors, counters and operators' actions. The addon
talks to the state only through these methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Key, Pool
from ..engine import Decision, Engine


@dataclass(slots=True)
class Ask:
    """One request asking to be admitted: what every `EngineState.decide` is given. Not
    changed once made (not frozen: made for every request, and a frozen dataclass costs about
    four times more)."""

    pool: Pool
    tokens: int
    """The request's token estimate."""
    now: float
    deadline: float
    """The latest it may be told to wait until."""
    exclude: frozenset[str] = frozenset()
    """Fingerprints of keys it already failed on (a failover attempt)."""
    affinity: str | None = None
    """Its conversation's affinity value, if the pool has one."""
    scope: str = ""
    """Which of a key's scopes it counts in ("" is the whole key)."""
    model: str | None = None
    """The model it asks for (selects the pool's local per-model limits)."""

    def at(self, now: float) -> Ask:
        """The same request, asked again at `now` (what `dataclasses.replace` makes, in a sixth
        of the time: with `[cluster]`, every request is asked this way)."""
        return Ask(
            self.pool,
            self.tokens,
            now,
            self.deadline,
            self.exclude,
            self.affinity,
            self.scope,
            self.model,
        )

    def locally(self, engine: Engine) -> Decision:
        """The in-process admission of this request (the engine's own limiter)."""
        return engine.decide(
            self.pool,
            self.tokens,
            self.now,
            deadline=self.deadline,
            exclude=self.exclude,
            affinity=self.affinity,
            scope=self.scope,
            model=self.model,
        )


class EngineState(Protocol):
    mode: str
    """"local" (one process), "shared" (Redis), "degraded" (Redis away: local shares of the
    limits) or "refusing" (Redis away, policy refuse)."""

    async def decide(self, engine: Engine, ask: Ask) -> Decision:
        """Admission of one request (see Engine.decide); waits on nothing but bounded I/O."""
        ...

    def observed(self, engine: Engine, key: Key, now: float, scope: str = "") -> None:
        """The key's health or budget changed in this process: share its cooldown."""
        ...

    def operated(self, key: Key, action: str) -> None:
        """An operator acted on a key here: tell every process."""
        ...

    def rotated(self, pool: Pool) -> None:
        """An operator moved a sticky pool on to its next key here: move every process."""
        ...

    def count(self, fp: str, name: str, n: int = 1) -> None:
        """Add to a key's counter ("requests", "errors", "upstream_429", ...)."""
        ...

    async def may_poll(self, pool: str, seconds: float) -> bool:
        """Whether this process reads the pool's usage endpoint for the next `seconds` (one
        poller per pool across processes)."""
        ...

    def status(self) -> dict[str, Any]:
        """What the status page, `kmi-rotor status` and /metrics show of the state."""
        ...


class LocalState:
    """Everything in this process: the engine's own limiter, health and cursors; counters and
    actions travel through the state file (the keeper). Today's behaviour, unchanged."""

    mode = "local"

    async def decide(self, engine: Engine, ask: Ask) -> Decision:
        return ask.locally(engine)

    def observed(self, engine: Engine, key: Key, now: float, scope: str = "") -> None:
        return None

    def operated(self, key: Key, action: str) -> None:
        return None

    def rotated(self, pool: Pool) -> None:
        return None

    def count(self, fp: str, name: str, n: int = 1) -> None:
        return None

    async def may_poll(self, pool: str, seconds: float) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode}
