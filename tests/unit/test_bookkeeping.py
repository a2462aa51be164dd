"""The status page's recent requests: the last trace records, read as dicts when asked."""

from __future__ import annotations

from kmi_rotor.bookkeeping import RECENT, Bookkeeping, RecentRequests
from kmi_rotor.core.scrub import Scrubber
from kmi_rotor.core.signals import parse_signal
from kmi_rotor.settling import OWN_OK
from kmi_rotor.trace import TraceRecord


def record(i: int, **changes: object) -> TraceRecord:
    fields: dict[str, object] = {
        "ts": 1_700_000_000.0 + i,
        "id": f"flow-{i}",
        "pool": "p",
        "key": "a",
        "fp": "sha256:00",
        "method": "POST",
        "path": "/v1/chat/completions?key=secret",
        "status": 200,
        "ttfb_ms": 1.5,
        "total_ms": 9.0,
        "tokens_in": 3,
        "tokens_out": 4,
        "outcome": "ok",
        "attempt": 1,
        "stream": False,
    }
    return TraceRecord(**(fields | changes))  # type: ignore[arg-type]


def test_keeps_the_last_records_oldest_first_as_dicts() -> None:
    recent = RecentRequests(size=3)
    assert (len(recent), list(recent)) == (0, [])
    for i in range(5):
        recent.add(record(i))
    rows = list(recent)
    assert len(recent) == 3
    assert [r["id"] for r in rows] == ["flow-2", "flow-3", "flow-4"]
    assert rows[0] == record(2).as_dict()
    assert rows[0]["path"] == "/v1/chat/completions"  # what the trace keeps, never the query


def test_every_reading_is_a_fresh_dict() -> None:
    recent = RecentRequests(size=2)
    recent.add(record(1, stream=True))
    first = list(recent)
    first[0]["key"] = "changed"
    again = next(iter(recent))
    assert again["key"] == "a" and again["stream"] is True


def test_bookkeeping_lists_up_to_recent_requests() -> None:
    books = Bookkeeping(clock=lambda: 0.0)
    for i in range(RECENT + 5):
        books.recent.add(record(i))
    rows = list(books.recent)
    assert len(rows) == RECENT and rows[-1]["id"] == f"flow-{RECENT + 4}"


def test_a_success_reason_needs_no_scrubbing() -> None:
    """Settling skips the scrubber for the reason every success gets: it must stay the one
    parse_signal gives, whatever the answer's body or headers quote."""
    secret = "sk-echoed-" + "x" * 30
    for status in (200, 201, 304):
        sig = parse_signal(status, [("x-note", secret)], secret.encode(), 0.0)
        assert (sig.reason, sig.detail) == (OWN_OK, "")
    assert Scrubber([secret])(OWN_OK, 120) == OWN_OK
