"""Pure decisions: masking, host patterns, credential placement, rotation and state merging."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from kmi_rotor.core.credentials import Placement, placements
from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.hosts import HostPattern
from kmi_rotor.core.presets import PRESETS
from kmi_rotor.core.rotation import RoundRobin, make
from kmi_rotor.core.secrets import fingerprint, mask, mask_credential_value
from kmi_rotor.core.state import (
    KEY_COUNTERS,
    POOL_COUNTERS,
    SCHEMA_VERSION,
    Delta,
    KeyDelta,
    KeyRecord,
    PoolRecord,
    StateDoc,
    merge,
    overlay,
)

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
        ("ftp://api.openai.com", "not a host pattern"),
        ("https://", "not a host pattern"),
        ("http://user@api.openai.com", "not a host pattern"),
        ("https://api.openai.com/v1", "not a host pattern"),
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


def kd(label: str, pool: str, *, requests: int = 0, errors: int = 0, **kw: Any) -> KeyDelta:
    """A key delta: counters by name (any of KEY_COUNTERS), the rest as KeyDelta fields."""
    counts = {"requests": requests, "errors": errors}
    counts |= {name: kw.pop(name) for name in KEY_COUNTERS if name in kw}
    return KeyDelta(label, pool, counters={n: c for n, c in counts.items() if c}, **kw)


def delta(*maps: Mapping[str, KeyDelta], **keys: KeyDelta) -> Delta:
    out = Delta()
    for m in (*maps, keys):
        out.keys.update(m)
    return out


def _doc(**records: dict[str, object]) -> StateDoc:
    return StateDoc(
        updated_at=10.0,
        keys={fp: KeyRecord(fingerprint=fp, **fields) for fp, fields in records.items()},
    )


def _counters(rec: KeyRecord) -> dict[str, int]:
    return {c: getattr(rec, c) for c in KEY_COUNTERS}


@pytest.mark.parametrize(
    ("on_disk", "delta_", "expected"),
    [
        pytest.param(
            None,
            kd("a", "p", requests=2, errors=1, last_status=None, last_error="x", last_used=5),
            {"label": "a", "pool": "p", "requests": 2, "errors": 1, "last_error": "x"},
            id="new-record",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "requests": 3, "errors": 1},
            kd("a", "p", requests=4, errors=2),
            {"requests": 7, "errors": 3, "last_used": None},
            id="counters-add",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": 429, "last_used": 100.0},
            kd("a", "p", requests=1, last_status=200, last_used=200.0),
            {"requests": 1, "last_status": 200, "last_error": None, "last_used": 200.0},
            id="newer-observation-wins",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": 429, "last_used": 200.0},
            kd("a", "p", requests=1, last_status=200, last_used=100.0),
            {"requests": 1, "last_status": 429, "last_used": 200.0},
            id="older-delta-keeps-newer-observation",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": None, "last_error": "boom", "last_used": 50},
            kd("a", "p", errors=0, last_status=200, last_used=50.0),
            {"last_status": 200, "last_error": None, "last_used": 50.0},
            id="same-time-delta-wins",
        ),
        pytest.param(
            {"label": "a", "pool": "p", "last_status": 500, "last_used": 100.0},
            kd("a", "p", requests=2),
            {"requests": 2, "last_status": 500, "last_used": 100.0},
            id="no-observation-keeps-old",
        ),
        pytest.param(
            {"label": "old-label", "pool": "old-pool", "requests": 1},
            kd("new-label", "new-pool", requests=1),
            {"label": "new-label", "pool": "new-pool", "requests": 2},
            id="labels-updated",
        ),
    ],
)
def test_merge(
    on_disk: dict[str, object] | None, delta_: KeyDelta, expected: dict[str, object]
) -> None:
    doc = _doc(fp1=on_disk) if on_disk is not None else StateDoc()
    merged = merge(doc, delta(fp1=delta_), now=500.0)
    rec = merged.keys["fp1"]
    assert rec.fingerprint == "fp1"
    for field, value in expected.items():
        assert getattr(rec, field) == value, field
    assert merged.updated_at == 500.0
    assert merged.schema_version == SCHEMA_VERSION


def test_key_counters_are_record_fields() -> None:
    fresh = KeyRecord(label="a", fingerprint="fp")
    assert set(KEY_COUNTERS) <= set(KeyRecord.model_fields)
    assert _counters(fresh) == dict.fromkeys(KEY_COUNTERS, 0)
    assert set(POOL_COUNTERS) == set(PoolRecord.model_fields)
    assert PoolRecord().model_dump() == dict.fromkeys(POOL_COUNTERS, 0)


@pytest.mark.parametrize("name", KEY_COUNTERS)
def test_merge_adds_each_key_counter_and_only_it(name: str) -> None:
    doc = _doc(fp1={"label": "a", **dict.fromkeys(KEY_COUNTERS, 10)})
    merged = merge(doc, delta(fp1=kd("a", "p", **{name: 5})), now=20.0)
    assert _counters(merged.keys["fp1"]) == {c: 15 if c == name else 10 for c in KEY_COUNTERS}


def test_merge_adds_every_key_counter_at_once() -> None:
    on_disk = {c: i + 1 for i, c in enumerate(KEY_COUNTERS)}
    added = {c: 100 * (i + 1) for i, c in enumerate(KEY_COUNTERS)}
    doc = _doc(fp1={"label": "a", **on_disk})
    merged = merge(doc, delta(fp1=kd("a", "p", **added), fp2=kd("b", "p", **added)), now=20.0)
    assert _counters(merged.keys["fp1"]) == {c: on_disk[c] + added[c] for c in KEY_COUNTERS}
    assert _counters(merged.keys["fp2"]) == added


def test_merge_ignores_counter_names_it_does_not_know() -> None:
    doc = _doc(fp1={"label": "a", "requests": 1})
    d = kd("a", "p", requests=1)
    d.add("no-such-counter", 5)
    rec = merge(doc, delta(fp1=d), now=20.0).keys["fp1"]
    assert _counters(rec) == {c: 2 if c == "requests" else 0 for c in KEY_COUNTERS}
    assert "no-such-counter" not in rec.model_dump()


def _health(at: float, reason: str) -> KeyHealth:
    return KeyHealth(
        cooling_until=at + 60.0,
        cooling_reason=reason,
        error_score=at / 100,
        rate_limit_streak=int(at),
        updated_at=at,
    )


@pytest.mark.parametrize(
    ("disk_at", "delta_at", "delta_wins"),
    [
        pytest.param(100.0, 200.0, True, id="newer-delta-wins"),
        pytest.param(200.0, 100.0, False, id="older-delta-does-not-overwrite"),
        pytest.param(150.0, 150.0, True, id="same-time-delta-wins"),
    ],
)
def test_merge_keeps_the_newest_health(disk_at: float, delta_at: float, delta_wins: bool) -> None:
    on_disk, newer = _health(disk_at, "disk"), _health(delta_at, "delta")
    doc = _doc(fp1={"label": "a", "requests": 1, "health": on_disk})
    d = kd("a", "p", requests=1, upstream_429=1)
    d.health = newer
    rec = merge(doc, delta(fp1=d), now=500.0).keys["fp1"]
    assert rec.health == (newer if delta_wins else on_disk)
    assert (rec.requests, rec.upstream_429) == (2, 1)  # counters add whichever health wins


def test_merge_decides_health_and_observation_separately() -> None:
    on_disk = _health(200.0, "disk")
    doc = _doc(fp1={"label": "a", "last_status": 429, "last_used": 100.0, "health": on_disk})
    d = kd("a", "p", last_status=200, last_used=300.0, health=_health(50.0, "delta"))
    rec = merge(doc, delta(fp1=d), now=500.0).keys["fp1"]
    assert (rec.last_status, rec.last_used) == (200, 300.0)
    assert rec.health == on_disk


def test_merge_without_health_keeps_the_one_on_disk() -> None:
    on_disk = _health(200.0, "disk")
    doc = _doc(fp1={"label": "a", "health": on_disk})
    rec = merge(doc, delta(fp1=kd("a", "p", requests=1)), now=500.0).keys["fp1"]
    assert rec.health == on_disk


def test_merge_new_record_takes_the_delta_health_or_a_fresh_one() -> None:
    h = _health(5.0, "new")
    merged = merge(
        StateDoc(), delta(fp1=kd("a", "p", health=h), fp2=kd("b", "p", requests=1)), now=9.0
    )
    assert merged.keys["fp1"].health == h
    assert merged.keys["fp2"].health == KeyHealth()


@pytest.mark.parametrize("name", POOL_COUNTERS)
def test_merge_adds_each_pool_counter_and_only_it(name: str) -> None:
    doc = StateDoc(pools={"p": PoolRecord(**dict.fromkeys(POOL_COUNTERS, 10))})
    d = Delta()
    d.pool_add("p", name, 5)
    merged = merge(doc, d, now=1.0)
    assert merged.pools["p"].model_dump() == {c: 15 if c == name else 10 for c in POOL_COUNTERS}


def test_merge_adds_pool_counters() -> None:
    doc = StateDoc(pools={"p": PoolRecord(local_429=2, rotations=1), "q": PoolRecord(local_429=5)})
    before = doc.model_dump()
    d = Delta()
    d.pool_add("p", "local_429", 3)
    d.pool_add("p", "rotations")
    d.pool_add("new", "rotations", 2)
    d.pool_add("new", "rotations", 1)
    merged = merge(doc, d, now=1.0)
    assert merged.pools == {
        "p": PoolRecord(local_429=5, rotations=2),
        "q": PoolRecord(local_429=5),
        "new": PoolRecord(rotations=3),
    }
    assert doc.model_dump() == before


LIMITER_OLD = {"format": 1, "at": 10.0, "scopes": {"global": {"rpm": [[9.0, 1]]}}}
LIMITER_NEW = {"format": 1, "at": 20.0, "scopes": {"global": {"rpm": [[19.0, 2]]}}}


@pytest.mark.parametrize(
    ("on_disk", "disk_at", "snapshot", "snapshot_at", "expected"),
    [
        pytest.param(None, 0.0, LIMITER_NEW, 20.0, (LIMITER_NEW, 20.0), id="first-snapshot"),
        pytest.param(LIMITER_OLD, 10.0, LIMITER_NEW, 20.0, (LIMITER_NEW, 20.0), id="newer-wins"),
        pytest.param(
            LIMITER_NEW, 20.0, LIMITER_OLD, 10.0, (LIMITER_NEW, 20.0), id="older-does-not-win"
        ),
        pytest.param(LIMITER_OLD, 10.0, LIMITER_NEW, 10.0, (LIMITER_NEW, 10.0), id="same-time"),
        pytest.param(LIMITER_OLD, 10.0, None, 0.0, (LIMITER_OLD, 10.0), id="none-keeps-disk"),
    ],
)
def test_merge_keeps_the_newest_limiter_snapshot(
    on_disk: dict[str, Any] | None,
    disk_at: float,
    snapshot: dict[str, Any] | None,
    snapshot_at: float,
    expected: tuple[dict[str, Any], float],
) -> None:
    doc = StateDoc(limiter=on_disk, limiter_at=disk_at)
    merged = merge(doc, Delta(limiter=snapshot, limiter_at=snapshot_at), now=99.0)
    assert (merged.limiter, merged.limiter_at) == expected


def test_merge_leaves_other_keys_and_the_input_alone() -> None:
    doc = _doc(
        fp1={"label": "a", "requests": 1, "health": _health(1.0, "a")},
        fp2={"label": "b", "requests": 5},
    )
    doc.pools["p"] = PoolRecord(local_429=1)
    doc.pools["q"] = PoolRecord(rotations=4)
    doc.limiter, doc.limiter_at = LIMITER_OLD, 10.0
    before = doc.model_dump()
    d = delta(fp1=kd("a", "p", requests=1, tokens_in=3, health=_health(2.0, "b")))
    d.pool_add("p", "local_429")
    d.limiter, d.limiter_at = LIMITER_NEW, 20.0
    merged = merge(doc, d, now=20.0)
    assert merged.keys["fp1"].requests == 2
    assert merged.keys["fp1"].tokens_in == 3
    assert merged.keys["fp2"] == doc.keys["fp2"]
    assert merged.pools["p"].local_429 == 2
    assert merged.pools["q"] == doc.pools["q"]
    assert doc.model_dump() == before


def test_merge_with_no_deltas_only_touches_the_time() -> None:
    doc = _doc(fp1={"label": "a", "requests": 1})
    doc.pools["p"] = PoolRecord(rotations=1)
    doc.limiter, doc.limiter_at = LIMITER_OLD, 10.0
    merged = merge(doc, Delta(), now=99.0)
    assert merged.keys == doc.keys
    assert merged.pools == doc.pools
    assert (merged.limiter, merged.limiter_at) == (LIMITER_OLD, 10.0)
    assert merged.updated_at == 99.0


def test_overlay_keeps_the_document_time() -> None:
    doc = _doc(fp1={"label": "a", "requests": 1})
    d = delta(fp1=kd("a", "p", requests=2), fp9=kd("z", "q", requests=1))
    d.pool_add("q", "local_429")
    view = overlay(doc, d)
    assert view.updated_at == doc.updated_at
    assert view.keys["fp1"].requests == 3
    assert view.keys["fp9"].requests == 1
    assert view.pools["q"].local_429 == 1
    assert doc.keys["fp1"].requests == 1
    assert "q" not in doc.pools


def test_overlay_of_nothing_is_the_document() -> None:
    doc = _doc(fp1={"label": "a", "requests": 1})
    assert overlay(doc, Delta()) == doc


@pytest.mark.parametrize(
    ("d", "truthy"),
    [
        pytest.param(Delta(), False, id="empty"),
        pytest.param(delta(fp=kd("a", "p")), True, id="a-key"),
        pytest.param(Delta(pools={"p": {"rotations": 1}}), True, id="a-pool"),
        pytest.param(Delta(limiter={}, limiter_at=1.0), True, id="a-limiter"),
    ],
)
def test_delta_is_true_when_it_holds_anything(d: Delta, truthy: bool) -> None:
    assert bool(d) is truthy


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


def test_key_delta_add() -> None:
    d = KeyDelta("a", "p")
    d.add("requests")
    d.add("requests")
    d.add("tokens_in", 120)
    d.add("tokens_in", 30)
    assert d.counters == {"requests": 2, "tokens_in": 150}


def test_delta_key_creates_once() -> None:
    d = Delta()
    first = d.key("fp", "a", "p")
    first.add("requests")
    again = d.key("fp", "a", "p")
    assert again is first
    assert d.keys == {"fp": KeyDelta("a", "p", counters={"requests": 1})}


def test_key_delta_absorb_adds_counters() -> None:
    mine = kd("a", "p", requests=2, errors=1, tokens_in=10)
    mine.absorb(kd("a", "p", requests=3, upstream_429=1, tokens_in=5, tokens_out=7))
    assert mine.counters == {
        "requests": 5,
        "errors": 1,
        "upstream_429": 1,
        "tokens_in": 15,
        "tokens_out": 7,
    }


@pytest.mark.parametrize(
    ("mine", "newer", "expected"),
    [
        pytest.param(None, (20.0, 200, None), (20.0, 200, None), id="first-observation"),
        pytest.param((10.0, 429, None), (20.0, None, "reset"), (20.0, None, "reset"), id="newer"),
        pytest.param((20.0, 429, None), (10.0, 200, None), (20.0, 429, None), id="older"),
        pytest.param((10.0, 429, None), (10.0, 200, None), (10.0, 200, None), id="same-time"),
        pytest.param((10.0, 429, None), None, (10.0, 429, None), id="nothing-observed"),
    ],
)
def test_key_delta_absorb_keeps_the_newest_observation(
    mine: tuple[float, int | None, str | None] | None,
    newer: tuple[float, int | None, str | None] | None,
    expected: tuple[float, int | None, str | None],
) -> None:
    a, b = KeyDelta("a", "p"), KeyDelta("a", "p")
    if mine is not None:
        a.observe(*mine)
    if newer is not None:
        b.observe(*newer)
    a.absorb(b)
    assert (a.last_used, a.last_status, a.last_error) == expected


@pytest.mark.parametrize(
    ("mine_at", "newer_at", "expected_at"),
    [
        pytest.param(None, 20.0, 20.0, id="first-health"),
        pytest.param(10.0, 20.0, 20.0, id="newer-wins"),
        pytest.param(20.0, 10.0, 20.0, id="older-does-not-win"),
        pytest.param(15.0, 15.0, 15.0, id="same-time"),
        pytest.param(10.0, None, 10.0, id="no-health-keeps-mine"),
    ],
)
def test_key_delta_absorb_keeps_the_newest_health(
    mine_at: float | None, newer_at: float | None, expected_at: float
) -> None:
    mine = KeyDelta("a", "p", health=None if mine_at is None else _health(mine_at, "mine"))
    newer = KeyDelta("a", "p", health=None if newer_at is None else _health(newer_at, "newer"))
    mine.absorb(newer)
    assert mine.health is not None
    assert mine.health.updated_at == expected_at
    if mine_at == newer_at:
        assert mine.health.cooling_reason == "newer"


def test_key_delta_absorb_takes_the_newer_label_and_pool() -> None:
    mine = kd("old", "p1", requests=1)
    mine.absorb(kd("new", "p2"))
    assert (mine.label, mine.pool, mine.counters) == ("new", "p2", {"requests": 1})


def test_delta_absorb_folds_keys_pools_and_limiter() -> None:
    mine = delta(
        fp1=kd("a", "p", requests=1, last_status=429, last_used=10.0, health=_health(10.0, "m")),
        fp2=kd("b", "p", errors=1),
    )
    mine.pool_add("p", "local_429", 2)
    mine.pool_add("q", "rotations")
    mine.limiter, mine.limiter_at = LIMITER_OLD, 10.0
    newer = delta(
        fp1=kd("a", "p", requests=2, retries=1, last_status=200, last_used=20.0),
        fp3=kd("c", "q", tokens_out=4),
    )
    newer.pool_add("p", "local_429", 3)
    newer.pool_add("p", "rotations")
    newer.pool_add("r", "local_429")
    newer.limiter, newer.limiter_at = LIMITER_NEW, 20.0
    mine.absorb(newer)

    assert set(mine.keys) == {"fp1", "fp2", "fp3"}
    fp1 = mine.keys["fp1"]
    assert fp1.counters == {"requests": 3, "retries": 1}
    assert (fp1.last_status, fp1.last_used) == (200, 20.0)
    assert fp1.health == _health(10.0, "m")  # the newer delta carried no health
    assert mine.keys["fp2"] == kd("b", "p", errors=1)
    assert mine.keys["fp3"] == kd("c", "q", tokens_out=4)
    assert mine.pools == {
        "p": {"local_429": 5, "rotations": 1},
        "q": {"rotations": 1},
        "r": {"local_429": 1},
    }
    assert (mine.limiter, mine.limiter_at) == (LIMITER_NEW, 20.0)


@pytest.mark.parametrize(
    ("mine", "newer", "expected"),
    [
        pytest.param((LIMITER_OLD, 10.0), (LIMITER_NEW, 20.0), (LIMITER_NEW, 20.0), id="newer"),
        pytest.param((LIMITER_NEW, 20.0), (LIMITER_OLD, 10.0), (LIMITER_NEW, 20.0), id="older"),
        pytest.param((LIMITER_OLD, 10.0), (None, 0.0), (LIMITER_OLD, 10.0), id="none-keeps"),
        pytest.param((None, 0.0), (LIMITER_NEW, 20.0), (LIMITER_NEW, 20.0), id="first"),
    ],
)
def test_delta_absorb_keeps_the_newest_limiter(
    mine: tuple[dict[str, Any] | None, float],
    newer: tuple[dict[str, Any] | None, float],
    expected: tuple[dict[str, Any], float],
) -> None:
    d = Delta(limiter=mine[0], limiter_at=mine[1])
    d.absorb(Delta(limiter=newer[0], limiter_at=newer[1]))
    assert (d.limiter, d.limiter_at) == expected


def _first() -> Delta:
    d = delta(
        fp1=kd("a", "p", requests=1, tokens_in=5, last_status=429, last_used=10.0),
        fp2=kd("b", "p", errors=1, last_error="reset", last_used=12.0, health=_health(12.0, "b")),
    )
    d.pool_add("p", "local_429")
    d.limiter, d.limiter_at = LIMITER_OLD, 10.0
    return d


def _second() -> Delta:
    d = delta(
        fp1=kd("a", "p", requests=2, upstream_429=1, last_status=200, last_used=20.0),
        fp2=kd("b", "p", retries=1, last_status=200, last_used=11.0, health=_health(5.0, "old")),
        fp3=kd("c", "q", requests=1, health=_health(3.0, "c")),
    )
    d.pool_add("p", "rotations", 2)
    d.pool_add("q", "local_429")
    d.limiter, d.limiter_at = LIMITER_NEW, 20.0
    return d


def test_merging_an_absorbed_delta_equals_merging_both_in_turn() -> None:
    doc = _doc(
        fp1={"label": "a", "requests": 4, "last_status": 500, "last_used": 15.0},
        fp2={"label": "b", "errors": 2, "health": _health(8.0, "disk")},
    )
    doc.pools["p"] = PoolRecord(local_429=1, rotations=1)
    in_turn = merge(merge(doc, _first(), now=30.0), _second(), now=40.0)
    folded = _first()
    folded.absorb(_second())
    assert merge(doc, folded, now=40.0) == in_turn
