"""What kind of failure a response is: status and structured body fields first, words last."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

BODY_LIMIT = 64 * 1024
"""Only this much of a body is ever looked at: error bodies are small, anything larger is not one."""


class FailureKind(StrEnum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    QUOTA = "quota"
    AUTH = "auth"
    OVERLOADED = "overloaded"
    CLIENT_ERROR = "client_error"


@dataclass(frozen=True)
class QuotaViolation:
    """One `google.rpc.QuotaFailure` violation."""

    quota_id: str
    dimension: str
    """"requests", "tokens", "input_tokens" or "output_tokens", read from the id and metric."""
    period: str | None
    value: float | None


@dataclass(frozen=True)
class BodyFacts:
    """What an error body says, as far as it could be read; empty when it could not."""

    codes: tuple[str, ...] = ()
    """Lower-cased structured fields: error.type, error.code, error.status, type, ErrorInfo reasons."""
    text: str = ""
    """Lower-cased human messages, searched for words only when nothing structured decided."""
    retry_delay: str | None = None
    """Gemini `RetryInfo.retryDelay`, unparsed."""
    violations: tuple[QuotaViolation, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    """Rate-limit headers copied into the body (OpenRouter `error.metadata.headers`)."""


_QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "exceeded_current_quota_error",
        "billing_hard_limit_reached",
        "billing_not_active",
        "insufficient_balance",
        "insufficient_credits",
        "payment_required",
    }
)
_RATE_CODES = frozenset(
    {"rate_limit_exceeded", "rate_limit_error", "rate_limit_reached_error", "too_many_requests"}
)
_OVERLOAD_CODES = frozenset({"overloaded_error", "engine_overloaded_error", "server_overloaded"})
_AUTH_CODES = frozenset(
    {
        "authentication_error",
        "invalid_api_key",
        "api_key_invalid",
        "unauthenticated",
        "invalid_authentication_error",
    }
)
# Most specific first: the first match names the reason.
_QUOTA_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"billing cycle"), "billing cycle usage limit"),
    (re.compile(r"membership benefits"), "membership not verified"),
    (re.compile(r"credit balance"), "credit balance too low"),
    (re.compile(r"余额不足|欠费|请充值"), "insufficient balance"),
    (re.compile(r"insufficient[ _](?:balance|funds|credits?)"), "insufficient balance"),
    (re.compile(r"exceeded your current quota"), "insufficient_quota"),
    (re.compile(r"\bbilling\b|\bbalance\b|\bcredits?\b|payment[ _]required"), "billing"),
)
_OVERLOAD_WORDS = re.compile(r"\boverloaded\b")
_AUTH_WORDS = re.compile(
    r"invalid[ _-]?(?:api[ _-]?)?key|api[ _-]?key (?:is )?(?:not valid|invalid|expired|revoked)"
    r"|incorrect api key|\bunauthori[sz]ed\b|invalid[ _]authentication|authentication failed"
    r"|\bleaked\b|key (?:has been |was )?(?:revoked|disabled|suspended)"
)
_QUOTA_DIMENSIONS = (
    (re.compile(r"input_?token"), "input_tokens"),
    (re.compile(r"output_?token"), "output_tokens"),
    (re.compile(r"token"), "tokens"),
)
_MESSAGE_KEYS = frozenset({"message", "msg", "detail", "error", "error_msg", "description", "raw"})
_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def classify(status: int, facts: BodyFacts) -> tuple[FailureKind, str]:
    """The kind of a response and a short reason that never quotes the body."""
    if 100 <= status < 400:
        return FailureKind.OK, "ok"
    if status == 401:
        return FailureKind.AUTH, "invalid key (401)"
    if status == 402:
        return FailureKind.QUOTA, _quota_words(facts.text) or "payment required (402)"
    if 400 <= status < 500:
        return _classify_4xx(status, facts)
    return FailureKind.OVERLOADED, f"overloaded ({status})"


def _classify_4xx(status: int, facts: BodyFacts) -> tuple[FailureKind, str]:
    named = _named(facts, status)
    if named is not None:
        return named
    if status == 429 and _OVERLOAD_WORDS.search(facts.text):
        return FailureKind.OVERLOADED, "engine overloaded (429)"
    if status == 403 and _AUTH_WORDS.search(facts.text):
        return FailureKind.AUTH, "invalid key (403)"
    if status == 429:
        return FailureKind.RATE_LIMITED, "rate limited"
    # A bare 403 is as often a WAF or a region block as a bad key: disabling on it is too costly.
    return FailureKind.CLIENT_ERROR, f"client error ({status})"


def _named(facts: BodyFacts, status: int | None) -> tuple[FailureKind, str] | None:
    """What the body names itself: Gemini's quota details, structured codes, then quota words."""
    gemini = _gemini(facts)
    if gemini is not None:
        return gemini
    for codes, kind in (
        (_QUOTA_CODES, FailureKind.QUOTA),
        (_OVERLOAD_CODES, FailureKind.OVERLOADED),
        (_RATE_CODES, FailureKind.RATE_LIMITED),
        (_AUTH_CODES, FailureKind.AUTH),
    ):
        found = next((c for c in facts.codes if c in codes), None)
        if found is not None:
            return kind, _reason(kind, found, status)
    if (quota := _quota_words(facts.text)) is not None:
        return FailureKind.QUOTA, quota
    return None


