"""One normalised signal from any provider's response: what kind it is, when to retry, what is left.

Every value read here comes from an upstream that may be buggy or hostile: anything malformed is
ignored (and its header name logged once), never raised, and no time lies outside [now, horizon].
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from email.utils import parsedate_to_datetime
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .classify import BodyFacts, FailureKind, classify, read_body

log = logging.getLogger("kmi_rotor")

DEFAULT_HORIZON = 31 * 86400.0
_MAX_COUNT = 1e15
_VALUE_LIMIT = 1024
_REPORTED: set[str] = set()
"""Header names already reported as malformed: one warning per name and process is enough."""


@dataclass(frozen=True)
class Window:
    dimension: str
    """"requests", "tokens", "input_tokens", "output_tokens" (or "unified": Anthropic plans)."""
    period: str | None
    """"minute", "hour", "day", "<n>s", or None when the provider does not say."""
    limit: float | None
    remaining: float | None
    reset_at: float | None
    """Absolute epoch seconds, within [now, now + horizon]."""


@dataclass(frozen=True)
class Signal:
    status: int
    kind: FailureKind
    retry_at: float | None
    """When the provider says to retry (absolute, within [now, now + horizon]); None on success."""
    windows: tuple[Window, ...]
    reason: str
    """Short human text in kmi-rotor's words: it may be shown to any client."""
    detail: str = ""
    """What the upstream said in its own words (an in-stream error's message), if anything:
    for this flow only, and only once scrubbed of secrets."""


def parse_signal(
    status: int,
    headers: Iterable[tuple[str, str]] | Mapping[str, str],
    body: bytes | None,
    now: float,
    *,
    provider: str | None = None,
    horizon: float = DEFAULT_HORIZON,
) -> Signal:
    """Everything a response says about its key; never raises on anything the upstream sent.

    Rate-limit headers are read in the dialects `provider` speaks (`dialects`), every dialect
    for an unknown or generic one. An answer below 400 is a success whatever its body says:
    only an error's body is read (for its kind, Gemini's quota details and the rate-limit
    headers OpenRouter copies into it)."""
    if 100 <= status < 400 and type(headers) is tuple:  # a success, as raw pairs: the usual
        name = provider.lower() if provider else ""
        windows = _success(headers, _SUCCESS_READS.get(name, _EVERY_DIALECT), now, horizon)
        if windows is not None:
            return _signal(status, FailureKind.OK, None, windows, "ok")
    return _parse_signal(status, headers, body, now, provider, horizon)


def _parse_signal(
    status: int,
    headers: Iterable[tuple[str, str]] | Mapping[str, str],
    body: bytes | None,
    now: float,
    provider: str | None,
    horizon: float,
) -> Signal:
    """`parse_signal` for any answer: what `_success` gives its answers, read the
    general way."""
    facts = read_body(body) if status >= 400 else _NO_FACTS
    h = _header_map(headers)
    if facts.headers:  # the rate-limit headers OpenRouter copies into an error's body
        for name, value in _header_map(facts.headers).items():
            if name.startswith(("x-ratelimit", "ratelimit", "retry-after")):
                h.setdefault(name, value)
    kind, reason = classify(status, facts)
    name = (provider or "").lower()
    windows: tuple[Window, ...] = ()
    for dialect in dialects(name):
        if dialect == "openai":
            windows += _openai_windows(h, now, horizon, name)
        else:
            windows += _READERS[dialect](h, now, horizon)
    if facts.violations:
        windows += _gemini_windows(facts, now, horizon)
    retry_at = None if kind is FailureKind.OK else _retry_at(kind, h, facts, windows, now, horizon)
    return _signal(status, kind, retry_at, windows, reason[:120])


_new = object.__new__


