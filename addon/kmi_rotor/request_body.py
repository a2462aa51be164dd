"""A request's body as kmi-rotor reads it (its declared size, whether it asks for a streamed
answer) and the one edit it makes to it (asking a streamed chat completion for its usage)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import msgspec
from mitmproxy import http

from .core.body_json import JSON_SPACE, MAX_BODY, BodyJSON, read_json, rebuilt, top_level
from .core.header_fields import field_value
from .names import META


def header_values(fields: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """`Headers.get_all(name)` for a lower-case `name`, read straight from the raw fields in
    one pass (mitmproxy converts the name and every field's name on each call)."""
    return [v.decode("utf-8", "surrogateescape") for k, v in fields if k.lower() == name]


def content_length(request: http.Request) -> int | None:
    """The declared size of the body; None when absent or not a number."""
    try:
        return int(request.headers.get("content-length", ""))
    except ValueError:
        return None


def wants_stream(request: http.Request, body: bytes, parsed: BodyJSON | None = None) -> bool:
    """Whether the client asked for a streamed answer: the body's `stream` decides when it has
    one; otherwise Gemini's streaming method or an `Accept: text/event-stream`. `parsed`: the
    body's parse (`read_json(body)`) when it was read already."""
    stream = _object(body, parsed).get("stream")
    if isinstance(stream, bool):
        return stream
    if b"streamGenerateContent" in request.data.path:  # in `request.path`: ASCII, as bytes
        return True
    return "text/event-stream" in (field_value(request.headers.fields, b"accept") or "")


def _object(body: bytes, parsed: BodyJSON | None) -> dict[str, Any]:
    """The body as a JSON object ({} when it is not one)."""
    return parse(body, parsed).data or {}


def parse(body: bytes, parsed: BodyJSON | None) -> BodyJSON:
    """The body's parse as the stream flag and the usage option read it: `parsed` when given
    (`read_json(body)`, or what `parse` gave), else made here. A body too large for
    `read_json` is read here one level deep (`top_level`) when its bytes hold a `"stream"`,
    the one key read from a body that large (a caller asking both, `parse` first, reads it
    once, whether or not it is an object)."""
    if parsed is None:
        parsed = read_json(body)
    if (
        parsed.data is None
        and parsed is not _TOP_UNREAD
        and len(body) > MAX_BODY
        and b'"stream"' in body
    ):
        try:
            return top_level(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return _TOP_UNREAD
    return parsed


_TOP_UNREAD = BodyJSON(None)
"""`parse` of a body too large for `read_json` whose top level is no JSON object either: told
apart from `read_json`'s NOTHING by identity, so that it is not read again."""


def ask_for_usage(flow: http.HTTPFlow, parsed: BodyJSON | None = None) -> None:
    """OpenAI-style streams carry usage only when asked: ask a chat completion whose body
    asks for a stream (`"stream": true`), unless the client said otherwise. Rewrites the
    request body (and notes it in the flow's metadata); a body that is not a JSON object is
    left as it is. `parsed`: the parse of the request's body as it is now, when it was read
    already (left unchanged)."""
    if not flow.request.path.split("?")[0].endswith("/chat/completions"):
        return
    body = flow.request.raw_content or b""
    parsed = parse(body, parsed)
    data = parsed.data or {}
    if data.get("stream") is not True:  # OpenAI refuses stream_options without a stream
        return
    options = data.get("stream_options")
    if options is None and "stream_options" not in data:
        flow.request.content = _with_usage_asked(body) or _written(data, parsed, _ASK)
    elif options is None or (isinstance(options, dict) and "include_usage" not in options):
        flow.request.content = _written(data, parsed, {**(options or {}), **_ASK})
    else:
        return
    flow.metadata[META]["usage_requested"] = True


def _written(data: dict[str, Any], parsed: BodyJSON, options: dict[str, Any]) -> bytes:
    """The body of `data` with `options` as its `stream_options`: from the parse's parts
    when it has them (the other values are the client's bytes), else written as JSON (a
    body read whole holds no `Unread`)."""
    if parsed.parts is not None:
        return rebuilt(parsed.parts, "stream_options", options)
    return json.dumps({**data, "stream_options": options}).encode()


_ASK = {"include_usage": True}
_ASKED = b'"stream_options":{"include_usage":true},'


def _with_usage_asked(body: bytes) -> bytes | None:
    """`body`, a UTF-8 JSON object with at least one member and no `stream_options`, with
    `stream_options` put first: the client's own bytes around it, as they were (a long
    conversation is not written again). None when the body is not plain UTF-8 (a byte-order
    mark, UTF-16 or UTF-32)."""
    stripped = body.lstrip(JSON_SPACE)  # (`body` itself when it starts with its brace)
    if stripped[:1] != b"{" or stripped[1:2] == b"\x00":
        return None
    at = len(body) - len(stripped) + 1
    whole = memoryview(body)  # one copy of a long body, not three (two slices, then theirs)
    return b"".join((whole[:at], _ASKED, whole[at:]))
