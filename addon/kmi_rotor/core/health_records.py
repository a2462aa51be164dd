"""A key's health as the state file keeps it: cooldowns, blocks, disables, known windows, and
the same per limit scope. Every field has a default, so older files keep loading; a number
that is not finite is dropped rather than making the file unreadable."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Persisted(BaseModel):
    """A model read back from the state file: a non-finite number in it (NaN, infinity) is
    dropped, so the field takes its default, rather than making the whole file unreadable."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {
                k: v for k, v in data.items() if not (isinstance(v, float) and not math.isfinite(v))
            }
        return data


class WindowState(Persisted):
    limit: float | None = None
    remaining: float | None = None
    reset_at: float | None = None
    seen_at: float = 0.0

    @classmethod
    def of(
        cls, limit: float | None, remaining: float | None, reset_at: float | None, seen_at: float
    ) -> WindowState:
        """A window from values already as validation leaves them (each a finite float, or
        None), not validated again: what `WindowState(...)` would give, in half the time.
        What comes from elsewhere (a file, a caller's dict) goes through validation."""
        values = {"limit": limit, "remaining": remaining, "reset_at": reset_at, "seen_at": seen_at}
        return built(cls, values, set(_WINDOW_FIELDS))


_WINDOW_FIELDS = frozenset(WindowState.model_fields)
_WINDOW_FIELDS_SET = set(_WINDOW_FIELDS)
"""Copied for each window made (`window_state`): a model's set of fields is its own."""


def window_state(
    limit: float | None, remaining: float | None, reset_at: float | None, seen_at: float
) -> WindowState:
    """`WindowState.of(limit, remaining, reset_at, seen_at)`, without its calls: one per
    window of every answer."""
    m = _new(WindowState)
    _set_dict(m, {"limit": limit, "remaining": remaining, "reset_at": reset_at, "seen_at": seen_at})
    _set_fields(m, _WINDOW_FIELDS_SET.copy())
    _set_extra(m, None)
    _set_private(m, None)
    return m


def updated[M: Persisted](m: M, update: dict[str, Any]) -> M:
    """`m.model_copy(update=update)` (its values taken as they are, not validated), in half
    the time: no copy of what these records never hold (extra fields, private attributes)."""
    return built(type(m), {**m.__dict__, **update}, m.__pydantic_fields_set__ | update.keys())


def built[M: Persisted](cls: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    """A record of `values` and `fields_set`, as pydantic lays one out, not validated
    (`values`: every field's, taken as they are; `fields_set`: the record's own)."""
    m = _new(cls)
    _set_dict(m, values)
    _set_fields(m, fields_set)
    _set_extra(m, None)  # `extra="ignore"`: none is ever kept
    _set_private(m, None)  # no private attributes
    return m


_new = object.__new__
# A model's own slots (and its `__dict__`) set through their descriptors: a quarter fewer
# instructions than `object.__setattr__` by name, as each record is made (a few per answer).
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


SCOPE_TTL = 86400.0
"""A scope not seen for this long is forgotten."""
MAX_SCOPES = 64
"""Scoped records kept per key at most (the least recently seen go first)."""


class ScopedHealth(Persisted):
    """What a key holds for one scope (a model, a model class): the provider's windows for it
    and a rate-limit cooldown that binds only requests of that scope."""

    cooling_until: float | None = None
    cooling_reason: str | None = None
    rate_limit_streak: int = 0
    windows: dict[str, WindowState] = Field(default_factory=dict)
    seen_at: float = 0.0


class KeyHealth(Persisted):
    """A key's health as persisted; every field has a default so old files keep loading."""

    cooling_until: float | None = None
    cooling_reason: str | None = None
    blocked_until: float | None = None
    blocked_reason: str | None = None
    disabled_reason: str | None = None
    disabled_at: float | None = None
    error_score: float = 0.0
    score_at: float | None = Field(None, description="When error_score had its stored value.")
    rate_limit_streak: int = 0
    overload_streak: int = 0
    windows: dict[str, WindowState] = Field(
        default_factory=dict, description='By "dimension" or "dimension:period".'
    )
    scopes: dict[str, ScopedHealth] = Field(
        default_factory=dict, description='By scope ("model:<name>", "class:<class>").'
    )
    updated_at: float = 0.0
