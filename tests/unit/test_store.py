"""state.json on disk (StateStore) and the proxy's in-memory view of it (StateKeeper)."""

from __future__ import annotations

import asyncio
import json
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
from pydantic import SecretStr

from kmi_rotor import store as store_module
from kmi_rotor.config import Key
from kmi_rotor.core.secrets import fingerprint
from kmi_rotor.core.state import SCHEMA_VERSION, KeyDelta, StateDoc
from kmi_rotor.keeper import StateKeeper
from kmi_rotor.store import StateStore

ADDON_DIR = Path(__file__).resolve().parents[2] / "addon"


def make_key(label: str, pool: str = "p") -> Key:
    secret = f"sk-{label}-{'x' * 20}"
    return Key(label, SecretStr(secret), fingerprint(secret), pool)


KEY_A = make_key("a")
KEY_B = make_key("b")


def asides(folder: Path, tag: str) -> list[Path]:
    return sorted(folder.glob(f"state.json.{tag}-*"))


# -- StateStore ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "deltas",
    [
        pytest.param({"fp1": KeyDelta("a", "p", requests=1)}, id="one-request"),
        pytest.param(
            {
                "fp1": KeyDelta("a", "p", requests=3, errors=1, last_status=429, last_used=12.5),
                "fp2": KeyDelta(
                    "b", "q", requests=1, errors=1, last_error="connection reset", last_used=13.0
                ),
            },
            id="two-keys-all-fields",
        ),
        pytest.param(
            {"fp-ü": KeyDelta("ключ", "池", requests=2, last_error="ошибка", last_used=1.0)},
            id="unicode",
        ),
    ],
)
def test_round_trip(tmp_path: Path, deltas: dict[str, KeyDelta]) -> None:
    store = StateStore(tmp_path / "state")
    written = store.commit(deltas, now=1000.0)
    read = StateStore(tmp_path / "state").read()
    assert read == written
    assert read.schema_version == SCHEMA_VERSION
    assert read.updated_at == 1000.0
    assert set(read.keys) == set(deltas)
    for fp, d in deltas.items():
        rec = read.keys[fp]
        assert (rec.label, rec.pool, rec.fingerprint) == (d.label, d.pool, fp)
        assert (rec.requests, rec.errors) == (d.requests, d.errors)
        assert (rec.last_status, rec.last_error, rec.last_used) == (
            d.last_status,
            d.last_error,
            d.last_used,
        )
    assert json.loads(store.path.read_text(encoding="utf-8"))["schema_version"] == SCHEMA_VERSION