def _gemini(facts: BodyFacts) -> tuple[FailureKind, str] | None:
    """Gemini's RESOURCE_EXHAUSTED: a daily quota when a violated quota id is per day."""
    if "resource_exhausted" not in facts.codes:
        return None
    # A quota id is the provider's name for a limit: kept to a name's characters, as it ends
    # up in a reason other clients may read.
    ids = [_SAFE.sub("", v.quota_id)[:80] for v in facts.violations]
    daily = next((q for q in ids if "perday" in q.lower()), None)
    if daily is not None:
        return FailureKind.QUOTA, f"daily quota: {daily}"[:120]
    return FailureKind.RATE_LIMITED, (f"rate limited: {ids[0]}" if ids else "rate limited")[:120]


def _reason(kind: FailureKind, code: str, status: int | None) -> str:
    if kind is FailureKind.QUOTA:
        return _SAFE.sub("", code)[:60] or "quota"
    shown = _SAFE.sub("", code)[:60] if status is None else str(status)
    if kind is FailureKind.OVERLOADED:
        return f"overloaded ({shown})"
    if kind is FailureKind.RATE_LIMITED:
        return "rate limited"
    return f"invalid key ({shown})"


def _quota_words(text: str) -> str | None:
    return next((reason for pattern, reason in _QUOTA_WORDS if pattern.search(text)), None)


# -- an error sent inside a stream ---------------------------------------------------------------

# The HTTP status each structured error type arrives with (Anthropic's documented table, and
# the types OpenAI shares with it). An error sent inside a stream, after a 200, names only its
# type: this is the status it stands for. It maps to a status, not to a kind: the kind is then
# decided by `classify`, exactly as for the HTTP answer.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "server_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


@dataclass(frozen=True)
class StreamFailure:
    """An error reported inside a stream, classified as its HTTP equivalent.

    `status` is the HTTP status the error states (a numeric `code` or `status`) or its type
    stands for; None when it gives neither and its words decided. `reason` never quotes it.
    """

    kind: FailureKind
    status: int | None
    reason: str


def classify_stream_error(body: object, *, finish_error: bool = False) -> StreamFailure:
    """Classify an error sent inside a stream by the rules of an HTTP answer (`classify`).

    `body` is what an HTTP error body would hold: an object with an `error` member (a dict or a
    string) or with `code`/`type`/`message` at the top, or the payload's text when it was no
    JSON. `finish_error` says a choice ended with `finish_reason: "error"`. The status is the
    one stated, else the one the error's type stands for, and `classify` decides; without
    either, the body's structured codes and quota words decide as they do for a 4xx; what
    they cannot name is a failure on the provider's side (a 502 after `finish_reason: "error"`,
    a 500 otherwise), as a 5xx is. Never raises.
    """
    if isinstance(body, dict):
        facts = _facts(body)
    else:
        facts = BodyFacts(text=str(body)[:BODY_LIMIT].lower())
    status = _stated_status(body) or next(
        (_TYPE_STATUS[c] for c in facts.codes if c in _TYPE_STATUS), None
    )
    if status is not None:
        kind, reason = classify(status, facts)
        return StreamFailure(kind, status, reason)
    named = _named(facts, None)
    if named is not None:
        return StreamFailure(named[0], None, named[1])
    status = 502 if finish_error else 500
    kind, _ = classify(status, facts)
    return StreamFailure(kind, status, "finish_reason error" if finish_error else "stream error")


