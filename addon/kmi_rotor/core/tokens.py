"""How many tokens a request may cost, known before the provider says."""

from __future__ import annotations

from typing import Any

from .body_json import MAX_BODY, BodyJSON, Unread, read_json

CHARS_PER_TOKEN = 4
"""A rough, provider-neutral ratio: a reservation is corrected to the reported usage anyway."""
DEFAULT_COMPLETION = 256
"""Completion budget assumed when the request names none (max_tokens is optional for OpenAI)."""
MAX_TOKENS = 100_000_000
"""More than any model's context: a larger count is garbage, and is capped to this."""


def estimate_from_length(content_length: int | None) -> int:
    """A first estimate from the size of the body alone, before it has arrived."""
    size = max(0, content_length or 0)
    return size // CHARS_PER_TOKEN + DEFAULT_COMPLETION


class Unreadable(ValueError):
    """A JSON request body no parser can read (nested too deeply): no provider could either."""


def estimate_from_body(
    body: bytes | None, *, strict: bool = False, parsed: BodyJSON | None = None
) -> int:
    """Prompt size plus the completion budget (`max_tokens` / `max_completion_tokens` /
    `max_output_tokens`), from a JSON request body; any body that is not JSON counts by size.
    `strict`: a body that nests too deeply to be parsed raises `Unreadable`. `parsed`: the
    body's parse (`read_json(body)`) when it was read already."""
    if not body:
        return DEFAULT_COMPLETION
    if parsed is None:
        parsed = read_json(body)
    if parsed.too_deep and strict:
        raise Unreadable("the JSON request body nests too deeply to be read")
    data = parsed.data
    if data is None:
        return estimate_from_length(len(body))
    prompt = len(body) - _non_prompt_size(data)
    return min(MAX_TOKENS, max(0, prompt) // CHARS_PER_TOKEN + _completion_budget(data))


def _completion_budget(data: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        found = data.get(name)
        if found is not None:  # (`_int(None)` is None: a request names one of these at most)
            value = _int(found)
            if value is not None:
                return value
    config = data.get("generationConfig")  # Gemini
    if isinstance(config, dict):
        value = _int(config.get("maxOutputTokens"))
        if value is not None:
            return value
    return DEFAULT_COMPLETION


def _non_prompt_size(data: dict[str, Any]) -> int:
    # Tool schemas and the like do count as prompt; only the obvious scalars are left out.
    size = 0
    for k, v in data.items():  # a loop, not a generator: asked of every request's body
        if type(v) is str:  # `_scalar_size`, inline for the usual scalar
            size += len(k) + len(v) + 6
        elif not isinstance(v, dict | list | Unread):
            size += len(k) + _scalar_size(v) + 6
    return size


def _scalar_size(v: object) -> int:
    if isinstance(v, str):
        return len(v)
    if isinstance(v, int) and abs(v) >= 10**64:  # str() of a huge int is slow, then refused
        return 64
    return len(str(v))


def reported_usage(body: bytes | None) -> tuple[int | None, int | None]:
    """(input, output) tokens from a JSON response's `usage` (OpenAI or Anthropic)."""
    if not body or len(body) > MAX_BODY:
        return None, None
    usage = _usage_tail(body)
    if usage is not None:  # an object whose usage is an object: the usual answer
        return _counts(usage)
    data = read_json(body).data
    if data is None:
        return None, None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        meta = data.get("usageMetadata")  # Gemini
        if isinstance(meta, dict):
            return _int(meta.get("promptTokenCount")), _int(meta.get("candidatesTokenCount"))
        return None, None
    return _counts(usage)


def _counts(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    """(input, output) tokens of a `usage` object (OpenAI's names, else Anthropic's)."""
    tokens_in = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    tokens_out = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    return tokens_in, tokens_out


def _usage_tail(body: bytes) -> dict[str, Any] | None:
    """The `usage` object of a JSON object body, read from its last `"usage"` key on as an
    object of its own, when that key belongs to the outermost object and holds an object;
    None otherwise (the whole body must then be read).

    OpenAI and Anthropic put `usage` after the answer's content, so this reads a few dozen
    bytes instead of the whole completion. The key belongs to the outermost object exactly
    when `{` + the rest is one JSON object: a nested key leaves a closing brace too many. A
    quote inside a JSON string is escaped, so a `"usage"` not preceded by a backslash opens a
    key. What comes before the key is not read: a body broken there still has its usage read.
    """
    at = body.rfind(b'"usage"')
    if at <= 0 or body[at - 1] == 0x5C:  # a backslash: inside a string, or an odd key
        return None
    data = read_json(b"{" + body[at:]).data
    usage = data.get("usage") if data is not None else None
    return usage if isinstance(usage, dict) else None


def _int(v: object) -> int | None:
    if type(v) is int:  # what JSON gives a count as: no bool to rule out, no call to make
        return None if v < 0 else v if v <= MAX_TOKENS else MAX_TOKENS
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return min(v, MAX_TOKENS)
    return None