def _signal(
    status: int,
    kind: FailureKind,
    retry_at: float | None,
    windows: tuple[Window, ...],
    reason: str,
) -> Signal:
    """`Signal(status, kind, retry_at, windows, reason)`, made without the frozen dataclass's
    `__init__` (an `object.__setattr__` per field): a third of the time, the same object."""
    sig = _new(Signal)
    _set_signal_dict(
        sig,
        {
            "status": status,
            "kind": kind,
            "retry_at": retry_at,
            "windows": windows,
            "reason": reason,
            "detail": "",
        },
    )
    return sig


# Each object's `__dict__` set through its class's descriptor: cheaper than
# `object.__setattr__(obj, "__dict__", ...)`, which looks the descriptor up by name each time.
_set_signal_dict = Signal.__dict__["__dict__"].__set__
_set_window_dict = Window.__dict__["__dict__"].__set__


def _window_of(
    dim: str, period: str | None, limit: float | None, remaining: float | None, reset: float | None
) -> Window:
    """`Window(dim, period, limit, remaining, reset)`, made as `_signal` makes a signal."""
    w = _new(Window)
    _set_window_dict(
        w,
        {"dimension": dim, "period": period, "limit": limit, "remaining": remaining,
         "reset_at": reset},
    )  # fmt: skip
    return w


_NO_FACTS = BodyFacts()
DIALECTS: Final = ("openai", "anthropic", "simple", "ietf")
"""The header dialects, in the order their windows are listed."""
_SPOKEN: Final[dict[str, tuple[str, ...]]] = {
    "openai": ("openai",),
    "groq": ("openai",),
    "deepseek": ("openai",),
    "anthropic": ("anthropic",),
    "kimi-code": ("simple",),
    "moonshot": ("simple",),
    "openrouter": ("simple",),
    "gemini": (),  # its limits are in the error body, read whatever the provider
}


def dialects(provider: str) -> tuple[str, ...]:
    """The rate-limit header dialects a provider's answers are read in: those it documents;
    all of them for `generic` and any provider not listed."""
    return _SPOKEN.get(provider, DIALECTS)


# -- times ----------------------------------------------------------------------------------------

# ASCII digits only: `\d` and float() would also accept other scripts' digits.
_NUMBER = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,12})?")
_GO_PART = re.compile(r"([0-9]{1,18}(?:\.[0-9]{0,12})?|\.[0-9]{1,12})(h|ms|m|s|us|µs|μs|ns)")
_GO_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go duration (`6m0s`, `2m59.56s`, `12ms`, `500us`); None for anything else."""
    s = text.strip() if isinstance(text, str) else ""
    one = _GO_PART.fullmatch(s)
    if one is not None:  # one part, as most resets are ("1s", "17ms"): a single match decides
        return float(one.group(1)) * _GO_UNITS[one.group(2)]
    if s == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(s) and pos < 64:
        m = _GO_PART.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(s) and pos and math.isfinite(total) else None


def _go_duration(text: str) -> float | None:
    """`parse_go_duration`, remembered for short values: a provider sends the same few resets
    ("1s", "6m0s"). A longer value is no real duration, and may be anything an upstream
    echoed (a key, even): it is read, not kept."""
    return _short_go_duration(text) if len(text) <= _REMEMBERED else parse_go_duration(text)


_REMEMBERED = 24


@functools.lru_cache(maxsize=256)
def _short_go_duration(text: str) -> float | None:
    return parse_go_duration(text)


def parse_retry_after(value: str, now: float, *, horizon: float = DEFAULT_HORIZON) -> float | None:
    """`Retry-After` (delta seconds or HTTP-date) as absolute epoch seconds, clamped to >= now."""
    s = value.strip() if isinstance(value, str) else ""
    delta = _number(s)
    at = now + delta if delta is not None else _date(s)
    return None if at is None else _clamp(at, now, horizon)


def _parse_reset(value: str, now: float, horizon: float) -> float | None:
    """A reset in any format seen: delta or epoch seconds or epoch ms (by magnitude), Go
    duration, RFC 3339 or HTTP date."""
    s = value.strip()
    n = _number(s) if s[-1:].isdigit() else None  # a Go duration ends in its unit: no number
    if n is not None:
        at = n / 1000 if n > 1e12 else n if n > 1e9 else now + n
    elif (
        d := _short_go_duration(s) if len(s) <= _REMEMBERED else parse_go_duration(s)
    ) is not None:  # `_go_duration(s)`, on every answer: one call fewer
        at = now + d
    else:
        at = _date(s)
        if at is None:
            return None
    # `_clamp(at, now, horizon)`, written out for the same reason.
    if not math.isfinite(at) or at > now + horizon:
        return None
    return now if now > at else at  # max(at, now), the same float whichever is equal


def _clamp(at: float, now: float, horizon: float) -> float | None:
    """Past times mean "now" (clock skew); beyond the horizon is no real provider's answer."""
    if not math.isfinite(at) or at > now + horizon:
        return None
    return max(at, now)


