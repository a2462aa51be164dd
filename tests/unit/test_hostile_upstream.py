"""Property tests: whatever an upstream sends, the readers of its answers neither raise nor let
an absurd value through.

Every reader of upstream bytes (`parse_signal`, the SSE tap, the Kimi usage reader, the token
readers) and the health rules fed by them are driven with random and adversarial input: values
of the wrong type, shape or size, numbers out of every range, broken encodings. Runs are
derandomized and database-less, so a failure reproduces on every machine.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmi_rotor.core import kimi, signals
from kmi_rotor.core import tokens as tk
from kmi_rotor.core.health import (
    KeyHealth,
    Policy,
    apply_network_error,
    apply_signal,
    decayed_score,
    headroom,
    next_usable_at,
    status,
)
from kmi_rotor.core.limiter import Limiter, Limits
from kmi_rotor.core.presets import PRESETS
from kmi_rotor.core.signals import (
    DEFAULT_HORIZON,
    FailureKind,
    Signal,
    Window,
    parse_go_duration,
    parse_retry_after,
    parse_signal,
)
from kmi_rotor.core.stream_tap import MAX_LINE, SSETap, StreamOutcome, Usage

HOSTILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NOW = 1795793400.0  # Fri, 27 Nov 2026 15:30:00 GMT
TIME_BOUND = 1.0
"""Seconds one parse of a 100 KB value may take: real cost is milliseconds, a pathological
regex would be seconds or more."""

HEADER_NAMES = (
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    *(
        f"x-ratelimit-{f}-{d}"
        for f in ("limit", "remaining", "reset")
        for d in ("requests", "tokens")
    ),
    *(
        f"anthropic-ratelimit-{d}-{f}"
        for d in ("requests", "tokens", "input-tokens", "output-tokens")
        for f in ("limit", "remaining", "reset")
    ),
    "anthropic-ratelimit-unified-status",
    "anthropic-ratelimit-unified-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
)
PROVIDERS = (*PRESETS, None, "", "GROQ", "groq ", "unknown-provider")


@pytest.fixture(autouse=True, scope="module")
def _restore_malformed_report() -> Iterator[None]:
    """Thousands of malformed headers are reported here; other modules see the set as it was."""
    saved = set(signals._REPORTED)
    yield
    signals._REPORTED.clear()
    signals._REPORTED.update(saved)


# -- hostile scalars ------------------------------------------------------------------------------

ODD_NUMBERS = (
    "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e-400", "0x10", "1_000",
    "０", "٣", "1.", ".5", "-0", "+5", "99999999999999999999", "1e3", "1E+3", "4.2e1", "1.0.0",
    " 7 ", "\t5\t", "5 5", "18446744073709551616", "-9223372036854775809",
)  # fmt: skip
ODD_DATES = (
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 0000 00:00:00 GMT",
    "Thu, 01 Jan 1970 00:00:00 +9999",
    "Sat, 32 Foo 2026 25:61:61 XYZ",
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59.999999+00:00",
    "9999-12-31T23:59:59-23:59",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00+23:59",
    "2026-02-30T00:00:00Z",
    "2026-01-01T00:00:00+24:00",
    "2026-11-27T15:30:00+05:30:15.123456",
    "2026-11-27",
    "2026-11-27T15:30:00",
)
ODD_TEXT = (
    "", " ", "\x00", "\x7f", "\r\n", "é", "日本", "\udcff\udc80", '"', '"unclosed', ";;;", ",,,",
    "r=;t=", "=", "\ufeff5", "🙂",
)  # fmt: skip
FILLERS = ("9", "1.", "-", "e9", "1h", "30s", '"', '"a', ",", ";", "=", " ", "é", "\x00", "r=1;")


def _rfc3339(y: int, mo: int, d: int, h: int, mi: int, off: str) -> str:
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:00{off}"


def _go(parts: list[tuple[str, str]]) -> str:
    return "".join(n + u for n, u in parts)


# Around every magnitude the readers treat differently: deltas, the horizon, epoch s and ms.
MAGNITUDES = (
    "0", "1", "59", "2678400", "2678401", "999999999", "1000000000", "1795793400", "4102444800",
    "999999999999", "1000000000000", "1795793400000", "999999999999999999", "1000000000000000000",
)  # fmt: skip
numbers = st.one_of(
    st.integers(-(10**40), 10**40).map(str),
    st.integers(0, 10**18).map(str),
    st.floats(0, 1e13).map(lambda f: f"{f:.3f}"),
    st.floats().map(repr),
    st.floats(allow_nan=False).map(lambda f: f"{f:e}"),
    st.sampled_from(ODD_NUMBERS + MAGNITUDES),
)
offsets = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
dates = st.one_of(
    st.sampled_from(ODD_DATES),
    st.builds(
        _rfc3339,
        st.integers(0, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 61),
        st.sampled_from(["Z", "z", "", "+23:59", "-23:59", "+99:99", "-00:00", "+05:30:15"]),
    ),
    st.datetimes(timezones=offsets).map(datetime.isoformat),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True)),
)
GO_UNITS = ("h", "m", "s", "ms", "us", "µs", "μs", "ns")
go_durations = st.one_of(
    st.lists(
        st.tuples(
            st.one_of(st.integers(-(10**25), 10**25).map(str), st.floats().map(repr)),
            st.sampled_from([*GO_UNITS, "", "d", "x"]),
        ),
        max_size=8,
    ).map(_go),
    st.lists(
        st.tuples(st.integers(0, 10**18).map(str), st.sampled_from(GO_UNITS)),
        min_size=1,
        max_size=4,
    ).map(_go),
)
texts = st.one_of(
    st.sampled_from(ODD_TEXT),
    st.text(max_size=60),
    st.text(st.characters(max_codepoint=0x1F), max_size=20),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
enormous = st.builds(lambda f, n: f * n, st.sampled_from(FILLERS), st.integers(1_000, 100_000))
scalar_values = st.one_of(numbers, dates, go_durations, texts)


def _ietf_item(name: str, r: str, t: str) -> str:
    return f'"{name}";r={r};t={t}'


def _policy_item(name: str, q: str, w: str, qu: str) -> str:
    return f'"{name}";q={q};w={w};qu="{qu}"'


ietf_values = st.one_of(
    st.lists(
        st.builds(
            _ietf_item, st.sampled_from(["default", "burst", ""]), scalar_values, scalar_values
        ),
        max_size=4,
    ).map(", ".join),
    st.builds(
        lambda a, b, c: f"limit={a}, remaining={b}, reset={c}",
        scalar_values,
        scalar_values,
        numbers,
    ),
    st.lists(
        st.builds(
            _policy_item,
            st.sampled_from(["default", "burst"]),
            scalar_values,
            scalar_values,
            st.sampled_from(["requests", "tokens", "bytes", ""]),
        ),
        max_size=3,
    ).map(", ".join),
    st.builds(lambda a, b: f"{a}, {a};w={b}", numbers, numbers),
)
header_values = st.one_of(scalar_values, ietf_values, enormous)
header_names = st.one_of(
    st.sampled_from(HEADER_NAMES),
    st.sampled_from(HEADER_NAMES),
    st.sampled_from(HEADER_NAMES).map(lambda n: f" {n.upper()} "),
    st.text(max_size=20),
)
header_pairs = st.lists(st.tuples(header_names, header_values), max_size=12)
headers = st.one_of(header_pairs, header_pairs.map(dict))

# -- hostile bodies -------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(),
    st.text(max_size=30),
    scalar_values,
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)
GEMINI_TYPES = (
    "type.googleapis.com/google.rpc.RetryInfo",
    "type.googleapis.com/google.rpc.QuotaFailure",
    "type.googleapis.com/google.rpc.ErrorInfo",
    "garbage",
)
violation = st.fixed_dictionaries(
    {},
    optional={
        "quotaId": st.one_of(st.sampled_from(["GenerateRequestsPerDayPerProject"]), json_values),
        "quotaMetric": json_values,
        "quotaValue": st.one_of(numbers, json_values),
    },
)
gemini_detail = st.fixed_dictionaries(
    {"@type": st.one_of(st.sampled_from(GEMINI_TYPES), json_values)},
    optional={
        "retryDelay": st.one_of(go_durations, json_values),
        "violations": st.one_of(st.lists(violation, max_size=3), json_values),
        "reason": json_values,
    },
)
error_object = st.fixed_dictionaries(
    {},
    optional={
        "code": st.one_of(st.integers(-1000, 1000), json_values),
        "status": st.one_of(st.sampled_from(["RESOURCE_EXHAUSTED"]), json_values),
        "type": json_values,
        "message": json_values,
        "details": st.one_of(
            st.lists(st.one_of(gemini_detail, json_values), max_size=5), json_values
        ),
        "metadata": st.one_of(
            st.fixed_dictionaries(
                {"headers": st.dictionaries(header_names, st.one_of(header_values, json_values))}
            ),
            json_values,
        ),
    },
)
json_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"error": st.one_of(error_object, json_values)}),
    st.lists(st.fixed_dictionaries({"error": error_object}), min_size=1, max_size=2),
).map(lambda v: json.dumps(v).encode())


def _deep(n: int, opener: bytes, closer: bytes, closed: bool) -> bytes:
    return opener * n + (b"1" + closer * n if closed else b"")


deep_bodies = st.builds(
    _deep,
    st.integers(1, 200_000),
    st.sampled_from([b"[", b'{"error":', b'{"a":[']),
    st.sampled_from([b"]", b"}", b"]}"]),
    st.booleans(),
)
huge_bodies = st.one_of(
    st.integers(1_000, 300_000).map(lambda n: json.dumps({"error": {"message": "é" * n}}).encode()),
    st.integers(1_000, 40_000).map(lambda n: json.dumps(list(range(n))).encode()),
    enormous.map(lambda s: s.encode("utf-8", "surrogatepass")),
)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.binary(max_size=100).map(lambda b: b"\xff\xfe\xc3" + b),
    json_bodies,
    deep_bodies,
    huge_bodies,
)
statuses = st.one_of(
    st.integers(100, 999),
    st.integers(-(2**63), 2**63),
    st.sampled_from([0, 99, 200, 401, 402, 403, 429, 500, 503, 529, 1000]),
)


# -- parse_signal ---------------------------------------------------------------------------------


def assert_sane_signal(sig: Signal, now: float, horizon: float) -> None:
    """Every time within [now, now + horizon]; every count finite and >= 0; a short reason."""
    assert isinstance(sig, Signal)
    assert isinstance(sig.kind, FailureKind)
    assert isinstance(sig.reason, str) and len(sig.reason) <= 120
    assert sig.retry_at is None or now <= sig.retry_at <= now + horizon
    if sig.kind is FailureKind.OK:
        assert sig.retry_at is None
    for w in sig.windows:
        assert isinstance(w, Window)
        assert w.reset_at is None or now <= w.reset_at <= now + horizon, w
        for n in (w.limit, w.remaining):
            assert n is None or (math.isfinite(n) and n >= 0), w


@HOSTILE
@given(
    status=statuses,
    headers=headers,
    body=bodies,
    now=st.floats(1e9, 4e9),
    provider=st.sampled_from(PROVIDERS),
)
def test_parse_signal_never_raises_and_keeps_times_in_range(
    status: int, headers: Any, body: bytes | None, now: float, provider: str | None
) -> None:
    sig = parse_signal(status, headers, body, now, provider=provider)
    assert_sane_signal(sig, now, DEFAULT_HORIZON)
    assert sig.status == status


TIME_HEADERS = (*(n for n in HEADER_NAMES if "reset" in n or "retry" in n), "ratelimit")


@settings(HOSTILE, max_examples=200)
@given(
    status=st.sampled_from([429, 402, 403, 503, 529]),
    name=st.sampled_from(TIME_HEADERS),
    value=st.one_of(numbers, dates, go_durations, ietf_values),
    now=st.floats(1e9, 4e9),
    provider=st.sampled_from(PROVIDERS),
)
def test_every_retry_and_reset_time_lies_between_now_and_the_horizon(
    status: int, name: str, value: str, now: float, provider: str | None
) -> None:
    sig = parse_signal(
        status, [(name, value), ("x-ratelimit-remaining", "0")], None, now, provider=provider
    )
    assert_sane_signal(sig, now, DEFAULT_HORIZON)


@settings(HOSTILE, max_examples=60)
@given(
    status=st.sampled_from([200, 429, 403, 503]),
    headers=header_pairs,
    body=json_bodies,
    horizon=st.floats(0, 1e9),
)
def test_parse_signal_honours_a_custom_horizon(
    status: int, headers: list[tuple[str, str]], body: bytes, horizon: float
) -> None:
    sig = parse_signal(status, headers, body, NOW, horizon=horizon)
    assert_sane_signal(sig, NOW, horizon)


@HOSTILE
@given(value=st.one_of(scalar_values, enormous), now=st.floats(1e9, 4e9))
def test_public_time_parsers_never_raise(value: str, now: float) -> None:
    d = parse_go_duration(value)
    assert d is None or (math.isfinite(d) and d >= 0)
    at = parse_retry_after(value, now)
    assert at is None or now <= at <= now + DEFAULT_HORIZON


def _slowest(calls: Iterable[Callable[[], object]]) -> float:
    worst = 0.0
    for call in calls:
        start = time.perf_counter()
        call()
        worst = max(worst, time.perf_counter() - start)
    return worst


def test_a_100kb_header_value_parses_fast() -> None:
    """No header value, however long and whatever it repeats, makes a regex backtrack."""
    values = [f * (100_000 // len(f)) for f in FILLERS] + ['"' + "a" * 100_000, "1" * 100_000 + "h"]
    calls = [
        lambda n=name, v=value: parse_signal(429, [(n, v)], None, NOW)
        for name in HEADER_NAMES
        for value in values
    ]
    calls += [lambda v=value: parse_go_duration(v) for value in values]
    calls += [lambda v=value: parse_retry_after(v, NOW) for value in values]
    assert _slowest(calls) < TIME_BOUND


def test_a_huge_error_body_parses_fast() -> None:
    big_message = json.dumps({"error": {"message": "overloaded " * 200_000}}).encode()
    calls = [
        lambda b=body, s=status: parse_signal(s, {}, b, NOW)
        for status in (403, 429, 500)
        for body in (big_message, b"[" * 500_000, b"\xff" * 500_000, b"a " * 500_000)
    ]
    assert _slowest(calls) < TIME_BOUND


# -- health ---------------------------------------------------------------------------------------

positive = st.floats(1e-6, 1e300)
policies = st.builds(
    Policy,
    max_cooldown_seconds=positive,
    quota_block_seconds=positive,
    rate_limit_backoff=positive,
    overload_backoff=positive,
    overload_backoff_max=positive,
    half_life_seconds=positive,
    auth_recheck_seconds=st.none() | positive,
)
count = st.none() | st.floats(0, 1e15)
window_specs = st.tuples(
    st.sampled_from(["requests", "tokens", "input_tokens", "unified"]),
    st.sampled_from([None, "minute", "day", "5s"]),
    count,
    count,
    st.none() | st.floats(0, DEFAULT_HORIZON),
)
steps = st.tuples(
    st.one_of(st.floats(0, 1e5), st.floats(-10, 0)),  # clocks step back, too
    st.sampled_from([*FailureKind, "network"]),
    st.none() | st.floats(0, DEFAULT_HORIZON),
    st.lists(window_specs, max_size=3),
    st.booleans(),
)
start_health = st.one_of(
    st.just(KeyHealth()),
    st.builds(
        KeyHealth,
        cooling_until=st.none() | st.floats(NOW - 1e6, NOW + 1e7),
        blocked_until=st.none() | st.floats(NOW - 1e6, NOW + 1e7),
        error_score=st.floats(0, 1e6),
        score_at=st.none() | st.floats(NOW - 1e6, NOW),
        rate_limit_streak=st.integers(0, 10**6),
        overload_streak=st.integers(0, 10**6),
    ),
)


def _signal(kind: FailureKind, now: float, retry: float | None, specs: list[Any]) -> Signal:
    windows = tuple(
        Window(d, p, lim, rem, None if r is None else now + r) for d, p, lim, rem, r in specs
    )
    return Signal(429, kind, None if retry is None else now + retry, windows, "hostile")


def _apply(h: KeyHealth, step: Any, now: float, policy: Policy) -> tuple[KeyHealth, str]:
    _, kind, retry, specs, outage = step
    if kind == "network":
        return apply_network_error(h, now, policy, outage=outage), kind
    return apply_signal(h, _signal(kind, now, retry, specs), now, policy, outage=outage), kind


def assert_health_step(
    before: KeyHealth, after: KeyHealth, kind: str, outage: bool, now: float, policy: Policy
) -> None:
    """The invariants of one step: caps, nothing shortened, a known state, a sane score."""
    for old, new in (
        (before.cooling_until, after.cooling_until),
        (before.blocked_until, after.blocked_until),
    ):
        if old is not None:
            assert new is not None and new >= old
    cooled = after.cooling_until != before.cooling_until
    if kind == FailureKind.RATE_LIMITED:
        assert after.cooling_until is not None
        if cooled:
            assert now <= after.cooling_until <= now + policy.max_cooldown_seconds
    elif kind in (FailureKind.OVERLOADED, "network") and cooled:
        assert not outage
        assert now <= after.cooling_until <= now + policy.overload_backoff_max  # type: ignore[operator]
    elif kind not in (FailureKind.OVERLOADED, "network"):
        assert not cooled
    if kind == FailureKind.CLIENT_ERROR or (outage and kind in (FailureKind.OVERLOADED, "network")):
        assert (
            after.error_score == before.error_score and after.blocked_until == before.blocked_until
        )
    assert_health_readable(after, now, policy)


def assert_health_readable(h: KeyHealth, now: float, policy: Policy) -> None:
    st_ = status(h, now)
    assert st_.state in ("ready", "cooling", "blocked", "disabled")
    assert st_.until is None or st_.until > now
    for later in (now, now + 1.0, now + 1e9):
        score = decayed_score(h, later, policy.half_life_seconds)
        assert math.isfinite(score) and score >= 0
    at = next_usable_at(h, now, policy)
    assert at is None or at >= now
    assert 0.0 <= headroom(h, now) <= 1.0


@settings(HOSTILE, max_examples=150)
@given(policy=policies, start=start_health, run=st.lists(steps, min_size=1, max_size=25))
def test_health_caps_and_never_shortens_a_penalty(
    policy: Policy, start: KeyHealth, run: list[Any]
) -> None:
    h, now = start, NOW
    for step in run:
        now += step[0]
        after, kind = _apply(h, step, now, policy)
        assert_health_step(h, after, kind, step[4], now, policy)
        h = after


@settings(HOSTILE, max_examples=60)
@given(
    policy=policies,
    run=st.lists(st.tuples(st.floats(0, 1e4), statuses, header_pairs, json_bodies), max_size=8),
)
def test_health_fed_by_parsed_responses(policy: Policy, run: list[Any]) -> None:
    h, now = KeyHealth(), NOW
    for dt, status_code, hdrs, body in run:
        now += dt
        sig = parse_signal(status_code, hdrs, body, now)
        after = apply_signal(h, sig, now, policy)
        assert_health_step(h, after, sig.kind, False, now, policy)
        h = after


# -- the SSE tap ----------------------------------------------------------------------------------

usage_values = st.one_of(
    st.integers(-(10**30), 10**30),
    st.integers(-5, 10**6),
    st.floats(),
    st.text(max_size=10),
    st.booleans(),
    st.none(),
    json_values,
)
usage_objects = st.fixed_dictionaries(
    {},
    optional={
        n: usage_values
        for n in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")
    },
)
usage_or_garbage = st.one_of(usage_objects, usage_objects, json_values)
finish_reasons = st.one_of(st.sampled_from([None, "stop", "error", "length"]), json_values)
payloads = st.one_of(
    st.builds(lambda u: {"usage": u}, usage_objects),
    st.builds(
        lambda c, f, u: {"choices": [{"delta": {"content": c}, "finish_reason": f}], "usage": u},
        st.text(max_size=20),
        finish_reasons,
        usage_or_garbage,
    ),
    st.builds(lambda u: {"type": "message_start", "message": {"usage": u}}, usage_or_garbage),
    st.builds(lambda u: {"type": "message_delta", "usage": u}, usage_or_garbage),
    st.builds(lambda e: {"type": "error", "error": e}, st.one_of(error_object, json_values)),
    st.builds(lambda e: {"error": e}, st.one_of(error_object, json_values)),
    json_values,
)
EVENT_NAMES = (
    "message_start", "message_delta", "message_stop", "content_block_delta", "ping", "error",
    "message", "garbage", "",
)  # fmt: skip
data_values = st.one_of(
    payloads.map(lambda p: json.dumps(p, ensure_ascii=False)),
    st.sampled_from(["[DONE]", " [DONE] ", "{", "null", ""]),
    st.text(max_size=30),
)
other_lines = st.sampled_from([": keep-alive", "id: 7", "retry: 1000", "data", "event", "junk"])
line_ends = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def sse_events(draw: st.DrawFn) -> list[str]:
    """One event's lines: maybe a name, one to three data lines, maybe a comment, a blank."""
    lines = []
    if draw(st.booleans()):
        lines.append("event: " + draw(st.sampled_from(EVENT_NAMES)))
    for value in draw(st.lists(data_values, min_size=1, max_size=3)):
        lines.append(("data: " if draw(st.booleans()) else "data:") + value)
    lines += draw(st.lists(other_lines, max_size=1))
    return [*lines, ""]


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """A plausible stream: events with mixed line ends, maybe a BOM, maybe a cut or junk end."""
    events = draw(st.lists(sse_events(), max_size=8))
    lines = [line for event in events for line in event]
    if lines and draw(st.booleans()):
        lines.pop()  # the last event's blank line never came
    text = "\ufeff" if draw(st.booleans()) else ""
    text += "".join(line + draw(line_ends) for line in lines)
    junk = draw(st.one_of(st.just(b""), st.binary(max_size=50)))
    return text.encode("utf-8", "surrogatepass") + junk


