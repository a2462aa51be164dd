"""The request trace: record format, the writer thread, rotation, permissions, reading back."""

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from proctools import wait_until

from kmi_rotor import trace
from kmi_rotor.trace import TraceRecord, TraceWriter, read_trace

SECRET = "sk-secretsecretsecretsecret9999"


def record(i: int = 0, **changes: object) -> TraceRecord:
    base = TraceRecord(
        ts=1_700_000_000.0 + i,
        id=f"flow-{i:04d}",
        pool="kimi",
        key="alpha",
        fp="sha256:0123456789abcdef",
        method="POST",
        path="/coding/v1/chat/completions",
        status=200,
        ttfb_ms=120.5,
        total_ms=870.25,
        tokens_in=1200,
        tokens_out=300,
        outcome="ok",
        attempt=1,
        stream=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "trace.jsonl"


class Gate:
    """Stands in for the writer's file append: holds the thread until released."""

    def __init__(self, writer: TraceWriter) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._real = writer._append
        writer._append = self  # type: ignore[method-assign]

    def __call__(self, data: bytes) -> None:
        self.entered.set()
        assert self.release.wait(5)
        self._real(data)


def test_record_is_compact_json_with_the_exact_field_names() -> None:
    r = record()
    line = r.to_json()
    assert "\n" not in line and ", " not in line and '": ' not in line
    data = json.loads(line)
    assert list(data) == [
        "ts", "id", "pool", "key", "fp", "method", "path", "status", "ttfb_ms",
        "total_ms", "tokens_in", "tokens_out", "outcome", "attempt", "stream", "scope",
    ]  # fmt: skip
    assert TraceRecord(**data) == r


def test_refused_request_round_trips_with_nulls() -> None:
    r = record(key=None, fp=None, status=429, ttfb_ms=None, total_ms=None, outcome="local_429")
    r = replace(r, tokens_in=None, tokens_out=None)
    assert TraceRecord(**json.loads(r.to_json())) == r


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="outcome"):
        record(outcome="fine")


@pytest.mark.parametrize(
    "given",
    [
        f"/v1beta/models/gemini:generateContent?key={SECRET}",
        f"/v1/chat?alt=sse&key={SECRET}",
        f"/v1/chat#key={SECRET}",
        f"/v1/chat?#{SECRET}",
    ],
)
def test_no_query_string_is_ever_written(path: Path, given: str) -> None:
    r = record(path=given)
    assert SECRET not in r.to_json()
    assert r.path.startswith("/v1") and "?" not in r.path and "#" not in r.path
    w = TraceWriter(path)
    w.write(r)
    w.close()
    assert SECRET not in path.read_text()
    assert [rec["path"] for rec in read_trace(path)] == [r.path]


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({}, id="ascii"),
        pytest.param({"key": "clé ключ", "pool": "池\u2028"}, id="non-ascii"),
        pytest.param({"key": "bad\udcff", "path": "/v1/\udc80"}, id="lone-surrogate"),
        pytest.param({"key": None, "fp": None, "ttfb_ms": 1e-05, "total_ms": 1e16}, id="numbers"),
    ],
)
def test_a_line_holds_what_the_record_does(path: Path, changes: dict[str, object]) -> None:
    r = record(**changes)
    line = r.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == json.loads(r.to_json()) == r.as_dict()
    w = TraceWriter(path)
    w.write(r)
    w.close()
    assert path.read_bytes() == line
    assert list(read_trace(path)) == [r.as_dict()]
    assert w.dropped == 0


def test_close_flushes_everything_queued_in_order(path: Path) -> None:
    w = TraceWriter(path)
    for i in range(2500):  # more than one batch
        w.write(record(i))
    w.close()
    got = list(read_trace(path))
    assert [r["id"] for r in got] == [f"flow-{i:04d}" for i in range(2500)]
    assert w.dropped == 0
    assert all(line.endswith("}") for line in path.read_text().splitlines())