def _number(s: str) -> float | None:
    if len(s) <= 18 and s.isdigit() and s.isascii():  # a plain count, the usual case
        return float(s)
    return float(s) if _NUMBER.fullmatch(s) else None


def _count(s: str | None) -> float | None:
    """A count as a header states it (None when absent, malformed or beyond belief)."""
    if s is None:
        return None
    n = _number(s.strip())
    return n if n is not None and n <= _MAX_COUNT else None


def _date(s: str) -> float | None:
    """An RFC 3339 or HTTP date as epoch seconds; a date without a zone is UTC. Remembered for
    short values as `_go_duration` remembers them: Anthropic states each reset in RFC 3339
    (`2026-12-04T18:00:00Z`), the same one in several headers and answers."""
    return _short_date(s) if len(s) <= _REMEMBERED else _read_date(s)


@functools.lru_cache(maxsize=256)
def _short_date(s: str) -> float | None:
    return _read_date(s)


def _read_date(s: str) -> float | None:
    try:
        dt = datetime.fromisoformat(s) if s[4:5] == "-" else parsedate_to_datetime(s)
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    except Exception:  # the stdlib parsers fail in many ways on garbage
        return None


def _next_pacific_midnight(now: float) -> float:
    """When Gemini's daily quotas reset."""
    try:
        tz: tzinfo = ZoneInfo("America/Los_Angeles")
    except (ZoneInfoNotFoundError, ValueError):
        tz = timezone(timedelta(hours=-8))  # no tz database: PST is right most of the year
    day = datetime.fromtimestamp(now, tz).date() + timedelta(days=1)
    return datetime.combine(day, time(0), tz).timestamp()


# -- headers --------------------------------------------------------------------------------------

_JOINED = frozenset({"ratelimit", "ratelimit-policy"})
_READ: Final = ("x-ratelimit", "ratelimit", "retry-after", "anthropic-ratelimit", "x-ms-retry")
"""The only header names any rule here reads: the others are not kept."""
_READ_BYTES: Final = tuple(p.encode() for p in _READ)


