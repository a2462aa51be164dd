"""Local answers and masking: what leaves a flow that kmi-rotor answered or sent."""

from __future__ import annotations

import json

from mitmproxy import http

from .core.credentials import CREDENTIAL_HEADERS, CREDENTIAL_QUERY, Placement
from .core.refusal import Refusal, render
from .core.secrets import mask_credential_value
from .flows import META

KEY_HEADER = "kmi-rotor-key"
"""The label of the key that served an answer (never the key itself)."""
ATTEMPT_HEADER = "kmi-rotor-attempt"
"""Which attempt served an answer, when a failover re-sent the request."""


def mask_request(flow: http.HTTPFlow) -> None:
    """Replace the injected key by its masked form wherever it was put (once)."""
    meta = flow.metadata.get(META) or {}
    for kind, name in meta.pop("placements", ()):
        value = flow.request.headers.get(name) if kind == "header" else flow.request.query.get(name)
        if value is not None:
            put(flow.request, Placement(kind, name), mask_credential_value(value))


def mask_credentials(flow: http.HTTPFlow) -> None:
    """A request answered locally never leaves: no credential needs to stay in it."""
    for name in CREDENTIAL_HEADERS:
        if name in flow.request.headers:
            flow.request.headers[name] = mask_credential_value(flow.request.headers[name])
    for name in CREDENTIAL_QUERY:
        if name in flow.request.query:
            flow.request.query[name] = mask_credential_value(flow.request.query[name])


def drop_credentials(flow: http.HTTPFlow) -> None:
    """Remove every credential slot from a request that goes out without a key."""
    for name in CREDENTIAL_HEADERS:
        flow.request.headers.pop(name, None)
    for name in CREDENTIAL_QUERY:
        flow.request.query.pop(name, None)


def put(request: http.Request, placement: Placement, value: str) -> None:
    if placement.kind == "header":
        request.headers[placement.name] = value
    else:
        request.query[placement.name] = value


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
