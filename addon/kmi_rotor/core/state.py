"""The persisted state: a versioned document of per-key records, and how changes merge into it.

Several processes (the proxy, the CLI, a second proxy) may write the same file. Each keeps its
own changes as a delta and merges it into whatever is on disk under a lock: counters add up,
observations and health keep the newest. So no process ever overwrites another's work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, StrictInt, field_validator

from .health import KeyHealth, Persisted
from .health_records import updated

SCHEMA_VERSION = 1

KEY_COUNTERS = ("requests", "errors", "upstream_429", "retries", "tokens_in", "tokens_out")
POOL_COUNTERS = ("local_429", "rotations")


class Operator(Persisted):
    """An operator's last action on a key; every process applies each action exactly once."""

    action: str = Field(description="disable, enable, reset, or block (a checked key)")
    at: float = Field(description="Epoch seconds; the newest action wins.")
    reason: str | None = Field(
        None, description="Set by `kmi-rotor check`: applied as the answer it got would be."
    )
    until: float | None = Field(None, description="block: when the quota resets, if known.")
    applied: bool | None = Field(
        None,
        description="Whether a proxy has applied it and written the health it gave; None in "
        "records written before this was kept.",
    )


def pending_at_start(op: Operator, health: KeyHealth) -> bool:
    """Whether an action found in the state when a proxy starts still has to be applied.

    It does unless a proxy applied it: the health it then wrote carries the action, and a later
    action would have replaced this record. Newer health alone says nothing, since a proxy may
    write an observation of the key after the action was written and before it read it. For a
    record without the mark, newer health is the only sign there is that it was applied.
    """
    if op.applied is None:
        return health.updated_at < op.at
    return not op.applied


class KeyRecord(Persisted):
    label: str
    pool: str = ""
    fingerprint: str
    requests: int = Field(0, ge=0, description="Requests sent upstream with this key.")
    errors: int = Field(0, ge=0, description="Requests that failed (any failure kind).")
    upstream_429: int = Field(0, ge=0, description="429s the provider answered for this key.")
    retries: int = Field(
        0, ge=0, description="Requests re-sent on another key after failing on this one."
    )
    tokens_in: int = Field(0, ge=0)
    tokens_out: int = Field(0, ge=0)
    last_status: int | None = Field(None, description="HTTP status of the last upstream answer.")
    last_error: str | None = Field(None, description="Why the last request failed, if it did.")
    last_used: float | None = Field(None, description="Epoch seconds of the last observation.")
    health: KeyHealth = Field(default_factory=KeyHealth)
    operator: Operator | None = None


class PoolRecord(Persisted):
    local_429: int = Field(0, ge=0, description="Requests refused locally for lack of capacity.")
    rotations: int = Field(0, ge=0, description="Manual rotations asked for (sticky pools).")