def _header_map(headers: object) -> dict[str, str]:
    """Lower-cased names of the rate-limit and retry headers; repeated structured-field lists
    joined, other repeats keep the first."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    try:
        for name, value in items:  # type: ignore[attr-defined]
            if isinstance(name, bytes):  # raw pairs, the usual case: decoded only when read
                if not name.lower().lstrip().startswith(_READ_BYTES):
                    continue  # most headers: passed over before anything is decoded
                n = name.decode("latin-1").strip().lower()
            else:
                n = _text(name).strip().lower()
            if not n.startswith(_READ):
                continue
            # latin-1 maps each byte to one character: cutting before decoding is the same.
            if isinstance(value, bytes):
                v = value[:_VALUE_LIMIT].decode("latin-1")
            else:
                v = _text(value)[:_VALUE_LIMIT]
            if n in _JOINED and n in out:
                out[n] = f"{out[n]}, {v}"
            else:
                out.setdefault(n, v)
    except (TypeError, ValueError):
        pass  # a pair of an unexpected shape: keep what was read before it
    return out


def _text(v: object) -> str:
    if isinstance(v, bytes | bytearray):
        return bytes(v).decode("latin-1")
    return v if isinstance(v, str) else ""


def _malformed(name: str, value: str) -> None:
    if name in _REPORTED:
        return
    _REPORTED.add(name)
    # Not the value: an upstream that echoes what it was sent could put a key in any header.
    log.warning("ignoring malformed %s header (%d characters)", name, len(value))


def _field[T](
    h: Mapping[str, str], name: str, parse: Callable[[str], T | None], label: str | None = None
) -> T | None:
    """The parsed header, or None; a present but unparsable one is reported under `label`."""
    value = h.get(name)
    if value is None:
        return None
    return _checked(name, value, parse(value), label)


def _checked[T](name: str, value: str | None, parsed: T | None, label: str | None) -> T | None:
    """`parsed`, the parse of the header `name`'s `value`; a value present but unparsable is
    reported under `label`."""
    if parsed is None and value is not None:
        _malformed(label or name, value)
    return parsed


def _window(
    h: Mapping[str, str],
    dim: str,
    period: str | None,
    names: tuple[str, str, str],
    now: float,
    horizon: float,
    label: str | None = None,
) -> Window | None:
    limit_text, remaining_text, reset_text = h.get(names[0]), h.get(names[1]), h.get(names[2])
    if limit_text is None and remaining_text is None and reset_text is None:
        return None
    limit = _checked(names[0], limit_text, _count(limit_text), label)
    remaining = _checked(names[1], remaining_text, _count(remaining_text), label)
    reset = None if reset_text is None else _parse_reset(reset_text, now, horizon)
    reset = _checked(names[2], reset_text, reset, label)
    if limit is None and remaining is None and reset is None:
        return None
    return _window_of(dim, period, limit, remaining, reset)


def _names(prefix: str, dim: str) -> tuple[str, str, str]:
    return f"{prefix}limit{dim}", f"{prefix}remaining{dim}", f"{prefix}reset{dim}"


def _windows(found: Iterable[Window | None]) -> tuple[Window, ...]:
    return tuple(w for w in found if w is not None)


def _openai_windows(
    h: Mapping[str, str], now: float, horizon: float, provider: str
) -> tuple[Window, ...]:
    periods = _GROQ_PERIODS if provider == "groq" else _NO_PERIODS
    found = [_window(h, dim, periods.get(dim), names, now, horizon) for dim, names in _OPENAI_NAMES]
    return _windows(found)


_OPENAI_NAMES: Final = tuple((d, _names("x-ratelimit-", f"-{d}")) for d in ("requests", "tokens"))
_OPENAI_SPEAKERS: Final = frozenset(p for p, spoken in _SPOKEN.items() if spoken == ("openai",))
"""The providers whose answers are read in OpenAI's dialect alone."""
_USUAL_OTHERS: Final = frozenset(
    (
        b"content-type", b"content-length", b"content-encoding", b"transfer-encoding",
        b"date", b"server", b"connection", b"keep-alive", b"vary", b"cache-control",
        b"alt-svc", b"set-cookie", b"strict-transport-security", b"x-content-type-options",
        b"access-control-expose-headers", b"x-request-id", b"request-id", b"cf-ray",
        b"cf-cache-status", b"openai-organization", b"openai-processing-ms",
        b"openai-version", b"openai-project", b"via", b"x-envoy-upstream-service-time",
    )
)  # fmt: skip
"""Names, as usually sent, of headers that every answer carries and no dialect reads (none
begins, lower-cased and stripped, as any read name or `_success`'s prefixes do): the success
readers pass them over at one look-up, not three calls each."""