def _stated_status(body: object) -> int | None:
    """An error status written in the object: `error.code`, `error.status`, `code`, `status`."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    places = (err, body) if isinstance(err, dict) else (body,)
    stated = (_as_status(place.get(name)) for place in places for name in ("code", "status"))
    return next((status for status in stated if status is not None), None)


def _as_status(value: object) -> int | None:
    """An error status (400-599) as a number or a three-digit string; None for anything else."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) == 3:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
        return value
    return None


# -- reading a body -----------------------------------------------------------------------------


def read_body(body: bytes | None) -> BodyFacts:
    """The facts of a body; never raises, whatever the body is."""
    text = _decode(body)
    if text is None:
        return BodyFacts()
    try:
        doc: Any = json.loads(text)
    except (ValueError, RecursionError):
        # A plain-text error may still carry words; an HTML page is some proxy's, not the API's,
        # and broken JSON is no error body at all.
        plain = text.lstrip()[:1] not in ("<", "{", "[")
        return BodyFacts(text=text.lower()) if plain else BodyFacts()
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        doc = doc[0]  # Gemini sometimes wraps the error object in a list
    if isinstance(doc, str):
        return BodyFacts(text=doc.lower())
    if not isinstance(doc, dict):
        return BodyFacts()
    return _facts(doc)


def _decode(body: bytes | bytearray | str | None) -> str | None:
    if isinstance(body, str):
        return body[:BODY_LIMIT]
    if not isinstance(body, bytes | bytearray) or not body:
        return None
    chunk = bytes(body[:BODY_LIMIT])
    # A cut may split one multi-byte character; only the last three bytes may be partial.
    for cut in range(4 if len(body) > BODY_LIMIT else 1):
        try:
            return chunk[: len(chunk) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _facts(doc: dict[str, Any]) -> BodyFacts:
    err = doc.get("error")
    e: dict[str, Any] = err if isinstance(err, dict) else {}
    codes = [_code(v) for v in (e.get("type"), e.get("code"), e.get("status"))]
    codes += [_code(doc.get(k)) for k in ("type", "code", "error_code", "status")]
    retry_delay: str | None = None
    violations: list[QuotaViolation] = []
    details = e.get("details")
    for d in details[:50] if isinstance(details, list) else ():
        if not isinstance(d, dict) or not isinstance(d.get("@type"), str):
            continue
        kind = d["@type"]
        if kind.endswith("google.rpc.RetryInfo") and isinstance(d.get("retryDelay"), str):
            retry_delay = d["retryDelay"][:64]
        elif kind.endswith("google.rpc.QuotaFailure"):
            violations += _violations(d.get("violations"))
        elif kind.endswith("google.rpc.ErrorInfo"):
            codes.append(_code(d.get("reason")))
    return BodyFacts(
        codes=tuple(c for c in codes if c),
        text=" ".join(_messages(doc, 0, [])).lower(),
        retry_delay=retry_delay,
        violations=tuple(violations),
        headers=_metadata_headers(e),
    )


def _code(value: object) -> str | None:
    return value.lower() if isinstance(value, str) and len(value) <= 100 else None


def _violations(raw: object) -> list[QuotaViolation]:
    out: list[QuotaViolation] = []
    for v in raw[:50] if isinstance(raw, list) else ():
        if isinstance(v, dict) and isinstance(v.get("quotaId"), str):
            quota_id = _SAFE.sub("", v["quotaId"])[:100]
            text = f"{quota_id} {str(v.get('quotaMetric', ''))[:200]}".lower()
            period = next((p for p in ("day", "hour", "minute") if f"per{p}" in text), None)
            dim = next((d for p, d in _QUOTA_DIMENSIONS if p.search(text)), "requests")
            out.append(QuotaViolation(quota_id, dim, period, _quota_value(v.get("quotaValue"))))
    return out


def _quota_value(raw: object) -> float | None:
    text = str(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else ""
    return float(text) if text.isascii() and text.isdigit() and len(text) <= 15 else None


def _metadata_headers(e: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    meta = e.get("metadata")
    raw = meta.get("headers") if isinstance(meta, dict) else None
    if not isinstance(raw, dict):
        return ()
    return tuple(
        (k, str(v))
        for k, v in list(raw.items())[:50]
        if isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
    )


def _messages(node: object, depth: int, out: list[str]) -> list[str]:
    """Human messages only: words in an echoed request must not decide anything."""
    if depth > 8 or len(out) > 100:
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and k in _MESSAGE_KEYS:
                out.append(v[:4096])
            elif isinstance(v, dict | list):
                _messages(v, depth + 1, out)
    elif isinstance(node, list):
        for v in node[:50]:
            _messages(v, depth + 1, out)
    return out
