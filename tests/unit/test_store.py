"""state.json on disk (StateStore) and the proxy's in-memory view of it (StateKeeper)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
from proctools import wait_until
from testkit import Clock, delta, kd, make_key, with_pools

from kmi_rotor import store as store_module
from kmi_rotor.config import Key
from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.state import (
    KEY_COUNTERS,
    SCHEMA_VERSION,
    Delta,
    KeyDelta,
    Operator,
    PoolRecord,
    StateDoc,
)
from kmi_rotor.keeper import StateKeeper
from kmi_rotor.store import StateStore

ADDON_DIR = Path(__file__).resolve().parents[2] / "addon"


KEY_A = make_key("a")
KEY_B = make_key("b")


def asides(folder: Path, tag: str) -> list[Path]:
    return sorted(folder.glob(f"state.json.{tag}-*"))


# -- StateStore ------------------------------------------------------------------------------


HEALTH = KeyHealth(
    cooling_until=1060.0,
    cooling_reason="rate limited",
    blocked_until=4600.0,
    blocked_reason="quota",
    error_score=1.5,
    score_at=999.0,
    rate_limit_streak=2,
    overload_streak=1,
    windows={"requests:minute": {"limit": 60, "remaining": 0, "reset_at": 1060.0, "seen_at": 1}},
    updated_at=1000.0,
)
LIMITER = {"format": 1, "at": 999.0, "scopes": {"global": {"rpm": [[998.5, 1], [999.0, 2]]}}}


@pytest.mark.parametrize(
    "delta_",
    [
        pytest.param(delta(fp1=kd("a", "p", requests=1)), id="one-request"),
        pytest.param(
            delta(
                fp1=kd("a", "p", requests=3, errors=1, last_status=429, last_used=12.5),
                fp2=kd(
                    "b", "q", requests=1, errors=1, last_error="connection reset", last_used=13.0
                ),
            ),
            id="two-keys-all-fields",
        ),
        pytest.param(
            delta({"fp-ü": kd("ключ", "池", requests=2, last_error="ошибка", last_used=1.0)}),
            id="unicode",
        ),
        pytest.param(
            with_pools(
                Delta(
                    keys={
                        "fp1": kd(
                            "a",
                            "p",
                            **{c: i + 1 for i, c in enumerate(KEY_COUNTERS)},
                            last_status=200,
                            last_used=999.0,
                            health=HEALTH,
                        )
                    },
                    limiter=LIMITER,
                    limiter_at=999.0,
                ),
                p={"local_429": 4, "rotations": 2},
                q={"rotations": 1},
            ),
            id="every-counter-health-pools-limiter",
        ),
        pytest.param(with_pools(Delta(), p={"local_429": 1}), id="pools-only"),
        pytest.param(Delta(limiter=LIMITER, limiter_at=5.0), id="limiter-only"),
    ],
)
def test_round_trip(tmp_path: Path, delta_: Delta) -> None:
    store = StateStore(tmp_path / "state")
    written = store.commit(delta_, now=1000.0)
    read = StateStore(tmp_path / "state").read()
    assert read == written
    assert read.schema_version == SCHEMA_VERSION
    assert read.updated_at == 1000.0
    assert set(read.keys) == set(delta_.keys)
    for fp, d in delta_.keys.items():
        rec = read.keys[fp]
        assert (rec.label, rec.pool, rec.fingerprint) == (d.label, d.pool, fp)
        assert {c: getattr(rec, c) for c in KEY_COUNTERS} == {
            c: d.counters.get(c, 0) for c in KEY_COUNTERS
        }
        assert (rec.last_status, rec.last_error, rec.last_used) == (
            d.last_status,
            d.last_error,
            d.last_used,
        )
        assert rec.health == (d.health or KeyHealth())
    assert read.pools == {name: PoolRecord(**counters) for name, counters in delta_.pools.items()}
    assert (read.limiter, read.limiter_at) == (delta_.limiter, delta_.limiter_at)
    assert json.loads(store.path.read_text(encoding="utf-8"))["schema_version"] == SCHEMA_VERSION


def test_a_save_logs_nothing_at_debug_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside mitmproxy every log record becomes an event-log entry sent to every addon: the
    lock's own debug lines (four per save) are not emitted at all."""
    caplog.set_level(logging.DEBUG)  # the root logger at debug, as mitmproxy sets it
    store = StateStore(tmp_path / "state")
    store.commit(with_pools(Delta(), p={"local_429": 1}), now=1000.0)
    store.read()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("filelock")] == []


