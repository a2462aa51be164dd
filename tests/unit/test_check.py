"""`kmi-rotor check`'s decisions: where a key is asked, what the answer means, what the state
already says, and what a running proxy makes of a verdict."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kmi_rotor.core import health as hl
from kmi_rotor.core.check import (
    CHECK_BLOCK,
    CHECK_DISABLE,
    Outcome,
    Probe,
    Verdict,
    action_for,
    against_state,
    from_state,
    probe_for,
    signal_of,
    verdict,
)
from kmi_rotor.core.health import KeyHealth, Policy, WindowState
from kmi_rotor.core.hosts import HostPattern
from kmi_rotor.core.presets import PRESETS
from kmi_rotor.core.signals import Window
from kmi_rotor.core.state import Operator

NOW = 1_800_000_000.0
KIMI_USAGES = "https://api.kimi.com/coding/v1/usages"


def hosts(*patterns: str) -> tuple[HostPattern, ...]:
    return tuple(HostPattern.parse(p) for p in patterns)


PROBE_CASES: list[tuple[str, tuple[str, ...], str | None, str]] = [
    ("openai", ("api.openai.com",), None, "https://api.openai.com/v1/models"),
    ("anthropic", ("api.anthropic.com",), None, "https://api.anthropic.com/v1/models"),
    ("moonshot", ("api.moonshot.ai", "api.moonshot.cn"), None, "https://api.moonshot.ai/v1/models"),
    ("openrouter", ("openrouter.ai",), None, "https://openrouter.ai/api/v1/key"),
    ("groq", ("api.groq.com",), None, "https://api.groq.com/openai/v1/models"),
    ("deepseek", ("api.deepseek.com",), None, "https://api.deepseek.com/models"),
    ("mistral", ("api.mistral.ai",), None, "https://api.mistral.ai/v1/models"),
    (
        "gemini",
        ("generativelanguage.googleapis.com",),
        None,
        "https://generativelanguage.googleapis.com/v1beta/models",
    ),
    (
        "generic",
        ("*.corp.example", "llm.corp.example:8443"),
        None,
        "https://llm.corp.example:8443/v1/models",
    ),
    ("generic", ("::1",), None, "https://[::1]/v1/models"),
    ("kimi-code", ("api.kimi.com",), KIMI_USAGES, KIMI_USAGES),
    (
        "kimi-code",
        ("127.0.0.1:9000",),
        "http://127.0.0.1:9000/usages",
        "http://127.0.0.1:9000/usages",
    ),
]


@pytest.mark.parametrize(("provider", "patterns", "usages", "url"), PROBE_CASES)
def test_probe_goes_to_the_pools_own_host(
    provider: str, patterns: tuple[str, ...], usages: str | None, url: str
) -> None:
    probe = probe_for(PRESETS[provider], hosts(*patterns), usages)
    assert isinstance(probe, Probe)
    assert probe.url == url
    assert probe.usages == (provider == "kimi-code")
    assert (probe.header, probe.bearer) == (PRESETS[provider].header, PRESETS[provider].bearer)


def test_anthropic_probe_names_the_api_version() -> None:
    probe = probe_for(PRESETS["anthropic"], hosts("api.anthropic.com"), None)
    assert isinstance(probe, Probe) and ("anthropic-version", "2023-06-01") in probe.extra


@pytest.mark.parametrize(
    ("patterns", "usages", "why"),
    [
        (("*.example.com",), None, "wildcards"),
        (("api.kimi.com",), "https://elsewhere.example/usages", "not on one of the pool's hosts"),
        (("api.kimi.com:443",), "https://api.kimi.com:8443/usages", "not on one of the pool's"),
        (("api.kimi.com",), "http://api.kimi.com/coding/v1/usages", "not https"),
        (("10.0.0.5:80",), "http://10.0.0.5/usages", "not https"),
        (("api.kimi.com",), "https://api.kimi.com:99999/usages", "malformed"),
    ],
)
def test_no_probe_that_would_send_a_key_elsewhere_or_in_clear(
    patterns: tuple[str, ...], usages: str | None, why: str
) -> None:
    provider = "generic" if usages is None else "kimi-code"
    result = probe_for(PRESETS[provider], hosts(*patterns), usages)
    assert isinstance(result, str) and why in result


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


OPENAI_QUOTA = body({"error": {"type": "insufficient_quota", "code": "insufficient_quota"}})
KIMI_BILLING = body(
    {
        "error": {
            "type": "exceeded_current_quota_error",
            "message": "usage limit for this billing cycle",
        }
    }
)
GEMINI_DAILY = body(
    {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"},
            ],
        }
    }
)
ANTHROPIC_CREDIT = body(
    {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Your credit balance is too low"},
    }
)
OPENAI_HEADERS = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-reset-requests": "1s",
}

VERDICT_CASES: list[tuple[str, str, int, dict[str, str], bytes, Outcome, float | None]] = [
    ("models listed", "openai", 200, {}, b'{"data": []}', Outcome.WORKS, None),
    ("garbage body on a 200", "openai", 200, {}, b"\xff\x00", Outcome.WORKS, None),
    ("revoked", "openai", 401, {}, b"{}", Outcome.BAD_CREDENTIAL, None),
    (
        "Gemini's API_KEY_INVALID (a 400)",
        "gemini",
        400,
        {},
        body(
            {
                "error": {
                    "code": 400,
                    "status": "INVALID_ARGUMENT",
                    "message": "API key not valid. Please pass a valid API key.",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                        }
                    ],
                }
            }
        ),
        Outcome.BAD_CREDENTIAL,
        None,
    ),
    (
        "Anthropic's 401",
        "anthropic",
        401,
        {},
        body({"error": {"type": "authentication_error"}}),
        Outcome.BAD_CREDENTIAL,
        None,
    ),
    ("OpenAI insufficient_quota (a 429)", "openai", 429, {}, OPENAI_QUOTA, Outcome.NO_QUOTA, None),
    ("Kimi's billing cycle (a 403)", "kimi-code", 403, {}, KIMI_BILLING, Outcome.NO_QUOTA, None),
    ("OpenRouter's 402", "openrouter", 402, {}, b"{}", Outcome.NO_QUOTA, None),
    (
        "Anthropic's credit balance (a 400)",
        "anthropic",
        400,
        {},
        ANTHROPIC_CREDIT,
        Outcome.NO_QUOTA,
        None,
    ),
    ("Gemini's daily quota", "gemini", 429, {}, GEMINI_DAILY, Outcome.NO_QUOTA, NOW + 37),
    (
        "a 429 with Retry-After",
        "openai",
        429,
        {"retry-after": "20"},
        b"{}",
        Outcome.RATE_LIMITED,
        NOW + 20,
    ),
    ("a bare 429", "openai", 429, {}, b"", Outcome.RATE_LIMITED, None),
    ("overloaded", "anthropic", 529, {}, b"{}", Outcome.UNREACHABLE, None),
    ("a 500", "openai", 500, {}, b"", Outcome.UNREACHABLE, None),
    ("no such endpoint", "generic", 404, {}, b"", Outcome.UNREACHABLE, None),
    ("a WAF's bare 403", "generic", 403, {}, b"<html>", Outcome.UNREACHABLE, None),
    (
        "a 200 whose requests are spent for 20 s",
        "openai",
        200,
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "20s",
        },
        b"{}",
        Outcome.RATE_LIMITED,
        NOW + 20,
    ),
    (
        "a 200 whose daily requests are spent for 5 h",
        "openai",
        200,
        {
            "x-ratelimit-limit-requests": "1000",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "5h0m0s",
        },
        b"{}",
        Outcome.NO_QUOTA,
        NOW + 5 * 3600,
    ),
]


@pytest.mark.parametrize(
    ("provider", "status", "headers", "raw", "outcome", "until"),
    [c[1:] for c in VERDICT_CASES],
    ids=[c[0] for c in VERDICT_CASES],
)
def test_verdict(
    provider: str,
    status: int,
    headers: dict[str, str],
    raw: bytes,
    outcome: Outcome,
    until: float | None,
) -> None:
    v = verdict(status, headers, raw, NOW, provider=provider)
    assert (v.outcome, v.until, v.status, v.probed) == (outcome, until, status, True)
    assert v.broken == (outcome in (Outcome.BAD_CREDENTIAL, Outcome.NO_QUOTA, Outcome.UNREACHABLE))
    assert raw.decode(errors="replace")[:30] not in v.detail or not raw


def test_a_working_key_reports_its_quota() -> None:
    v = verdict(200, OPENAI_HEADERS, b"{}", NOW, provider="openai")
    assert v.outcome is Outcome.WORKS
    assert v.windows == (Window("requests", None, 60.0, 59.0, NOW + 1),)


def usages(**usage: Any) -> bytes:
    return body({"usage": usage})


@pytest.mark.parametrize(
    ("doc", "outcome", "until"),
    [
        (usages(limit=100, used=40, reset_in=3600), Outcome.WORKS, None),
        (usages(limit=100, used=100, reset_in=86400), Outcome.NO_QUOTA, NOW + 86400),
        (
            body(
                {
                    "usage": {"limit": 100, "used": 10, "reset_in": 86400},
                    "limits": [
                        {
                            "detail": {"limit": 20, "remaining": 0, "reset_in": 40},
                            "window": {"duration": 1, "timeUnit": "MINUTE"},
                        }
                    ],
                }
            ),
            Outcome.RATE_LIMITED,
            NOW + 40,
        ),
        (
            body(
                {
                    "limits": [
                        {
                            "detail": {"limit": 200, "remaining": 0, "reset_in": 7200},
                            "window": {"duration": 5, "timeUnit": "HOUR"},
                        }
                    ]
                }
            ),
            Outcome.NO_QUOTA,
            NOW + 7200,
        ),
        (b"not json", Outcome.WORKS, None),
    ],
    ids=["quota left", "plan used up", "minute window spent", "5-hour window spent", "garbage"],
)
def test_kimi_usages(doc: bytes, outcome: Outcome, until: float | None) -> None:
    v = verdict(200, {}, doc, NOW, provider="kimi-code", usages=True)
    assert (v.outcome, v.until) == (outcome, until)


def test_kimi_usages_report_the_quota() -> None:
    v = verdict(
        200, {}, usages(limit=100, used=40, reset_in=3600), NOW, provider="kimi-code", usages=True
    )
    assert v.windows == (Window("requests", "plan", 100.0, 60.0, NOW + 3600),)


def test_a_401_from_the_usages_endpoint_is_a_bad_credential() -> None:
    v = verdict(401, {}, b"{}", NOW, provider="kimi-code", usages=True)
    assert v.outcome is Outcome.BAD_CREDENTIAL


STATE_CASES: list[tuple[str, bool, KeyHealth | None, Outcome | None, float | None]] = [
    ("never seen: ask", False, None, None, None),
    ("ready: ask", False, KeyHealth(), None, None),
    ("disabled in the configuration", True, KeyHealth(), Outcome.SKIPPED, None),
    (
        "cooling: not asked",
        False,
        KeyHealth(cooling_until=NOW + 30, cooling_reason="rate limited"),
        Outcome.RATE_LIMITED,
        NOW + 30,
    ),
    ("cooled down: ask", False, KeyHealth(cooling_until=NOW - 1, cooling_reason="x"), None, None),
    (
        "blocked: not asked",
        False,
        KeyHealth(blocked_until=NOW + 3600, blocked_reason="insufficient_quota"),
        Outcome.NO_QUOTA,
        NOW + 3600,
    ),
    (
        "disabled in the state: asked again",
        False,
        KeyHealth(disabled_reason="invalid key (401)", disabled_at=NOW - 60),
        None,
        None,
    ),
    (
        "a minute window spent",
        False,
        KeyHealth(windows={"requests": WindowState(limit=60, remaining=0, reset_at=NOW + 20)}),
        Outcome.RATE_LIMITED,
        NOW + 20,
    ),
    (
        "a plan spent",
        False,
        KeyHealth(windows={"requests:plan": WindowState(limit=9, remaining=0, reset_at=NOW + 9e4)}),
        Outcome.NO_QUOTA,
        NOW + 9e4,
    ),
]


@pytest.mark.parametrize(
    ("disabled", "h", "outcome", "until"),
    [c[1:] for c in STATE_CASES],
    ids=[c[0] for c in STATE_CASES],
)
def test_from_state(
    disabled: bool, h: KeyHealth | None, outcome: Outcome | None, until: float | None
) -> None:
    v = from_state(disabled, h, NOW)
    if outcome is None:
        assert v is None
        return
    assert v is not None and (v.outcome, v.until, v.probed) == (outcome, until, False)


@pytest.mark.parametrize(
    ("v", "expected"),
    [
        (Verdict(Outcome.WORKS, "ok"), None),
        (Verdict(Outcome.RATE_LIMITED, "rate limited", NOW + 9), None),
        (Verdict(Outcome.UNREACHABLE, "refused"), None),
        (
            Verdict(Outcome.BAD_CREDENTIAL, "x"),
            Operator(action="disable", at=NOW, reason=CHECK_DISABLE, applied=False),
        ),
        (
            Verdict(Outcome.NO_QUOTA, "x", NOW + 60),
            Operator(action="block", at=NOW, reason=CHECK_BLOCK, until=NOW + 60, applied=False),
        ),
        (
            Verdict(Outcome.NO_QUOTA, "x"),
            Operator(action="block", at=NOW, reason=CHECK_BLOCK, applied=False),
        ),
        # what the state said already is not written back
        (Verdict(Outcome.NO_QUOTA, "x", NOW + 60, probed=False), None),
    ],
)
def test_action_for(v: Verdict, expected: Operator | None) -> None:
    assert action_for(v, NOW) == expected


POLICY = Policy(quota_block_seconds=900)


def test_a_bad_credential_disables_the_key_as_a_401_would() -> None:
    op = action_for(Verdict(Outcome.BAD_CREDENTIAL, "invalid key (401)"), NOW)
    assert op is not None
    sig = signal_of(op)
    assert sig is not None
    h = hl.apply_signal(KeyHealth(), sig, NOW + 1, POLICY)
    assert hl.status(h, NOW + 1) == hl.KeyStatus("disabled", None, CHECK_DISABLE)


@pytest.mark.parametrize(("until", "blocked_until"), [(NOW + 60, NOW + 60), (None, NOW + 1 + 900)])
def test_an_empty_quota_blocks_the_key_until_the_reset(
    until: float | None, blocked_until: float
) -> None:
    op = action_for(Verdict(Outcome.NO_QUOTA, "insufficient_quota", until), NOW)
    assert op is not None
    sig = signal_of(op)
    assert sig is not None
    h = hl.apply_signal(KeyHealth(), sig, NOW + 1, POLICY)
    assert hl.status(h, NOW + 1) == hl.KeyStatus("blocked", blocked_until, CHECK_BLOCK)


@pytest.mark.parametrize("action", ["disable", "enable", "reset", "explode"])
def test_plain_operator_actions_are_not_signals(action: str) -> None:
    assert signal_of(Operator(action=action, at=NOW)) is None


def test_operator_records_without_the_new_fields_still_load() -> None:
    op = Operator.model_validate({"action": "disable", "at": NOW})
    assert (op.reason, op.until) == (None, None)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_a_working_key(status: int) -> None:
    v = verdict(status, {"location": "https://elsewhere.example/"}, b"", NOW, provider="openai")
    assert (v.outcome, v.broken) == (Outcome.UNREACHABLE, True)
    assert "not followed" in v.detail


def test_a_working_key_disabled_in_the_state_says_so_and_stays_disabled() -> None:
    v = Verdict(Outcome.WORKS, "ok (200)")
    h = KeyHealth(disabled_reason="disabled by operator", disabled_at=NOW)
    out = against_state(v, h)
    assert out.outcome is Outcome.WORKS and "disabled by operator" in out.detail
    assert action_for(out, NOW) is None
    assert against_state(v, KeyHealth()) == v
    assert against_state(Verdict(Outcome.BAD_CREDENTIAL, "x"), h).detail == "x"