@st.composite
def chunked(draw: st.DrawFn, streams: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    """The stream, and the same bytes cut at random places or in small equal pieces."""
    data = draw(streams)
    if draw(st.booleans()):
        size = draw(st.integers(1, 16))
        return data, [data[i : i + size] for i in range(0, len(data), size)]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=30))))
    edges = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def assert_sane_outcome(o: StreamOutcome, fed: int) -> None:
    assert o.bytes == fed and o.events >= 0
    if o.usage is not None:
        for n in (o.usage.input_tokens, o.usage.output_tokens):
            assert n is None or (type(n) is int and n >= 0)
    if o.error is not None:
        assert isinstance(o.error.reason, str) and len(o.error.reason) <= 120
        assert o.error.status is None or 400 <= o.error.status <= 599
    assert not (o.truncated and (o.terminal_seen or o.error is not None))


def run_tap(chunks: list[bytes], max_line: int) -> tuple[SSETap, StreamOutcome]:
    """Feed `chunks` as mitmproxy would, checking each return and the buffer bound."""
    tap = SSETap(max_line=max_line)
    for chunk in chunks:
        assert tap(chunk) is chunk
        assert tap.buffered <= max_line
    end = b""
    assert tap(end) is end
    first = tap.finish()
    assert tap.finish() is first and tap.outcome is first
    assert tap(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and tap.finish() is first
    assert tap.internal_error is None
    assert_sane_outcome(first, sum(len(c) for c in chunks))
    return tap, first


stream_inputs = st.one_of(chunked(sse_streams()), chunked(st.binary(max_size=400)))


@settings(HOSTILE, max_examples=200)
@given(stream=stream_inputs, max_line=st.sampled_from([MAX_LINE, MAX_LINE, 1, 7, 64, 300]))
def test_sse_tap_survives_and_chunking_changes_nothing(
    stream: tuple[bytes, list[bytes]], max_line: int
) -> None:
    data, chunks = stream
    tap, outcome = run_tap(chunks, max_line)
    whole, whole_outcome = run_tap([data] if data else [], max_line)
    assert outcome == whole_outcome
    assert tap.discarded_lines == whole.discarded_lines


@settings(HOSTILE, max_examples=30)
@given(
    size=st.integers(2_000, 50_000),
    piece=st.integers(1, 4_096),
    filler=st.sampled_from([b"x", b"\r", b"data: ", b"\xff", b"{"]),
)
def test_sse_tap_memory_stays_bounded_on_lines_without_end(
    size: int, piece: int, filler: bytes
) -> None:
    """A line longer than the bound is dropped whatever the chunking; the next event counts."""
    line = b"data: " + filler * (size // len(filler))
    tail = b'\n\ndata: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\ndata: [DONE]\n\n'
    stream = line + tail
    chunks = [stream[i : i + piece] for i in range(0, len(stream), piece)]
    _, outcome = run_tap(chunks, 1_000)
    assert outcome.terminal_seen
    assert outcome.usage == Usage(3, 4)


def test_sse_tap_drops_a_line_far_beyond_the_default_bound() -> None:
    line = b"data: " + b"a" * (3 * MAX_LINE)
    tail = b'\n\ndata: {"usage": {"prompt_tokens": 5, "completion_tokens": 6}}\n\n'
    stream = line + tail
    tap, outcome = run_tap([stream[i : i + 65536] for i in range(0, len(stream), 65536)], MAX_LINE)
    assert tap.discarded_lines >= 1
    assert outcome.usage == Usage(5, 6)


@HOSTILE
@given(things=st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5), json_values)))
def test_sse_tap_hands_back_anything_that_is_not_bytes(things: list[Any]) -> None:
    tap = SSETap()
    for thing in things:
        assert tap(thing) is thing
    assert tap.finish().bytes == 0
    assert tap.internal_error is None