@dataclass(frozen=True, slots=True)
class _Reads:
    """What a success's raw header pairs are read for in the dialects a provider speaks: see
    `_success`."""

    slots: dict[bytes, int]
    """The raw (lower-cased) names read, each with its place among the values kept."""
    prefixes: tuple[bytes, ...]
    """What begins every name read, and `bail`'s: a name without any is passed over."""
    bail: tuple[bytes, ...]
    """What begins a name that this pass does not read (IETF's): the general path reads it."""
    places: tuple[tuple[int, str, tuple[str, str, str]], ...]
    """Each window in order, with where its limit, remaining and reset start and their names."""
    unified: int | None
    """Where Anthropic's unified status and reset are, if read; its window follows its others."""
    after: tuple[tuple[int, str, tuple[str, str, str]], ...] = ()
    """The windows that follow the unified one (the simple dialect's, for every dialect)."""
    periods: Mapping[str, str] | None = None
    """Each dimension's period, where the provider gives its windows one (Groq's)."""


def _reads(dialects: tuple[str, ...]) -> _Reads:
    """The `_Reads` of the dialects that `_parse_signal` reads in this order, on a success:
    OpenAI's (without Groq's periods), Anthropic's, the simple one and IETF's (bailed on)."""
    names: list[str] = []
    places: list[tuple[int, str, tuple[str, str, str]]] = []
    after: list[tuple[int, str, tuple[str, str, str]]] = []
    unified = None
    prefixes: list[bytes] = []
    for dialect in dialects:
        if dialect == "openai":
            for dim, three in _OPENAI_NAMES:
                places.append((len(names), dim, three))
                names += three
            prefixes.append(b"x-ratelimit-")
        elif dialect == "anthropic":
            for dim in _ANTHROPIC_DIMENSIONS:
                three = _names(f"anthropic-ratelimit-{dim}-", "")
                places.append((len(names), dim.replace("-", "_"), three))
                names += three
            unified = len(names)
            names += _UNIFIED
            prefixes.append(b"anthropic-ratelimit-")
        elif dialect == "simple":
            (after if unified is not None else places).append((len(names), "requests", _SIMPLE))
            names += _SIMPLE
            prefixes.append(b"x-ratelimit-")
    bail = (b"ratelimit",) if "ietf" in dialects else ()
    slots = {n.encode(): i for i, n in enumerate(names)}
    return _Reads(
        slots, tuple(dict.fromkeys(prefixes)) + bail, bail, (*places,), unified, (*after,)
    )


_SPACES: Final = bytes(c for c in range(256) if chr(c).isspace())
"""The bytes that `str.strip` takes off a name decoded from latin-1, as `_header_map` does."""


def _success(
    fields: tuple[tuple[bytes, bytes], ...], reads: _Reads, now: float, horizon: float
) -> tuple[Window, ...] | None:
    """The windows of a success in the dialects `reads` stands for, read from its raw header
    pairs in one pass that keeps only the names they read: what `_header_map` and the
    dialects' readers give. None when the pairs hold
    anything this pass does not read exactly as they do (a name that is one of these only once
    stripped, an IETF one, a pair that is not two byte strings): the general path then reads
    them."""
    slots, prefixes = reads.slots, reads.prefixes
    raws: list[bytes | None] = [None] * len(slots)
    try:
        for name, value in fields:
            i = slots.get(name)  # one of the names as they are usually sent
            if i is None:
                if name in _USUAL_OTHERS:
                    continue
                lowered = name.lower()
                # What `_header_map` could keep under one of the names, or an IETF one.
                stripped = lowered.lstrip()
                if not stripped.startswith(prefixes):
                    continue
                i = slots.get(lowered)
                if i is None:
                    if stripped.startswith(reads.bail) or lowered.strip(_SPACES) in slots:
                        return None
                    continue  # a name of the same family that these dialects do not read
            if type(value) is not bytes:
                return None
            if raws[i] is None:  # a repeat keeps the first, as `_header_map` does
                raws[i] = value
    except (AttributeError, TypeError, ValueError):
        return None  # a name or a pair of an unexpected shape
    found: list[Window] = []
    if reads.places:
        _raw_windows(raws, reads.places, now, horizon, found, reads.periods)
    at = reads.unified
    if at is not None and (raws[at] is not None or raws[at + 1] is not None):
        # What `_anthropic_windows` makes of the unified status and reset.
        state_raw, reset_raw = raws[at], raws[at + 1]
        state = "" if state_raw is None else state_raw[:_VALUE_LIMIT].decode("latin-1")
        state = state.strip().lower()
        reset = None
        if reset_raw is not None:
            text = reset_raw[:_VALUE_LIMIT].decode("latin-1")
            if (reset := _parse_reset(text, now, horizon)) is None:
                _malformed(_UNIFIED[1], text)
        if state or reset is not None:
            remaining = 0.0 if state == "rejected" else None
            found.append(_window_of("unified", None, None, remaining, reset))
    if reads.after:
        _raw_windows(raws, reads.after, now, horizon, found)
    return tuple(found)