class StateDoc(Persisted):
    schema_version: StrictInt = SCHEMA_VERSION
    updated_at: float = 0.0
    keys: dict[str, KeyRecord] = Field(default_factory=dict, description="By key fingerprint.")
    pools: dict[str, PoolRecord] = Field(default_factory=dict, description="By pool name.")
    limiter: dict[str, Any] | None = Field(None, description="Limiter windows worth keeping.")
    limiter_at: float = 0.0

    @field_validator("limiter")
    @classmethod
    def _limiter_shape(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # Windows are a few levels deep; anything deeper is not ours and could not be written back.
        return v if v is None or _depth(v) <= MAX_LIMITER_DEPTH else None


MAX_LIMITER_DEPTH = 8


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_LIMITER_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


@dataclass
class KeyDelta:
    """What one process observed about one key since its last flush."""

    label: str
    pool: str
    counters: dict[str, int] = field(default_factory=dict)
    last_status: int | None = None
    last_error: str | None = None
    last_used: float | None = None
    health: KeyHealth | None = None
    operator: Operator | None = None

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def observe(self, at: float, status: int | None, error: str | None) -> None:
        if self.last_used is None or at >= self.last_used:
            self.last_used, self.last_status, self.last_error = at, status, error

    def absorb(self, newer: KeyDelta) -> None:
        """Fold a later delta of the same key into this one."""
        for name, n in newer.counters.items():
            self.add(name, n)
        if newer.last_used is not None:
            self.observe(newer.last_used, newer.last_status, newer.last_error)
        if newer.health is not None and (
            self.health is None or newer.health.updated_at >= self.health.updated_at
        ):
            self.health = newer.health
        if newer.operator is not None and (
            self.operator is None or newer.operator.at >= self.operator.at
        ):
            self.operator = newer.operator
        self.label, self.pool = newer.label, newer.pool


@dataclass
class Delta:
    """All of one process's unflushed changes."""

    keys: dict[str, KeyDelta] = field(default_factory=dict)
    pools: dict[str, dict[str, int]] = field(default_factory=dict)
    limiter: dict[str, Any] | None = None
    limiter_at: float = 0.0

    def key(self, fingerprint: str, label: str, pool: str) -> KeyDelta:
        d = self.keys.get(fingerprint)
        if d is None:
            d = self.keys[fingerprint] = KeyDelta(label=label, pool=pool)
        return d

    def pool_add(self, pool: str, name: str, n: int = 1) -> None:
        counters = self.pools.setdefault(pool, {})
        counters[name] = counters.get(name, 0) + n

    def __bool__(self) -> bool:
        return bool(self.keys or self.pools or self.limiter is not None)

    def absorb(self, newer: Delta) -> None:
        for fp, d in newer.keys.items():
            mine = self.keys.get(fp)
            if mine is None:
                self.keys[fp] = d
            else:
                mine.absorb(d)
        for pool, counters in newer.pools.items():
            for name, n in counters.items():
                self.pool_add(pool, name, n)
        if newer.limiter is not None and newer.limiter_at >= self.limiter_at:
            self.limiter, self.limiter_at = newer.limiter, newer.limiter_at


def merge(doc: StateDoc, delta: Delta, now: float) -> StateDoc:
    """A new document: `doc` with the delta applied (counters added, newest observation and
    health kept)."""
    keys = dict(doc.keys)
    for fp, d in delta.keys.items():
        keys[fp] = _merge_key(keys.get(fp), fp, d)
    pools = dict(doc.pools)
    for name, counters in delta.pools.items():
        rec = pools.get(name) or PoolRecord()
        pools[name] = rec.model_copy(
            update={c: getattr(rec, c) + counters.get(c, 0) for c in POOL_COUNTERS}
        )
    limiter, limiter_at = doc.limiter, doc.limiter_at
    if delta.limiter is not None and delta.limiter_at >= doc.limiter_at:
        limiter, limiter_at = delta.limiter, delta.limiter_at
    # Built without validation: every part is a validated record or this process's own
    # limiter windows, and validating the windows again costs more than the rest of a write.
    return StateDoc.model_construct(
        schema_version=SCHEMA_VERSION,
        updated_at=now,
        keys=keys,
        pools=pools,
        limiter=limiter,
        limiter_at=limiter_at,
    )


def _merge_key(rec: KeyRecord | None, fp: str, d: KeyDelta) -> KeyRecord:
    rec = rec or KeyRecord(label=d.label, pool=d.pool, fingerprint=fp)
    values, counters = rec.__dict__, d.counters
    update: dict[str, object] = {"label": d.label, "pool": d.pool}
    for c in KEY_COUNTERS:
        update[c] = values[c] + counters.get(c, 0)
    last_used = values["last_used"]
    if d.last_used is not None and (last_used is None or d.last_used >= last_used):
        update["last_used"] = d.last_used
        update["last_status"] = d.last_status
        update["last_error"] = d.last_error
    if d.health is not None and d.health.updated_at >= values["health"].updated_at:
        update["health"] = d.health
    op = values["operator"]
    if d.operator is not None and (op is None or d.operator.at >= op.at):
        update["operator"] = d.operator
    # A thousand keys' records are merged twice a second under load: copied without
    # pydantic's general copy (every value here is validated already, or a sum of them).
    return updated(rec, update)


def overlay(doc: StateDoc, delta: Delta) -> StateDoc:
    """The state as this process sees it: what is on disk plus what it has not flushed yet."""
    return merge(doc, delta, doc.updated_at) if delta else doc
