"""The fast path of `parse_signal` (a success in OpenAI's dialect, as raw header pairs) gives
exactly what the general path gives, warnings included, or hands over to it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmi_rotor.core import signals
from kmi_rotor.core.signals import FailureKind, Window, parse_signal

NOW = 1795793400.0
OPENAI = (
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"x-ratelimit-reset-requests", b"6ms"),
    (b"x-ratelimit-limit-tokens", b"30000000"),
    (b"x-ratelimit-remaining-tokens", b"29999990"),
    (b"x-ratelimit-reset-tokens", b"0s"),
)
CTYPE = ((b"content-type", b"application/json"),)

CASES: list[tuple[str, tuple[Any, ...]]] = [
    ("usual", CTYPE + OPENAI),
    ("none", CTYPE),
    ("empty", ()),
    ("requests only", OPENAI[:3]),
    ("reset only", ((b"x-ratelimit-reset-tokens", b"1m30s"),)),
    ("upper case", tuple((n.upper(), v) for n, v in OPENAI)),
    ("mixed case", ((b"X-RateLimit-Remaining-Requests", b"5"),)),
    ("repeat keeps the first", (*OPENAI, (b"x-ratelimit-remaining-requests", b"1"))),
    ("space before a name", ((b" x-ratelimit-remaining-requests", b"7"),)),
    ("tab after a name", ((b"x-ratelimit-remaining-requests\t", b"7"),)),
    ("nbsp after a name", ((b"x-ratelimit-remaining-requests\xa0", b"7"),)),
    ("nbsp before a name", ((b"\xa0x-ratelimit-remaining-requests", b"7"),)),
    ("other x-ratelimit name", ((b"x-ratelimit-remaining", b"7"), *OPENAI)),
    ("name inside another", ((b"y-x-ratelimit-remaining-requests", b"7"),)),
    ("retry-after on a success", ((b"retry-after", b"30"), *OPENAI)),
    ("value with spaces", ((b"x-ratelimit-remaining-requests", b" 12 "),)),
    ("value decimal", ((b"x-ratelimit-remaining-requests", b"12.5"),)),
    ("value huge", ((b"x-ratelimit-remaining-requests", b"9" * 16),)),
    ("value 15 digits", ((b"x-ratelimit-remaining-requests", b"9" * 15),)),
    ("value beyond belief", ((b"x-ratelimit-limit-requests", b"1" + b"0" * 17),)),
    ("value not ascii digits", ((b"x-ratelimit-remaining-requests", "١٢".encode()),)),
    ("value garbage", ((b"x-ratelimit-remaining-requests", b"lots"),)),
    ("value superscript digits", ((b"x-ratelimit-remaining-requests", b"\xb2\xb3"),)),
    ("value leading zeros", ((b"x-ratelimit-limit-requests", b"007"),)),
    ("value 16 digits", ((b"x-ratelimit-limit-tokens", b"1" * 16),)),
    ("value empty", ((b"x-ratelimit-limit-tokens", b""),)),
    ("value latin-1", ((b"x-ratelimit-reset-tokens", b"\xe91s"),)),
    ("value long", ((b"x-ratelimit-reset-tokens", b"1" * 5000),)),
    ("reset epoch seconds", ((b"x-ratelimit-reset-requests", b"1795793460"),)),
    ("reset epoch ms", ((b"x-ratelimit-reset-requests", b"1795793460000"),)),
    ("reset date", ((b"x-ratelimit-reset-requests", b"Fri, 27 Nov 2026 15:31:00 GMT"),)),
    ("reset past", ((b"x-ratelimit-reset-requests", b"1000000000"),)),
    ("reset beyond horizon", ((b"x-ratelimit-reset-requests", b"99999999h"),)),
    ("reset bad", ((b"x-ratelimit-reset-requests", b"soon"),)),
    ("all bad", ((b"x-ratelimit-limit-requests", b"x"), (b"x-ratelimit-remaining-requests", b"y"))),
    ("str pairs", (("x-ratelimit-remaining-requests", "3"),)),
    ("str value", ((b"x-ratelimit-remaining-requests", "3"),)),
    ("bytearray name", ((bytearray(b"x-ratelimit-remaining-requests"), b"3"),)),
    ("a pair of three", ((b"x-ratelimit-remaining-requests", b"3", b"4"),)),
    ("after a bad pair", ((b"x-ratelimit-limit-requests", b"3"), None, *OPENAI)),
    ("a name that is no string", ((7, b"3"), *OPENAI)),
    ("a name that cannot be hashed", (([1], b"3"), *OPENAI)),
    ("a bytes name among str ones", (("content-type", "x"), *OPENAI)),
]


def _both(status: int, headers: Any, provider: str | None) -> tuple[Any, Any, list[str], list[str]]:
    """The fast and the general path's answers, and the header names each warned about
    (the names warned about before are left as they were)."""
    saved = set(signals._REPORTED)
    try:
        signals._REPORTED.clear()
        fast = parse_signal(status, headers, None, NOW, provider=provider)
        fast_warned = sorted(signals._REPORTED)
        signals._REPORTED.clear()
        general = signals._parse_signal(
            status, headers, None, NOW, provider, signals.DEFAULT_HORIZON
        )
        general_warned = sorted(signals._REPORTED)
    finally:
        signals._REPORTED.clear()
        signals._REPORTED.update(saved)
    return fast, general, fast_warned, general_warned


@pytest.mark.parametrize("provider", ["openai", "groq", "deepseek", "OpenAI"])
@pytest.mark.parametrize("status", [200, 204, 301, 399])
@pytest.mark.parametrize(("label", "headers"), CASES, ids=[c[0] for c in CASES])
def test_fast_path_agrees_with_the_general_one(
    label: str, headers: tuple[Any, ...], status: int, provider: str
) -> None:
    fast, general, fast_warned, general_warned = _both(status, headers, provider)
    assert fast == general, label
    assert fast_warned == general_warned, label
    assert [type(w) for w in fast.windows] == [Window] * len(fast.windows)


def test_the_usual_answer_takes_the_fast_path_and_reads_both_windows() -> None:
    assert signals._success(CTYPE + OPENAI, signals._SUCCESS_READS["openai"], NOW, 1e6) is not None
    sig = parse_signal(200, CTYPE + OPENAI, None, NOW, provider="openai")
    assert sig == signals.Signal(
        200,
        FailureKind.OK,
        None,
        (
            Window("requests", None, 10000.0, 9999.0, NOW + 0.006),
            Window("tokens", None, 30000000.0, 29999990.0, NOW),
        ),
        "ok",
    )
    groq = parse_signal(200, OPENAI, None, NOW, provider="groq")
    assert [w.period for w in groq.windows] == ["day", "minute"]


@pytest.mark.parametrize(
    "headers",
    [
        ((b" x-ratelimit-remaining-requests", b"7"),),
        ((b"x-ratelimit-remaining", b"7"),),
        ((b"x-ratelimit-remaining-requests", "3"),),
        (("x-ratelimit-remaining-requests", "3"),),
        ((b"x-ratelimit-limit-requests", b"3"), None),
    ],
)
def test_what_the_fast_path_cannot_read_exactly_goes_to_the_general_one(headers: Any) -> None:
    assert signals._success(headers, signals._SUCCESS_READS["openai"], NOW, 1e6) is None


@pytest.mark.parametrize("status", [99, 400, 429, 500])
def test_failures_and_other_dialects_read_the_general_way(status: int) -> None:
    fast, general, _, _ = _both(status, OPENAI, "openai")
    assert fast == general
    for provider in ("anthropic", "generic", "kimi-code", "", "gemini"):
        fast, general, _, _ = _both(200, OPENAI, provider)
        assert fast == general


def test_a_malformed_header_warns_once_without_its_value(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signals, "_REPORTED", set())
    with caplog.at_level(logging.WARNING, logger="kmi_rotor"):
        for _ in range(3):
            parse_signal(
                200,
                ((b"x-ratelimit-remaining-tokens", b"sk-secret"),),
                None,
                NOW,
                provider="openai",
            )
    assert len(caplog.records) == 1
    assert "x-ratelimit-remaining-tokens" in caplog.text and "sk-secret" not in caplog.text


def test_the_fast_signal_and_window_are_what_their_classes_make() -> None:
    made = signals._signal(200, FailureKind.OK, None, (), "ok")
    assert made == signals.Signal(200, FailureKind.OK, None, (), "ok")
    assert hash(made) == hash(signals.Signal(200, FailureKind.OK, None, (), "ok"))
    assert repr(made) == repr(signals.Signal(200, FailureKind.OK, None, (), "ok"))
    w = signals._window_of("tokens", "minute", 1.0, None, 3.0)
    assert w == Window("tokens", "minute", 1.0, None, 3.0)
    assert hash(w) == hash(Window("tokens", "minute", 1.0, None, 3.0))
    with pytest.raises(AttributeError):
        w.limit = 2.0  # type: ignore[misc]


_NAMES = st.sampled_from(
    [n for n, _ in OPENAI]
    + [n.upper() for n, _ in OPENAI]
    + [b"content-type", b"retry-after", b"x-ratelimit-remaining", b" x-ratelimit-limit-tokens"]
    + [b"date", b"Date", b"server", b" server", b"x-request-id"]
)
_VALUES = st.one_of(
    st.sampled_from([b"0", b"1", b"12", b"1.5", b"1ms", b"6m0s", b"-1", b"", b" 3", b"1e3"]),
    st.binary(max_size=12),
)


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=10), st.sampled_from(["openai", "groq"]))
def test_any_raw_pairs_read_alike(pairs: list[tuple[bytes, bytes]], provider: str) -> None:
    fast, general, fast_warned, general_warned = _both(200, tuple(pairs), provider)
    assert fast == general
    assert fast_warned == general_warned


def _reset_as_before(value: str, now: float, horizon: float) -> float | None:
    """`_parse_reset` as written before its calls were written out."""
    s = value.strip()
    n = signals._number(s) if s[-1:].isdigit() else None
    if n is not None:
        at = n / 1000 if n > 1e12 else n if n > 1e9 else now + n
    elif (d := signals._go_duration(s)) is not None:
        at = now + d
    else:
        at = signals._date(s)
    return None if at is None else signals._clamp(at, now, horizon)


RESETS = ["1ms", "6m0s", " 2s ", "0", "0.5", "17", "1795793460", "1795793460000", "1e3", "-1",
          "Fri, 27 Nov 2026 15:31:00 GMT", "2026-11-27T15:31:00Z", "2026-11-27T15:31:00",
          "soon", "", " ", "9" * 18, "1s" * 16, "99999999h", "1.5h", "٣s"]  # fmt: skip


@pytest.mark.parametrize("now", [NOW, 0.0, -0.0, 1e300, float("inf"), float("nan")])
@pytest.mark.parametrize("value", RESETS)
def test_a_reset_is_read_as_before(value: str, now: float) -> None:
    for horizon in (signals.DEFAULT_HORIZON, 0.0, float("inf")):
        mine = signals._parse_reset(value, now, horizon)
        theirs = _reset_as_before(value, now, horizon)
        assert repr(mine) == repr(theirs), (value, now, horizon)