def test_sse_tap_keeps_reading_after_a_type_with_a_lone_surrogate() -> None:
    tap = SSETap()
    tap(b'data: {"type": "\\ud800", "usage": {"prompt_tokens": 1}}\n\n')
    tap(b'data: {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\ndata: [DONE]\n\n')
    outcome = tap.finish()
    assert tap.internal_error is None
    assert outcome.usage == Usage(7, 3)


# -- Kimi usages and token counts -----------------------------------------------------------------

num_values = st.one_of(
    st.integers(-(10**300), 10**300),
    st.floats(max_value=1e300),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-5", " 5 ", "1_000", "12", ""]),
    st.sampled_from(ODD_DATES),
    st.booleans(),
    st.none(),
    json_values,
)
RESET_NAMES = ("reset_in", "resetIn", "reset_in_seconds", "reset_at", "resetAt", "resetTime")
quota_objects = st.fixed_dictionaries(
    {}, optional={n: num_values for n in ("limit", "used", "remaining", *RESET_NAMES)}
)
# Durations stay below 1e300: a larger one overflows (see the xfail test below).
windows_objects = st.fixed_dictionaries(
    {},
    optional={
        "duration": st.one_of(
            st.floats(-1e300, 1e300), st.integers(-(10**30), 10**30), json_values
        ),
        "timeUnit": st.one_of(st.sampled_from([*kimi.UNIT_SECONDS, "day", "YEAR"]), json_values),
        "time_unit": st.sampled_from([*kimi.UNIT_SECONDS]),
    },
)
limit_items = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "window": st.one_of(windows_objects, json_values),
            "detail": st.one_of(quota_objects, json_values),
            "name": json_values,
            "limit": num_values,
            "remaining": num_values,
        },
    ),
    json_values,
)
# `limits` stays a list or a falsy value: a truthy scalar raises (see the xfail test below).
usages_docs = st.fixed_dictionaries(
    {},
    optional={
        "usage": st.one_of(quota_objects, json_values),
        "limits": st.one_of(st.lists(limit_items, max_size=5), st.sampled_from([None, 0, "", {}])),
    },
)
usage_bodies = st.one_of(
    usages_docs.map(json.dumps),
    usages_docs.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    st.text(max_size=100),
    json_values.map(json.dumps),
)


