"""The scope of a request: its model (body or URL), Anthropic's model classes, the scope name."""

from __future__ import annotations

import json

import pytest

from kmi_rotor.core.scope import (
    KEY_SCOPE,
    MAX_MODEL,
    anthropic_class,
    default_scope,
    model_of_request,
    scope_of,
)


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


MODEL_CASES: list[tuple[str, str, bytes | None, str | None]] = [
    ("OpenAI chat", "/v1/chat/completions", body(model="gpt-4o-mini", messages=[]), "gpt-4o-mini"),
    ("Anthropic messages", "/v1/messages", body(model="claude-sonnet-4-5"), "claude-sonnet-4-5"),
    (
        "Gemini: the model is in the URL",
        "/v1beta/models/gemini-2.0-flash:generateContent",
        body(contents=[]),
        "gemini-2.0-flash",
    ),
    (
        "Gemini streaming, with a query",
        "/v1beta/models/gemini-1.5-pro:streamGenerateContent?alt=sse",
        None,
        "gemini-1.5-pro",
    ),
    ("Gemini model URL-encoded", "/v1beta/models/tuned%2Dx:generateContent", None, "tuned-x"),
    ("the body wins over the URL", "/v1beta/models/a:generateContent", body(model="b"), "b"),
    ("a model listing names none", "/v1/models", None, None),
    ("retrieving a model is not a request to it", "/v1/models/gpt-4o", None, None),
    ("no body", "/v1/chat/completions", None, None),
    ("empty body", "/v1/chat/completions", b"", None),
    ("not JSON", "/v1/chat/completions", b"model=gpt-4o", None),
    ("broken JSON", "/v1/chat/completions", b'{"model": "gpt', None),
    ("a JSON list", "/v1/chat/completions", b'[{"model": "gpt-4o"}]', None),
    ("model not a string", "/v1/chat/completions", body(model=4), None),
    ("model blank", "/v1/chat/completions", body(model="   "), None),
    ("non-UTF-8 body", "/v1/chat/completions", b'{"model": "\xff\xfe"}', None),
    ("deeply nested", "/v1/chat/completions", b"{" + b'"a":[' * 5000 + b"]" * 5000 + b"}", None),
    ("control characters dropped", "/v1/chat/completions", body(model="gpt\n-4o\x00"), "gpt-4o"),
    ("surrounding space dropped", "/v1/chat/completions", body(model=" gpt-4o "), "gpt-4o"),
]


@pytest.mark.parametrize(
    ("path", "raw", "expected"), [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES]
)
def test_model_of_request(path: str, raw: bytes | None, expected: str | None) -> None:
    assert model_of_request(path, raw) == expected


def test_a_huge_model_name_is_cut() -> None:
    model = model_of_request("/v1/chat/completions", body(model="m" * 10_000))
    assert model == "m" * MAX_MODEL


CLASS_CASES = [
    ("claude-3-5-haiku-latest", "haiku-3"),
    ("claude-3-5-haiku-20241022", "haiku-3"),
    ("claude-3-haiku-20240307", "haiku-3"),
    ("claude-haiku-4-5", "haiku-4"),
    ("claude-haiku-4-5-20251001", "haiku-4"),
    ("claude-sonnet-4-5", "sonnet-4"),
    ("claude-sonnet-4-5-20250929", "sonnet-4"),
    ("claude-sonnet-4-20250514", "sonnet-4"),
    ("claude-3-7-sonnet-latest", "sonnet-3"),
    ("claude-3-7-sonnet-20250219", "sonnet-3"),
    ("claude-opus-4-1", "opus-4"),
    ("claude-opus-4-1-20250805", "opus-4"),
    ("claude-opus-4-20250514", "opus-4"),
    ("claude-3-opus-20240229", "opus-3"),
    ("claude-3-opus-latest", "opus-3"),
    ("Claude-Sonnet-4-5", "sonnet-4"),
    ("anthropic.claude-sonnet-4-20250514-v1:0", "sonnet-4"),
    ("claude-sonnet", "sonnet"),
    ("claude-2.1", "claude-2.1"),
    ("claude-instant-1.2", "claude-instant-1.2"),
    ("gpt-4o", "gpt-4o"),
    ("", ""),
]


@pytest.mark.parametrize(("model", "expected"), CLASS_CASES)
def test_anthropic_class(model: str, expected: str) -> None:
    assert anthropic_class(model) == expected


def test_haiku_sonnet_and_opus_are_apart_and_dated_variants_together() -> None:
    classes = {anthropic_class(m) for m, _ in CLASS_CASES[:14]}
    assert classes == {"haiku-3", "haiku-4", "sonnet-3", "sonnet-4", "opus-3", "opus-4"}


SCOPE_CASES = [
    ("key", "openai", "gpt-4o", KEY_SCOPE),
    ("model", "openai", "gpt-4o", "model:gpt-4o"),
    ("model", "kimi-code", "kimi-for-coding", "model:kimi-for-coding"),
    ("model_class", "anthropic", "claude-3-5-haiku-latest", "class:haiku-3"),
    ("model_class", "anthropic", "claude-sonnet-4-5-20250929", "class:sonnet-4"),
    ("model_class", "openai", "gpt-4o", "class:gpt-4o"),
    ("model", "anthropic", "claude-sonnet-4-5", "model:claude-sonnet-4-5"),
    ("model", "openai", None, KEY_SCOPE),
    ("model_class", "anthropic", None, KEY_SCOPE),
    (None, "openai", "gpt-4o-mini", "model:gpt-4o-mini"),
    (None, "gemini", "gemini-2.0-flash", "model:gemini-2.0-flash"),
    (None, "groq", "llama-3.1-8b-instant", "model:llama-3.1-8b-instant"),
    (None, "mistral", "mistral-small-latest", "model:mistral-small-latest"),
    (None, "deepseek", "deepseek-chat", "model:deepseek-chat"),
    (None, "anthropic", "claude-opus-4-1", "class:opus-4"),
    (None, "kimi-code", "kimi-for-coding", KEY_SCOPE),
    (None, "moonshot", "kimi-k2", KEY_SCOPE),
    (None, "generic", "anything", KEY_SCOPE),
    (None, "openrouter", "openai/gpt-4o", KEY_SCOPE),
]


@pytest.mark.parametrize(("limit_scope", "provider", "model", "expected"), SCOPE_CASES)
def test_scope_of(limit_scope: str | None, provider: str, model: str | None, expected: str) -> None:
    assert scope_of(limit_scope, provider, model) == expected  # type: ignore[arg-type]


def test_default_scope_of_unknown_providers_is_key() -> None:
    assert default_scope("no-such-provider") == "key"
