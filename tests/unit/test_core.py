"""Pure decisions: masking, host patterns, credential placement, rotation and state merging."""

from __future__ import annotations

import pytest

from kmi_rotor.core.credentials import Placement, placements
from kmi_rotor.core.hosts import HostPattern
from kmi_rotor.core.presets import PRESETS
from kmi_rotor.core.rotation import RoundRobin, make
from kmi_rotor.core.secrets import fingerprint, mask, mask_credential_value
from kmi_rotor.core.state import SCHEMA_VERSION, KeyDelta, KeyRecord, StateDoc, merge, overlay

ELLIPSIS = "…"

# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("sk-abcdefghijklmnop1234", "sk-…1234"),
        ("sk-proj-abcdefghijklmnop9876", "sk-…9876"),
        ("sk_live_abcdefghijklmnop5678", "sk_…5678"),
        ("gsk_abcdefghijklmnopqrstuvwxyz", "gsk_…wxyz"),
        ("AIzaSyabcdefghijklmnopqrstuv", "…stuv"),
        ("abcdefghijklmnop", "…mnop"),  # exactly 16 characters: the tail is shown
        ("verylongprefix-abcdefghijkl", "…ijkl"),  # a long head is not a public prefix
        ("-abcdefghijklmnopqrs", "…pqrs"),  # an empty head is no prefix either
        ("abcdefghijklmno", ELLIPSIS),  # 15 characters: nothing at all
        ("sk-12345678", ELLIPSIS),
        ("abcd", ELLIPSIS),
        ("", ELLIPSIS),
    ],
)
def test_mask(key: str, expected: str) -> None:
    assert mask(key) == expected


@pytest.mark.parametrize(
    "key",
    ["sk-abcdefghijklmnop1234", "abcdefghijklmnopqrstuvwxyz0123456789", "short", "sk-12345678"],
)
def test_mask_never_contains_the_key(key: str) -> None:
    assert key not in mask(key)
    assert key not in mask_credential_value(f"Bearer {key}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer sk-abcdefghijklmnop1234", "Bearer sk-…1234"),
        ("bearer sk-abcdefghijklmnop1234", "bearer sk-…1234"),
        ("Bearer  sk-abcdefghijklmnop1234", "Bearer sk-…1234"),
        ("Bearer short", f"Bearer {ELLIPSIS}"),
        ("Basic dXNlcjpwYXNzd29yZDEyMzQ1Njc4", "Basic …Njc4"),
        ("sk-abcdefghijklmnop1234", "sk-…1234"),  # a bare key (x-api-key, ?key=)
        ("Bearer", ELLIPSIS),
        ("Bearer ", ELLIPSIS),
        ("", ELLIPSIS),
    ],
)
def test_mask_credential_value(value: str, expected: str) -> None:
    assert mask_credential_value(value) == expected


@pytest.mark.parametrize(
    "key", ["sk-abcdefghijklmnop1234", "x", "ключ-с-юникодом-1234567890", "a" * 200]
)
def test_fingerprint_is_stable_and_hides_the_key(key: str) -> None:
    fp = fingerprint(key)
    assert fp == fingerprint(key)
    assert fp.startswith("sha256:")
    assert len(fp) == len("sha256:") + 16
    assert all(c in "0123456789abcdef" for c in fp.removeprefix("sha256:"))
    assert key not in fp


def test_fingerprint_differs_per_key() -> None:
    keys = [
        "sk-abcdefghijklmnop1234",
        "sk-abcdefghijklmnop1235",
        "sk-abcdefghijklmnop1234 ",
        "SK-abcdefghijklmnop1234",
        "",
    ]
    assert len({fingerprint(k) for k in keys}) == len(keys)


