"""The persisted state: a versioned document of per-key records, and how changes merge into it.

Several processes (the proxy, the CLI, a second proxy) may write the same file. Each keeps its
own changes as a delta and merges it into whatever is on disk under a lock: counters add up,
observations keep the newest. So no process ever overwrites another's work.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    label: str
    pool: str = ""
    fingerprint: str
    requests: int = Field(0, ge=0, description="Requests sent upstream with this key.")
    errors: int = Field(0, ge=0, description="Requests that ended without an upstream response.")
    last_status: int | None = Field(None, description="HTTP status of the last upstream answer.")
    last_error: str | None = Field(None, description="Why the last request failed, if it did.")
    last_used: float | None = Field(None, description="Epoch seconds of the last observation.")


class StateDoc(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    updated_at: float = 0.0
    keys: dict[str, KeyRecord] = Field(default_factory=dict, description="By key fingerprint.")


@dataclass
class KeyDelta:
    """What one process observed about one key since its last flush."""

    label: str
    pool: str
    requests: int = 0
    errors: int = 0
    last_status: int | None = None
    last_error: str | None = None
    last_used: float | None = None

    def observe(self, at: float, status: int | None, error: str | None) -> None:
        if self.last_used is None or at >= self.last_used:
            self.last_used, self.last_status, self.last_error = at, status, error


def merge(doc: StateDoc, deltas: dict[str, KeyDelta], now: float) -> StateDoc:
    """A new document: `doc` with every delta applied (counters added, newest observation kept)."""
    keys = {fp: rec.model_copy() for fp, rec in doc.keys.items()}
    for fp, d in deltas.items():
        rec = keys.get(fp) or KeyRecord(label=d.label, pool=d.pool, fingerprint=fp)
        update: dict[str, object] = {
            "label": d.label,
            "pool": d.pool,
            "requests": rec.requests + d.requests,
            "errors": rec.errors + d.errors,
        }
        if d.last_used is not None and (rec.last_used is None or d.last_used >= rec.last_used):
            update |= {
                "last_used": d.last_used,
                "last_status": d.last_status,
                "last_error": d.last_error,
            }
        keys[fp] = rec.model_copy(update=update)
    return StateDoc(schema_version=SCHEMA_VERSION, updated_at=now, keys=keys)


def overlay(doc: StateDoc, deltas: dict[str, KeyDelta]) -> StateDoc:
    """The state as this process sees it: what is on disk plus what it has not flushed yet."""
    return merge(doc, deltas, doc.updated_at)
