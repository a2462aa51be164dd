"""Where a pool key goes in a request: the same place the client put its own credential."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .presets import Preset

CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
CREDENTIAL_QUERY = ("key",)


@dataclass(frozen=True)
class Placement:
    kind: Literal["header", "query"]
    name: str
    bearer: bool = False

    def render(self, key: str) -> str:
        return f"Bearer {key}" if self.bearer else key


def placements(
    header_names: Iterable[str], query_names: Iterable[str], preset: Preset
) -> list[Placement]:
    """Every credential slot the client used, or the preset's header when it used none.

    Each slot the client filled gets the pool key, so that no client credential survives.
    """
    headers = {n.lower() for n in header_names}
    queries = set(query_names)
    return list(
        _placements(
            tuple(name for name in CREDENTIAL_HEADERS if name in headers),
            tuple(name for name in CREDENTIAL_QUERY if name in queries),
            preset,
        )
    )


def placements_of_fields(
    fields: Iterable[tuple[bytes, bytes]], query_names: Iterable[str], preset: Preset
) -> list[Placement]:
    """`placements`, from a request's raw header fields (name, value) as mitmproxy holds them:
    one pass over the names, none of them decoded."""
    present = frozenset({name.lower() for name, _ in fields} & _HEADER_SET)
    if query_names:  # most requests have no query string: nothing to look for
        found = set(query_names)
        queries = tuple(name for name in CREDENTIAL_QUERY if name in found)
    else:
        queries = ()
    return list(_placements_present(present, queries, preset))


@dataclass(frozen=True, slots=True)
class Writes:
    """A combination of credential slots (`placements_of_fields`) and how to write a key into
    them, worked out once per combination."""

    placements: tuple[Placement, ...]
    shown: tuple[tuple[str, str], ...]
    """(kind, name) of each slot, as the flow's metadata lists them."""
    headers: tuple[tuple[bytes, bool], ...] | None
    """When every slot is a header of a lower-case name: each name (raw) and whether the key
    goes in as a bearer token; None when a slot must be written otherwise (`masking.put`)."""


def writes_of_fields(
    fields: Iterable[tuple[bytes, bytes]], query_names: Iterable[str], preset: Preset
) -> Writes:
    """`placements_of_fields` and how to write them (see `Writes`)."""
    if query_names:  # rare: the general way
        present = _HEADER_SET.intersection({name.lower() for name, _ in fields})
        found = set(query_names)
        queries = tuple(name for name in CREDENTIAL_QUERY if name in found)
        return _writes_present(present, queries, preset)
    # Which credential headers are there, as bits; each preset's combinations by those bits
    # (a preset is hashed by all its fields: looked up by identity instead).
    mask = 0
    bits = _HEADER_BITS
    for name, _ in fields:
        mask |= bits.get(name.lower(), 0)
    table = _WRITES.get(id(preset))
    if table is None or table[0] is not preset:
        if len(_WRITES) > 64:  # presets are few; those of an old configuration go
            _WRITES.clear()
        table = _WRITES[id(preset)] = (preset, {})
    writes = table[1].get(mask)
    if writes is None:
        present = frozenset(raw for raw, bit in bits.items() if mask & bit)
        writes = table[1][mask] = _writes_present(present, (), preset)
    return writes


@functools.lru_cache(maxsize=256)
def _writes_present(present: frozenset[bytes], queries: tuple[str, ...], preset: Preset) -> Writes:
    where = _placements_present(present, queries, preset)
    headers = []
    for p in where:
        name = p.name.encode("utf-8", "surrogateescape")
        if p.kind != "header" or name != name.lower():
            return Writes(where, tuple((p.kind, p.name) for p in where), None)
        headers.append((name, p.bearer))
    return Writes(where, tuple((p.kind, p.name) for p in where), tuple(headers))


_HEADER_BYTES = tuple((name, name.encode()) for name in CREDENTIAL_HEADERS)
_HEADER_SET = frozenset(raw for _, raw in _HEADER_BYTES)
_HEADER_BITS = {raw: 1 << i for i, (_, raw) in enumerate(_HEADER_BYTES)}
_WRITES: dict[int, tuple[Preset, dict[int, Writes]]] = {}
"""By preset (its id, kept alive with it): its `Writes` by the bits of the credential headers
present (`_HEADER_BITS`)."""


@functools.lru_cache(maxsize=256)
def _placements_present(
    present: frozenset[bytes], queries: tuple[str, ...], preset: Preset
) -> tuple[Placement, ...]:
    """`_placements` of the credential headers in `present` (lower-case names), in their
    order of `CREDENTIAL_HEADERS`: worked out once per combination, not per request."""
    return _placements(
        tuple(name for name, raw in _HEADER_BYTES if raw in present), queries, preset
    )


@functools.lru_cache(maxsize=256)
def _placements(
    headers: tuple[str, ...], queries: tuple[str, ...], preset: Preset
) -> tuple[Placement, ...]:
    """Made once per combination of slots and preset (a handful), not per request."""
    found = tuple(Placement("header", name, bearer=(name == "authorization")) for name in headers)
    found += tuple(Placement("query", name) for name in queries)
    return found or (Placement("header", preset.header, bearer=preset.bearer),)
