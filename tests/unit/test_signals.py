"""Reading a provider's response: failure kinds, retry hints and rate-limit windows."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmi_rotor.core import signals
from kmi_rotor.core.classify import BODY_LIMIT
from kmi_rotor.core.signals import (
    DEFAULT_HORIZON,
    FailureKind,
    Signal,
    Window,
    parse_go_duration,
    parse_retry_after,
    parse_signal,
)

NOW = 1795793400.0  # Fri, 27 Nov 2026 15:30:00 GMT (07:30 in Los Angeles)
PACIFIC_MIDNIGHT = 1795852800.0  # Sat, 28 Nov 2026 00:00 PST = 08:00 GMT
SECRET = "sk-proj-Zx9yQ8wV7uT6sR5qP4oN3mL2kJ1i"

OK, RATE, QUOTA, AUTH, OVER, CLIENT = (
    FailureKind.OK,
    FailureKind.RATE_LIMITED,
    FailureKind.QUOTA,
    FailureKind.AUTH,
    FailureKind.OVERLOADED,
    FailureKind.CLIENT_ERROR,
)


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(signals, "_REPORTED", set())
    yield


def body(doc: object) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


# -- realistic samples ----------------------------------------------------------------------------

OPENAI_OK_HEADERS = [
    ("content-type", "application/json"),
    ("openai-organization", "user-abc123"),
    ("openai-processing-ms", "453"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999990"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("x-request-id", "req_8f2c3b1a9d7e4f60a1b2c3d4e5f60718"),
]
OPENAI_429_HEADERS = [
    ("x-ratelimit-limit-requests", "3"),
    ("x-ratelimit-limit-tokens", "40000"),
    ("x-ratelimit-remaining-requests", "0"),
    ("x-ratelimit-remaining-tokens", "39950"),
    ("x-ratelimit-reset-requests", "6m0s"),
    ("x-ratelimit-reset-tokens", "75ms"),
]
OPENAI_429_BODY = body(
    {
        "error": {
            "message": "Rate limit reached for gpt-4o-mini in organization org-abc on requests per "
            "min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit "
            "https://platform.openai.com/account/rate-limits to learn more. You can increase "
            "your rate limit by adding a payment method to your account at "
            "https://platform.openai.com/account/billing.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
)
OPENAI_QUOTA_BODY = body(
    {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details. For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
)
OPENAI_401_BODY = body(
    {
        "error": {
            "message": f"Incorrect API key provided: {SECRET[:8]}****{SECRET[-4:]}. You can find "
            "your API key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
)
AZURE_429_HEADERS = [
    ("retry-after", "2"),
    ("retry-after-ms", "1500"),
    ("x-ms-retry-after-ms", "1500"),
    ("x-ratelimit-remaining-requests", "0"),
    ("x-ratelimit-remaining-tokens", "0"),
    ("apim-request-id", "6f1d2c3b-4a5e-6f70-8192-a3b4c5d6e7f8"),
]
AZURE_429_BODY = body(
    {
        "error": {
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
            "version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 "
            "pricing tier. Please retry after 2 seconds.",
        }
    }
)
ANTHROPIC_429_HEADERS = [
    ("anthropic-ratelimit-requests-limit", "50"),
    ("anthropic-ratelimit-requests-remaining", "0"),
    ("anthropic-ratelimit-requests-reset", "2026-11-27T15:30:20Z"),
    ("anthropic-ratelimit-tokens-limit", "40000"),
    ("anthropic-ratelimit-tokens-remaining", "12000"),
    ("anthropic-ratelimit-tokens-reset", "2026-11-27T15:30:45Z"),
    ("anthropic-ratelimit-input-tokens-limit", "30000"),
    ("anthropic-ratelimit-input-tokens-remaining", "10000"),
    ("anthropic-ratelimit-input-tokens-reset", "2026-11-27T15:30:45.500000+00:00"),
    ("anthropic-ratelimit-output-tokens-limit", "8000"),
    ("anthropic-ratelimit-output-tokens-remaining", "2000"),
    ("anthropic-ratelimit-output-tokens-reset", "2026-11-27T07:30:31-08:00"),
    ("retry-after", "20"),
    ("request-id", "req_011CVYkq8Z3nX5d7pQw2rT9u"),
]
ANTHROPIC_429_BODY = body(
    {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "This request would exceed the rate limit for your organization of 50 "
            "requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits."
            " You can see the response headers for current usage. Please reduce the prompt "
            "length or the maximum tokens requested, or try again later. You may also contact "
            "sales at https://www.anthropic.com/contact-sales to discuss your options for a rate "
            "limit increase.",
        },
        "request_id": "req_011CVYkq8Z3nX5d7pQw2rT9u",
    }
)
ANTHROPIC_529_BODY = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
ANTHROPIC_CREDIT_BODY = body(
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API. Please go "
            "to Plans & Billing to upgrade or purchase credits.",
        },
    }
)
ANTHROPIC_401_BODY = (
    b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
)
UNIFIED_ALLOWED = [
    ("anthropic-ratelimit-unified-status", "allowed"),
    ("anthropic-ratelimit-unified-reset", "1795804200"),  # 18:30 GMT
    ("anthropic-ratelimit-unified-5h-status", "allowed"),
    ("anthropic-ratelimit-unified-5h-reset", "1795804200"),
    ("anthropic-ratelimit-unified-5h-utilization", "0.42"),
    ("anthropic-ratelimit-unified-7d-status", "allowed"),
    ("anthropic-ratelimit-unified-7d-reset", "1796299200"),
    ("anthropic-ratelimit-unified-7d-utilization", "0.18"),
    ("anthropic-ratelimit-unified-representative-claim", "five_hour"),
    ("anthropic-ratelimit-unified-fallback-percentage", "0.5"),
    ("anthropic-ratelimit-unified-overage-status", "rejected"),
    ("anthropic-ratelimit-unified-overage-disabled-reason", "org_level_disabled"),
]
UNIFIED_REJECTED = [
    ("anthropic-ratelimit-unified-status", "rejected"),
    ("anthropic-ratelimit-unified-reset", "1795804200"),
    ("anthropic-ratelimit-unified-5h-status", "rejected"),
    ("anthropic-ratelimit-unified-5h-utilization", "1.0"),
    ("anthropic-ratelimit-unified-representative-claim", "five_hour"),
]
ANTHROPIC_UNIFIED_429_BODY = (
    b'{"type":"error","error":{"type":"rate_limit_error","message":"Rate limited"}}'
)
OPENROUTER_RESET_MS = "1795793460000"  # NOW + 60 s, in milliseconds
OPENROUTER_429_HEADERS = [
    ("X-RateLimit-Limit", "20"),
    ("X-RateLimit-Remaining", "0"),
    ("X-RateLimit-Reset", OPENROUTER_RESET_MS),
]
OPENROUTER_429_BODY = body(
    {
        "error": {
            "message": "Rate limit exceeded: free-models-per-min. ",
            "code": 429,
            "metadata": {
                "headers": {
                    "X-RateLimit-Limit": "20",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": OPENROUTER_RESET_MS,
                },
                "provider_name": None,
            },
        },
        "user_id": "user_2nQpF7cXk9aBcDeFgHiJkLmNoPq",
    }
)
OPENROUTER_DAILY_BODY = body(
    {
        "error": {
            "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 "
            "free model requests per day",
            "code": 429,
            "metadata": {
                "headers": {
                    "X-RateLimit-Limit": 50,
                    "X-RateLimit-Remaining": 0,
                    "X-RateLimit-Reset": 1795824000000,  # next midnight GMT
                },
                "provider_name": None,
            },
        },
    }
)
OPENROUTER_402_BODY = body(
    {
        "error": {
            "code": 402,
            "message": "This request requires more credits, or fewer max_tokens. You requested "
            "up to 4096 tokens, but can only afford 1523. To increase, visit "
            "https://openrouter.ai/settings/credits and upgrade to a paid account",
        }
    }
)
KIMI_OVERLOADED_BODY = body(
    {
        "error": {
            "message": "The engine is currently overloaded, please try again later",
            "type": "engine_overloaded_error",
        }
    }
)
KIMI_OVERLOADED_UNTYPED = b'{"error":{"message":"engine is currently overloaded"}}'
KIMI_TOO_MANY_BODY = body(
    {
        "error": {
            "message": "Your account org-8a7b6c <ak-f1e2d3> request reached organization max RPM: "
            "3, please try again after 1 seconds",
            "type": "rate_limit_reached_error",
        }
    }
)
KIMI_BILLING_403_BODY = body(
    {
        "error": {
            "message": "You've reached your usage limit for this billing cycle. Upgrade your plan "
            "or wait for the next cycle to continue.",
            "type": "permission_denied_error",
        }
    }
)
KIMI_MEMBERSHIP_402_BODY = body(
    {
        "error": {
            "message": "We're unable to verify your membership benefits at this time. Please "
            "make sure your membership is active.",
            "type": "invalid_request_error",
        }
    }
)
MOONSHOT_SUSPENDED_BODY = body(
    {
        "error": {
            "message": "Your account org-8a7b6c <ak-f1e2d3> is suspended, please check your plan "
            "and billing details",
            "type": "exceeded_current_quota_error",
        }
    }
)
MOONSHOT_401_BODY = body(
    {"error": {"message": "Invalid Authentication", "type": "invalid_authentication_error"}}
)


def gemini_429(quota_id: str, metric: str, value: str, retry_delay: str | None) -> bytes:
    details: list[dict[str, object]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": f"generativelanguage.googleapis.com/{metric}",
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                    "quotaValue": value,
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
    ]
    if retry_delay is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
        )
    return body(
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota, please check your plan and billing "
                "details. For more information on this error, head to: "
                "https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for "
                f"metric: generativelanguage.googleapis.com/{metric}, limit: {value}",
                "status": "RESOURCE_EXHAUSTED",
                "details": details,
            }
        }
    )


GEMINI_MINUTE = gemini_429(
    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
    "generate_content_free_tier_requests",
    "10",
    "37s",
)
GEMINI_DAY = gemini_429(
    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    "generate_content_free_tier_requests",
    "250",
    None,
)
GEMINI_DAY_WITH_DELAY = gemini_429(
    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    "generate_content_free_tier_requests",
    "250",
    "1.5s",
)
GEMINI_TOKENS = gemini_429(
    "GenerateContentInputTokensPerModelPerMinute-FreeTier",
    "generate_content_free_tier_input_token_count",
    "250000",
    "12.5s",
)
GEMINI_503 = body(
    {
        "error": {
            "code": 503,
            "message": "The model is overloaded. Please try again later.",
            "status": "UNAVAILABLE",
        }
    }
)
GEMINI_BAD_KEY = body(
    {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ],
        }
    }
)
GEMINI_LEAKED = body(
    [
        {
            "error": {
                "code": 403,
                "message": "Your API key was reported as leaked. Please use another API key.",
                "status": "PERMISSION_DENIED",
            }
        }
    ]
)


# -- classification -------------------------------------------------------------------------------

CLASSIFY_CASES = [
    # (id, status, headers, body, kind, reason)
    ("openai-ok", 200, OPENAI_OK_HEADERS, b'{"id":"chatcmpl-1"}', OK, "ok"),
    ("no-content", 204, [], None, OK, "ok"),
    ("redirect", 302, [("location", "/v2")], None, OK, "ok"),
    ("not-modified", 304, [], None, OK, "ok"),
    ("switching", 101, [], None, OK, "ok"),
    ("openai-429", 429, OPENAI_429_HEADERS, OPENAI_429_BODY, RATE, "rate limited"),
    ("openai-quota", 429, [], OPENAI_QUOTA_BODY, QUOTA, "insufficient_quota"),
    ("openai-401", 401, [], OPENAI_401_BODY, AUTH, "invalid key (401)"),
    ("azure-429", 429, AZURE_429_HEADERS, AZURE_429_BODY, RATE, "rate limited"),
    ("anthropic-429", 429, ANTHROPIC_429_HEADERS, ANTHROPIC_429_BODY, RATE, "rate limited"),
    ("anthropic-529", 529, [], ANTHROPIC_529_BODY, OVER, "overloaded (529)"),
    ("anthropic-credit", 400, [], ANTHROPIC_CREDIT_BODY, QUOTA, "credit balance too low"),
    ("anthropic-401", 401, [], ANTHROPIC_401_BODY, AUTH, "invalid key (401)"),
    ("openrouter-429", 429, OPENROUTER_429_HEADERS, OPENROUTER_429_BODY, RATE, "rate limited"),
    # A daily free-model limit that asks for credits: blocked until its reset, like a quota.
    ("openrouter-daily", 429, [], OPENROUTER_DAILY_BODY, QUOTA, "billing"),
    ("openrouter-402", 402, [], OPENROUTER_402_BODY, QUOTA, "billing"),
    ("openrouter-402-bare", 402, [], None, QUOTA, "payment required (402)"),
    ("kimi-overloaded", 429, [], KIMI_OVERLOADED_BODY, OVER, "overloaded (429)"),
    ("kimi-overloaded-words", 429, [], KIMI_OVERLOADED_UNTYPED, OVER, "engine overloaded (429)"),
    ("kimi-too-many", 429, [], KIMI_TOO_MANY_BODY, RATE, "rate limited"),
    ("kimi-billing-403", 403, [], KIMI_BILLING_403_BODY, QUOTA, "billing cycle usage limit"),
    ("kimi-membership-402", 402, [], KIMI_MEMBERSHIP_402_BODY, QUOTA, "membership not verified"),
    ("moonshot-suspended", 429, [], MOONSHOT_SUSPENDED_BODY, QUOTA, "exceeded_current_quota_error"),
    ("moonshot-401", 401, [], MOONSHOT_401_BODY, AUTH, "invalid key (401)"),
    ("gemini-minute", 429, [], GEMINI_MINUTE, RATE, "rate limited: GenerateRequestsPerMinute"),
    ("gemini-day", 429, [], GEMINI_DAY, QUOTA, "daily quota: GenerateRequestsPerDay"),
    ("gemini-503", 503, [], GEMINI_503, OVER, "overloaded (503)"),
    ("gemini-bad-key", 400, [], GEMINI_BAD_KEY, AUTH, "invalid key (400)"),
    ("gemini-leaked", 403, [], GEMINI_LEAKED, AUTH, "invalid key (403)"),
    (
        "cn-balance",
        403,
        [],
        body({"error": {"message": "账户余额不足，请充值后再试"}}),
        QUOTA,
        "insufficient balance",
    ),
    ("cn-arrears", 400, [], "您的账户已欠费".encode(), QUOTA, "insufficient balance"),
    ("cn-topup", 429, [], body({"code": 1113, "msg": "请充值"}), QUOTA, "insufficient balance"),
    (
        "insufficient-balance",
        402,
        [],
        b'{"error":{"message":"Insufficient Balance"}}',
        QUOTA,
        "insufficient balance",
    ),
    ("bare-429", 429, [], None, RATE, "rate limited"),
    ("bare-403", 403, [], None, CLIENT, "client error (403)"),
    (
        "html-403",
        403,
        [],
        b"<html><body><h1>401 Unauthorized</h1></body></html>",
        CLIENT,
        "client error (403)",
    ),
    (
        "region-403",
        403,
        [],
        b'{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported"}}',
        CLIENT,
        "client error (403)",
    ),
    (
        "invalid-key-403",
        403,
        [],
        b'{"error":{"message":"Invalid API key"}}',
        AUTH,
        "invalid key (403)",
    ),
    (
        "plan-word",
        400,
        [],
        b'{"error":{"message":"Your plan does not include tool use"}}',
        CLIENT,
        "client error (400)",
    ),
    (
        "bad-request",
        400,
        [],
        b'{"error":{"type":"invalid_request_error","message":"max_tokens: 99999 > 8192"}}',
        CLIENT,
        "client error (400)",
    ),
    (
        "not-found",
        404,
        [],
        b'{"error":{"message":"model not found"}}',
        CLIENT,
        "client error (404)",
    ),
    ("too-large", 413, [], b"request entity too large", CLIENT, "client error (413)"),
    (
        "unprocessable",
        422,
        [],
        b'{"detail":[{"msg":"field required"}]}',
        CLIENT,
        "client error (422)",
    ),
    ("timeout-408", 408, [], None, CLIENT, "client error (408)"),
    (
        "server-500",
        500,
        [],
        b'{"error":{"type":"api_error","message":"Internal server error"}}',
        OVER,
        "overloaded (500)",
    ),
    ("bad-gateway", 502, [], b"<html>502 Bad Gateway</html>", OVER, "overloaded (502)"),
    ("gateway-timeout", 504, [], None, OVER, "overloaded (504)"),
    # A 5xx is the provider's trouble even when its body mentions billing.
    (
        "server-billing",
        503,
        [],
        b'{"error":{"message":"billing service unavailable"}}',
        OVER,
        "overloaded (503)",
    ),
    (
        "overloaded-400",
        400,
        [],
        b'{"error":{"message":"overloaded"}}',
        CLIENT,
        "client error (400)",
    ),
]


@pytest.mark.parametrize(
    ("status", "headers", "raw", "kind", "reason"),
    [c[1:] for c in CLASSIFY_CASES],
    ids=[c[0] for c in CLASSIFY_CASES],
)
def test_classification(
    status: int, headers: list[tuple[str, str]], raw: bytes | None, kind: FailureKind, reason: str
) -> None:
    sig = parse_signal(status, headers, raw, NOW)
    assert (sig.status, sig.kind) == (status, kind)
    assert sig.reason.startswith(reason)
    assert len(sig.reason) <= 120


@pytest.mark.parametrize(
    "raw",
    [OPENAI_401_BODY, MOONSHOT_SUSPENDED_BODY, KIMI_TOO_MANY_BODY, ANTHROPIC_CREDIT_BODY],
    ids=["openai-401", "moonshot", "kimi", "anthropic"],
)
@pytest.mark.parametrize("status", [400, 401, 402, 403, 429, 500])
def test_reason_never_quotes_the_body(status: int, raw: bytes) -> None:
    reason = parse_signal(status, [], raw, NOW).reason
    assert SECRET[:8] not in reason
    assert "ak-" not in reason and "org-" not in reason
    assert len(reason) <= 120


def test_structured_fields_win_over_words() -> None:
    # The free-tier rate-limit message talks about payment and billing; its code says what it is.
    assert parse_signal(429, [], OPENAI_429_BODY, NOW).kind is RATE
    # Gemini's per-minute message says "exceeded your current quota ... billing".
    assert parse_signal(429, [], GEMINI_MINUTE, NOW).kind is RATE


# -- windows and retry hints ----------------------------------------------------------------------

WINDOW_CASES = [
    (
        "openai-ok",
        200,
        OPENAI_OK_HEADERS,
        None,
        None,
        None,
        (
            Window("requests", None, 10000, 9999, NOW + 0.006),
            Window("tokens", None, 30000000, 29999990, NOW),
        ),
    ),
    (
        "openai-429-6m0s",
        429,
        OPENAI_429_HEADERS,
        OPENAI_429_BODY,
        None,
        NOW + 360,
        (
            Window("requests", None, 3, 0, NOW + 360),
            Window("tokens", None, 40000, 39950, NOW + 0.075),
        ),
    ),
    (
        "groq",
        200,
        [
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-limit-tokens", "6000"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-remaining-tokens", "5997"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-reset-tokens", "30ms"),
        ],
        None,
        "groq",
        None,
        (
            Window("requests", "day", 14400, 14370, NOW + 179.56),
            Window("tokens", "minute", 6000, 5997, NOW + 0.03),
        ),
    ),
    (
        "azure-ms-wins",
        429,
        AZURE_429_HEADERS,
        AZURE_429_BODY,
        None,
        NOW + 1.5,
        (Window("requests", None, None, 0, None), Window("tokens", None, None, 0, None)),
    ),
    (
        "azure-x-ms-only",
        429,
        [("x-ms-retry-after-ms", "250")],
        None,
        None,
        NOW + 0.25,
        (),
    ),
    (
        "anthropic-429",
        429,
        ANTHROPIC_429_HEADERS,
        ANTHROPIC_429_BODY,
        None,
        NOW + 20,
        (
            Window("requests", None, 50, 0, NOW + 20),
            Window("tokens", None, 40000, 12000, NOW + 45),
            Window("input_tokens", None, 30000, 10000, NOW + 45.5),
            Window("output_tokens", None, 8000, 2000, NOW + 31),
        ),
    ),
    (
        "anthropic-429-no-retry-after",
        429,
        [h for h in ANTHROPIC_429_HEADERS if h[0] != "retry-after"],
        ANTHROPIC_429_BODY,
        None,
        NOW + 20,  # the exhausted requests window
        None,
    ),
    (
        "unified-allowed",
        200,
        UNIFIED_ALLOWED,
        None,
        None,
        None,
        (Window("unified", None, None, None, NOW + 3 * 3600),),
    ),
    (
        "unified-rejected",
        429,
        UNIFIED_REJECTED,
        ANTHROPIC_UNIFIED_429_BODY,
        None,
        NOW + 3 * 3600,
        (Window("unified", None, None, 0, NOW + 3 * 3600),),
    ),
    (
        "openrouter-429",
        429,
        OPENROUTER_429_HEADERS,
        OPENROUTER_429_BODY,
        None,
        NOW + 60,
        (Window("requests", None, 20, 0, NOW + 60),),
    ),
    (
        "openrouter-body-only",
        429,
        [],
        OPENROUTER_429_BODY,
        None,
        NOW + 60,
        (Window("requests", None, 20, 0, NOW + 60),),
    ),
    (
        "openrouter-daily",
        429,
        [],
        OPENROUTER_DAILY_BODY,
        None,
        NOW + 8.5 * 3600,
        (Window("requests", None, 50, 0, NOW + 8.5 * 3600),),
    ),
    (
        "gemini-minute",
        429,
        [],
        GEMINI_MINUTE,
        None,
        NOW + 37,
        (Window("requests", "minute", 10, 0, NOW + 37),),
    ),
    (
        "gemini-day",
        429,
        [],
        GEMINI_DAY,
        None,
        PACIFIC_MIDNIGHT,
        (Window("requests", "day", 250, 0, PACIFIC_MIDNIGHT),),
    ),
    (
        "gemini-day-with-delay",
        429,
        [],
        GEMINI_DAY_WITH_DELAY,
        None,
        NOW + 1.5,
        (Window("requests", "day", 250, 0, PACIFIC_MIDNIGHT),),
    ),
    (
        "gemini-input-tokens",
        429,
        [],
        GEMINI_TOKENS,
        None,
        NOW + 12.5,
        (Window("input_tokens", "minute", 250000, 0, NOW + 12.5),),
    ),
    ("retry-after-on-503", 503, [("Retry-After", "120")], None, None, NOW + 120, ()),
    ("no-retry-on-success", 200, [("Retry-After", "120")], None, None, None, ()),
]


@pytest.mark.parametrize(
    ("status", "headers", "raw", "provider", "retry_at", "windows"),
    [c[1:] for c in WINDOW_CASES],
    ids=[c[0] for c in WINDOW_CASES],
)
def test_windows_and_retry_at(
    status: int,
    headers: list[tuple[str, str]],
    raw: bytes | None,
    provider: str | None,
    retry_at: float | None,
    windows: tuple[Window, ...] | None,
) -> None:
    sig = parse_signal(status, headers, raw, NOW, provider=provider)
    assert sig.retry_at == pytest.approx(retry_at)
    if windows is not None:
        assert _same(sig.windows, windows)


def _same(got: tuple[Window, ...], want: tuple[Window, ...]) -> bool:
    assert len(got) == len(want), got
    for g, w in zip(got, want, strict=True):
        assert (g.dimension, g.period) == (w.dimension, w.period)
        for field in ("limit", "remaining", "reset_at"):
            assert getattr(g, field) == pytest.approx(getattr(w, field)), (g, field)
    return True


@pytest.mark.parametrize(
    "reset",
    [
        "30",  # delta seconds
        "30.0",
        "1795793430",  # epoch seconds
        "1795793430000",  # epoch milliseconds
        "30s",  # Go duration
        "0m30s",
        "Fri, 27 Nov 2026 15:30:30 GMT",  # HTTP date
        "2026-11-27T15:30:30Z",  # RFC 3339
        "2026-11-27T23:30:30+08:00",
    ],
)
def test_moonshot_reset_formats(reset: str) -> None:
    headers = {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}
    sig = parse_signal(429, headers, KIMI_TOO_MANY_BODY, NOW, provider="moonshot")
    assert sig.windows == (Window("requests", None, 3, 0, NOW + 30),)
    assert sig.retry_at == NOW + 30


IETF_CASES = [
    (
        "draft-11",
        [
            ("RateLimit-Policy", '"burst";q=100;w=60, "daily";q=1000;w=86400'),
            ("RateLimit", '"burst";r=50;t=30, "daily";r=0;t=3600'),
        ],
        (
            Window("requests", "minute", 100, 50, NOW + 30),
            Window("requests", "day", 1000, 0, NOW + 3600),
        ),
    ),
    (
        "draft-11-split-lines",
        [
            ("RateLimit-Policy", '"burst";q=100;w=60'),
            ("RateLimit-Policy", '"tokens";q=5000;w=10;qu="tokens"'),
            ("RateLimit", '"burst";r=99;t=1'),
            ("RateLimit", '"tokens";r=10;t=4'),
        ],
        (
            Window("requests", "minute", 100, 99, NOW + 1),
            Window("tokens", "10s", 5000, 10, NOW + 4),
        ),
    ),
    (
        "draft-11-unknown-policy-and-unit",
        [
            ("RateLimit-Policy", '"bytes";q=1000000;w=60;qu="content-bytes"'),
            ("RateLimit", '"default";r=5;t=2, "bytes";r=10;t=60'),
        ],
        (Window("requests", None, None, 5, NOW + 2),),
    ),
    (
        "intermediate",
        [("RateLimit", "limit=100, remaining=50, reset=30"), ("RateLimit-Policy", "100;w=60")],
        (Window("requests", "minute", 100, 50, NOW + 30),),
    ),
    (
        "oldest",
        [("RateLimit-Limit", "100"), ("RateLimit-Remaining", "0"), ("RateLimit-Reset", "30")],
        (Window("requests", None, 100, 0, NOW + 30),),
    ),
    (
        "oldest-with-policies",
        [
            ("RateLimit-Limit", "10, 10;w=1, 50;w=60"),
            ("RateLimit-Remaining", "9"),
            ("RateLimit-Reset", "1"),
        ],
        (Window("requests", "1s", 10, 9, NOW + 1),),
    ),
]


@pytest.mark.parametrize(
    ("headers", "windows"), [c[1:] for c in IETF_CASES], ids=[c[0] for c in IETF_CASES]
)
def test_ietf_ratelimit_headers(
    headers: list[tuple[str, str]], windows: tuple[Window, ...]
) -> None:
    assert parse_signal(200, headers, None, NOW).windows == windows


def test_ietf_429_retry_at_is_the_exhausted_window() -> None:
    headers = [
        ("RateLimit-Policy", '"burst";q=100;w=60, "daily";q=1000;w=86400'),
        ("RateLimit", '"burst";r=40;t=30, "daily";r=0;t=3600'),
    ]
    assert parse_signal(429, headers, None, NOW).retry_at == NOW + 3600


@pytest.mark.parametrize(
    ("now", "midnight"),
    [
        (NOW, PACIFIC_MIDNIGHT),  # November: PST, UTC-8
        (1784030400.0, 1784098800.0),  # 14 July 2026 12:00 GMT: PDT, UTC-7
        (1795852799.0, 1795852800.0),  # one second before midnight
        (1795852800.0, 1795939200.0),  # at midnight: the next one
    ],
)
def test_gemini_daily_quota_resets_at_pacific_midnight(now: float, midnight: float) -> None:
    sig = parse_signal(429, [], GEMINI_DAY, now)
    assert (sig.kind, sig.retry_at) == (QUOTA, midnight)


# -- header forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "7"},
        {"RETRY-AFTER": "7"},
        [("retry-after", "7")],
        [(b"Retry-After", b"7")],
        [("retry-after", "7"), ("retry-after", "99")],  # repeats keep the first
        [("x", "y"), ("retry-after", " 7 ")],
    ],
)
def test_header_forms(headers: object) -> None:
    assert parse_signal(429, headers, None, NOW).retry_at == NOW + 7  # type: ignore[arg-type]


@pytest.mark.parametrize("headers", [None, 42, [("only-one",)], [("a", "b", "c")], [42]])
def test_headers_of_an_unexpected_shape_never_raise(headers: object) -> None:
    sig = parse_signal(429, headers, None, NOW)  # type: ignore[arg-type]
    assert (sig.kind, sig.retry_at) == (RATE, None)


# -- time helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("2m59.56s", 179.56),
        ("1h2m3s", 3723.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("500μs", 0.0005),
        ("250ns", 2.5e-7),
        ("0", 0.0),
        ("0s", 0.0),
        (".5s", 0.5),
        ("1.5h", 5400.0),
        ("37s", 37.0),
        (" 1s ", 1.0),
        ("", None),
        ("s", None),
        ("1", None),
        ("-1s", None),
        ("+1s", None),
        ("1x", None),
        ("1h 2m", None),
        ("1e3s", None),
        ("NaN", None),
        ("inf", None),
        ("1d", None),
        ("١s", None),  # Arabic-Indic digit
        ("9" * 400 + "h", None),
        ("1s" * 100, None),
        ("17ms", 0.017),
        ("1h2m3.5s", 3723.5),
        ("\t17ms\n", 0.017),
        ("1.s", 1.0),
        ("0.5ms", 0.0005),
        ("1h1h", 7200.0),
        ("9" * 18 + "h", 9.99999999999999999e17 * 3600),
        ("9" * 19 + "h", None),
        ("1.1234567890123s", None),
        (" ", None),
        ("ms", None),
        (".s", None),
        ("1ms1", None),
        ("1m-1s", None),
        ("-6m0s", None),
        ("1S", None),
        ("1 s", None),
        ("١٢ms", None),
        ("1e400s", None),
        ("0x1s", None),
        ("1s" * 32, 32.0),
    ],
)
def test_parse_go_duration(text: str, seconds: float | None) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


def _go_duration_part_by_part(text: str) -> float | None:
    """The reference reading: one part at a time, from the left."""
    s = text.strip()
    if s == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(s) and pos < 64:
        m = signals._GO_PART.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * signals._GO_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(s) and pos else None


@given(
    st.lists(
        st.tuples(
            st.one_of(st.from_regex(r"[0-9]{0,20}(\.[0-9]{0,14})?", fullmatch=True), st.text()),
            st.sampled_from(["h", "m", "s", "ms", "us", "µs", "μs", "ns", "", "x", " "]),
        ),
        max_size=4,
    ).map(lambda parts: "".join(n + u for n, u in parts))
)
def test_parse_go_duration_reads_as_part_by_part(text: str) -> None:
    assert parse_go_duration(text) == _go_duration_part_by_part(text)


def _reset_as_read_in_turn(value: str, now: float, horizon: float) -> float | None:
    """The reference reading of a reset: a number, else a Go duration, else a date."""
    s = value.strip()
    n = signals._number(s)
    if n is not None:
        at = n / 1000 if n > 1e12 else n if n > 1e9 else now + n
    elif (d := parse_go_duration(s)) is not None:
        at = now + d
    else:
        at = signals._date(s)
    return None if at is None else signals._clamp(at, now, horizon)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1ms", NOW + 0.001),
        (" 6m0s ", NOW + 360),
        ("6m0s", NOW + 360),  # again: remembered, the same
        ("0", NOW),
        ("0s", NOW),
        ("30", NOW + 30),
        ("1.5", NOW + 1.5),
        (str(NOW + 60), NOW + 60),  # epoch seconds
        (str(int((NOW + 60) * 1000)), NOW + 60),  # epoch milliseconds
        ("2026-11-27T15:32:00", NOW + 120),  # a date ending in a digit
        ("2026-11-27T15:32:00Z", NOW + 120),
        ("Fri, 27 Nov 2026 15:32:00 GMT", NOW + 120),
        ("١٢", None),  # other scripts' digits: not a number, nor anything else
        ("12١", None),
        ("1.2.3", None),
        ("", None),
        ("s", None),
        ("1 s", None),
    ],
)
def test_parse_reset(value: str, expected: float | None) -> None:
    assert signals._parse_reset(value, NOW, DEFAULT_HORIZON) == pytest.approx(expected)


def test_only_short_go_durations_are_remembered() -> None:
    signals._short_go_duration.cache_clear()
    long = "1s" * 16  # a real duration, but as long as a key: read each time, not kept
    assert signals._parse_reset(long, NOW, DEFAULT_HORIZON) == NOW + 16
    assert signals._short_go_duration.cache_info().currsize == 0
    for _ in range(2):
        assert signals._parse_reset("2m30s", NOW, DEFAULT_HORIZON) == NOW + 150
    assert signals._short_go_duration.cache_info()[:4] == (1, 1, 256, 1)  # hits, misses, ...


@given(
    st.one_of(
        st.from_regex(r"[0-9]{0,14}(\.[0-9]{0,4})?(h|m|s|ms|us|µs|ns|)?", fullmatch=True),
        st.text(alphabet="0123456789.:-TZhmsun ١", max_size=24),
        st.text(max_size=24),
    )
)
def test_parse_reset_reads_as_each_format_in_turn(value: str) -> None:
    """A number is tried only on what ends in a digit, and Go durations are remembered: the
    same results as trying a number, a Go duration and a date in turn."""
    for _ in range(2):  # the second reading comes from what was remembered
        got = signals._parse_reset(value, NOW, DEFAULT_HORIZON)
        assert got == _reset_as_read_in_turn(value, NOW, DEFAULT_HORIZON)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("0", 0.0),
        ("999999", 999999.0),
        (" 42 ", 42.0),
        ("1.5", 1.5),
        ("1" * 15, 1e15 / 9),
        ("1" * 16, None),  # beyond any real count
        ("9" * 19, None),
        ("", None),
        ("-1", None),
        ("+1", None),
        ("1e3", None),
        ("١٢", None),
        ("²", None),
        ("12abc", None),
        (None, None),
    ],
)
def test_count(text: str | None, count: float | None) -> None:
    assert signals._count(text) == pytest.approx(count)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", NOW + 120),
        ("1.5", NOW + 1.5),
        ("0", NOW),
        ("Fri, 27 Nov 2026 15:32:00 GMT", NOW + 120),
        ("Fri, 27 Nov 2026 15:00:00 GMT", NOW),  # in the past: retry now
        ("Thu, 01 Jan 1970 00:00:00 GMT", NOW),
        ("2678400", NOW + DEFAULT_HORIZON),  # exactly the horizon
        ("2678401", None),
        ("Fri, 31 Dec 9999 23:59:59 GMT", None),
        ("-5", None),
        ("NaN", None),
        ("inf", None),
        ("1e3", None),
        ("soon", None),
        ("", None),
        ("9" * 30, None),
    ],
)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_horizon_is_a_parameter() -> None:
    assert parse_retry_after("2678401", NOW, horizon=60 * 86400) == NOW + 2678401
    assert parse_signal(429, {"retry-after": "90"}, None, NOW, horizon=60).retry_at is None


# -- malformed values -----------------------------------------------------------------------------

GARBAGE = [
    "",
    "   ",
    "abc",
    "-5",
    "-1s",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "Infinity",
    "1e309",
    "1e3",
    "0x10",
    "9" * 400,
    "99999999999999999",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "9999-12-31T23:59:59Z",
    "10000-01-01T00:00:00Z",
    "2026-13-45T99:99:99Z",
    "1.2.3",
    "30, 40",
    "١٢٣",
    "\x00\x01",
    "5m-1s",
    '"burst";r=abc;t=-1',
    "limit=abc, remaining=-1, reset=NaN",
    "Bearer " + SECRET,
]
HEADER_NAMES = [
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-unified-reset",
    "anthropic-ratelimit-unified-status",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
]


def _check_invariants(sig: Signal, now: float, horizon: float = DEFAULT_HORIZON) -> None:
    assert isinstance(sig.kind, FailureKind)
    assert len(sig.reason) <= 120
    if sig.retry_at is not None:
        assert now <= sig.retry_at <= now + horizon
    for w in sig.windows:
        for v in (w.limit, w.remaining):
            assert v is None or (math.isfinite(v) and 0 <= v <= 1e15)
        assert w.reset_at is None or now <= w.reset_at <= now + horizon


@pytest.mark.parametrize("name", HEADER_NAMES)
def test_malformed_header_values_are_ignored(name: str) -> None:
    for value in GARBAGE:
        for status in (200, 429):
            sig = parse_signal(status, [(name, value)], None, NOW)
            _check_invariants(sig, NOW)
            assert sig.retry_at is None
            assert all(w.reset_at is None for w in sig.windows)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe\x00\x00",
        b"\x80abc",
        b"not json at all",
        b"null",
        b"42",
        b"[]",
        b"[1, 2, 3]",
        b'"a string"',
        b'{"error": null}',
        b'{"error": []}',
        b'{"error": {"details": "nope"}}',
        b'{"error": {"details": [1, null, {"@type": 5}]}}',
        b'{"error": {"status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": "x"}]}}',
        b'{"error": {"status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "soon"}]}}',
        b'{"error": {"status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "99999999s"}]}}',
        b'{"error": {"metadata": {"headers": {"X-RateLimit-Reset": {"a": 1}, "X-RateLimit-Limit": true}}}}',
        b'{"error": {"metadata": {"headers": ["X-RateLimit-Reset"]}}}',
        b'{"error": {"code": 1e999, "type": ["insufficient_quota"]}}',
        b'{"error": {"code": ' + b"9" * 5000 + b"}}",
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b"{" * 100_000,
        b"\xe4\xbd\x99" * 30_000,  # 90 KB of a valid CJK character, cut mid-character
    ],
)
@pytest.mark.parametrize("status", [400, 402, 403, 429, 503])
def test_malformed_bodies_never_raise(raw: bytes, status: int) -> None:
    sig = parse_signal(status, [], raw, NOW)
    _check_invariants(sig, NOW)


def test_only_the_first_64_kib_is_read() -> None:
    padding = " " * BODY_LIMIT
    late = f'{{"error": {{"message": "{padding}insufficient balance"}}}}'.encode()
    assert parse_signal(400, [], late, NOW).kind is CLIENT
    # Cut, it is no longer JSON, and broken JSON is not searched for words.
    early = f'{{"error": {{"message": "insufficient balance {padding}"}}}}'.encode()
    assert parse_signal(400, [], early, NOW).kind is CLIENT
    assert parse_signal(400, [], b"insufficient balance" + b" " * BODY_LIMIT, NOW).kind is QUOTA


def test_randomised_inputs_keep_the_invariants() -> None:
    rng = random.Random(20261127)
    values = [*GARBAGE, "0", "1", "30", "6m0s", "1795793430000", "2026-11-27T15:31:00Z", "rejected"]
    bodies = [None, OPENAI_429_BODY, GEMINI_DAY, OPENROUTER_429_BODY, b"\xff", b"{", b"[]"]
    for _ in range(400):
        headers = [(rng.choice(HEADER_NAMES), rng.choice(values)) for _ in range(rng.randint(0, 6))]
        now = rng.uniform(0, 4e9)
        status = rng.choice([0, 100, 200, 302, 400, 401, 402, 403, 404, 429, 500, 529, 999])
        sig = parse_signal(
            status, headers, rng.choice(bodies), now, provider=rng.choice([None, "groq"])
        )
        _check_invariants(sig, now)


# -- logging --------------------------------------------------------------------------------------


def test_each_malformed_header_name_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kmi_rotor")
    headers = [("authorization", f"Bearer {SECRET}"), ("Retry-After", "x" * 100)]
    parse_signal(429, headers, None, NOW)
    parse_signal(429, [("retry-after", "later")], None, NOW)
    parse_signal(429, [("x-ratelimit-reset", "garbage")], None, NOW)
    records = [r for r in caplog.records if r.name == "kmi_rotor"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    assert "retry-after" in records[0].getMessage()
    assert "x" not in records[0].getMessage().replace("x-", "")  # the value is not quoted
    assert "x-ratelimit-reset" in records[1].getMessage()
    assert SECRET not in caplog.text


def test_valid_headers_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kmi_rotor")
    for headers in (OPENAI_OK_HEADERS, ANTHROPIC_429_HEADERS, UNIFIED_ALLOWED, AZURE_429_HEADERS):
        parse_signal(429, headers, None, NOW)
    parse_signal(429, [], GEMINI_MINUTE, NOW)
    assert caplog.records == []


# -- dialects: each provider's answers are read in the dialects it speaks ----------------------

EVERY_DIALECT = {
    "x-ratelimit-remaining-requests": "7",  # openai
    "anthropic-ratelimit-requests-remaining": "6",  # anthropic
    "x-ratelimit-remaining": "5",  # kimi, moonshot, openrouter
    "ratelimit-remaining": "4",  # ietf (legacy)
    "retry-after": "30",  # any server
}
REMAINING = {"openai": 7.0, "anthropic": 6.0, "simple": 5.0, "ietf": 4.0}


@pytest.mark.parametrize(
    ("provider", "spoken"),
    [
        ("openai", ["openai"]),
        ("groq", ["openai"]),
        ("deepseek", ["openai"]),
        ("anthropic", ["anthropic"]),
        ("kimi-code", ["simple"]),
        ("moonshot", ["simple"]),
        ("openrouter", ["simple"]),
        ("gemini", []),
        ("generic", ["openai", "anthropic", "simple", "ietf"]),
        ("mistral", ["openai", "anthropic", "simple", "ietf"]),
        (None, ["openai", "anthropic", "simple", "ietf"]),
    ],
)
def test_headers_are_read_in_the_providers_dialects_only(
    provider: str | None, spoken: list[str]
) -> None:
    sig = parse_signal(429, EVERY_DIALECT, b"", NOW, provider=provider)
    assert sorted(w.remaining for w in sig.windows) == sorted(REMAINING[d] for d in spoken)
    assert sig.retry_at == NOW + 30  # a retry hint is read whoever sends it
    assert signals.dialects(provider or "") == tuple(spoken)


def test_a_success_is_not_read_for_an_error_body() -> None:
    """Rate-limit headers copied into an error body count on an error only: a 200's body is
    the answer, whatever words it holds."""
    body = json.dumps(
        {"error": {"code": 429, "metadata": {"headers": {"X-RateLimit-Remaining": "0"}}}}
    ).encode()
    assert parse_signal(200, {}, body, NOW, provider="openrouter").windows == ()
    failed = parse_signal(429, {}, body, NOW, provider="openrouter")
    assert [w.remaining for w in failed.windows] == [0.0]


def test_raw_header_pairs_read_as_the_mapping_does() -> None:
    pairs = [(k.encode(), v.encode()) for k, v in EVERY_DIALECT.items()]
    pairs += [(b"Content-Type", b"application/json"), (b"X-RateLimit-Limit-Requests", b"100")]
    mapping = {**EVERY_DIALECT, "x-ratelimit-limit-requests": "100"}
    assert parse_signal(429, pairs, b"", NOW) == parse_signal(429, mapping, b"", NOW)