def _raw_windows(
    raws: list[bytes | None],
    places: tuple[tuple[int, str, tuple[str, str, str]], ...],
    now: float,
    horizon: float,
    found: list[Window],
    periods: dict[str, str] | None = None,
) -> None:
    """The windows at `places` among the raw values (each with its period in `periods`, if
    any), appended to `found`: what `_window` makes of the values as `_header_map` decodes them
    (latin-1, cut at _VALUE_LIMIT), without its calls for what is absent. A count of at most 15
    ASCII digits (below `_MAX_COUNT`, nothing to strip: the usual header) is read from its
    bytes at once, as `_count` reads the same digits decoded."""
    for at, dim, names in places:
        limit_raw, remaining_raw, reset_raw = raws[at], raws[at + 1], raws[at + 2]
        if limit_raw is None and remaining_raw is None and reset_raw is None:
            continue
        limit = remaining = reset = None
        if limit_raw is not None:
            if limit_raw.isdigit() and len(limit_raw) <= 15:  # bytes: ASCII digits only
                limit = float(limit_raw)
            elif (limit := _count(text := limit_raw[:_VALUE_LIMIT].decode("latin-1"))) is None:
                _malformed(names[0], text)
        if remaining_raw is not None:
            if remaining_raw.isdigit() and len(remaining_raw) <= 15:
                remaining = float(remaining_raw)
            elif (
                remaining := _count(text := remaining_raw[:_VALUE_LIMIT].decode("latin-1"))
            ) is None:
                _malformed(names[1], text)
        if reset_raw is not None:
            text = reset_raw[:_VALUE_LIMIT].decode("latin-1")
            if (reset := _parse_reset(text, now, horizon)) is None:
                _malformed(names[2], text)
        if limit is not None or remaining is not None or reset is not None:
            period = periods.get(dim) if periods else None
            found.append(_window_of(dim, period, limit, remaining, reset))


_GROQ_PERIODS: Final = {"requests": "day", "tokens": "minute"}
"""Groq reuses the names, but its request budget is per day and its token budget per minute."""
_NO_PERIODS: Final[dict[str, str]] = {}


_ANTHROPIC_DIMENSIONS: Final = ("requests", "tokens", "input-tokens", "output-tokens")
_UNIFIED: Final = ("anthropic-ratelimit-unified-status", "anthropic-ratelimit-unified-reset")
_SIMPLE: Final = _names("x-ratelimit-", "")


def _anthropic_windows(h: Mapping[str, str], now: float, horizon: float) -> tuple[Window, ...]:
    prefix = "anthropic-ratelimit-"
    found = [
        _window(h, dim.replace("-", "_"), None, _names(f"{prefix}{dim}-", ""), now, horizon)
        for dim in _ANTHROPIC_DIMENSIONS
    ]
    state = h.get("anthropic-ratelimit-unified-status", "").strip().lower()
    reset = _field(h, "anthropic-ratelimit-unified-reset", lambda v: _parse_reset(v, now, horizon))
    if state or reset is not None:
        found.append(Window("unified", None, None, 0.0 if state == "rejected" else None, reset))
    return _windows(found)


def _simple_windows(h: Mapping[str, str], now: float, horizon: float) -> tuple[Window, ...]:
    """Kimi, Moonshot and OpenRouter: `X-RateLimit-{Limit,Remaining,Reset}`."""
    return _windows([_window(h, "requests", None, _SIMPLE, now, horizon)])


