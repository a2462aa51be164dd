"""A request's credential slots: the pool key put in, masked once it is no longer needed, or
every client credential dropped or masked in a request that goes out without one."""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

from .core.credentials import CREDENTIAL_HEADERS, CREDENTIAL_QUERY, Placement
from .core.header_fields import field_positions, field_value, with_field_at, with_fields
from .core.secrets import mask_credential_value
from .names import META


def put(request: http.Request, placement: Placement, value: str) -> None:
    """Write `value` into one credential slot (a header or a query parameter)."""
    if placement.kind == "header":
        request.headers[placement.name] = value
    else:
        request.query[placement.name] = value


def put_all(request: http.Request, slots: Iterable[tuple[Placement, str]]) -> None:
    """`put` of each (slot, value), the headers' in one pass over the raw fields (each
    `headers[name] = value` walks and rebuilds them all); a header name that is not lower-case
    (none of kmi-rotor's) is written by `put`, which keeps its spelling in a new field."""
    updates: dict[bytes, bytes] = {}
    for placement, value in slots:
        name = placement.name.encode("utf-8", "surrogateescape")
        if placement.kind == "header" and name == name.lower():
            updates[name] = value.encode("utf-8", "surrogateescape")
        else:
            put(request, placement, value)
    if updates:
        request.headers.fields = with_fields(request.headers.fields, updates)


def mask_request(flow: http.HTTPFlow) -> None:
    """Replace the injected key by its masked form wherever it was put (once)."""
    meta = flow.metadata.get(META) or {}
    for kind, name in meta.pop("placements", ()):
        if kind == "header":
            _mask_header(flow.request.headers, name.encode("utf-8", "surrogateescape").lower())
        elif (value := flow.request.query.get(name)) is not None:
            put(flow.request, Placement(kind, name), mask_credential_value(value))


def _mask_header(headers: http.Headers, name: bytes) -> None:
    """`headers[name] = mask(headers[name])` when present, on the raw pairs: one pass for the
    one field a key is written to (two when the name is repeated), not the four of `Headers`'
    own look-ups."""
    fields = headers.fields
    at = field_positions(fields, name)
    if len(at) == 1:
        value = fields[at[0]][1]
        masked = mask_credential_value(value.decode("utf-8", "surrogateescape"))
        headers.fields = with_field_at(fields, at[0], masked.encode("utf-8", "surrogateescape"))
    elif at:
        joined = field_value(fields, name) or ""
        masked = mask_credential_value(joined).encode("utf-8", "surrogateescape")
        headers.fields = with_fields(fields, {name: masked})


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