@settings(HOSTILE, max_examples=200)
@given(body=usage_bodies, now=st.floats(1e9, 4e9))
def test_kimi_usages_never_raise_and_stay_in_range(body: bytes | str, now: float) -> None:
    windows = kimi.parse_usages(body, now)
    assert isinstance(windows, tuple)
    for w in windows:
        assert isinstance(w.dimension, str) and (w.period is None or isinstance(w.period, str))
        assert w.reset_at is None or now <= w.reset_at <= now + kimi.MAX_HORIZON, w
        for n in (w.limit, w.remaining):
            assert n is None or (math.isfinite(n) and n >= 0), w


KIMI_CRASHES = [
    pytest.param(b'{"limits": 5}', id="limits-is-a-number"),
    pytest.param(b'{"limits": true}', id="limits-is-true"),
    pytest.param(
        b'{"limits": [{"window": {"duration": 1e308, "timeUnit": "WEEK"}, "limit": 1}]}',
        id="duration-overflows",
    ),
    pytest.param(b"[" * 100_000, id="deeply-nested"),
]


@pytest.mark.parametrize("body", KIMI_CRASHES)
def test_kimi_usages_never_raise_on_known_shapes(body: bytes) -> None:
    assert isinstance(kimi.parse_usages(body, NOW), tuple)


