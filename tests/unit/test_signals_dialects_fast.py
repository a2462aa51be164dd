"""The fast path of `parse_signal` for a success in the other dialects (the simple one of Kimi
Code, Moonshot and OpenRouter, Anthropic's, every dialect for `generic` and unknown providers,
none for Gemini), as raw header pairs: exactly what the general path gives, warnings included,
or a hand-over to it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmi_rotor.core import signals
from kmi_rotor.core.signals import FailureKind, Window, parse_signal
from tests.unit.test_signals_fast import _both

NOW = 1795793400.0
CTYPE = ((b"content-type", b"application/json"),)
SIMPLE = (
    (b"X-RateLimit-Limit", b"1000"),
    (b"X-RateLimit-Remaining", b"999"),
    (b"X-RateLimit-Reset", b"1795793460000"),
)
ANTHROPIC = tuple(
    (f"anthropic-ratelimit-{dim}-{part}".encode(), value)
    for dim in ("requests", "tokens", "input-tokens", "output-tokens")
    for part, value in (
        ("limit", b"4000"),
        ("remaining", b"3999"),
        ("reset", b"2026-12-04T18:00:00Z"),
    )
)
UNIFIED = (
    (b"anthropic-ratelimit-unified-status", b"allowed"),
    (b"anthropic-ratelimit-unified-reset", b"1795797000"),
)
OPENAI = (
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"x-ratelimit-reset-requests", b"6ms"),
    (b"x-ratelimit-limit-tokens", b"30000000"),
    (b"x-ratelimit-remaining-tokens", b"29999990"),
    (b"x-ratelimit-reset-tokens", b"0s"),
)
IETF = ((b"RateLimit", b'"default";r=50;t=30'), (b"RateLimit-Policy", b'"default";q=100;w=60'))

CASES: list[tuple[str, tuple[Any, ...]]] = [
    ("simple", CTYPE + SIMPLE),
    ("simple lower case", tuple((n.lower(), v) for n, v in SIMPLE)),
    ("simple upper case", tuple((n.upper(), v) for n, v in SIMPLE)),
    ("anthropic", CTYPE + ANTHROPIC + UNIFIED),
    ("anthropic mixed case", tuple((n.title(), v) for n, v in ANTHROPIC)),
    ("openai", CTYPE + OPENAI),
    ("every dialect", CTYPE + OPENAI + ANTHROPIC + UNIFIED + SIMPLE),
    ("ietf", CTYPE + IETF),
    ("ietf legacy", ((b"ratelimit-limit", b"100, 100;w=60"), (b"ratelimit-remaining", b"5"))),
    ("ietf among others", SIMPLE + ANTHROPIC + OPENAI + IETF),
    ("none", CTYPE),
    ("empty", ()),
    ("only a reset", ((b"x-ratelimit-reset", b"30"),)),
    ("only a limit", ((b"anthropic-ratelimit-tokens-limit", b"30"),)),
    ("repeat keeps the first", (*SIMPLE, (b"x-ratelimit-remaining", b"1"))),
    ("repeat in another case", (*SIMPLE, (b"X-RATELIMIT-REMAINING", b"1"))),
    ("anthropic repeat", (*ANTHROPIC, (b"anthropic-ratelimit-tokens-remaining", b"1"))),
    ("space before a name", ((b" x-ratelimit-remaining", b"7"),)),
    ("space before an anthropic name", ((b" anthropic-ratelimit-requests-limit", b"7"),)),
    ("tab after a name", ((b"x-ratelimit-remaining\t", b"7"),)),
    ("nbsp after a name", ((b"x-ratelimit-remaining\xa0", b"7"),)),
    ("nbsp before a name", ((b"\xa0x-ratelimit-remaining", b"7"),)),
    ("x85 after a name", ((b"anthropic-ratelimit-unified-status\x85", b"rejected"),)),
    ("unit separator after a name", ((b"x-ratelimit-limit\x1f", b"7"),)),
    ("space before an ietf name", ((b" ratelimit", b'"d";r=1'),)),
    ("stripped repeat after the name", (*SIMPLE, (b"x-ratelimit-limit ", b"2"))),
    ("stripped repeat before the name", ((b"x-ratelimit-limit ", b"2"), *SIMPLE)),
    ("a longer name", ((b"x-ratelimit-limit-minute", b"7"), *SIMPLE)),
    ("a shorter name", ((b"x-ratelimit-", b"7"), (b"anthropic-ratelimit-", b"1"), *SIMPLE)),
    ("name inside another", ((b"y-x-ratelimit-remaining", b"7"),)),
    ("anthropic unknown name", ((b"anthropic-ratelimit-images-limit", b"7"), *ANTHROPIC)),
    (
        "retry-after on a success",
        ((b"retry-after", b"30"), (b"x-ms-retry-after-ms", b"9"), *SIMPLE),
    ),
    ("value with spaces", ((b"x-ratelimit-remaining", b" 12 "),)),
    ("value decimal", ((b"x-ratelimit-remaining", b"12.5"),)),
    ("value huge", ((b"x-ratelimit-remaining", b"9" * 16),)),
    ("value 15 digits", ((b"x-ratelimit-remaining", b"9" * 15),)),
    ("value beyond belief", ((b"anthropic-ratelimit-requests-limit", b"1" + b"0" * 17),)),
    ("value not ascii digits", ((b"x-ratelimit-remaining", "١٢".encode()),)),
    ("value superscript digits", ((b"x-ratelimit-limit", b"\xb2\xb3"),)),
    ("value garbage", ((b"anthropic-ratelimit-tokens-remaining", b"lots"),)),
    ("value empty", ((b"x-ratelimit-limit", b""), (b"anthropic-ratelimit-tokens-limit", b""))),
    ("value latin-1", ((b"x-ratelimit-reset", b"\xe91s"),)),
    ("value long", ((b"x-ratelimit-reset", b"1" * 5000), (b"x-ratelimit-limit", b"2" * 5000))),
    ("value negative", ((b"x-ratelimit-remaining", b"-1"),)),
    ("reset go duration", ((b"x-ratelimit-reset", b"6m0s"),)),
    ("reset epoch seconds", ((b"anthropic-ratelimit-requests-reset", b"1795793460"),)),
    ("reset date", ((b"x-ratelimit-reset", b"Fri, 27 Nov 2026 15:31:00 GMT"),)),
    ("reset local date", ((b"anthropic-ratelimit-tokens-reset", b"2026-12-04T18:00:00"),)),
    ("reset past", ((b"x-ratelimit-reset", b"1000000000"),)),
    ("reset beyond horizon", ((b"anthropic-ratelimit-unified-reset", b"99999999h"),)),
    ("reset bad", ((b"x-ratelimit-reset", b"soon"), (b"anthropic-ratelimit-unified-reset", b"?"))),
    ("unified rejected", ((b"anthropic-ratelimit-unified-status", b" Rejected "),)),
    ("unified status empty", ((b"anthropic-ratelimit-unified-status", b" "),)),
    ("unified status latin-1", ((b"anthropic-ratelimit-unified-status", b"REJECTED\xa0"),)),
    ("unified reset only", ((b"anthropic-ratelimit-unified-reset", b"60"),)),
    ("unified reset bad, no status", ((b"anthropic-ratelimit-unified-reset", b"later"),)),
    ("all bad", ((b"x-ratelimit-limit", b"x"), (b"anthropic-ratelimit-tokens-reset", b"y"))),
    ("str pairs", (("x-ratelimit-remaining", "3"), ("anthropic-ratelimit-tokens-limit", "3"))),
    ("str value", ((b"x-ratelimit-remaining", "3"),)),
    ("str value of an ignored name", ((b"x-ratelimit-limit-minute", "3"), *SIMPLE)),
    ("bytearray name", ((bytearray(b"x-ratelimit-remaining"), b"3"),)),
    ("bytearray value", ((b"anthropic-ratelimit-tokens-limit", bytearray(b"3")),)),
    ("a pair of three", ((b"x-ratelimit-remaining", b"3", b"4"),)),
    ("after a bad pair", ((b"x-ratelimit-limit", b"3"), None, *SIMPLE)),
    ("a name that is no string", ((7, b"3"), *SIMPLE)),
    ("a name that cannot be hashed", (([1], b"3"), *ANTHROPIC)),
    ("a bytes name among str ones", (("content-type", "x"), *SIMPLE)),
]
PROVIDERS = ["kimi-code", "moonshot", "openrouter", "OpenRouter", "anthropic", "Anthropic",
             "generic", "mistral", "unknown", "", None, "gemini"]  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [100, 200, 399])
@pytest.mark.parametrize(("label", "headers"), CASES, ids=[c[0] for c in CASES])
def test_fast_path_agrees_with_the_general_one(
    label: str, headers: tuple[Any, ...], status: int, provider: str | None
) -> None:
    fast, general, fast_warned, general_warned = _both(status, headers, provider)
    assert fast == general, label
    assert repr(fast) == repr(general), label
    assert fast_warned == general_warned, label
    assert [type(w) for w in fast.windows] == [Window] * len(fast.windows)


def _reads(provider: str) -> signals._Reads:
    return signals._SUCCESS_READS.get(provider, signals._EVERY_DIALECT)


def test_the_usual_answers_take_the_fast_path() -> None:
    for provider, headers in (
        ("kimi-code", SIMPLE),
        ("openrouter", SIMPLE),
        ("anthropic", ANTHROPIC + UNIFIED),
        ("generic", OPENAI + ANTHROPIC + SIMPLE),
        ("mistral", OPENAI),
        ("gemini", OPENAI + IETF),
    ):
        assert signals._success(CTYPE + headers, _reads(provider), NOW, 1e9) is not None
    sig = parse_signal(200, CTYPE + SIMPLE, None, NOW, provider="kimi-code")
    assert sig == signals.Signal(
        200, FailureKind.OK, None, (Window("requests", None, 1000.0, 999.0, NOW + 60),), "ok"
    )
    sig = parse_signal(200, CTYPE + ANTHROPIC + UNIFIED, None, NOW, provider="anthropic")
    at = 1796407200.0  # 2026-12-04T18:00:00Z
    assert sig.windows == (
        Window("requests", None, 4000.0, 3999.0, at),
        Window("tokens", None, 4000.0, 3999.0, at),
        Window("input_tokens", None, 4000.0, 3999.0, at),
        Window("output_tokens", None, 4000.0, 3999.0, at),
        Window("unified", None, None, None, 1795797000.0),
    )
    sig = parse_signal(200, OPENAI + ANTHROPIC[:3] + SIMPLE, None, NOW, provider="generic")
    assert [w.dimension for w in sig.windows] == ["requests", "tokens", "requests", "requests"]


@pytest.mark.parametrize(
    ("provider", "headers"),
    [
        ("kimi-code", ((b" x-ratelimit-remaining", b"7"),)),
        ("kimi-code", ((b"x-ratelimit-remaining\xa0", b"7"),)),
        ("anthropic", ((b"anthropic-ratelimit-unified-status\t", b"rejected"),)),
        ("kimi-code", ((b"x-ratelimit-remaining", "3"),)),
        ("anthropic", (("anthropic-ratelimit-tokens-limit", "3"),)),
        ("kimi-code", ((b"x-ratelimit-limit", b"3"), None)),
        ("generic", ((b"RateLimit", b'"d";r=1'),)),
        ("generic", ((b"ratelimit-remaining", b"1"),)),
        ("generic", ((b" x-ratelimit-limit-tokens", b"1"),)),
    ],
)
def test_what_the_fast_path_cannot_read_exactly_goes_to_the_general_one(
    provider: str, headers: Any
) -> None:
    assert signals._success(headers, _reads(provider), NOW, 1e9) is None


def test_every_provider_listed_has_its_reads() -> None:
    assert set(signals._SUCCESS_READS) == set(signals._SPOKEN)
    for provider in signals._OPENAI_SPEAKERS:  # any other `x-ratelimit-*` name is bailed on
        assert signals._SUCCESS_READS[provider].bail == (b"x-ratelimit-",)
    assert signals._SUCCESS_READS["groq"].periods == {"requests": "day", "tokens": "minute"}
    assert {"kimi-code", "moonshot", "openrouter", "anthropic", "gemini"} <= set(
        signals._SUCCESS_READS
    )
    assert signals._EVERY_DIALECT.bail == (b"ratelimit",)
    assert len(signals._EVERY_DIALECT.slots) == 6 + 14 + 3
    assert signals._SUCCESS_READS["gemini"].slots == {}


_NAMES = st.sampled_from(
    [n.lower() for n, _ in SIMPLE + ANTHROPIC + UNIFIED + OPENAI + IETF]
    + [n for n, _ in SIMPLE + IETF]
    + [n.upper() for n, _ in ANTHROPIC[:3] + UNIFIED]
    + [b"content-type", b"retry-after", b"x-ratelimit-limit-minute", b"ratelimit-limit"]
    + [b" x-ratelimit-limit", b"x-ratelimit-reset\xa0", b"\x1canthropic-ratelimit-tokens-limit"]
)
_VALUES = st.one_of(
    st.sampled_from(
        [
            b"0",
            b"1",
            b"12",
            b"1.5",
            b"1ms",
            b"6m0s",
            b"-1",
            b"",
            b" 3",
            b"1e3",
            b"rejected",
            b" Allowed",
            b"1795793460000",
            b"2026-12-04T18:00:00Z",
            b'"default";r=5;t=3',
        ]
    ),
    st.binary(max_size=12),
)


@given(
    st.lists(st.tuples(_NAMES, _VALUES), max_size=10),
    st.sampled_from(["kimi-code", "anthropic", "generic", "gemini"]),
)
def test_any_raw_pairs_read_alike(pairs: list[tuple[bytes, bytes]], provider: str) -> None:
    fast, general, fast_warned, general_warned = _both(200, tuple(pairs), provider)
    assert fast == general
    assert fast_warned == general_warned


DATES = ["2026-12-04T18:00:00Z", "2026-12-04T18:00:00", "2026-12-04T18:00:00+02:00",
         "2026-12-04T18:00:00.5Z", "2026-13-04T18:00:00Z", "Fri, 27 Nov 2026 15:31:00 GMT",
         "27 Nov 2026 15:31 GMT", "", " ", "soon", "2026-12-04", "x" * 24, "x" * 25,
         "2026-12-04T18:00:00.123456+00:00"]  # fmt: skip


@pytest.mark.parametrize("value", DATES)
def test_a_date_is_read_alike_remembered_or_not(value: str) -> None:
    for _ in range(2):  # read, then remembered
        assert repr(signals._date(value)) == repr(signals._read_date(value))
    assert signals._short_date.cache_info().maxsize == 256


USUAL_OTHERS = tuple((name, b"x") for name in sorted(signals._USUAL_OTHERS))


def test_the_usual_other_headers_are_none_a_dialect_reads() -> None:
    read = [*signals._SUCCESS_READS["openai"].slots, *signals._EVERY_DIALECT.slots]
    prefixes = (*signals._EVERY_DIALECT.prefixes, b"x-ratelimit", b"retry-after")
    for name in signals._USUAL_OTHERS:
        assert name == name.lower().strip(), name
        assert not name.startswith(prefixes), name
        assert name not in read, name
        assert not signals._header_map(((name, b"1"),)), name


@pytest.mark.parametrize(
    "provider", ["openai", "groq", "kimi-code", "anthropic", "generic", "gemini"]
)
@pytest.mark.parametrize(
    ("label", "rates"),
    [("openai", OPENAI), ("simple", SIMPLE), ("anthropic", ANTHROPIC + UNIFIED), ("none", ())],
)
def test_answers_among_the_usual_other_headers_read_alike(
    label: str, rates: tuple[Any, ...], provider: str
) -> None:
    headers = USUAL_OTHERS[:9] + rates + USUAL_OTHERS[9:]
    fast, general, fast_warned, general_warned = _both(200, headers, provider)
    assert fast == general, label
    assert fast_warned == general_warned, label
    assert fast == parse_signal(200, rates, None, NOW, provider=provider), label
