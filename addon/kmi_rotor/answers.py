"""What kmi-rotor puts in answers: its own local answers (refusals, errors), and on an answer
from upstream the label of the key that served it."""

from __future__ import annotations

import json

from mitmproxy import http

from .core.header_fields import has_field, with_fields
from .core.refusal import Refusal, render
from .masking import mask_credentials, mask_request
from .names import META

KEY_HEADER = "kmi-rotor-key"
"""The label of the key that served an answer (never the key itself)."""
ATTEMPT_HEADER = "kmi-rotor-attempt"
"""Which attempt served an answer, when a failover re-sent the request."""
_KEY_HEADER = KEY_HEADER.encode()
_ATTEMPT_HEADER = ATTEMPT_HEADER.encode()
_PREFIX = b"kmi-rotor-"
"""What both header names begin with."""


def answer_locally(flow: http.HTTPFlow, r: Refusal, now: float) -> None:
    """Answer locally; a key already injected is masked at once (nothing goes upstream now)."""
    status, headers, body = render(r, now)
    mask_request(flow)
    mask_credentials(flow)
    flow.response = http.Response.make(status, json.dumps(body).encode(), headers)
    meta = flow.metadata.setdefault(META, {})
    meta.pop("fingerprint", None)
    meta.update({"local": True, "code": r.code, "status": status})
    flow.comment = f"kmi-rotor: {status} {r.code}" + (
        f" · retry in {body['error']['retry_after']}s" if "retry_after" in body["error"] else ""
    )


def label_answer(response: http.Response, label: str, attempt: int) -> None:
    """Name the serving key's label on the answer, and the attempt after a failover; a header
    of the same name from upstream is replaced, never passed on."""
    attempt_value = str(attempt).encode() if attempt > 1 else None
    raw = label.encode("utf-8", "surrogateescape")
    headers = response.headers
    fields = headers.fields
    # Upstream answers do not name these headers: when no field name holds their common
    # prefix (looked for in C, over the names joined), the label is appended, as
    # `with_fields` would append it; else `with_fields` replaces and removes.
    if _PREFIX not in b"\n".join([k for k, _ in fields]).lower():
        added = ((_KEY_HEADER, raw),)
        if attempt_value is not None:
            added += ((_ATTEMPT_HEADER, attempt_value),)
        headers.fields = (*fields, *added)
        return
    headers.fields = with_fields(  # one pass over the raw pairs
        fields, {_KEY_HEADER: raw, _ATTEMPT_HEADER: attempt_value}
    )


def is_labelled(response: http.Response) -> bool:
    """Whether the answer names a serving key (`label_answer` ran on it)."""
    return has_field(response.headers.fields, _KEY_HEADER)
