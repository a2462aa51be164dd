"""`kmi-rotor check`: which call tells whether a key works, and what its answer means.

Each provider is asked the cheapest question that needs a valid key: its model list, OpenRouter's
key endpoint, or Kimi Code's quota endpoint (which also tells what is left). The answer is read
exactly as the proxy reads traffic (`parse_signal`), so a key that the check calls bad is a key
that traffic would have disabled.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from urllib.parse import urlsplit

from . import health as hl
from .health import KeyHealth
from .hosts import HostPattern
from .kimi import parse_usages
from .presets import Preset
from .signals import FailureKind, Signal, Window, parse_signal
from .state import Operator

PROBE_PATHS = {
    "moonshot": "/v1/models",
    "openai": "/v1/models",
    "anthropic": "/v1/models",
    "openrouter": "/api/v1/key",  # its model list answers without a key
    "groq": "/openai/v1/models",
    "deepseek": "/models",
    "mistral": "/v1/models",
    "gemini": "/v1beta/models",
}
"""The cheapest call that needs a valid key, per preset (`generic`: /v1/models; `kimi-code`:
the pool's usages endpoint)."""
DEFAULT_PROBE_PATH = "/v1/models"
EXTRA_HEADERS = {"anthropic": (("anthropic-version", "2023-06-01"),)}

SHORT_PERIOD = 3600.0
"""An exhausted window shorter than this is a rate limit; a longer one (or a plan) is a quota."""

CHECK_DISABLE = "check: bad credential"
CHECK_BLOCK = "check: no quota"


class Outcome(StrEnum):
    WORKS = "works"
    BAD_CREDENTIAL = "bad credential"
    NO_QUOTA = "no quota"
    RATE_LIMITED = "rate-limited"
    UNREACHABLE = "unreachable"
    SKIPPED = "skipped"


BROKEN = frozenset({Outcome.BAD_CREDENTIAL, Outcome.NO_QUOTA, Outcome.UNREACHABLE})
"""Outcomes that make `check` exit non-zero: a rate limit passes, a key disabled by hand too."""


@dataclass(frozen=True)
class Probe:
    url: str
    header: str
    """Where the key goes (a header name)."""
    bearer: bool
    extra: tuple[tuple[str, str], ...] = ()
    usages: bool = False
    """The answer is a Kimi Code quota document."""


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    detail: str
    """Short human text; never quotes a key or a body."""
    until: float | None = None
    """When a rate limit or a quota resets, where known."""
    windows: tuple[Window, ...] = ()
    """The quota the provider reported."""
    status: int | None = None
    probed: bool = True

    @property
    def broken(self) -> bool:
        return self.outcome in BROKEN


# -- where to ask -----------------------------------------------------------------------------


def probe_for(preset: Preset, hosts: Iterable[HostPattern], usages_url: str | None) -> Probe | str:
    """The request that checks a key of this pool, or why there is none.

    The key only ever goes to one of the pool's own hosts, over TLS; plain http only to a
    loopback address (a usages endpoint configured so).
    """
    hosts = tuple(hosts)
    extra = EXTRA_HEADERS.get(preset.name, ())
    if preset.name == "kimi-code" and usages_url:
        why = _own_url(usages_url, hosts)
        if why is not None:
            return why
        return Probe(usages_url, preset.header, preset.bearer, extra, usages=True)
    exact = next((h for h in hosts if not h.wildcard), None)
    if exact is None:
        return "the pool's hosts are all wildcards: no host to ask"
    host = f"[{exact.host}]" if ":" in exact.host else exact.host
    port = f":{exact.port}" if exact.port is not None else ""
    path = PROBE_PATHS.get(preset.name, DEFAULT_PROBE_PATH)
    return Probe(f"https://{host}{port}{path}", preset.header, preset.bearer, extra)


def _own_url(url: str, hosts: tuple[HostPattern, ...]) -> str | None:
    """None when `url` is on one of `hosts` over TLS (or http to loopback), else why not."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "the usages URL is malformed"
    host = parts.hostname or ""
    if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(host)):
        return "the usages URL is not https (plain http is only allowed to loopback)"
    if not any(h.matches(host, port) for h in hosts):
        return "the usages URL is not on one of the pool's hosts"
    return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


# -- what the state already says ----------------------------------------------------------------


def from_state(disabled_in_config: bool, h: KeyHealth | None, now: float) -> Verdict | None:
    """The verdict without asking the provider, for a key that must not be asked now (disabled
    in the configuration, cooling, blocked, or with a window spent); None: ask it.

    A key disabled in the state is asked: one cheap call tells whether that still holds.
    """
    if disabled_in_config:
        return Verdict(Outcome.SKIPPED, "disabled in the configuration", probed=False)
    if h is None:
        return None
    st = hl.status(h, now)
    if st.state == "blocked":
        return Verdict(Outcome.NO_QUOTA, _known(st.reason), st.until, probed=False)
    if st.state == "cooling":
        return Verdict(Outcome.RATE_LIMITED, _known(st.reason), st.until, probed=False)
    if st.state == "ready" and hl.held_back(h, now):
        spent = [
            (name, w)
            for name, w in h.windows.items()
            if w.remaining is not None and w.remaining <= 0 and (w.reset_at or 0) > now
        ]
        quota = any(_is_quota(_period_of(name), w.reset_at, now) for name, w in spent)
        outcome = Outcome.NO_QUOTA if quota else Outcome.RATE_LIMITED
        return Verdict(
            outcome, _known("no remaining quota reported"), hl.next_usable_at(h, now), probed=False
        )
    return None


def _known(reason: str | None) -> str:
    return f"{reason or 'as recorded'} (known from the state; not asked)"


def _period_of(window_name: str) -> str | None:
    _, sep, period = window_name.partition(":")
    return period if sep else None


def _is_quota(period: str | None, reset_at: float | None, now: float) -> bool:
    """Whether a spent window is a quota rather than a rate limit: by its period, or, when the
    provider names none (OpenAI's headers), by how far its reset is."""
    if period is None:
        return reset_at is None or reset_at - now >= SHORT_PERIOD
    seconds = {"second": 1.0, "minute": 60.0, "hour": 3600.0}.get(period)
    if seconds is None and period.endswith("s") and period[:-1].isdigit():
        seconds = float(period[:-1])
    return seconds is None or seconds >= SHORT_PERIOD


# -- what an answer means -------------------------------------------------------------------


def verdict(
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes | None,
    now: float,
    *,
    provider: str,
    usages: bool = False,
) -> Verdict:
    """What the answer to a probe says about the key; never raises on what the upstream sent."""
    if 300 <= status < 400:  # never followed: the key stays with the pool's host
        return Verdict(Outcome.UNREACHABLE, f"redirected ({status}); not followed", status=status)
    sig = parse_signal(status, headers, body, now, provider=provider)
    windows = sig.windows
    if usages and sig.kind is FailureKind.OK:
        windows = parse_usages(body or b"", now) + windows
    match sig.kind:
        case FailureKind.OK:
            return _works(status, windows, now)
        case FailureKind.AUTH:
            return Verdict(Outcome.BAD_CREDENTIAL, sig.reason, None, windows, status)
        case FailureKind.QUOTA:
            return Verdict(Outcome.NO_QUOTA, sig.reason, sig.retry_at, windows, status)
        case FailureKind.RATE_LIMITED:
            return Verdict(Outcome.RATE_LIMITED, sig.reason, sig.retry_at, windows, status)
        case FailureKind.OVERLOADED:
            return Verdict(Outcome.UNREACHABLE, sig.reason, sig.retry_at, windows, status)
    why = "no such endpoint" if status == 404 else "the answer does not tell"
    return Verdict(Outcome.UNREACHABLE, f"{why} ({status})", None, windows, status)


def _works(status: int, windows: tuple[Window, ...], now: float) -> Verdict:
    """A key that answered: still empty when a reported window is spent until a later reset."""
    spent = [
        w
        for w in windows
        if w.remaining is not None and w.remaining <= 0 and (w.reset_at or now + 1) > now
    ]
    quotas = [w for w in spent if _is_quota(w.period, w.reset_at, now)]
    if quotas:
        until = max((w.reset_at for w in quotas if w.reset_at is not None), default=None)
        return Verdict(Outcome.NO_QUOTA, f"{quotas[0].dimension} used up", until, windows, status)
    if spent:
        until = max((w.reset_at for w in spent if w.reset_at is not None), default=None)
        return Verdict(
            Outcome.RATE_LIMITED, f"{spent[0].dimension} used up", until, windows, status
        )
    return Verdict(Outcome.WORKS, f"ok ({status})", None, windows, status)


def against_state(v: Verdict, h: KeyHealth | None) -> Verdict:
    """A working key that the state holds disabled says so: the check never enables a key."""
    if v.outcome is not Outcome.WORKS or h is None or h.disabled_reason is None:
        return v
    detail = f"{v.detail}; disabled in the state ({h.disabled_reason}): enable it to use it"
    return replace(v, detail=detail)


def unreachable(why: str) -> Verdict:
    """No answer at all: connection refused, TLS failure, timeout."""
    return Verdict(Outcome.UNREACHABLE, why)


# -- what a running proxy makes of it -----------------------------------------------------------


def action_for(v: Verdict, now: float) -> Operator | None:
    """The operator action that shares a verdict with running proxies: a bad credential
    disables the key, an empty quota blocks it until the reset (None: no reset known, the
    proxy's own quota block applies). Nothing for other outcomes, or for what the state
    already said."""
    if not v.probed:
        return None
    if v.outcome is Outcome.BAD_CREDENTIAL:
        return Operator(action="disable", at=now, reason=CHECK_DISABLE, applied=False)
    if v.outcome is Outcome.NO_QUOTA:
        return Operator(action="block", at=now, reason=CHECK_BLOCK, until=v.until, applied=False)
    return None


def signal_of(op: Operator) -> Signal | None:
    """The signal traffic would have given for a checked key, so that a proxy applies the
    check's verdict exactly as it applies an answer; None for a plain operator action."""
    if op.reason is None:
        return None
    if op.action == "disable":
        return Signal(401, FailureKind.AUTH, None, (), op.reason)
    if op.action == "block":
        return Signal(429, FailureKind.QUOTA, op.until, (), op.reason)
    return None
