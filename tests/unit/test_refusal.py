"""Local refusals: status, headers and JSON body, and when the client is told to come back."""

from __future__ import annotations

import json
import math
from datetime import datetime

import pytest

from kmi_rotor.core.refusal import Refusal, render, retry_after_seconds

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (None, None),
        (0.0, 0),
        (-5.0, 0),
        (0.001, 1),
        (0.25, 1),
        (1.0, 1),
        (1.0000002, 2),
        (1.5, 2),
        (59.75, 60),
        (60.0, 60),
        (3600.5, 3601),
    ],
)
def test_retry_after_seconds_rounds_up(delta: float | None, expected: int | None) -> None:
    retry_at = None if delta is None else NOW + delta
    assert retry_after_seconds(retry_at, NOW) == expected


@pytest.mark.parametrize("delta", [0.0001 * i for i in range(1, 200)] + [0.5, 7.3, 12.99, 100.01])
def test_retry_after_is_never_early(delta: float) -> None:
    retry_at = NOW + delta
    wait = retry_after_seconds(retry_at, NOW)
    assert wait is not None and NOW + wait >= retry_at - 1e-6
    assert wait - (retry_at - NOW) < 1.0  # and never a whole second late


@pytest.mark.parametrize(
    ("delta", "seconds", "ms"),
    [(0.25, "1", "250"), (1.0, "1", "1000"), (1.5, "2", "1500"), (0.0, "0", "0"), (-3.0, "0", "0")],
)
def test_render_retry_headers(delta: float, seconds: str, ms: str) -> None:
    status, headers, body = render(Refusal(429, "local_rate_limit", "x", NOW + delta), NOW)
    assert status == 429
    assert headers["retry-after"] == seconds
    assert headers["retry-after-ms"] == ms
    assert body["error"]["retry_after"] == int(seconds)
    frees = datetime.fromisoformat(body["error"]["frees_at"]).timestamp()
    assert frees == pytest.approx(NOW + delta, abs=1e-3)


def test_render_retry_after_ms_rounds_up() -> None:
    _, headers, _ = render(Refusal(429, "c", "m", NOW + 0.0015), NOW)
    assert int(headers["retry-after-ms"]) == math.ceil(1.5) and headers["retry-after"] == "1"


def test_render_without_retry_at_has_no_retry_after() -> None:
    status, headers, body = render(Refusal(503, "all_keys_disabled", "every key is disabled"), NOW)
    assert status == 503
    assert "retry-after" not in headers and "retry-after-ms" not in headers
    assert "retry_after" not in body["error"] and "frees_at" not in body["error"]
    assert body["error"]["type"] == "kmi_rotor_error"


def test_render_common_headers_and_body() -> None:
    r = Refusal(429, "pool_exhausted", "no key can serve now", NOW + 3)
    _, headers, body = render(r, NOW)
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert body == {
        "error": {
            "type": "rate_limit_error",
            "code": "pool_exhausted",
            "message": "kmi-rotor: no key can serve now",
            "retry_after": 3,
            "frees_at": "2023-11-14T22:13:23.000+00:00",
        }
    }
    assert json.loads(json.dumps(body)) == body


@pytest.mark.parametrize("status", [413, 499, 500, 503])
def test_non_429_refusals_are_not_rate_limit_errors(status: int) -> None:
    _, _, body = render(Refusal(status, "c", "m"), NOW)
    assert body["error"]["type"] == "kmi_rotor_error"


@pytest.mark.parametrize(
    ("limit", "value", "delta", "policy", "state"),
    [
        (
            "requests_per_second",
            5,
            0.25,
            '"requests-per-second";q=5;w=1',
            '"requests-per-second";r=0;t=1',
        ),
        (
            "requests_per_minute",
            60,
            12.5,
            '"requests-per-minute";q=60;w=60',
            '"requests-per-minute";r=0;t=13',
        ),
        (
            "requests_per_hour",
            1000,
            1800.0,
            '"requests-per-hour";q=1000;w=3600',
            '"requests-per-hour";r=0;t=1800',
        ),
        (
            "requests_per_day",
            10,
            86399.1,
            '"requests-per-day";q=10;w=86400',
            '"requests-per-day";r=0;t=86400',
        ),
        (
            "tokens_per_minute",
            40000,
            59.0,
            '"tokens-per-minute";q=40000;w=60',
            '"tokens-per-minute";r=0;t=59',
        ),
        (
            "tokens_per_day",
            10**6,
            7.0,
            '"tokens-per-day";q=1000000;w=86400',
            '"tokens-per-day";r=0;t=7',
        ),
    ],
)
def test_render_ietf_ratelimit_headers(
    limit: str, value: int, delta: float, policy: str, state: str
) -> None:
    r = Refusal(429, "local_rate_limit", "m", NOW + delta, limit, value, "the proxy")
    _, headers, body = render(r, NOW)
    assert headers["ratelimit-policy"] == policy
    assert headers["ratelimit"] == state
    assert body["error"]["limit"] == limit and body["error"]["scope"] == "the proxy"


def test_ratelimit_without_retry_at_says_the_whole_window() -> None:
    r = Refusal(429, "c", "m", None, "requests_per_minute", 3, "key 'a'")
    _, headers, _ = render(r, NOW)
    assert headers["ratelimit"] == '"requests-per-minute";r=0;t=60'
    assert "retry-after" not in headers


@pytest.mark.parametrize(
    ("limit", "value"),
    [("concurrency", 2), ("requests_per_minute", None), ("tokens_per_day", None)],
)
def test_no_ratelimit_headers_without_a_window_and_its_value(limit: str, value: int | None) -> None:
    r = Refusal(429, "local_rate_limit", "m", NOW + 1, limit, value, "key 'a'")
    _, headers, body = render(r, NOW)
    assert "ratelimit" not in headers and "ratelimit-policy" not in headers
    assert body["error"]["limit"] == limit and body["error"]["scope"] == "key 'a'"
    assert headers["retry-after"] == "1"


def test_no_limit_no_limit_fields() -> None:
    _, headers, body = render(Refusal(429, "c", "m", NOW + 1), NOW)
    assert "limit" not in body["error"] and "scope" not in body["error"]
    assert "ratelimit" not in headers


def test_render_keys_list() -> None:
    keys = (
        {"label": "a", "status": "cooling", "reason": "rate limited", "until": NOW + 30},
        {"label": "b", "status": "disabled", "reason": "bad key", "until": None},
        {"label": "c", "status": "blocked", "reason": "quota", "until": NOW + 0.4, "extra": 1},
    )
    _, _, body = render(Refusal(429, "pool_exhausted", "m", NOW + 30, keys=keys), NOW)
    assert body["error"]["keys"] == [
        {
            "label": "a",
            "status": "cooling",
            "reason": "rate limited",
            "until": "2023-11-14T22:13:50+00:00",
        },
        {"label": "b", "status": "disabled", "reason": "bad key", "until": None},
        {
            "label": "c",
            "status": "blocked",
            "reason": "quota",
            "until": "2023-11-14T22:13:20+00:00",
        },
    ]


def test_render_without_keys_has_no_keys_field() -> None:
    _, _, body = render(Refusal(429, "c", "m", NOW + 1), NOW)
    assert "keys" not in body["error"]
