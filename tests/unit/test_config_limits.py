"""Limits in the config file: every limit the limiter knows is a field at every scope, checked
the same way, merged key over pool, and reaches the limiter unchanged."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from kmi_rotor.config import ConfigError, LimitsConfig, from_dict
from kmi_rotor.core.limiter import Limits
from kmi_rotor.engine import limits_of

LIMIT_NAMES = [f.name for f in fields(Limits)]
SOURCE = Path("/nonexistent/rotor.toml")


def settings(*, limits: Any = None, key_limits: Any = None, own: Any = None) -> Any:
    key: dict[str, Any] = {"label": "a", "key": "sk-alphaalphaalphaalpha0001"}
    pool: dict[str, Any] = {"name": "p", "provider": "openai", "keys": [key]}
    raw: dict[str, Any] = {"pools": [pool]}
    if limits is not None:
        raw["limits"] = limits
    if key_limits is not None:
        pool["key_limits"] = key_limits
    if own is not None:
        key["limits"] = own
    return from_dict(raw, SOURCE, {})


def test_the_file_knows_exactly_the_limiters_limits() -> None:
    assert list(LimitsConfig.model_fields) == LIMIT_NAMES


@pytest.mark.parametrize("name", LIMIT_NAMES)
def test_every_limit_is_read_at_every_scope_and_reaches_the_limiter(name: str) -> None:
    s = settings(limits={name: 5}, key_limits={name: 7})
    assert limits_of(s.limits) == Limits(**{name: 5})
    assert limits_of(s.keys[0].limits) == Limits(**{name: 7})
    own = settings(key_limits={name: 7}, own={name: 3}).keys[0].limits
    assert limits_of(own) == Limits(**{name: 3})


def test_a_keys_own_limits_override_the_pools_field_by_field() -> None:
    s = settings(
        key_limits={"requests_per_minute": 60, "concurrency": 4},
        own={"requests_per_minute": 10, "tokens_per_day": 1_000},
    )
    assert limits_of(s.keys[0].limits) == Limits(
        requests_per_minute=10, tokens_per_day=1_000, concurrency=4
    )


@pytest.mark.parametrize("name", LIMIT_NAMES)
@pytest.mark.parametrize(
    ("value", "why"),
    [
        (0, "Input should be greater than 0"),
        (-1, "Input should be greater than 0"),
        (True, "Input should be a valid integer"),
        ("3", "Input should be a valid integer"),
        (1.5, "Input should be a valid integer"),
    ],
)
@pytest.mark.parametrize(
    ("scope", "where"),
    [
        ("limits", "limits"),
        ("key_limits", "pools[0].key_limits"),
        ("own", "pools[0].keys[0].limits"),
    ],
)
def test_a_bad_limit_is_one_line_naming_it(
    name: str, value: object, why: str, scope: str, where: str
) -> None:
    with pytest.raises(ConfigError) as e:
        settings(**{scope: {name: value}})
    assert str(e.value) == f"{SOURCE}: {where}.{name}: {why}"


def test_a_limits_table_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError) as e:
        settings(key_limits=5)
    assert str(e.value) == (
        f"{SOURCE}: pools[0].key_limits: Input should be a valid dictionary or instance of "
        "LimitsConfig"
    )


def test_an_unknown_limit_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        settings(own={"requests_per_week": 1})
    assert str(e.value) == f"{SOURCE}: pools[0].keys[0].limits.requests_per_week: unknown field"