def test_commits_accumulate(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(5):
        store.commit({"fp": KeyDelta("a", "p", requests=1, last_status=200 + i, last_used=i)})
    doc = StateStore(tmp_path).read()
    assert doc.keys["fp"].requests == 5
    assert doc.keys["fp"].last_status == 204


def test_missing_file_reads_empty_and_is_not_created(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "nothing-yet")
    assert store.read() == StateDoc()
    assert store.commit({}) == StateDoc()
    assert not store.path.exists()
    assert store.changed() is False


def test_file_mode_and_folder_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = StateStore(tmp_path / "deep" / "state")
        store.commit({"fp": KeyDelta("a", "p", requests=1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert not list(store.dir.glob(".state.*.tmp"))


def test_rewrite_tightens_a_loose_file_mode(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.commit({"fp": KeyDelta("a", "p", requests=1)})
    os.chmod(store.path, 0o644)
    store.commit({"fp": KeyDelta("a", "p", requests=1)})
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
    doc = store.commit({"fp": KeyDelta("a", "p", requests=1)})
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
    store.commit({"fp": KeyDelta("a", "p", requests=1)})
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
    from kmi_rotor.core.state import KeyDelta
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
        store.commit({"shared": KeyDelta("shared", "p", requests=1, last_used=float(i))})
        if i % 50 == 0:
            store.commit({f"own-{me}": KeyDelta(me, "p", requests=1)})
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
        deadline = time.monotonic() + 30
        while not all((folder / f"ready-{n}").exists() for n in ("w1", "w2")):
            assert time.monotonic() < deadline, "writers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.005)
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
    assert doc.keys["shared"].requests == 2 * count
    assert doc.keys["own-w1"].requests == count // 50
    assert doc.keys["own-w2"].requests == count // 50
    assert doc.keys["shared"].last_used == float(count - 1)
    assert not asides(folder, "*")
    assert not list(folder.glob(".state.*.tmp"))


# -- StateKeeper -----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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


def apply(keeper: StateKeeper, clock: Clock, steps: list[tuple[object, ...]]) -> None:
    for step in steps:
        match step:
            case ("sent",):
                keeper.sent(KEY_A)
            case ("answered", int(status), float(at)):
                clock.now = at
                keeper.answered(KEY_A, status)
            case ("failed", str(error), float(at)):
                clock.now = at
                keeper.failed(KEY_A, error)
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
    keeper.sent(KEY_A)
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
    keeper.sent(KEY_A)
    await keeper.sync()

    other = StateStore(tmp_path)
    other.commit(
        {
            KEY_A.fingerprint: KeyDelta("a", "p", requests=5, last_status=500, last_used=1500.0),
            KEY_B.fingerprint: KeyDelta("b", "p", requests=2, last_status=200, last_used=2500.0),
        },
        now=2600.0,
    )
    _bump_mtime(other.path)

    await keeper.sync()  # nothing pending: only takes in what the other store wrote
    view = keeper.view()
    assert view.keys[KEY_A.fingerprint].requests == 6
    assert view.keys[KEY_A.fingerprint].last_status == 500
    assert view.keys[KEY_B.fingerprint].requests == 2

    keeper.sent(KEY_B)
    keeper.answered(KEY_B, 201)  # clock 2000 < the other's 2500: the other's status stays
    keeper.sent(KEY_A)
    keeper.answered(KEY_A, 204)  # 2000 > 1500: newer than the other's observation
    other.commit({KEY_B.fingerprint: KeyDelta("b", "p", requests=10)}, now=2700.0)
    await keeper.sync()

    on_disk = StateStore(tmp_path).read()
    assert on_disk.keys[KEY_A.fingerprint].requests == 7
    assert on_disk.keys[KEY_A.fingerprint].last_status == 204
    assert on_disk.keys[KEY_B.fingerprint].requests == 13
    assert on_disk.keys[KEY_B.fingerprint].last_status == 200
    assert keeper.view() == on_disk


async def test_load_blocking_reads_what_is_on_disk(tmp_path: Path) -> None:
    StateStore(tmp_path).commit({KEY_A.fingerprint: KeyDelta("a", "p", requests=9)})
    keeper = keeper_for(tmp_path)
    assert KEY_A.fingerprint not in keeper.view().keys
    keeper.load_blocking()
    keeper.sent(KEY_A)
    assert keeper.view().keys[KEY_A.fingerprint].requests == 10


async def test_sync_picks_up_a_write_in_the_same_time_tick(tmp_path: Path) -> None:
    keeper = keeper_for(tmp_path)
    keeper.sent(KEY_A)
    await keeper.sync()
    seen = os.stat(keeper.store.path).st_mtime_ns
    StateStore(tmp_path).commit({KEY_B.fingerprint: KeyDelta("b", "p", requests=3)})
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

    def flaky_commit(deltas: dict[str, KeyDelta], now: float | None = None) -> StateDoc:
        calls.append(len(deltas))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_commit(deltas, now)

    monkeypatch.setattr(keeper.store, "commit", flaky_commit)
    keeper.sent(KEY_A)
    keeper.sent(KEY_A)
    clock.now = 1001.0
    keeper.answered(KEY_A, 429)
    keeper.sent(KEY_B)
    await keeper.sync()
    assert calls == [2]
    assert not keeper.store.path.exists()
    view = keeper.view()
    assert view.keys[KEY_A.fingerprint].requests == 2
    assert view.keys[KEY_A.fingerprint].last_status == 429
    assert view.keys[KEY_B.fingerprint].requests == 1

    keeper.sent(KEY_A)
    clock.now = 1000.5
    keeper.failed(KEY_A, "older")  # older than the kept 429: counted, but not the newest
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

    def slow_commit(deltas: dict[str, KeyDelta], now: float | None = None) -> StateDoc:
        started.set()
        release.wait(10)
        return real_commit(deltas, now)

    monkeypatch.setattr(keeper.store, "commit", slow_commit)
    keeper.sent(KEY_A)
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
    keeper.sent(KEY_A)
    keeper.failed(KEY_A, "boom")
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

    def broken(deltas: dict[str, KeyDelta], now: float | None = None) -> StateDoc:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(keeper.store, "commit", broken)
    keeper.sent(KEY_A)
    keeper.close_blocking()
    assert not keeper.store.path.exists()


async def test_background_writer_flushes_after_the_debounce(tmp_path: Path) -> None:
    keeper = StateKeeper(StateStore(tmp_path), debounce=0.01, poll=0.05, clock=Clock())
    keeper.start()
    try:
        keeper.sent(KEY_A)
        keeper.sent(KEY_A)
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