def test_files_are_0600_and_the_folder_0700(path: Path) -> None:
    w = TraceWriter(path, max_bytes=600, backups=2)
    for i in range(10):
        w.write(record(i))
    w.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    files = sorted(path.parent.iterdir())
    assert len(files) == 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_rotation_keeps_the_bound_and_the_backups_and_reads_back_in_order(path: Path) -> None:
    line = len(record().to_json()) + 1
    w = TraceWriter(path, max_bytes=4 * line, backups=3)
    for i in range(30):
        w.write(record(i))
    w.close()
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["trace.jsonl", "trace.jsonl.1", "trace.jsonl.2", "trace.jsonl.3"]
    for f in path.parent.iterdir():
        assert f.stat().st_size <= 4 * line
    ids = [r["id"] for r in read_trace(path)]
    assert ids == [f"flow-{i:04d}" for i in range(30 - len(ids), 30)]
    assert len(ids) == 4 * 3 + len(path.read_text().splitlines())
    assert [r["id"] for r in read_trace(path, include_rotated=False)] == ids[-2:]


def test_rotation_counts_what_an_earlier_process_wrote(path: Path) -> None:
    line = len(record().to_json()) + 1
    for run in range(2):
        w = TraceWriter(path, max_bytes=3 * line, backups=1)
        for i in range(2):
            w.write(record(run * 2 + i))
        w.close()
    assert len(path.read_text().splitlines()) == 1
    assert [r["id"] for r in read_trace(path)] == [f"flow-{i:04d}" for i in range(4)]


def test_no_backups_means_the_file_restarts(path: Path) -> None:
    line = len(record().to_json()) + 1
    w = TraceWriter(path, max_bytes=2 * line, backups=0)
    for i in range(5):
        w.write(record(i))
    w.close()
    assert [p.name for p in path.parent.iterdir()] == ["trace.jsonl"]
    assert [r["id"] for r in read_trace(path)] == ["flow-0004"]


def test_write_never_waits_for_the_file(path: Path) -> None:
    w = TraceWriter(path)
    gate = Gate(w)
    w.write(record(0))
    assert gate.entered.wait(2)  # the thread is now stuck in the file write
    start = time.perf_counter()
    for i in range(1, 200):
        w.write(record(i))
    assert time.perf_counter() - start < 0.5
    assert not path.exists() or path.read_text() == ""
    gate.release.set()
    w.close()
    assert len(list(read_trace(path))) == 200


def test_a_full_queue_drops_and_counts(path: Path) -> None:
    w = TraceWriter(path, max_queue=10)
    gate = Gate(w)
    w.write(record(0))
    assert gate.entered.wait(2)
    for i in range(1, 16):
        w.write(record(i))
    assert w.dropped == 5
    gate.release.set()
    w.close()
    assert [r["id"] for r in read_trace(path)] == [f"flow-{i:04d}" for i in range(11)]


def test_write_after_close_is_dropped(path: Path) -> None:
    w = TraceWriter(path)
    w.close()
    w.write(record())
    w.close()  # twice is fine
    assert w.dropped == 1
    assert not path.exists()


def test_an_unwritable_folder_never_raises_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    w = TraceWriter(blocker / "trace.jsonl")
    with caplog.at_level(logging.ERROR, logger="kmi_rotor"):
        for i in range(3):
            w.write(record(i))
            wait_until(lambda i=i: w.dropped == i + 1, 10, "the write dropped", 0.005)
        w.close()
    assert w.dropped == 3
    assert len([r for r in caplog.records if "cannot write the trace" in r.message]) == 1


