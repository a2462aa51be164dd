"""Merging state: counters add up, the newest observation, health and limiter win."""

from __future__ import annotations

from typing import Any

import pytest
from testkit import delta, kd

from kmi_rotor.core.health import KeyHealth
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


def test_a_merged_document_is_what_validating_it_would_give() -> None:
    """`merge` builds its document without validation: the parts it is made of are valid."""
    doc = _doc(fp1={"label": "a", "requests": 4}, fp2={"label": "b", "health": _health(8.0, "d")})
    merged = merge(merge(doc, _first(), now=30.0), _second(), now=40.0)
    assert type(merged) is StateDoc
    assert StateDoc.model_validate(merged.model_dump()) == merged
    assert StateDoc.model_validate_json(merged.model_dump_json()) == merged


@pytest.mark.parametrize(
    "d",
    [
        pytest.param(kd("a", "p", requests=2, tokens_in=5), id="counters"),
        pytest.param(kd("b", "q", last_status=500, last_error="boom", last_used=300.0), id="seen"),
        pytest.param(kd("a", "p", health=_health(400.0, "new")), id="health"),
        pytest.param(kd("a", "p", last_used=50.0, health=_health(50.0, "old")), id="older"),
    ],
)
def test_a_merged_record_is_what_pydantic_would_copy(d: KeyDelta) -> None:
    """Merged records are copied without pydantic's `model_copy`: the same values, the same
    set of fields, the same text in the file."""
    on_disk = KeyRecord(
        label="a", pool="p", fingerprint="fp1", requests=3, last_used=100.0, last_status=200,
        health=_health(100.0, "disk"),
    )  # fmt: skip
    rec = merge(_doc(), delta(fp1=d), now=500.0).keys["fp1"]  # a new record
    assert rec == KeyRecord.model_validate_json(rec.model_dump_json())
    rec = merge(StateDoc(keys={"fp1": on_disk}), delta(fp1=d), now=500.0).keys["fp1"]
    update: dict[str, object] = {"label": d.label, "pool": d.pool}
    update |= {c: getattr(on_disk, c) + d.counters.get(c, 0) for c in KEY_COUNTERS}
    if d.last_used is not None and d.last_used >= 100.0:
        update |= {
            "last_used": d.last_used,
            "last_status": d.last_status,
            "last_error": d.last_error,
        }
    if d.health is not None and d.health.updated_at >= 100.0:
        update["health"] = d.health
    expected = on_disk.model_copy(update=update)
    assert rec == expected
    assert rec.model_fields_set == expected.model_fields_set
    assert rec.model_dump_json() == expected.model_dump_json()