# -- host patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "wildcard", "shown"),
    [
        ("api.openai.com", "api.openai.com", None, False, "api.openai.com"),
        ("API.OpenAI.com", "api.openai.com", None, False, "api.openai.com"),
        ("  api.openai.com  ", "api.openai.com", None, False, "api.openai.com"),
        ("api.openai.com:443", "api.openai.com", 443, False, "api.openai.com:443"),
        ("localhost:8080", "localhost", 8080, False, "localhost:8080"),
        ("127.0.0.1:1", "127.0.0.1", 1, False, "127.0.0.1:1"),
        ("example.com:65535", "example.com", 65535, False, "example.com:65535"),
        ("*.example.com", "example.com", None, True, "*.example.com"),
        ("*.Example.COM:8443", "example.com", 8443, True, "*.example.com:8443"),
        ("[::1]:8080", "::1", 8080, False, "[::1]:8080"),
        ("[::1]", "::1", None, False, "[::1]"),
        ("[2001:DB8::1]:443", "2001:db8::1", 443, False, "[2001:db8::1]:443"),
        ("::1", "::1", None, False, "[::1]"),
    ],
)
def test_host_pattern_parse(
    text: str, host: str, port: int | None, wildcard: bool, shown: str
) -> None:
    p = HostPattern.parse(text)
    assert (p.host, p.port, p.wildcard) == (host, port, wildcard)
    assert str(p) == shown
    assert HostPattern.parse(str(p)) == p


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a host pattern"),
        ("   ", "not a host pattern"),
        ("https://api.openai.com", "not a host pattern"),
        ("api.openai.com/v1", "not a host pattern"),
        ("api openai.com", "not a host pattern"),
        ("api.openai.com:", "bad port"),
        ("api.openai.com:0", "bad port"),
        ("api.openai.com:65536", "bad port"),
        ("api.openai.com:-1", "bad port"),
        ("api.openai.com:https", "bad port"),
        ("[::1", "unclosed"),
        ("[::1]:", "bad port"),
        ("[::1]:99999", "bad port"),
        ("*", "'*' may only open a pattern"),
        ("*.", "'*' may only open a pattern"),
        ("*example.com", "'*' may only open a pattern"),
        ("api.*.com", "'*' may only open a pattern"),
        ("*.*.example.com", "'*' may only open a pattern"),
        (":8080", "'*' may only open a pattern"),
    ],
)
def test_host_pattern_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="pattern") as exc:
        HostPattern.parse(text)
    assert reason in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("pattern", "host", "port", "expected"),
    [
        ("api.openai.com", "api.openai.com", 443, True),
        ("api.openai.com", "API.OPENAI.COM", 443, True),
        ("api.openai.com", "api.openai.com.", 443, True),
        ("api.openai.com", "api.openai.com", 8080, True),  # no port: any port
        ("api.openai.com", "openai.com", 443, False),
        ("api.openai.com", "xapi.openai.com", 443, False),
        ("api.openai.com", "api.openai.com.evil.net", 443, False),
        ("api.openai.com:443", "api.openai.com", 443, True),
        ("api.openai.com:443", "api.openai.com", 80, False),
        ("*.example.com", "api.example.com", 443, True),
        ("*.example.com", "a.b.example.com", 443, True),
        ("*.example.com", "API.Example.Com", 443, True),
        ("*.example.com", "example.com", 443, False),
        ("*.example.com", "evilexample.com", 443, False),
        ("*.example.com", "example.com.evil.net", 443, False),
        ("*.example.com:8443", "api.example.com", 8443, True),
        ("*.example.com:8443", "api.example.com", 443, False),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 8081, False),
        ("[::1]", "::1", 1234, True),
        ("127.0.0.1", "127.0.0.1", 80, True),
        ("127.0.0.1", "127.0.0.2", 80, False),
    ],
)
def test_host_pattern_matches(pattern: str, host: str, port: int, expected: bool) -> None:
    assert HostPattern.parse(pattern).matches(host, port) is expected


def test_host_pattern_with_trailing_dot_matches_or_is_rejected() -> None:
    try:
        pattern = HostPattern.parse("api.example.com.")
    except ValueError:
        return
    assert pattern.matches("api.example.com", 443)


# -- credential placements -------------------------------------------------------------------

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


# -- rotation --------------------------------------------------------------------------------


def _picks(keys: list[str], unusable: set[str], n: int) -> list[str | None]:
    rr = RoundRobin()
    return [rr.pick(keys, lambda k: k not in unusable) for _ in range(n)]


@pytest.mark.parametrize(
    ("keys", "unusable", "expected"),
    [
        (["a"], set(), ["a", "a", "a", "a"]),
        (["a", "b"], set(), ["a", "b", "a", "b", "a", "b"]),
        (["a", "b", "c"], set(), ["a", "b", "c", "a", "b", "c", "a"]),
        (["a", "b", "c"], {"b"}, ["a", "c", "a", "c", "a", "c"]),
        (["a", "b", "c"], {"a"}, ["b", "c", "b", "c"]),
        (["a", "b", "c"], {"c"}, ["a", "b", "a", "b"]),
        (["a", "b", "c"], {"a", "c"}, ["b", "b", "b"]),
        (["a", "b"], {"b"}, ["a", "a", "a"]),
        (["a"], {"a"}, [None, None]),
        (["a", "b", "c"], {"a", "b", "c"}, [None, None, None]),
        ([], set(), [None, None]),
    ],
)
def test_round_robin_order(keys: list[str], unusable: set[str], expected: list[str | None]) -> None:
    assert _picks(keys, unusable, len(expected)) == expected


def test_round_robin_follows_keys_becoming_unusable_and_usable_again() -> None:
    rr = RoundRobin()
    keys = ["a", "b", "c"]
    down: set[str] = set()

    def pick() -> str | None:
        return rr.pick(keys, lambda k: k not in down)

    assert [pick(), pick()] == ["a", "b"]
    down.add("c")
    assert [pick(), pick(), pick()] == ["a", "b", "a"]
    down.clear()
    assert [pick(), pick(), pick(), pick()] == ["b", "c", "a", "b"]
    down.update(keys)
    assert pick() is None
    down.clear()
    assert pick() == "c"  # an empty round does not move the cursor


