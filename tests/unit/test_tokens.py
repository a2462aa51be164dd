"""Token estimates before a request goes, and the usage a provider reports after."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmi_rotor.core.tokens import (
    CHARS_PER_TOKEN,
    DEFAULT_COMPLETION,
    MAX_BODY,
    _completion_budget,
    _int,
    _non_prompt_size,
    _scalar_size,
    _usage_tail,
    estimate_from_body,
    estimate_from_length,
    reported_usage,
)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


# -- before the body ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (None, DEFAULT_COMPLETION),
        (0, DEFAULT_COMPLETION),
        (-10, DEFAULT_COMPLETION),
        (3, DEFAULT_COMPLETION),
        (4, 1 + DEFAULT_COMPLETION),
        (4000, 1000 + DEFAULT_COMPLETION),
        (4003, 1000 + DEFAULT_COMPLETION),
    ],
)
def test_estimate_from_length(length: int | None, expected: int) -> None:
    assert estimate_from_length(length) == expected


# -- from the body ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "budget"),
    [
        ({}, DEFAULT_COMPLETION),
        ({"max_tokens": 100}, 100),
        ({"max_tokens": 0}, 0),
        ({"max_completion_tokens": 700}, 700),
        ({"max_output_tokens": 333}, 333),
        ({"max_tokens": 100, "max_completion_tokens": 900}, 900),
        ({"max_tokens": -1}, DEFAULT_COMPLETION),
        ({"max_tokens": "100"}, DEFAULT_COMPLETION),
        ({"max_tokens": 1.5}, DEFAULT_COMPLETION),
        ({"max_tokens": True}, DEFAULT_COMPLETION),
        ({"max_tokens": None}, DEFAULT_COMPLETION),
        ({"generationConfig": {"maxOutputTokens": 512}}, 512),
        ({"generationConfig": {"maxOutputTokens": -5}}, DEFAULT_COMPLETION),
        ({"generationConfig": "nope"}, DEFAULT_COMPLETION),
        pytest.param(
            {"generationConfig": {"maxOutputTokens": True}},
            DEFAULT_COMPLETION,
            id="gemini-bool-budget",
        ),
    ],
)
def test_completion_budget_is_added_to_the_prompt(extra: dict[str, Any], budget: int) -> None:
    """The same prompt with and without a budget differs by exactly the budget."""
    messages = chat("x" * 400)
    plain = estimate_from_body(body(**messages))
    with_budget = estimate_from_body(body(**messages, **extra))
    prompt = plain - DEFAULT_COMPLETION
    assert prompt >= 100
    if all(not isinstance(v, dict | list) for v in extra.values()):
        assert with_budget == prompt + budget
    else:  # a nested object (Gemini's generationConfig) is counted as prompt
        extra_prompt = with_budget - budget - prompt
        assert 0 <= extra_prompt <= len(json.dumps(extra)) // CHARS_PER_TOKEN + 1


@pytest.mark.parametrize("size", [0, 400, 4000, 40_000])
def test_prompt_grows_with_the_text(size: int) -> None:
    small = estimate_from_body(body(**chat("", max_tokens=10)))
    big = estimate_from_body(body(**chat("y" * size, max_tokens=10)))
    assert big - small == size // CHARS_PER_TOKEN


def test_budget_values_change_only_the_budget() -> None:
    a = estimate_from_body(body(**chat("z" * 999, max_tokens=100)))
    b = estimate_from_body(body(**chat("z" * 999, max_tokens=100_000)))
    assert b - a == 100_000 - 100


def test_tool_schemas_count_as_prompt() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"d": "q" * 800}}}]
    without = estimate_from_body(body(**chat(max_tokens=10)))
    with_tools = estimate_from_body(body(**chat(max_tokens=10), tools=tools))
    assert with_tools - without >= 800 // CHARS_PER_TOKEN


def test_gemini_request() -> None:
    req = {
        "contents": [{"role": "user", "parts": [{"text": "w" * 4000}]}],
        "generationConfig": {"maxOutputTokens": 64, "temperature": 0.2},
    }
    est = estimate_from_body(body(**req))
    # the text and the JSON around it are prompt; maxOutputTokens is the budget
    assert 1000 + 64 <= est <= len(json.dumps(req)) // CHARS_PER_TOKEN + 64


@pytest.mark.parametrize(
    "raw",
    [
        b"not json at all " * 100,
        b"\xff\xfe\x00garbage" * 50,
        b"[1, 2, 3]" + b" " * 391,
        b'"a json string"',
        b"42",
        b'{"max_tokens": 5',
        "é".encode("latin-1") * 100,
    ],
)
def test_non_json_bodies_count_by_size(raw: bytes) -> None:
    assert estimate_from_body(raw) == len(raw) // CHARS_PER_TOKEN + DEFAULT_COMPLETION


@pytest.mark.parametrize("raw", [None, b""])
def test_no_body_is_the_default_budget(raw: bytes | None) -> None:
    assert estimate_from_body(raw) == DEFAULT_COMPLETION


def test_huge_bodies_are_counted_by_size_without_parsing() -> None:
    prefix = b'{"max_tokens": 5, "messages": [{"content": "'
    raw = prefix + b"a" * MAX_BODY + b'"}]}'
    assert estimate_from_body(raw) == len(raw) // CHARS_PER_TOKEN + DEFAULT_COMPLETION


def test_body_at_the_size_limit_is_still_parsed() -> None:
    shell = body(**chat("", max_tokens=7))
    raw = body(**chat("b" * (MAX_BODY - len(shell)), max_tokens=7))
    assert len(raw) == MAX_BODY
    est = estimate_from_body(raw)
    assert est < len(raw) // CHARS_PER_TOKEN + 7 + 1
    assert est > (MAX_BODY - 200) // CHARS_PER_TOKEN


def test_estimate_is_never_negative() -> None:
    # Scalars only: everything is "not prompt", the prompt part clamps at zero.
    assert estimate_from_body(body(model="m" * 50, max_tokens=3)) == 3


# -- what the provider reported ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (  # OpenAI chat completions
            {
                "id": "x",
                "choices": [],
                "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
            },
            (12, 34),
        ),
        (  # OpenAI responses API
            {"output": [], "usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}},
            (5, 6),
        ),
        (  # Anthropic messages
            {
                "type": "message",
                "usage": {
                    "input_tokens": 20,
                    "output_tokens": 8,
                    "cache_read_input_tokens": 100,
                },
            },
            (20, 8),
        ),
        (  # Gemini generateContent
            {
                "candidates": [],
                "usageMetadata": {
                    "promptTokenCount": 9,
                    "candidatesTokenCount": 4,
                    "totalTokenCount": 13,
                },
            },
            (9, 4),
        ),
        ({"usageMetadata": {"promptTokenCount": 9}}, (9, None)),
        ({"usage": {"prompt_tokens": 7}}, (7, None)),
        ({"usage": {"completion_tokens": 3}}, (None, 3)),
        ({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}, (0, 0)),
        ({"usage": {"prompt_tokens": "7", "completion_tokens": 2.5}}, (None, None)),
        ({"usage": {"prompt_tokens": -1, "completion_tokens": True}}, (None, None)),
        ({"usage": {}}, (None, None)),
        ({"usage": None}, (None, None)),
        ({"usage": "lots"}, (None, None)),
        ({"usageMetadata": "x"}, (None, None)),
        ({"choices": []}, (None, None)),
    ],
)
def test_reported_usage(response: dict[str, Any], expected: tuple[int | None, int | None]) -> None:
    assert reported_usage(json.dumps(response).encode()) == expected


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"garbage",
        b"\xff\xfe\xfd",
        b"[1, 2]",
        b"null",
        b"123",
        b'{"usage": {"prompt_tokens": 1',
        b"data: {}\n\n",
    ],
)
def test_garbage_reports_nothing(raw: bytes | None) -> None:
    assert reported_usage(raw) == (None, None)


def test_huge_response_reports_nothing() -> None:
    raw = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "'
    raw += b"p" * MAX_BODY + b'"}'
    assert reported_usage(raw) == (None, None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # usage last, as OpenAI and Anthropic send it: read from the tail
        (b'{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}', (9, 2)),
        (b'{"usage": {"input_tokens": 5, "output_tokens": 1}, "id": "x"}  \n', (5, 1)),
        # a nested "usage" after the outermost one: the outermost one counts
        (
            b'{"usage": {"prompt_tokens": 3}, "content": [{"type": "tool_use",'
            b' "input": {"usage": {"prompt_tokens": 99}}}]}',
            (3, None),
        ),
        # only a nested "usage": none reported, as when the whole body is read
        (b'{"content": [{"input": {"usage": {"prompt_tokens": 99}}}]}', (None, None)),
        (b'{"a": {"usage": {"prompt_tokens": 99}}, "usage": 1}', (None, None)),
        # "usage" quoted inside a string is no key
        (b'{"usage": {"prompt_tokens": 4}, "text": "say \\"usage\\": {}"}', (4, None)),
        (b'{"text": "\\"usage\\": {\\"prompt_tokens\\": 8}"}', (None, None)),
        # a key that ends in usage, or the outermost usage not an object
        (b'{"x\\"usage": {"prompt_tokens": 8}}', (None, None)),
        (b'{"usageMetadata": {"promptTokenCount": 6}, "usage": null}', (6, None)),
        (b'{"usage": null, "usageMetadata": {"promptTokenCount": 6}}', (6, None)),
        # the last of duplicate keys, as json.loads keeps
        (b'{"usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}', (2, None)),
    ],
)
def test_reported_usage_read_from_the_tail(raw: bytes, expected: tuple[int | None, ...]) -> None:
    assert reported_usage(raw) == expected


def test_usage_after_a_long_answer_is_read_without_the_answer() -> None:
    # The tail alone is read: content before it is never parsed (here, broken on purpose).
    raw = b'{"choices": [{"message": {"content": "' + b"\xff" * 4096 + b'"}}],'
    raw += b' "usage": {"prompt_tokens": 12, "completion_tokens": 700}}'
    assert reported_usage(raw) == (12, 700)


def _tail_as_json_loads_reads_it(raw: bytes) -> dict[str, Any] | None:
    """What `_usage_tail` gives, with `json.loads` reading the tail's bytes itself."""
    at = raw.rfind(b'"usage"')
    if at <= 0 or raw[at - 1] == 0x5C:
        return None
    try:
        data = json.loads(b"{" + raw[at:])
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"usage": {"prompt_tokens": 9, "completion_tokens": 2}}',
        b'{"x": 1, "usage": {"prompt_tokens": -1, "completion_tokens": 1e400}}',
        b'{"x": 1, "usage": {"prompt_tokens": NaN, "completion_tokens": Infinity}}',
        b'{"x": 1, "usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}",
        b'{"x": 1, "usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}',
        b'{"x": 1, "usage": {"note": "caf\xc3\xa9 \\ud800"}}',
        b'{"x": 1, "usage": {"note": "\xed\xa0\x80"}}',  # a surrogate as raw UTF-8
        b'{"x": 1, "usage": {"note": "\xff"}}',  # no UTF-8
        b'{"x": 1, "usage": {"note": "\x00\x00"}}',
        b'{"x": 1, "usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep
        b'{"x": 1, "usage": {}}  \n\t',
        b'{"x": 1, "usage": {}} trailing',
        b'{"x": 1, "usage": {}}\x0b',
        b'{"x": 1, "usage": {}}\xc2\xa0',
        b'{"x": 1, "usage": {}}\r\n\r\n',
        b'{"x": 1, "usage": {}}}',
        b'{"x": 1, "usage"',
        b'{"x": 1, "usage":',
        b"\xef\xbb\xbf" + b'{"x": 1, "usage": {"prompt_tokens": 3}}',
        b'{"x": 1, "usage": {"prompt_tokens": 3}',
    ],
)
def test_the_tail_is_read_as_json_loads_reads_it(raw: bytes) -> None:
    assert _usage_tail(raw) == _tail_as_json_loads_reads_it(raw)