def test_commits_accumulate(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(5):
        d = delta(fp=kd("a", "p", requests=1, tokens_out=i, last_status=200 + i, last_used=i))
        store.commit(with_pools(d, p={"local_429": 1, "rotations": i}))
    doc = StateStore(tmp_path).read()
    assert doc.keys["fp"].requests == 5
    assert doc.keys["fp"].tokens_out == 0 + 1 + 2 + 3 + 4
    assert doc.keys["fp"].last_status == 204
    assert doc.pools["p"] == PoolRecord(local_429=5, rotations=10)


def test_an_older_health_does_not_overwrite_a_newer_one_on_disk(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    newer = HEALTH.model_copy(update={"updated_at": 2000.0, "cooling_reason": "newer"})
    older = HEALTH.model_copy(update={"updated_at": 1500.0, "cooling_reason": "older"})
    store.commit(delta(fp=kd("a", "p", requests=1, health=newer)), now=2000.0)
    store.commit(delta(fp=kd("a", "p", upstream_429=1, health=older)), now=2100.0)
    rec = StateStore(tmp_path).read().keys["fp"]
    assert rec.health == newer
    assert (rec.requests, rec.upstream_429) == (1, 1)
    newest = HEALTH.model_copy(update={"updated_at": 2500.0, "cooling_reason": "newest"})
    store.commit(delta(fp=kd("a", "p", health=newest)), now=2200.0)
    assert StateStore(tmp_path).read().keys["fp"].health == newest


def test_an_older_limiter_snapshot_does_not_overwrite_a_newer_one(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    older = {**LIMITER, "at": 10.0}
    store.commit(Delta(limiter=LIMITER, limiter_at=999.0))
    store.commit(Delta(limiter=older, limiter_at=10.0))
    doc = StateStore(tmp_path).read()
    assert (doc.limiter, doc.limiter_at) == (LIMITER, 999.0)
    store.commit(Delta(limiter=older, limiter_at=1000.0))
    doc = StateStore(tmp_path).read()
    assert (doc.limiter, doc.limiter_at) == (older, 1000.0)


def test_missing_file_reads_empty_and_is_not_created(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "nothing-yet")
    assert store.read() == StateDoc()
    assert store.commit(Delta()) == StateDoc()
    assert not store.path.exists()
    assert store.changed() is False


def test_file_mode_and_folder_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = StateStore(tmp_path / "deep" / "state")
        store.commit(delta(fp=kd("a", "p", requests=1)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert not list(store.dir.glob(".state.*.tmp"))


def test_rewrite_tightens_a_loose_file_mode(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.commit(delta(fp=kd("a", "p", requests=1)))
    os.chmod(store.path, 0o644)
    store.commit(delta(fp=kd("a", "p", requests=1)))
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


CORRUPT = [
    pytest.param(b"\x00\xff\xfe garbage \x80", id="garbage-bytes"),
    pytest.param(b"", id="empty-file"),
    pytest.param(b'{"schema_version": 1, "keys": {', id="truncated-json"),
    pytest.param(b"[1, 2, 3]", id="json-list"),
    pytest.param(b'"just a string"', id="json-string"),
    pytest.param(b"null", id="json-null"),
    pytest.param(b'{"keys": []}', id="keys-not-a-table"),
    pytest.param(b'{"keys": {"fp": {"label": "a"}}}', id="record-without-fingerprint"),
    pytest.param(
        b'{"keys": {"fp": {"label": "a", "fingerprint": "fp", "requests": -1}}}',
        id="negative-counter",
    ),
    pytest.param(b'{"schema_version": "one", "keys": {}}', id="version-not-a-number"),
]


@pytest.mark.parametrize("content", CORRUPT)
def test_corrupt_file_is_moved_aside_on_read(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    assert store.read() == StateDoc()
    assert not store.path.exists()
    [aside] = asides(tmp_path, "corrupt")
    assert aside.read_bytes() == content


@pytest.mark.parametrize("content", CORRUPT)
def test_corrupt_file_is_moved_aside_on_commit(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    doc = store.commit(delta(fp=kd("a", "p", requests=1)))
    assert doc.keys["fp"].requests == 1
    assert StateStore(tmp_path).read().keys["fp"].requests == 1
    [aside] = asides(tmp_path, "corrupt")
    assert aside.read_bytes() == content


def test_two_corrupt_files_in_the_same_second_are_both_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = types.SimpleNamespace(time=time.time, strftime=lambda *_: "20260101T000000")
    monkeypatch.setattr(store_module, "time", frozen)
    store = StateStore(tmp_path)
    for content in (b"first garbage", b"second garbage"):
        store.path.write_bytes(content)
        assert store.read() == StateDoc()
    kept = {p.read_bytes() for p in asides(tmp_path, "corrupt")}
    assert kept == {b"first garbage", b"second garbage"}


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 99])
def test_newer_schema_is_moved_aside_not_overwritten(tmp_path: Path, version: int) -> None:
    content = json.dumps(
        {"schema_version": version, "keys": {"fp": {"future": True}}, "extra": [1]}
    ).encode()
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    assert store.read() == StateDoc()
    [aside] = asides(tmp_path, f"newer-v{version}")
    assert aside.read_bytes() == content
    assert not asides(tmp_path, "corrupt")
    store.commit(delta(fp=kd("a", "p", requests=1)))
    assert aside.read_bytes() == content
    doc = json.loads(store.path.read_bytes())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["keys"]["fp"]["requests"] == 1


def test_unknown_fields_of_the_current_schema_are_tolerated(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text(
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "note": "x",
                "keys": {"fp": {"label": "a", "fingerprint": "fp", "requests": 4, "extra": 1}},
            }
        ),
        encoding="utf-8",
    )
    assert store.read().keys["fp"].requests == 4
    assert not asides(tmp_path, "*")


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from kmi_rotor.core.state import KEY_COUNTERS, Delta
    from kmi_rotor.store import StateStore

    folder, me, count = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    store = StateStore(folder)
    (folder / f"ready-{me}").touch()
    deadline = time.monotonic() + 30
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.001)
    for i in range(count):
        d = Delta(limiter={"by": me, "i": i}, limiter_at=float(i))
        shared = d.key("shared", "shared", "p")
        for name in KEY_COUNTERS:
            shared.add(name)
        shared.observe(float(i), 200, None)
        d.pool_add("p", "local_429")
        d.pool_add("p", "rotations", 2)
        store.commit(d)
        if i % 50 == 0:
            own = Delta()
            own.key(f"own-{me}", me, "p").add("requests")
            own.pool_add(me, "rotations")
            store.commit(own)
    """
)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    count = 200
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(ADDON_DIR), str(folder), name, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("w1", "w2")
    ]
    try:

        def ready() -> bool:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            return all((folder / f"ready-{n}").exists() for n in ("w1", "w2"))

        wait_until(ready, 30, "both writers ready", 0.005)
        (folder / "go").touch()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    doc = StateStore(folder).read()
    shared = doc.keys["shared"]
    assert {c: getattr(shared, c) for c in KEY_COUNTERS} == dict.fromkeys(KEY_COUNTERS, 2 * count)
    assert doc.keys["own-w1"].requests == count // 50
    assert doc.keys["own-w2"].requests == count // 50
    assert shared.last_used == float(count - 1)
    assert shared.last_status == 200
    assert doc.pools == {
        "p": PoolRecord(local_429=2 * count, rotations=4 * count),
        "w1": PoolRecord(rotations=count // 50),
        "w2": PoolRecord(rotations=count // 50),
    }
    assert doc.limiter_at == float(count - 1)
    assert doc.limiter is not None and doc.limiter["i"] == count - 1
    assert not asides(folder, "*")
    assert not list(folder.glob(".state.*.tmp"))


class Parses:
    """Counts how often the store parses the file's text."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = store_module.json.loads

        def loads(raw: bytes) -> object:
            self.count += 1
            return real(raw)

        monkeypatch.setattr(store_module, "json", types.SimpleNamespace(loads=loads))


def test_a_commit_after_our_own_write_does_not_parse_the_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    store.commit(delta(fp=kd("a", "p", requests=1, health=HEALTH)), now=1.0)
    parses = Parses(monkeypatch)
    for i in range(3):
        doc = store.commit(delta(fp=kd("a", "p", requests=1), fp2=kd("b", "p")), now=2.0 + i)
    assert parses.count == 0
    assert doc.keys["fp"].requests == 4 and doc.keys["fp"].health == HEALTH
    assert StateStore(tmp_path).read() == doc
    assert parses.count == 1  # a store that did not write it reads it


def test_a_file_written_by_another_process_is_parsed_and_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = StateStore(tmp_path)
    mine.commit(delta(fp=kd("a", "p", requests=1)), now=1.0)
    StateStore(tmp_path).commit(delta(fp=kd("a", "p", requests=5)), now=2.0)
    parses = Parses(monkeypatch)
    doc = mine.commit(delta(fp=kd("a", "p", requests=1)), now=3.0)
    assert parses.count == 1
    assert doc.keys["fp"].requests == 7


def test_a_rewrite_that_keeps_the_files_identity_is_still_read(tmp_path: Path) -> None:
    """Same inode, size and modification time (written in place, a coarse clock): what was
    written is still merged, not replaced by what this store wrote last."""
    store = StateStore(tmp_path)
    store.commit(delta(fp=kd("a", "p", requests=1)), now=1.0)
    before = os.stat(store.path)
    text = store.path.read_bytes()
    assert text.count(b'"requests": 1,') == 1
    with open(store.path, "r+b") as f:
        f.write(text.replace(b'"requests": 1,', b'"requests": 8,'))
    os.utime(store.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(store.path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert store.commit(delta(fp=kd("a", "p", requests=1)), now=2.0).keys["fp"].requests == 9


# -- StateKeeper -----------------------------------------------------------------------------


def keeper_for(folder: Path, clock: Clock | None = None) -> StateKeeper:
    return StateKeeper(StateStore(folder), debounce=60.0, poll=60.0, clock=clock or Clock())


def record_tuple(doc: StateDoc, key: Key) -> tuple[object, ...]:
    rec = doc.keys[key.fingerprint]
    return (
        rec.label,
        rec.pool,
        rec.requests,
        rec.errors,
        rec.last_status,
        rec.last_error,
        rec.last_used,
    )


OBSERVATIONS = [
    pytest.param([("sent",)], ("a", "p", 1, 0, None, None, None), id="sent"),
    pytest.param(
        [("sent",), ("answered", 200, 1001.0)], ("a", "p", 1, 0, 200, None, 1001.0), id="answered"
    ),
    pytest.param(
        [("sent",), ("failed", "connection reset", 1002.0)],
        ("a", "p", 1, 1, None, "connection reset", 1002.0),
        id="failed",
    ),
    pytest.param(
        [
            ("sent",),
            ("answered", 429, 1001.0),
            ("sent",),
            ("failed", "timeout", 1002.0),
            ("sent",),
            ("answered", 200, 1003.0),
        ],
        ("a", "p", 3, 1, 200, None, 1003.0),
        id="mixed-newest-last",
    ),
    pytest.param(
        [("sent",), ("answered", 200, 1005.0), ("failed", "late", 1004.0)],
        ("a", "p", 1, 1, 200, None, 1005.0),
        id="older-observation-does-not-win",
    ),
]


def sent(keeper: StateKeeper, key: Key) -> None:
    keeper.key(key).add("requests")


def answered(keeper: StateKeeper, key: Key, status: int) -> None:
    keeper.key(key).observe(keeper.clock(), status, None)


def failed(keeper: StateKeeper, key: Key, error: str) -> None:
    d = keeper.key(key)
    d.add("errors")
    d.observe(keeper.clock(), None, error)


def apply(keeper: StateKeeper, clock: Clock, steps: list[tuple[object, ...]]) -> None:
    for step in steps:
        match step:
            case ("sent",):
                sent(keeper, KEY_A)
            case ("answered", int(status), float(at)):
                clock.now = at
                answered(keeper, KEY_A, status)
            case ("failed", str(error), float(at)):
                clock.now = at
                failed(keeper, KEY_A, error)
            case _:
                raise AssertionError(f"unknown step {step!r}")


@pytest.mark.parametrize(("steps", "expected"), OBSERVATIONS)
async def test_observations_show_at_once_and_sync_writes_them(
    tmp_path: Path, steps: list[tuple[object, ...]], expected: tuple[object, ...]
) -> None:
    clock = Clock()
    keeper = keeper_for(tmp_path, clock)
    apply(keeper, clock, steps)
    assert record_tuple(keeper.view(), KEY_A) == expected
    assert not keeper.store.path.exists()  # no I/O until a sync
    await keeper.sync()
    assert record_tuple(StateStore(tmp_path).read(), KEY_A) == expected
    assert record_tuple(keeper.view(), KEY_A) == expected


async def test_sync_without_changes_writes_nothing(tmp_path: Path) -> None:
    keeper = keeper_for(tmp_path)
    await keeper.sync()
    assert not keeper.store.path.exists()
    sent(keeper, KEY_A)
    await keeper.sync()
    mtime = os.stat(keeper.store.path).st_mtime_ns
    await keeper.sync()
    assert os.stat(keeper.store.path).st_mtime_ns == mtime


def _bump_mtime(path: Path) -> None:
    """Make another writer's change visible even where file times are coarse."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


async def test_sync_picks_up_other_writers_and_merges(tmp_path: Path) -> None:
    keeper = keeper_for(tmp_path, Clock(2000.0))
    keeper.load_blocking()
    sent(keeper, KEY_A)
    await keeper.sync()

    other = StateStore(tmp_path)
    other.commit(
        delta(
            {
                KEY_A.fingerprint: kd("a", "p", requests=5, last_status=500, last_used=1500.0),
                KEY_B.fingerprint: kd("b", "p", requests=2, last_status=200, last_used=2500.0),
            }
        ),
        now=2600.0,
    )
    _bump_mtime(other.path)

    await keeper.sync()  # nothing pending: only takes in what the other store wrote
    view = keeper.view()
    assert view.keys[KEY_A.fingerprint].requests == 6
    assert view.keys[KEY_A.fingerprint].last_status == 500
    assert view.keys[KEY_B.fingerprint].requests == 2

    sent(keeper, KEY_B)
    answered(keeper, KEY_B, 201)  # clock 2000 < the other's 2500: the other's status stays
    sent(keeper, KEY_A)
    answered(keeper, KEY_A, 204)  # 2000 > 1500: newer than the other's observation
    other.commit(delta({KEY_B.fingerprint: kd("b", "p", requests=10)}), now=2700.0)
    await keeper.sync()

    on_disk = StateStore(tmp_path).read()
    assert on_disk.keys[KEY_A.fingerprint].requests == 7
    assert on_disk.keys[KEY_A.fingerprint].last_status == 204
    assert on_disk.keys[KEY_B.fingerprint].requests == 13
    assert on_disk.keys[KEY_B.fingerprint].last_status == 200
    assert keeper.view() == on_disk


async def test_load_blocking_reads_what_is_on_disk(tmp_path: Path) -> None:
    StateStore(tmp_path).commit(delta({KEY_A.fingerprint: kd("a", "p", requests=9)}))
    keeper = keeper_for(tmp_path)
    assert KEY_A.fingerprint not in keeper.view().keys
    keeper.load_blocking()
    sent(keeper, KEY_A)
    assert keeper.view().keys[KEY_A.fingerprint].requests == 10


async def test_sync_picks_up_a_write_in_the_same_time_tick(tmp_path: Path) -> None:
    keeper = keeper_for(tmp_path)
    sent(keeper, KEY_A)
    await keeper.sync()
    seen = os.stat(keeper.store.path).st_mtime_ns
    StateStore(tmp_path).commit(delta({KEY_B.fingerprint: kd("b", "p", requests=3)}))
    st = os.stat(keeper.store.path)
    os.utime(keeper.store.path, ns=(st.st_atime_ns, seen))  # as a coarse clock would leave it
    await keeper.sync()
    assert KEY_B.fingerprint in keeper.view().keys


async def test_failed_commit_keeps_pending_deltas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    keeper = keeper_for(tmp_path, clock)
    real_commit = keeper.store.commit
    calls: list[int] = []

    def flaky_commit(delta_: Delta, now: float | None = None) -> StateDoc:
        calls.append(len(delta_.keys))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_commit(delta_, now)

    monkeypatch.setattr(keeper.store, "commit", flaky_commit)
    sent(keeper, KEY_A)
    sent(keeper, KEY_A)
    clock.now = 1001.0
    answered(keeper, KEY_A, 429)
    sent(keeper, KEY_B)
    await keeper.sync()
    assert calls == [2]
    assert not keeper.store.path.exists()
    view = keeper.view()
    assert view.keys[KEY_A.fingerprint].requests == 2
    assert view.keys[KEY_A.fingerprint].last_status == 429
    assert view.keys[KEY_B.fingerprint].requests == 1

    sent(keeper, KEY_A)
    clock.now = 1000.5
    failed(keeper, KEY_A, "older")  # older than the kept 429: counted, but not the newest
    await keeper.sync()
    assert calls == [2, 2]
    on_disk = StateStore(tmp_path).read()
    assert on_disk.keys[KEY_A.fingerprint].requests == 3
    assert on_disk.keys[KEY_A.fingerprint].errors == 1
    assert on_disk.keys[KEY_A.fingerprint].last_status == 429
    assert on_disk.keys[KEY_A.fingerprint].last_used == 1001.0
    assert on_disk.keys[KEY_B.fingerprint].requests == 1
    assert keeper.view() == on_disk


async def test_view_keeps_observations_while_a_sync_is_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = keeper_for(tmp_path)
    real_commit = keeper.store.commit
    started, release = threading.Event(), threading.Event()

    def slow_commit(delta_: Delta, now: float | None = None) -> StateDoc:
        started.set()
        release.wait(10)
        return real_commit(delta_, now)

    monkeypatch.setattr(keeper.store, "commit", slow_commit)
    sent(keeper, KEY_A)
    task = asyncio.create_task(keeper.sync())
    try:
        for _ in range(1000):
            if started.is_set():
                break
            await asyncio.sleep(0.005)
        assert started.is_set()
        during = keeper.view().keys.get(KEY_A.fingerprint)
    finally:
        release.set()
        await task
    assert during is not None and during.requests == 1


async def test_close_blocking_flushes(tmp_path: Path) -> None:
    keeper = keeper_for(tmp_path)
    keeper.start()
    sent(keeper, KEY_A)
    failed(keeper, KEY_A, "boom")
    keeper.close_blocking()
    await asyncio.sleep(0)
    doc = StateStore(tmp_path).read()
    assert doc.keys[KEY_A.fingerprint].requests == 1
    assert doc.keys[KEY_A.fingerprint].errors == 1
    assert keeper.view() == doc
    keeper.close_blocking()  # a second close has nothing left to write
    assert StateStore(tmp_path).read() == doc


async def test_close_blocking_survives_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = keeper_for(tmp_path)

    def broken(delta_: Delta, now: float | None = None) -> StateDoc:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(keeper.store, "commit", broken)
    sent(keeper, KEY_A)
    keeper.close_blocking()
    assert not keeper.store.path.exists()


async def test_background_writer_flushes_after_the_debounce(tmp_path: Path) -> None:
    keeper = StateKeeper(StateStore(tmp_path), debounce=0.01, poll=0.05, clock=Clock())
    keeper.start()
    try:
        sent(keeper, KEY_A)
        sent(keeper, KEY_A)
        for _ in range(400):
            await asyncio.sleep(0.01)
            if keeper.store.path.exists():
                doc = StateStore(tmp_path).read()
                if KEY_A.fingerprint in doc.keys and doc.keys[KEY_A.fingerprint].requests == 2:
                    break
        else:
            pytest.fail("the background writer never flushed")
    finally:
        keeper.close_blocking()
        await asyncio.sleep(0)


async def test_on_change_hears_of_the_document_loaded_at_start(tmp_path: Path) -> None:
    StateStore(tmp_path).commit(delta({KEY_A.fingerprint: kd("a", "p", requests=9)}))
    keeper = keeper_for(tmp_path)
    seen: list[StateDoc] = []
    keeper.on_change = seen.append
    keeper.load_blocking()
    assert seen == [StateStore(tmp_path).read()]
    assert seen[0].keys[KEY_A.fingerprint].requests == 9
    assert keeper.base is seen[0]


async def test_on_change_hears_of_an_empty_start(tmp_path: Path) -> None:
    keeper = keeper_for(tmp_path / "nothing-yet")
    seen: list[StateDoc] = []
    keeper.on_change = seen.append
    keeper.load_blocking()
    assert seen == [StateDoc()]


async def test_on_change_hears_of_every_new_document_after_sync(tmp_path: Path) -> None:
    keeper = keeper_for(tmp_path, Clock(2000.0))
    seen: list[StateDoc] = []
    keeper.on_change = seen.append

    await keeper.sync()  # nothing pending, nothing on disk: no new document
    assert seen == []

    sent(keeper, KEY_A)
    await keeper.sync()
    assert len(seen) == 1
    assert seen[0] == StateStore(tmp_path).read()
    assert seen[0].keys[KEY_A.fingerprint].requests == 1
    assert seen[0].updated_at == 2000.0

    await keeper.sync()  # the file did not change since: nothing new to hear of
    assert len(seen) == 1

    other = StateStore(tmp_path)
    h = KeyHealth(blocked_until=9999.0, blocked_reason="quota", updated_at=2500.0)
    other.commit(delta({KEY_B.fingerprint: kd("b", "p", requests=2, health=h)}), now=2600.0)
    _bump_mtime(other.path)
    await keeper.sync()  # nothing pending: takes in the other writer's document
    assert len(seen) == 2
    assert seen[1] == StateStore(tmp_path).read()
    assert seen[1].keys[KEY_B.fingerprint].health == h
    assert keeper.view() == seen[1]


async def test_on_change_is_not_called_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = keeper_for(tmp_path)
    seen: list[StateDoc] = []
    keeper.on_change = seen.append

    def broken(delta_: Delta, now: float | None = None) -> StateDoc:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keeper.store, "commit", broken)
    sent(keeper, KEY_A)
    await keeper.sync()
    assert seen == []
    assert keeper.view().keys[KEY_A.fingerprint].requests == 1


async def test_a_failing_on_change_is_logged_and_the_document_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = keeper_for(tmp_path)

    def boom(doc: StateDoc) -> None:
        raise RuntimeError("cannot apply")

    keeper.on_change = boom
    sent(keeper, KEY_A)
    with caplog.at_level("ERROR", logger="kmi_rotor"):
        await keeper.sync()
        keeper.load_blocking()
    failures = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [(type(e), str(e)) for e in failures] == [(RuntimeError, "cannot apply")] * 2
    assert keeper.base == StateStore(tmp_path).read()
    assert keeper.base.keys[KEY_A.fingerprint].requests == 1


async def test_pool_counters_and_limiter_show_at_once_and_sync_writes_them(
    tmp_path: Path,
) -> None:
    clock = Clock(1000.0)
    keeper = keeper_for(tmp_path, clock)
    keeper.pool_add("p", "local_429")
    keeper.pool_add("p", "local_429", 2)
    keeper.pool_add("q", "rotations")
    clock.now = 1001.0
    keeper.limiter_snapshot({"old": True})
    clock.now = 1002.0
    keeper.limiter_snapshot(LIMITER)
    expected_pools = {"p": PoolRecord(local_429=3), "q": PoolRecord(rotations=1)}
    view = keeper.view()
    assert view.pools == expected_pools
    assert (view.limiter, view.limiter_at) == (LIMITER, 1002.0)
    assert not keeper.store.path.exists()  # no I/O until a sync
    await keeper.sync()
    on_disk = StateStore(tmp_path).read()
    assert on_disk.pools == expected_pools
    assert (on_disk.limiter, on_disk.limiter_at) == (LIMITER, 1002.0)
    assert keeper.view() == on_disk

    keeper.pool_add("p", "rotations")
    await keeper.sync()
    assert StateStore(tmp_path).read().pools["p"] == PoolRecord(local_429=3, rotations=1)


async def test_keeper_does_not_overwrite_newer_health_or_limiter_of_another_writer(
    tmp_path: Path,
) -> None:
    keeper = keeper_for(tmp_path, Clock(1000.0))
    newer = HEALTH.model_copy(update={"updated_at": 3000.0, "cooling_reason": "other"})
    other = StateStore(tmp_path)
    other.commit(
        Delta(
            keys={KEY_A.fingerprint: kd("a", "p", requests=4, health=newer)},
            limiter=LIMITER,
            limiter_at=3000.0,
        ),
        now=3000.0,
    )
    d = keeper.key(KEY_A)
    d.add("requests")
    d.add("upstream_429")
    d.health = HEALTH.model_copy(update={"updated_at": 1000.0, "cooling_reason": "mine"})
    keeper.limiter_snapshot({"mine": True})  # at 1000: older than the other's
    await keeper.sync()
    on_disk = StateStore(tmp_path).read()
    rec = on_disk.keys[KEY_A.fingerprint]
    assert (rec.requests, rec.upstream_429) == (5, 1)
    assert rec.health == newer
    assert (on_disk.limiter, on_disk.limiter_at) == (LIMITER, 3000.0)
    assert keeper.view() == on_disk


async def test_failed_commit_keeps_pool_counters_health_and_limiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(1000.0)
    keeper = keeper_for(tmp_path, clock)
    real_commit = keeper.store.commit
    calls: list[Delta] = []

    def flaky_commit(delta_: Delta, now: float | None = None) -> StateDoc:
        calls.append(delta_)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_commit(delta_, now)

    monkeypatch.setattr(keeper.store, "commit", flaky_commit)
    first = HEALTH.model_copy(update={"updated_at": 1000.0, "cooling_reason": "first"})
    d = keeper.key(KEY_A)
    d.add("tokens_in", 10)
    d.health = first
    keeper.pool_add("p", "local_429")
    keeper.limiter_snapshot({"first": True})
    await keeper.sync()
    assert len(calls) == 1
    assert not keeper.store.path.exists()
    view = keeper.view()
    assert view.keys[KEY_A.fingerprint].tokens_in == 10
    assert view.keys[KEY_A.fingerprint].health == first
    assert view.pools == {"p": PoolRecord(local_429=1)}
    assert (view.limiter, view.limiter_at) == ({"first": True}, 1000.0)

    clock.now = 1001.0
    second = HEALTH.model_copy(update={"updated_at": 1001.0, "cooling_reason": "second"})
    d = keeper.key(KEY_A)
    d.add("tokens_in", 5)
    d.add("tokens_out", 7)
    d.health = second
    keeper.pool_add("p", "local_429")
    keeper.pool_add("p", "rotations")
    keeper.limiter_snapshot(LIMITER)
    await keeper.sync()
    assert len(calls) == 2
    on_disk = StateStore(tmp_path).read()
    rec = on_disk.keys[KEY_A.fingerprint]
    assert (rec.tokens_in, rec.tokens_out) == (15, 7)
    assert rec.health == second
    assert on_disk.pools == {"p": PoolRecord(local_429=2, rotations=1)}
    assert (on_disk.limiter, on_disk.limiter_at) == (LIMITER, 1001.0)
    assert keeper.view() == on_disk


async def test_an_outside_write_is_adopted_at_the_next_poll(tmp_path: Path) -> None:
    """What the CLI writes (an operator action) reaches a running proxy at the keeper's next
    look at the file: counted in looks, not timed. A look happens every `poll` seconds, after
    a `debounce` when the proxy has changes of its own: with the defaults, 1.5 s at most,
    within the two seconds the CLI promises."""
    defaults = StateKeeper(StateStore(tmp_path / "unused"))
    assert defaults.poll + defaults.debounce <= 2.0
    keeper = StateKeeper(StateStore(tmp_path), debounce=0.0, poll=0.05, clock=Clock())
    looks: list[bool] = []
    changed = keeper.store.changed

    def counting() -> bool:
        looks.append(result := changed())
        return result

    keeper.store.changed = counting  # type: ignore[method-assign]
    seen: list[StateDoc] = []
    keeper.on_change = seen.append
    keeper.start()
    try:
        while len(looks) < 2:
            await asyncio.sleep(0.01)
        before = len(looks)
        action = KeyDelta("a", "p", operator=Operator(action="disable", at=1000.0))
        StateStore(tmp_path).commit(delta({KEY_A.fingerprint: action}))
        for _ in range(2000):
            if seen:
                break
            await asyncio.sleep(0.01)
        # The look under way while the CLI wrote may have missed it; the next one did not.
        assert len(looks) - before <= 2
        operator = seen[0].keys[KEY_A.fingerprint].operator
        assert operator is not None and operator.action == "disable"
    finally:
        keeper.close_blocking()
        await asyncio.sleep(0)