# -- IETF RateLimit headers -----------------------------------------------------------------------

_PERIODS = {60.0: "minute", 3600.0: "hour", 86400.0: "day"}
_PARTS = {sep: re.compile(rf'(?:[^{sep}"]|"[^"]*")+') for sep in ",;"}


def _ietf_windows(h: Mapping[str, str], now: float, horizon: float) -> tuple[Window, ...]:
    """Three generations: `"name";r=;t=` lists, `limit=, remaining=, reset=`, `RateLimit-*`."""
    raw = h.get("ratelimit")
    if raw is None:
        return _windows([_ietf_legacy(h, now, horizon)])
    members = [_member(m) for m in _split(raw, ",")]
    if members and all("=" in head and not head.startswith('"') for head, _ in members):
        return _windows([_ietf_dict(h, members, now, horizon)])
    policies = _policies(h.get("ratelimit-policy", ""))
    out: list[Window] = []
    for head, params in members:
        limit, period, dim = policies.get(head.strip('"'), (None, None, "requests"))
        remaining = _count(params["r"]) if "r" in params else None
        reset = _parse_reset(params["t"], now, horizon) if "t" in params else None
        if ("r" in params and remaining is None) or ("t" in params and reset is None):
            _malformed("ratelimit", raw)
        if dim is not None and (remaining is not None or reset is not None):
            out.append(Window(dim, period, limit, remaining, reset))
    return tuple(out)


def _ietf_dict(
    h: Mapping[str, str], members: list[tuple[str, dict[str, str]]], now: float, horizon: float
) -> Window | None:
    d = {k.strip().lower(): v.strip() for k, _, v in (head.partition("=") for head, _ in members)}
    parsed = _window(
        d, "requests", None, ("limit", "remaining", "reset"), now, horizon, "ratelimit"
    )
    if parsed is None or parsed.limit is None:
        return parsed
    policy = [_member(m) for m in _split(h.get("ratelimit-policy", ""), ",")]
    return replace(parsed, period=_legacy_period(policy, parsed.limit))


def _ietf_legacy(h: Mapping[str, str], now: float, horizon: float) -> Window | None:
    names = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
    # `RateLimit-Limit: 100, 100;w=60`: the first item is the limit, the others its policies.
    members = [_member(m) for m in _split(h.get(names[0], ""), ",")]
    fields = {**h, names[0]: members[0][0]} if members else h
    parsed = _window(fields, "requests", None, names, now, horizon)
    if parsed is None or parsed.limit is None:
        return parsed
    return replace(parsed, period=_legacy_period(members, parsed.limit))


def _legacy_period(members: list[tuple[str, dict[str, str]]], limit: float) -> str | None:
    return next(
        (_period(p["w"]) for head, p in members if "w" in p and _count(head) == limit), None
    )


def _policies(text: str) -> dict[str, tuple[float | None, str | None, str | None]]:
    """`"burst";q=100;w=60;qu="tokens"` by name: (quota, period, dimension or None if unknown)."""
    out: dict[str, tuple[float | None, str | None, str | None]] = {}
    for head, p in (_member(m) for m in _split(text, ",")):
        out[head.strip('"')] = (_count(p.get("q", "")), _period(p.get("w", "")), _unit(p.get("qu")))
    return out


def _period(w: str) -> str | None:
    n = _count(w)
    return None if not n else _PERIODS.get(n, f"{n:g}s")