class _Count(int):
    pass


@pytest.mark.parametrize(
    "value",
    [0, 1, 9, -1, 10**8, 10**8 + 1, 10**30, -(10**30), True, False, _Count(5), 1.0, "3", None],
)
def test_a_count_is_read_as_the_general_rule_reads_it(value: object) -> None:
    from kmi_rotor.core.tokens import MAX_TOKENS, _int

    general = (
        min(value, MAX_TOKENS)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else None
    )
    assert _int(value) == general and type(_int(value)) is type(general)


def _reference_non_prompt_size(data: dict[str, Any]) -> int:
    """`_non_prompt_size` as written first: every scalar through `_scalar_size`."""
    return sum(
        len(k) + _scalar_size(v) + 6 for k, v in data.items() if not isinstance(v, dict | list)
    )


def _reference_completion_budget(data: dict[str, Any]) -> int:
    """`_completion_budget` as written first: `_int` of every name, present or not."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = _int(data.get(name))
        if value is not None:
            return value
    config = data.get("generationConfig")
    if isinstance(config, dict):
        value = _int(config.get("maxOutputTokens"))
        if value is not None:
            return value
    return DEFAULT_COMPLETION


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**70), max_value=10**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
)
_BUDGET_NAMES = st.sampled_from(
    ["max_completion_tokens", "max_tokens", "max_output_tokens", "generationConfig", "model", "x"]
)
_CONFIGS = st.dictionaries(st.sampled_from(["maxOutputTokens", "y"]), _SCALARS, max_size=2)


@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(
        _BUDGET_NAMES | st.text(max_size=4),
        _SCALARS | st.lists(_SCALARS, max_size=2) | _CONFIGS,
        max_size=6,
    )
)
def test_the_sizes_read_in_a_loop_are_the_first_ones(data: dict[str, Any]) -> None:
    """Scalars of every kind, nested values, budgets given or not, of any type."""
    assert _non_prompt_size(data) == _reference_non_prompt_size(data)
    assert _completion_budget(data) == _reference_completion_budget(data)
