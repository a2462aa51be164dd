"""The failover decisions, table-driven: which failures are retried, what ends the attempts,
what the client is told and when to come back."""

from __future__ import annotations

import math

import pytest

from kmi_rotor.core import failover as fo
from kmi_rotor.core.refusal import Refusal, render

NOW = 1_700_000_000.0

RETRY = [
    # outcome, attempt, max_attempts, another key ready, retried
    ("rate_limited", 1, 3, True, True),
    ("quota", 1, 3, True, True),
    ("auth", 2, 3, True, True),
    ("overloaded", 1, 3, True, True),
    ("error", 1, 3, True, True),  # refused, reset, TLS, timeout before the headers
    ("rate_limited", 3, 3, True, False),  # the last allowed attempt
    ("rate_limited", 1, 1, True, False),  # failover off
    ("rate_limited", 1, 3, False, False),  # no other key can serve now
    ("ok", 1, 3, True, False),
    ("client_error", 1, 3, True, False),  # a bad request fails on every key
    ("client_gone", 1, 3, True, False),
    ("truncated", 1, 3, True, False),  # after the first byte: never
    ("stream_error", 1, 3, True, False),
]


@pytest.mark.parametrize(("outcome", "attempt", "most", "ready", "expected"), RETRY)
def test_which_attempts_are_followed_by_another(outcome, attempt, most, ready, expected):
    assert fo.retry(outcome, attempt, most, ready) is expected


CLOSING = [
    ("rate_limited", "pool"),
    ("quota", "pool"),
    ("auth", "pool"),
    ("overloaded", "pass"),  # the provider's own answer: every key would have had it
    ("error", "pass"),
    ("ok", "pass"),
    ("client_error", "pass"),
    (None, "pass"),  # no attempt answered: the connection error stands
]


@pytest.mark.parametrize(("outcome", "expected"), CLOSING)
def test_what_the_client_gets_once_the_attempts_stop(outcome, expected):
    assert fo.closing(outcome) == expected


RETRY_AT = [
    # pool available at (from now), told (from now)
    (0.0, 1.0),  # a key is ready: come back in a second, never 0
    (-5.0, 1.0),
    (0.2, 1.0),
    (1.0, 1.0),
    (2.5, 2.5),
    (37.2, 37.2),
]


@pytest.mark.parametrize(("available", "told"), RETRY_AT)
def test_the_pool_says_when_to_come_back_at_least_a_second_ahead(available, told):
    at = fo.retry_at(NOW + available, NOW)
    assert at == pytest.approx(NOW + told)
    _, headers, body = render(Refusal(429, "pool_exhausted", "x", at), NOW)
    assert int(headers["retry-after"]) == math.ceil(told) >= 1
    assert 1000 <= int(headers["retry-after-ms"]) == pytest.approx(told * 1000, abs=1)
    assert body["error"]["retry_after"] >= 1


@pytest.mark.parametrize("available", [None, math.inf, math.nan])
def test_no_time_when_no_key_will_serve(available):
    assert fo.retry_at(available, NOW) is None