def _unit(qu: str | None) -> str | None:
    # Bytes and concurrency are not request or token budgets: such policies are skipped.
    if qu is None or qu == "requests":
        return "requests"
    return "tokens" if "token" in qu else None


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes."""
    return [p.strip() for p in _PARTS[sep].findall(text[:_VALUE_LIMIT]) if p.strip()]


def _member(text: str) -> tuple[str, dict[str, str]]:
    """`item;k=v;k2="v"` as (item, params); keys lower-cased, quotes dropped from values."""
    head, *rest = _split(text, ";") or [""]
    params = {}
    for p in rest:
        k, _, v = p.partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    return head, params


# -- Gemini and retry hints -----------------------------------------------------------------------


def _gemini_windows(facts: BodyFacts, now: float, horizon: float) -> tuple[Window, ...]:
    """Each violated quota as an exhausted window, so the key is skipped until it resets."""
    delay_at = _delay_at(facts, now, horizon)
    out: list[Window] = []
    for v in facts.violations:
        reset = _clamp(_next_pacific_midnight(now), now, horizon) if v.period == "day" else delay_at
        out.append(Window(v.dimension, v.period, v.value, 0.0, reset))
    return tuple(out)


def _retry_at(
    kind: FailureKind,
    h: Mapping[str, str],
    facts: BodyFacts,
    windows: tuple[Window, ...],
    now: float,
    horizon: float,
) -> float | None:
    """Explicit hints first (most precise first), then what the windows imply."""
    hinted = _hinted_at(h, facts, now, horizon)
    if hinted is not None:
        return hinted
    return _windows_reset_at(kind, windows)


_RETRY_HEADERS = ("retry-after-ms", "x-ms-retry-after-ms", "retry-after")


def _hinted_at(h: Mapping[str, str], facts: BodyFacts, now: float, horizon: float) -> float | None:
    """A retry time the answer states: headers (milliseconds first), then a body's retryDelay."""
    for name in _RETRY_HEADERS:
        parse = _parse_ms if name.endswith("-ms") else parse_retry_after
        at = _field(h, name, lambda v, parse=parse: parse(v, now, horizon=horizon))
        if at is not None:
            return at
    if facts.retry_delay is None:
        return None
    at = _delay_at(facts, now, horizon)
    if at is None:
        _malformed("retryDelay", facts.retry_delay)
    return at


def _windows_reset_at(kind: FailureKind, windows: tuple[Window, ...]) -> float | None:
    """A unified window's rejection says when; a rate-limit or quota failure waits for the first
    exhausted window's reset (or, none known exhausted, the first reset of unknown state)."""
    rejected = [w.reset_at for w in windows if w.dimension == "unified" and w.remaining == 0]
    if rejected and rejected[0] is not None:
        return rejected[0]
    if kind not in (FailureKind.RATE_LIMITED, FailureKind.QUOTA):
        return None
    exhausted = [w.reset_at for w in windows if w.remaining is not None and w.remaining <= 0]
    unknown = [w.reset_at for w in windows if w.remaining is None and w.dimension != "unified"]
    known = [t for t in exhausted if t is not None] or [t for t in unknown if t is not None]
    return min(known, default=None)


def _delay_at(facts: BodyFacts, now: float, horizon: float) -> float | None:
    delay = parse_go_duration(facts.retry_delay) if facts.retry_delay else None
    return None if delay is None else _clamp(now + delay, now, horizon)


def _parse_ms(value: str, now: float, *, horizon: float) -> float | None:
    ms = _number(value.strip())
    return None if ms is None else _clamp(now + ms / 1000, now, horizon)


_READERS: Final[dict[str, Callable[[Mapping[str, str], float, float], tuple[Window, ...]]]] = {
    "anthropic": _anthropic_windows,
    "simple": _simple_windows,
    "ietf": _ietf_windows,
}
_OPENAI_ALONE: Final = replace(_reads(("openai",)), bail=(b"x-ratelimit-",))
"""OpenAI's dialect read alone: any other `x-ratelimit-*` name goes to the general path."""
_SUCCESS_READS: Final = {
    p: _reads(spoken) for p, spoken in _SPOKEN.items() if p not in _OPENAI_SPEAKERS
} | {
    p: replace(_OPENAI_ALONE, periods=_GROQ_PERIODS if p == "groq" else None)
    for p in _OPENAI_SPEAKERS
}
"""What `_success` reads for each provider listed (Groq's windows with their periods)."""
_EVERY_DIALECT: Final = _reads(DIALECTS)
"""What `_success` reads for `generic` and any provider not listed."""
