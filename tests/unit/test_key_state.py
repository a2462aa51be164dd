"""A key's state from (key, health, now): for people, and for steering. Table-driven, no clock
but the one passed in."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kmi_rotor.core.health import KeyHealth, Policy, WindowState
from kmi_rotor.core.key_state import in_service, key_state, paced, quota
from kmi_rotor.core.limiter import Limits

NOW = 1000.0


@dataclass(frozen=True)
class K:
    fingerprint: str = "sha256:0123456789abcdef"
    disabled: bool = False
    problem: str | None = None


L = Limits


SPENT = {"requests": WindowState(limit=10, remaining=0, reset_at=NOW + 30, seen_at=NOW)}

STATES = [
    # (key, health, spent_until, status, until, reason)
    (K(), KeyHealth(), None, "ready", None, None),
    (
        K(fingerprint="", problem="KEY unset"),
        KeyHealth(),
        None,
        "unknown",
        None,
        "no secret here, no record yet",
    ),
    (K(problem="KEY unset"), KeyHealth(), None, "ready", None, None),
    (K(disabled=True), KeyHealth(), None, "disabled", None, "disabled in the configuration"),
    (
        K(),
        KeyHealth(cooling_until=NOW + 5, cooling_reason="rate limited"),
        None,
        "cooling",
        NOW + 5,
        "rate limited",
    ),
    (
        K(),
        KeyHealth(blocked_until=NOW + 60, blocked_reason="quota"),
        None,
        "blocked",
        NOW + 60,
        "quota",
    ),
    (
        K(),
        KeyHealth(disabled_reason="invalid key", disabled_at=NOW - 1),
        None,
        "disabled",
        None,
        "invalid key",
    ),
    (
        K(),
        KeyHealth(windows=SPENT),
        None,
        "cooling",
        NOW + 30,
        "provider reports no remaining quota",
    ),
    (K(), KeyHealth(), NOW + 7, "cooling", NOW + 7, "provider reports no remaining requests"),
    (K(), KeyHealth(), NOW - 7, "ready", None, None),
]


@pytest.mark.parametrize(("key", "h", "spent", "status", "until", "reason"), STATES)
def test_key_state(key, h, spent, status, until, reason) -> None:
    got = key_state(key, h, NOW, Policy(), spent)
    assert got == {"status": status, "until": until, "reason": reason}


def test_a_report_is_capped_by_the_policy() -> None:
    """A provider's reset beyond max_cooldown_seconds does not hold the key back past it."""
    far = {"requests": WindowState(limit=10, remaining=0, reset_at=NOW + 9000, seen_at=NOW)}
    h = KeyHealth(windows=far)
    assert key_state(K(), h, NOW, Policy(max_cooldown_seconds=60))["status"] == "cooling"
    assert key_state(K(), h, NOW + 61, Policy(max_cooldown_seconds=60))["status"] == "ready"


SERVICE = [
    (K(), KeyHealth(), True),
    (K(disabled=True), KeyHealth(), False),
    (K(), KeyHealth(blocked_until=NOW + 1, blocked_reason="quota"), False),
    (K(), KeyHealth(disabled_reason="invalid key"), False),
    (K(), KeyHealth(cooling_until=NOW + 1, rate_limit_streak=1), False),
    (K(), KeyHealth(cooling_until=NOW + 1, overload_streak=1), True),
    (K(), KeyHealth(cooling_until=NOW - 1, rate_limit_streak=1), True),
]


@pytest.mark.parametrize(("key", "h", "expected"), SERVICE)
def test_in_service(key, h, expected) -> None:
    assert in_service(key, h, NOW) is expected


PACED = [
    (L(), frozenset()),
    (L(requests_per_second=1), frozenset({"requests"})),
    (L(requests_per_day=100), frozenset({"requests"})),
    (L(tokens_per_minute=1000), frozenset({"tokens", "input_tokens", "output_tokens"})),
    (
        L(requests_per_hour=5, tokens_per_day=10),
        frozenset({"requests", "tokens", "input_tokens", "output_tokens"}),
    ),
]


@pytest.mark.parametrize(("limits", "expected"), PACED)
def test_paced(limits, expected) -> None:
    assert paced(limits) == expected


def test_quota_lists_live_provider_windows_then_local_ones() -> None:
    h = KeyHealth(
        windows={
            "tokens": WindowState(limit=100, remaining=40, reset_at=NOW + 10),
            "requests": WindowState(limit=10, remaining=2, reset_at=NOW - 1),  # reset already
            "unified": WindowState(limit=None, remaining=0.5, reset_at=None),
        }
    )
    local = {"requests_per_minute": {"limit": 20, "used": 25, "free_at": NOW + 3}}
    assert quota(h, NOW, local) == [
        {
            "name": "tokens",
            "source": "provider",
            "limit": 100,
            "remaining": 40,
            "resets_at": NOW + 10,
        },
        {
            "name": "unified",
            "source": "provider",
            "limit": None,
            "remaining": 0.5,
            "resets_at": None,
        },
        {
            "name": "requests_per_minute",
            "source": "local",
            "limit": 20,
            "remaining": 0.0,
            "resets_at": NOW + 3,
        },
    ]
