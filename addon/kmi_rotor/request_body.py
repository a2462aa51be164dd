"""A request's body as kmi-rotor reads it (its declared size, whether it asks for a streamed
answer) and the one edit it makes to it (asking a streamed chat completion for its usage)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from mitmproxy import http

from .core.body_json import MAX_BODY, BodyJSON
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
    body's parse when it was read already."""
    if b'"stream"' in body:
        stream = _object(body, parsed).get("stream")
        if isinstance(stream, bool):
            return stream
    if b"streamGenerateContent" in request.data.path:  # in `request.path`: ASCII, as bytes
        return True
    return "text/event-stream" in (field_value(request.headers.fields, b"accept") or "")


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; {} when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _object(body: bytes, parsed: BodyJSON | None) -> dict[str, Any]:
    """`json_object(body)`, from the body's parse when there is one (a body too large for
    `read_json` is parsed here all the same)."""
    if parsed is None or (parsed.data is None and len(body) > MAX_BODY):
        return json_object(body)
    return parsed.data if parsed.data is not None else {}


def ask_for_usage(flow: http.HTTPFlow, parsed: BodyJSON | None = None) -> None:
    """OpenAI-style streams carry usage only when asked: ask, unless the client said otherwise.
    Rewrites the request body (and notes it in the flow's metadata). `parsed`: the parse of
    the request's body as it is now, when it was read already (left unchanged)."""
    if not flow.request.path.split("?")[0].endswith("/chat/completions"):
        return
    data = dict(_object(flow.request.raw_content or b"", parsed))  # a copy: `parsed` is shared
    options = data.get("stream_options")
    if options is None:
        data["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict) and "include_usage" not in options:
        data["stream_options"] = {**options, "include_usage": True}
    else:
        return
    flow.request.content = json.dumps(data).encode()
    flow.metadata[META]["usage_requested"] = True