token_values = st.one_of(st.integers(-(10**30), 10**30), usage_values)
token_docs = st.one_of(
    st.fixed_dictionaries({"usage": usage_or_garbage}),
    st.fixed_dictionaries(
        {
            "usageMetadata": st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "promptTokenCount": token_values,
                        "candidatesTokenCount": token_values,
                    },
                ),
                json_values,
            )
        }
    ),
    st.fixed_dictionaries(
        {},
        optional={
            n: token_values for n in ("max_tokens", "max_completion_tokens", "max_output_tokens")
        }
        | {"generationConfig": st.one_of(st.fixed_dictionaries({"maxOutputTokens": token_values}))}
        | {"messages": json_values},
    ),
    json_values,
)
# Bodies stay shallow: deep nesting raises (see the xfail test below).
token_bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    token_docs.map(lambda d: json.dumps(d).encode()),
    huge_bodies,
)


def _is_count(n: object) -> bool:
    return type(n) is int and n >= 0


@settings(HOSTILE, max_examples=200)
@given(body=token_bodies)
def test_token_readers_never_raise_and_count_sanely(body: bytes | None) -> None:
    tokens_in, tokens_out = tk.reported_usage(body)
    assert tokens_in is None or _is_count(tokens_in)
    assert tokens_out is None or _is_count(tokens_out)
    estimate = tk.estimate_from_body(body)
    assert _is_count(estimate)
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):  # anything but a JSON object counts by its size alone
        assert estimate == tk.estimate_from_length(len(body or b""))