def test_round_robin_gives_each_usable_key_an_equal_share() -> None:
    picks = _picks(["a", "b", "c", "d"], {"b"}, 300)
    assert {k: picks.count(k) for k in "abcd"} == {"a": 100, "b": 0, "c": 100, "d": 100}


def test_make_round_robin() -> None:
    assert isinstance(make("round-robin"), RoundRobin)


# -- state merging ---------------------------------------------------------------------------


def _doc(**records: dict[str, object]) -> StateDoc:
    return StateDoc(
        updated_at=10.0,
        keys={fp: KeyRecord(fingerprint=fp, **fields) for fp, fields in records.items()},
    )


@pytest.mark.parametrize(
    ("on_disk", "delta", "expected"),
    [
        pytest.param(
            None,
            KeyDelta("a", "p", requests=2, errors=1, last_status=None, last_error="x", last_used=5),
            {"label": "a", "pool": "p", "requests": 2, "errors": 1, "last_error": "x"},
            id="new-record",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "requests": 3, "errors": 1},
            KeyDelta("a", "p", requests=4, errors=2),
            {"requests": 7, "errors": 3, "last_used": None},
            id="counters-add",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": 429, "last_used": 100.0},
            KeyDelta("a", "p", requests=1, last_status=200, last_used=200.0),
            {"requests": 1, "last_status": 200, "last_error": None, "last_used": 200.0},
            id="newer-observation-wins",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": 429, "last_used": 200.0},
            KeyDelta("a", "p", requests=1, last_status=200, last_used=100.0),
            {"requests": 1, "last_status": 429, "last_used": 200.0},
            id="older-delta-keeps-newer-observation",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": None, "last_error": "boom", "last_used": 50},
            KeyDelta("a", "p", errors=0, last_status=200, last_used=50.0),
            {"last_status": 200, "last_error": None, "last_used": 50.0},
            id="same-time-delta-wins",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": 500, "last_used": 100.0},
            KeyDelta("a", "p", requests=2),
            {"requests": 2, "last_status": 500, "last_used": 100.0},
            id="no-observation-keeps-old",
        ),
        pytest.param(
            {"label": "old-label", "pool": "old-pool", "requests": 1},
            KeyDelta("new-label", "new-pool", requests=1),
            {"label": "new-label", "pool": "new-pool", "requests": 2},
            id="labels-updated",
        ),
    ],
)
def test_merge(
    on_disk: dict[str, object] | None, delta: KeyDelta, expected: dict[str, object]
) -> None:
    doc = _doc(fp1=on_disk) if on_disk is not None else StateDoc()
    merged = merge(doc, {"fp1": delta}, now=500.0)
    rec = merged.keys["fp1"]
    assert rec.fingerprint == "fp1"
    for field, value in expected.items():
        assert getattr(rec, field) == value, field
    assert merged.updated_at == 500.0
    assert merged.schema_version == SCHEMA_VERSION


def test_merge_leaves_other_keys_and_the_input_alone() -> None:
    doc = _doc(fp1={"label": "a", "requests": 1}, fp2={"label": "b", "requests": 5})
    before = doc.model_dump()
    merged = merge(doc, {"fp1": KeyDelta("a", "p", requests=1)}, now=20.0)
    assert merged.keys["fp1"].requests == 2
    assert merged.keys["fp2"] == doc.keys["fp2"]
    assert doc.model_dump() == before


def test_merge_with_no_deltas_only_touches_the_time() -> None:
    doc = _doc(fp1={"label": "a", "requests": 1})
    merged = merge(doc, {}, now=99.0)
    assert merged.keys == doc.keys
    assert merged.updated_at == 99.0


def test_overlay_keeps_the_document_time() -> None:
    doc = _doc(fp1={"label": "a", "requests": 1})
    view = overlay(doc, {"fp1": KeyDelta("a", "p", requests=2), "fp9": KeyDelta("z", "q", 1)})
    assert view.updated_at == doc.updated_at
    assert view.keys["fp1"].requests == 3
    assert view.keys["fp9"].requests == 1
    assert doc.keys["fp1"].requests == 1


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        ([(10.0, 200, None)], (10.0, 200, None)),
        ([(10.0, 200, None), (20.0, None, "reset")], (20.0, None, "reset")),
        ([(20.0, None, "reset"), (10.0, 200, None)], (20.0, None, "reset")),
        ([(10.0, 500, None), (10.0, 200, None)], (10.0, 200, None)),
    ],
)
def test_key_delta_observe_keeps_the_newest(
    observations: list[tuple[float, int | None, str | None]],
    expected: tuple[float, int | None, str | None],
) -> None:
    d = KeyDelta("a", "p")
    for at, status, error in observations:
        d.observe(at, status, error)
    assert (d.last_used, d.last_status, d.last_error) == expected
