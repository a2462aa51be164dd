"""What kmi-rotor puts in answers: its own local answers (refusals, errors), and on an answer
from upstream the label of the key that served it."""

from __future__ import annotations

import json

from mitmproxy import http

from .core.refusal import Refusal, render
from .masking import mask_credentials, mask_request
from .names import META

KEY_HEADER = "kmi-rotor-key"
"""The label of the key that served an answer (never the key itself)."""
ATTEMPT_HEADER = "kmi-rotor-attempt"
"""Which attempt served an answer, when a failover re-sent the request."""


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
    response.headers[KEY_HEADER] = label
    if attempt > 1:
        response.headers[ATTEMPT_HEADER] = str(attempt)
    else:
        response.headers.pop(ATTEMPT_HEADER, None)