@pytest.mark.parametrize("reader", [tk.reported_usage, tk.estimate_from_body])
def test_token_readers_survive_deep_nesting(reader: Callable[[bytes], object]) -> None:
    reader(b"[" * 100_000)


def test_a_hostile_usage_count_does_not_break_the_limiter() -> None:
    body = b'{"usage": {"prompt_tokens": 1' + b"0" * 400 + b', "completion_tokens": 1}}'
    limiter = Limiter(Limits(), {"k": Limits(tokens_per_minute=1000)})
    admitted = limiter.try_admit(["k"], 10, NOW)
    tokens_in, tokens_out = tk.reported_usage(body)
    limiter.adjust(admitted.reservation, (tokens_in or 0) + (tokens_out or 0))  # type: ignore[union-attr]
    assert 0.0 <= limiter.headroom("k", NOW) <= 1.0


def test_dates_at_the_edges_of_the_calendar_are_ignored() -> None:
    """Dates at the edges of datetime's range never escape as OverflowError or ValueError."""
    for text in ODD_DATES:
        at = parse_retry_after(text, NOW)
        assert at is None or NOW <= at <= NOW + DEFAULT_HORIZON
        body = json.dumps({"usage": {"limit": 1, "reset_at": text}})
        for w in kimi.parse_usages(body, NOW):
            assert w.reset_at is None or NOW < w.reset_at <= NOW + kimi.MAX_HORIZON