def test_the_writer_recovers_when_the_folder_comes_back(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    folder.write_text("")  # a file where the folder should be
    w = TraceWriter(folder / "trace.jsonl")
    w.write(record(0))
    wait_until(lambda: w.dropped == 1, 10, "the write dropped", 0.005)
    folder.unlink()
    w.write(record(1))
    w.close()
    assert [r["id"] for r in read_trace(folder / "trace.jsonl")] == ["flow-0001"]


def test_malformed_and_truncated_lines_are_skipped(path: Path) -> None:
    path.parent.mkdir()
    good = [record(i).to_json() for i in range(3)]
    (path.parent / "trace.jsonl.1").write_text(good[0] + "\nnot json\n[1, 2]\n")
    path.write_bytes(
        (good[1] + "\n\n" + good[2] + "\n").encode() + b"\xff\xfe\n" + good[2][:25].encode()
    )
    assert [r["id"] for r in read_trace(path)] == ["flow-0000", "flow-0001", "flow-0002"]


def test_a_missing_trace_reads_as_empty(tmp_path: Path) -> None:
    assert list(read_trace(tmp_path / "nowhere" / "trace.jsonl")) == []


def test_backups_are_read_oldest_first_past_nine(path: Path) -> None:
    path.parent.mkdir()
    for n in (1, 2, 10):
        (path.parent / f"trace.jsonl.{n}").write_text(record(100 - n).to_json() + "\n")
    (path.parent / "trace.jsonl.old").write_text(record(0).to_json() + "\n")
    path.write_text(record(100).to_json() + "\n")
    assert [r["ts"] for r in read_trace(path)] == [record(i).ts for i in (90, 98, 99, 100)]


def test_trace_path_is_in_the_state_folder(tmp_path: Path) -> None:
    assert trace.trace_path(tmp_path) == tmp_path / "trace.jsonl"


def test_as_dict_is_the_records_fields_in_order() -> None:
    from dataclasses import asdict

    r = record(path="/v1/chat?key=x")
    assert r.as_dict() == asdict(r)
    assert list(r.as_dict()) == list(asdict(r))
    assert json.loads(r.to_json()) == r.as_dict()


def test_records_wait_for_the_next_flush_not_one_wake_up_each(path: Path) -> None:
    w = TraceWriter(path, flush_seconds=60.0)
    for i in range(5):
        w.write(record(i))
    # The thread sleeps until its next flush: a write does not wake it.
    assert not path.exists()
    w.close()
    assert [r["id"] for r in read_trace(path)] == [f"flow-{i:04d}" for i in range(5)]


def test_a_full_batch_is_written_without_waiting_for_the_flush(path: Path) -> None:
    w = TraceWriter(path, flush_seconds=60.0)
    for i in range(trace._BATCH):
        w.write(record(i))
    wait_until(lambda: len(list(read_trace(path))) == trace._BATCH, 10, "the batch written")
    w.close()


def test_a_record_is_written_within_the_flush_interval(path: Path) -> None:
    w = TraceWriter(path, flush_seconds=0.05)
    w.write(record(1))
    wait_until(lambda: [r["id"] for r in read_trace(path)] == ["flow-0001"], 10, "written")
    w.close()


@pytest.mark.parametrize(
    ("extra", "shown", "hidden"),
    [
        (
            {"scope": "model:gpt-4o-mini", "stream": True},
            ["streamed", "scope model:gpt-4o-mini"],
            [],
        ),
        ({"scope": None}, [], ["scope"]),
        ({}, [], ["scope"]),  # a line written before records had a scope
        ({"scope": 7}, [], ["scope"]),  # not what kmi-rotor writes: left out, not an error
    ],
)
def test_a_trace_line_for_people_names_its_scope(extra, shown, hidden) -> None:
    from kmi_rotor.cli_trace import render_record

    base = {"ts": 1.0, "pool": "p", "key": "a", "method": "POST", "path": "/v1/x", "status": 200}
    text = render_record({**base, "outcome": "ok", **extra})
    assert "p/a" in text and "POST /v1/x" in text
    for part in shown:
        assert part in text
    for part in hidden:
        assert part not in text
