"""One classifier: every known provider error gets the same failure kind whether it arrives as
an HTTP answer or inside a stream that had already begun (a 200).

The HTTP path is `parse_signal` on the status and the body; the stream path is the body sent as
an in-stream error in the provider's own framing, read by the tap and turned into the key's
signal by `core.outcome.stream_signal`, exactly as the addon does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kmi_rotor.core import outcome as oc
from kmi_rotor.core.classify import FailureKind, classify_stream_error
from kmi_rotor.core.signals import parse_signal
from kmi_rotor.core.stream_tap import SSETap

NOW = 1_000_000.0
OK = parse_signal(200, {}, b"", NOW)

QUOTA, RATE, AUTH = FailureKind.QUOTA, FailureKind.RATE_LIMITED, FailureKind.AUTH
OVERLOADED, CLIENT = FailureKind.OVERLOADED, FailureKind.CLIENT_ERROR


def openai(message: str, etype: str | None, code: object = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def anthropic(etype: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": etype, "message": message}}


def gemini(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


def quota_failure(quota_id: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaMetric": "generativelanguage.googleapis.com/x", "quotaId": quota_id}],
    }


def openrouter(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# (id, HTTP status, body, framing of the in-stream error, expected kind)
CASES: list[tuple[str, int, dict[str, Any], str, FailureKind]] = [
    # OpenAI (Groq, DeepSeek and other clones use the same shape)
    (
        "openai-insufficient_quota",
        429,
        openai(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        "openai",
        QUOTA,
    ),
    (
        "openai-billing_not_active",
        429,
        openai(
            "Your account is not active, please check your billing details on our website.",
            "billing_not_active",
            "billing_not_active",
        ),
        "openai",
        QUOTA,
    ),
    (
        "openai-invalid_api_key",
        401,
        openai(
            "Incorrect API key provided: sk-abc***wxyz. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        "openai",
        AUTH,
    ),
    (
        "openai-rate_limit_exceeded-requests",
        429,
        openai(
            "Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): "
            "Limit 500, Used 500, Requested 1.",
            "requests",
            "rate_limit_exceeded",
        ),
        "openai",
        RATE,
    ),
    (
        "groq-rate_limit_exceeded-tokens",
        429,
        openai("Rate limit reached on tokens per minute (TPM).", "tokens", "rate_limit_exceeded"),
        "openai",
        RATE,
    ),
    (
        "openai-context_length_exceeded",
        400,
        openai(
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130000 tokens.",
            "invalid_request_error",
            "context_length_exceeded",
        ),
        "openai",
        CLIENT,
    ),
    (
        "openai-model_not_found",
        404,
        openai("The model `gpt-9` does not exist.", "invalid_request_error", "model_not_found"),
        "openai",
        CLIENT,
    ),
    (
        "openai-server_error",
        500,
        openai("The server had an error while processing your request.", "server_error"),
        "openai",
        OVERLOADED,
    ),
    (
        "deepseek-insufficient-balance",
        402,
        openai("Insufficient Balance", "unknown_error", "invalid_request_error"),
        "openai",
        QUOTA,
    ),
    # Anthropic: the status each error type is documented with
    (
        "anthropic-invalid_request_error",
        400,
        anthropic("invalid_request_error", "max_tokens: field required"),
        "anthropic",
        CLIENT,
    ),
    (
        "anthropic-credit-balance-too-low",
        400,
        anthropic(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans "
            "& Billing to upgrade or purchase credits.",
        ),
        "anthropic",
        QUOTA,
    ),
    (
        "anthropic-authentication_error",
        401,
        anthropic("authentication_error", "invalid x-api-key"),
        "anthropic",
        AUTH,
    ),
    (
        "anthropic-billing_error",
        402,
        anthropic("billing_error", "There is an issue with your payment information."),
        "anthropic",
        QUOTA,
    ),
    (
        "anthropic-permission_error",
        403,
        anthropic(
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        "anthropic",
        CLIENT,
    ),
    (
        "anthropic-not_found_error",
        404,
        anthropic("not_found_error", "model: claude-9"),
        "anthropic",
        CLIENT,
    ),
    (
        "anthropic-request_too_large",
        413,
        anthropic("request_too_large", "Request exceeds the maximum allowed number of bytes."),
        "anthropic",
        CLIENT,
    ),
    (
        "anthropic-rate_limit_error",
        429,
        anthropic("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
        "anthropic",
        RATE,
    ),
    (
        "anthropic-api_error",
        500,
        anthropic("api_error", "Internal server error"),
        "anthropic",
        OVERLOADED,
    ),
    (
        "anthropic-timeout_error",
        504,
        anthropic("timeout_error", "Timeout"),
        "anthropic",
        OVERLOADED,
    ),
    (
        "anthropic-overloaded_error-529",
        529,
        anthropic("overloaded_error", "Overloaded"),
        "anthropic",
        OVERLOADED,
    ),
    # Kimi Code and Moonshot
    (
        "moonshot-engine_overloaded_error",
        429,
        openai(
            "The engine is currently overloaded, please try again later",
            "engine_overloaded_error",
        ),
        "openai",
        OVERLOADED,
    ),
    (
        "moonshot-rate_limit_reached_error",
        429,
        openai(
            "Your account org-x request reached organization max RPM: 3, please try again after "
            "1 seconds",
            "rate_limit_reached_error",
        ),
        "openai",
        RATE,
    ),
    (
        "moonshot-exceeded_current_quota_error",
        429,
        openai(
            "Your account org-x is suspended, please check your plan and billing details",
            "exceeded_current_quota_error",
        ),
        "openai",
        QUOTA,
    ),
    (
        "moonshot-invalid_authentication_error",
        401,
        openai("Invalid Authentication", "invalid_authentication_error"),
        "openai",
        AUTH,
    ),
    (
        "kimi-code-403-billing-cycle",
        403,
        {"error": {"message": "You've reached your usage limit for this billing cycle."}},
        "openai",
        QUOTA,
    ),
    (
        "kimi-code-402-membership",
        402,
        {"error": {"message": "Unable to verify your membership benefits."}},
        "openai",
        QUOTA,
    ),
    (
        "moonshot-insufficient-balance-zh",
        403,
        {"error": {"message": "账户余额不足，请充值"}},
        "openai",
        QUOTA,
    ),
    # Gemini: the error object carries its status; per-day quota ids are quotas
    (
        "gemini-resource-exhausted-per-day",
        429,
        gemini(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota.",
            quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
        ),
        "openai",
        QUOTA,
    ),
    (
        "gemini-resource-exhausted-per-minute",
        429,
        gemini(
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted.",
            quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
        ),
        "openai",
        RATE,
    ),
    (
        "gemini-api-key-invalid",
        400,
        gemini(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"},
        ),
        "openai",
        AUTH,
    ),
    (
        "gemini-permission-denied",
        403,
        gemini(403, "PERMISSION_DENIED", "The caller does not have permission"),
        "openai",
        CLIENT,
    ),
    (
        "gemini-unavailable",
        503,
        gemini(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        "openai",
        OVERLOADED,
    ),
    # OpenRouter: a failure after the stream began ends a choice with finish_reason "error"
    (
        "openrouter-402-credits",
        402,
        openrouter(402, "Insufficient credits. Add more using https://openrouter.ai/credits"),
        "openrouter",
        QUOTA,
    ),
    (
        "openrouter-429",
        429,
        openrouter(429, "Rate limit exceeded: free-models-per-min."),
        "openrouter",
        RATE,
    ),
    ("openrouter-502", 502, openrouter(502, "Provider returned error"), "openrouter", OVERLOADED),
    ("generic-403-forbidden", 403, openrouter(403, "Forbidden"), "openai", CLIENT),
]


def in_stream(body: dict[str, Any], framing: str) -> bytes:
    """A stream that began well and then carries `body` as its error, as the provider frames it."""
    if framing == "anthropic":
        start = {"type": "message_start", "message": {"usage": {"input_tokens": 3}}}
        events = [("message_start", start), ("error", body)]
    else:
        chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
        failed = body
        if framing == "openrouter":
            finish = {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
            failed = {"id": "c1", **body, "choices": [finish]}
        events = [("", chunk), ("", failed)]
    text = "".join(
        (f"event: {name}\n" if name else "") + f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        for name, obj in events
    )
    return text.encode()


def stream_kind(body: dict[str, Any], framing: str) -> FailureKind:
    tap = SSETap()
    tap(in_stream(body, framing))
    outcome = tap.finish()
    assert outcome.error is not None, "the tap saw no error"
    sig, what = oc.stream_signal(OK, outcome)
    assert what == "stream_error"
    return sig.kind


def http_kind(status: int, body: dict[str, Any]) -> FailureKind:
    return parse_signal(status, {}, json.dumps(body).encode(), NOW).kind


@pytest.mark.parametrize(
    ("status", "body", "framing", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_same_kind_over_http_and_in_a_stream(
    status: int, body: dict[str, Any], framing: str, expected: FailureKind
) -> None:
    assert http_kind(status, body) == expected
    assert stream_kind(body, framing) == expected


@pytest.mark.parametrize(
    ("body", "finish_error", "expected"),
    [
        pytest.param({}, True, (OVERLOADED, 502, "finish_reason error"), id="finish-reason-only"),
        pytest.param("upstream went away", False, (OVERLOADED, 500, "stream error"), id="text"),
        pytest.param({"error": "odd"}, False, (OVERLOADED, 500, "stream error"), id="unnamed"),
        pytest.param({"code": "503"}, False, (OVERLOADED, 503, "overloaded (503)"), id="code-str"),
        pytest.param({"code": 200}, False, (OVERLOADED, 500, "stream error"), id="code-not-error"),
        pytest.param(
            {"error": {"type": "brand_new_error"}},
            False,
            (OVERLOADED, 500, "stream error"),
            id="new",
        ),
        pytest.param(
            {"code": "insufficient_quota"}, False, (QUOTA, None, "insufficient_quota"), id="top"
        ),
    ],
)
def test_what_no_rule_names_is_a_failure_on_the_providers_side(
    body: object, finish_error: bool, expected: tuple[FailureKind, int | None, str]
) -> None:
    got = classify_stream_error(body, finish_error=finish_error)
    assert (got.kind, got.status, got.reason) == expected


def test_the_reason_never_quotes_the_error() -> None:
    secret = "sk-live-abcdefghijklmnopqrstuvwxyz"
    for body in (
        {"error": {"code": 401, "message": f"bad key {secret}"}},
        {"error": {"type": "insufficient_quota", "message": secret}},
        {"error": {"message": secret}},
        secret,
    ):
        assert secret not in classify_stream_error(body).reason


def test_a_stream_error_without_a_status_keeps_the_streams_own() -> None:
    """Nothing invents a status: an error naming none is recorded with the stream's 200."""
    sig, _ = oc.stream_signal(OK, _finished(in_stream(CASES[1][2], "openai")))
    assert (sig.status, sig.kind, sig.reason) == (200, QUOTA, "billing_not_active")


def _finished(data: bytes) -> Any:
    tap = SSETap()
    tap(data)
    return tap.finish()


@pytest.mark.parametrize(
    "tokens", [(None, None), (7, None), (None, 5), (3, 4), (0, 0), (0, None), (None, 0)]
)
def test_total_tokens_are_what_the_sum_of_the_known_ones_was(tokens: tuple[Any, Any]) -> None:
    known = [t for t in tokens if t is not None]
    expected = sum(known) if known else None
    assert oc.total(tokens) == expected and type(oc.total(tokens)) is type(expected)


def test_an_answers_outcome_is_its_kinds_value() -> None:
    from kmi_rotor.settling import _OUTCOMES

    for kind in FailureKind:
        assert _OUTCOMES[kind] == kind.value and type(_OUTCOMES[kind]) is str
