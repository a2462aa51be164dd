"""Where a key goes in a request: the client's own credential slots, else the preset's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kmi_rotor.core.credentials import (
    Placement,
    placements,
    placements_of_fields,
    writes_of_fields,
)
from kmi_rotor.core.presets import PRESETS

OPENAI = PRESETS["openai"]

H = "header"
Q = "query"


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        (["Authorization"], [], [(H, "authorization", True)]),
        (["authorization"], [], [(H, "authorization", True)]),
        (["AUTHORIZATION", "content-type"], ["model"], [(H, "authorization", True)]),
        (["x-api-key"], [], [(H, "x-api-key", False)]),
        (["X-Api-Key"], [], [(H, "x-api-key", False)]),
        (["x-goog-api-key"], [], [(H, "x-goog-api-key", False)]),
        ([], ["key"], [(Q, "key", False)]),
        (["content-type"], ["alt", "key"], [(Q, "key", False)]),
        (
            ["x-goog-api-key", "Authorization"],
            [],
            [(H, "authorization", True), (H, "x-goog-api-key", False)],
        ),
        (
            ["x-api-key", "authorization"],
            ["key"],
            [(H, "authorization", True), (H, "x-api-key", False), (Q, "key", False)],
        ),
        (
            ["x-goog-api-key", "x-api-key", "authorization"],
            ["key"],
            [
                (H, "authorization", True),
                (H, "x-api-key", False),
                (H, "x-goog-api-key", False),
                (Q, "key", False),
            ],
        ),
        (["Authorization", "authorization"], [], [(H, "authorization", True)]),
        ([], ["Key", "api_key"], [(H, "authorization", True)]),  # query names are exact
        (["api-key", "cookie"], [], [(H, "authorization", True)]),  # none: the preset's
        ([], [], [(H, "authorization", True)]),
    ],
)
def test_placements(
    headers: list[str], query: list[str], expected: list[tuple[str, str, bool]]
) -> None:
    found = placements(headers, query, OPENAI)
    assert [(p.kind, p.name, p.bearer) for p in found] == expected
    fields = [(name.encode(), b"v") for name in headers]
    assert placements_of_fields(fields, query, OPENAI) == found  # from raw header fields
    writes = writes_of_fields(fields, query, OPENAI)
    assert list(writes.placements) == found
    assert list(writes.shown) == [(p.kind, p.name) for p in found]
    assert writes.headers == (
        None
        if any(p.kind == "query" for p in found)
        else tuple((p.name.encode(), p.bearer) for p in found)
    )


@pytest.mark.parametrize("preset", ["anthropic", "gemini"])
def test_placements_of_fields_fall_back_to_the_preset(preset: str) -> None:
    fields = [(b"Content-Type", b"application/json"), (b"X-\xc0pi-Key", b"v")]
    assert placements_of_fields(fields, ["alt"], PRESETS[preset]) == placements(
        [k.decode("latin-1") for k, _ in fields], ["alt"], PRESETS[preset]
    )


PRESET_DEFAULTS = {
    "kimi-code": ("authorization", True),
    "moonshot": ("authorization", True),
    "openai": ("authorization", True),
    "anthropic": ("x-api-key", False),
    "openrouter": ("authorization", True),
    "groq": ("authorization", True),
    "deepseek": ("authorization", True),
    "mistral": ("authorization", True),
    "gemini": ("x-goog-api-key", False),
    "generic": ("authorization", True),
}


def test_preset_table_covers_every_preset() -> None:
    assert set(PRESET_DEFAULTS) == set(PRESETS)


@pytest.mark.parametrize(("name", "default"), sorted(PRESET_DEFAULTS.items()))
def test_placements_without_client_credential_use_the_preset(
    name: str, default: tuple[str, bool]
) -> None:
    header, bearer = default
    assert placements(["content-type"], ["alt"], PRESETS[name]) == [
        Placement("header", header, bearer=bearer)
    ]


@pytest.mark.parametrize("name", sorted(PRESET_DEFAULTS))
def test_client_credential_wins_over_the_preset(name: str) -> None:
    assert placements(["X-Api-Key"], [], PRESETS[name]) == [Placement("header", "x-api-key")]


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        (Placement("header", "authorization", bearer=True), "Bearer sk-secret"),
        (Placement("header", "x-api-key"), "sk-secret"),
        (Placement("query", "key"), "sk-secret"),
    ],
)
def test_placement_render(placement: Placement, expected: str) -> None:
    assert placement.render("sk-secret") == expected


def test_placements_are_made_once_per_combination() -> None:
    first = placements(["Authorization", "content-type"], [], PRESETS["openai"])
    again = placements(["authorization"], [], PRESETS["openai"])
    assert first == again == [Placement("header", "authorization", bearer=True)]
    assert first[0] is again[0]


@pytest.mark.parametrize(
    "query_names",
    [[], (), ["key"], iter(["alt", "key"]), iter([]), {"key": 1}.keys(), {}.keys(), ["Key"]],
)
def test_placements_of_fields_reads_any_query_names(query_names) -> None:
    names = list(query_names)
    fields = [(b"X-API-KEY", b"v"), (b"\xff\xfe", b"v")]
    again = iter(names) if isinstance(query_names, Iterator) else query_names  # read up above
    assert placements_of_fields(fields, again, OPENAI) == placements(["X-API-KEY"], names, OPENAI)


def test_placements_of_fields_are_made_once_per_combination() -> None:
    first = placements_of_fields([(b"Authorization", b"a"), (b"accept", b"b")], [], OPENAI)
    again = placements_of_fields([(b"authorization", b"c")], (), OPENAI)
    assert first == again and first[0] is again[0]
    other = placements_of_fields([(b"authorization", b"c")], (), PRESETS["anthropic"])
    assert other == [Placement("header", "authorization", bearer=True)]
    fallback = placements_of_fields([], (), PRESETS["anthropic"])
    assert fallback == [Placement("header", "x-api-key")]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(
    "names", [[], ["authorization"], ["X-Api-Key", "accept"], ["x-goog-api-key", "AUTHORIZATION"]]
)
@pytest.mark.parametrize("query", [(), ("key",), ("alt",)])
def test_writes_of_fields_are_the_placements(
    preset: str, names: list[str], query: tuple[str, ...]
) -> None:
    fields = [(n.encode(), b"v") for n in names]
    found = placements_of_fields(fields, query, PRESETS[preset])
    writes = writes_of_fields(fields, query, PRESETS[preset])
    assert list(writes.placements) == found
    assert list(writes.shown) == [(p.kind, p.name) for p in found]
    simple = all(p.kind == "header" and p.name == p.name.lower() for p in found)
    assert writes.headers == (tuple((p.name.encode(), p.bearer) for p in found) if simple else None)
