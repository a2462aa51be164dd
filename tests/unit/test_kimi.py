"""Kimi Code's `GET {base}/usages`: every documented shape, odd encodings, and garbage."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kmi_rotor.core.kimi import MAX_HORIZON, parse_usages
from kmi_rotor.core.signals import Window

NOW = 1795793400.0  # Fri, 27 Nov 2026 15:30:00 GMT
RESET = NOW + 3600.0  # 16:30:00 GMT
RESET_RFC3339 = "2026-11-27T16:30:00Z"


def plan(**fields: Any) -> dict[str, Any]:
    """A document with only the overall `usage` object."""
    return {"usage": fields}


def limit(name: str | None, detail: dict[str, Any], duration: Any, unit: Any) -> dict[str, Any]:
    """A document with one entry of `limits[]`."""
    item: dict[str, Any] = {"detail": detail, "window": {"duration": duration, "timeUnit": unit}}
    if name is not None:
        item["name"] = name
    return {"limits": [item]}


def requests(remaining: float | None, reset: float | None, lim: float | None = 100.0) -> Window:
    return Window("requests", "plan", lim, remaining, reset)


USAGE_CASES: list[tuple[str, dict[str, Any], tuple[Window, ...]]] = [
    (
        "reset_at RFC 3339 (Z)",
        plan(used=40, limit=100, remaining=60, reset_at=RESET_RFC3339),
        (requests(60.0, RESET),),
    ),
    (
        "reset_at RFC 3339 with offset and fraction",
        plan(used=40, limit=100, remaining=60, reset_at="2026-11-28T00:30:00.000+08:00"),
        (requests(60.0, RESET),),
    ),
    (
        "reset_at epoch s",
        plan(limit=100, remaining=60, reset_at=int(RESET)),
        (requests(60, RESET),),
    ),
    (
        "reset_at epoch ms",
        plan(limit=100, remaining=60, reset_at=int(RESET * 1000)),
        (requests(60, RESET),),
    ),
    (
        "reset_at epoch s as text",
        plan(limit="100", remaining="0", reset_at=str(int(RESET))),
        (requests(0, RESET),),
    ),
    ("reset_in s", plan(limit=100, remaining=0, reset_in=3600), (requests(0, RESET),)),
    ("resetIn (camelCase)", plan(limit=100, remaining=0, resetIn=3600), (requests(0, RESET),)),
    (
        "resetTime (camelCase)",
        plan(limit=100, remaining=0, resetTime=RESET_RFC3339),
        (requests(0, RESET),),
    ),
    (
        "reset_in wins over reset_at",
        plan(limit=100, remaining=5, reset_in=60, reset_at=int(RESET)),
        (requests(5, NOW + 60),),
    ),
    ("remaining from limit - used", plan(limit=100, used=30), (requests(70, None),)),
    ("used over limit: 0 remaining", plan(limit=100, used=130), (requests(0, None),)),
    ("remaining without limit", plan(remaining=7), (requests(7, None, None),)),
    ("limit without remaining or used", plan(limit=100), (requests(None, None),)),
    ("only used: nothing known", plan(used=3), ()),
    ("no reset", plan(limit=100, remaining=60), (requests(60, None),)),
    (
        "reset in the past",
        plan(limit=100, remaining=0, reset_at=int(NOW - 1)),
        (requests(0, None),),
    ),
    (
        "reset beyond the horizon",
        plan(limit=100, remaining=0, reset_at=int(NOW + MAX_HORIZON + 60)),
        (requests(0, None),),
    ),
    (
        "reset_in beyond the horizon",
        plan(limit=100, remaining=0, reset_in=MAX_HORIZON + 1),
        (requests(0, None),),
    ),
    (
        "unparseable date",
        plan(limit=100, remaining=1, reset_at="next tuesday"),
        (requests(1, None),),
    ),
    ("negative and boolean numbers", plan(limit=-5, remaining=True, used=2), ()),
]

WINDOW_CASES: list[tuple[Any, Any, str | None]] = [
    (1, "MINUTE", "minute"),
    (1, "HOUR", "hour"),
    (1, "DAY", "day"),
    (1, "WEEK", "week"),
    (300, "MINUTE", "18000s"),
    (5, "HOUR", "18000s"),
    (7, "DAY", "604800s"),
    (2, "WEEK", "1209600s"),
    (1, "minute", "minute"),  # the unit's case does not matter
    ("5", "HOUR", "18000s"),  # nor whether the duration is a number or its text
    (1, "FORTNIGHT", None),
    (None, "HOUR", None),
    ("soon", "HOUR", None),
    (1, None, None),
]

GARBAGE: list[Any] = [
    b"",
    b"not json",
    b"\xff\xfe",
    b"null",
    b"[]",
    b'"usage"',
    b"42",
    b"{}",
    json.dumps({"usage": 5, "limits": [5, None, "x", []]}).encode(),
    json.dumps({"usage": {"limit": "lots", "remaining": "some"}}).encode(),
    json.dumps({"limits": [{"detail": 5, "window": {"duration": 1, "timeUnit": "DAY"}}]}).encode(),
    b'{"usage": {"limit": Infinity, "remaining": NaN}}',
    None,
]


@pytest.mark.parametrize(
    ("doc", "expected"), [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES]
)
def test_overall_usage(doc: dict[str, Any], expected: tuple[Window, ...]) -> None:
    assert parse_usages(json.dumps(doc).encode(), NOW) == expected


@pytest.mark.parametrize(("duration", "unit", "period"), WINDOW_CASES)
def test_limit_window_periods(duration: Any, unit: Any, period: str | None) -> None:
    doc = limit("5h", {"used": 3, "limit": 10, "reset_in": 600}, duration, unit)
    assert parse_usages(json.dumps(doc), NOW) == (Window("5h", period, 10.0, 7.0, NOW + 600),)


def test_both_shapes_together_in_order() -> None:
    doc = {
        "usage": {"used": 40, "limit": 100, "remaining": 60, "reset_at": RESET_RFC3339},
        "limits": [
            {
                "name": "Rate Limit",
                "detail": {"used": 10, "limit": 10, "remaining": 0, "reset_in": 90},
                "window": {"duration": 5, "timeUnit": "MINUTE"},
            },
            {
                "detail": {"limit": 2000, "remaining": 1500, "reset_at": int(RESET * 1000)},
                "window": {"duration": 1, "timeUnit": "WEEK"},
            },
        ],
    }
    assert parse_usages(json.dumps(doc).encode(), NOW) == (
        Window("requests", "plan", 100.0, 60.0, RESET),
        Window("rate_limit", "300s", 10.0, 0.0, NOW + 90),
        Window("requests", "week", 2000.0, 1500.0, RESET),
    )


def test_limit_fields_on_the_item_itself_and_long_names() -> None:
    doc = {"limits": [{"name": "X" * 60, "limit": 10, "remaining": 4, "reset_in": 5}]}
    (w,) = parse_usages(json.dumps(doc), NOW)
    assert w == Window("x" * 40, None, 10.0, 4.0, NOW + 5)


def test_text_and_bytes_are_both_accepted() -> None:
    doc = json.dumps(plan(limit=10, remaining=1))
    assert parse_usages(doc, NOW) == parse_usages(doc.encode(), NOW) == (requests(1, None, 10),)


@pytest.mark.parametrize("body", GARBAGE)
def test_garbage_gives_no_window(body: Any) -> None:
    assert parse_usages(body, NOW) == ()


@pytest.mark.parametrize("value", [5, 1.5, True])
def test_limits_that_is_not_a_list_gives_no_window(value: Any) -> None:
    assert parse_usages(json.dumps({"limits": value}), NOW) == ()
