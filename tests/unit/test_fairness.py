"""Fairness of a pool's traffic over its keys, the text report, and `kmi-rotor trace`."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kmi_rotor import cli_trace
from kmi_rotor.core.fairness import jain_index, render_summary, summarize
from kmi_rotor.trace import TraceRecord, TraceWriter

KEYS3 = [("kimi", "a"), ("kimi", "b"), ("kimi", "c")]


def rec(key: str | None, outcome: str = "ok", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": 1_700_000_000.0,
        "id": f"f-{key}-{outcome}",
        "pool": "kimi",
        "key": key,
        "fp": None if key is None else f"sha256:{key}",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "ttfb_ms": 10.0,
        "total_ms": 100.0,
        "tokens_in": 10,
        "tokens_out": 5,
        "outcome": outcome,
        "attempt": 1,
        "stream": False,
    }
    return base | extra


def traffic(**per_key: int) -> list[dict[str, Any]]:
    return [rec(k, id=f"{k}-{i}") for k, n in per_key.items() for i in range(n)]


@pytest.mark.parametrize(
    ("records", "keys", "fairness", "unused"),
    [
        pytest.param(traffic(a=5, b=5, c=5), KEYS3, 100.0, (), id="even"),
        pytest.param(traffic(a=9), KEYS3, 100 / 3, ("b", "c"), id="one-takes-all"),
        pytest.param(traffic(a=2, b=1, c=1), KEYS3, 16 / 18 * 100, (), id="uneven"),
        pytest.param(traffic(a=3, b=3), KEYS3, 4 / 6 * 100, ("c",), id="one-idle"),
        pytest.param([], KEYS3, None, ("a", "b", "c"), id="no-traffic"),
        pytest.param(
            [rec(None, "local_429", status=429)], KEYS3, None, ("a", "b", "c"), id="only-refused"
        ),
        pytest.param(
            # the disabled key is left out of `keys`: its traffic does not count against n
            traffic(a=4, b=4, off=4),
            [("kimi", "a"), ("kimi", "b")],
            100.0,
            (),
            id="disabled-excluded",
        ),
    ],
)
def test_fairness_figure(
    records: list[dict[str, Any]],
    keys: Sequence[tuple[str, str]],
    fairness: float | None,
    unused: tuple[str, ...],
) -> None:
    (pool,) = summarize(records, keys).pools
    assert pool.fairness_pct == (None if fairness is None else pytest.approx(fairness))
    assert pool.unused == unused
    assert pool.usable_keys == len(keys)


def test_one_of_three_renders_as_a_third() -> None:
    text = render_summary(summarize(traffic(a=9), KEYS3))
    assert "fairness 33.3% over 3 usable keys" in text
    assert "unused: b, c" in text


def test_jain_index_bounds() -> None:
    assert jain_index([]) is None
    assert jain_index([0, 0]) is None
    assert jain_index([7]) == 1.0
    assert jain_index([1, 0, 0, 0]) == 0.25


def test_keys_outside_the_configuration_are_reported_but_not_usable() -> None:
    (pool,) = summarize(traffic(a=2, off=6), [("kimi", "a")]).pools
    by_label = {k.label: k for k in pool.keys}
    assert by_label["off"].usable is False and by_label["off"].requests == 6
    assert by_label["off"].share_pct == pytest.approx(75.0)
    assert pool.fairness_pct == 100.0
    assert "off (not usable)" in render_summary(summarize(traffic(off=1), [("kimi", "a")]))


def test_failover_retries_local_429_and_outcomes() -> None:
    records = [
        rec("a", "rate_limited", id="r1", status=429),
        rec("b", "ok", id="r1", attempt=2),
        rec("a", "overloaded", id="r2", status=529),
        rec("b", "quota", id="r2", attempt=2, status=403),
        rec("c", "ok", id="r2", attempt=3),
        rec(None, "local_429", id="r3", status=429, total_ms=None),
        rec("c", "stream_error", id="r4", total_ms=300.0),
        rec("c", "auth", id="r5", status=401, total_ms=200.0),
    ]
    summary = summarize(records, KEYS3)
    (pool,) = summary.pools
    assert (pool.requests, pool.client_requests, pool.retries, pool.local_429) == (8, 5, 3, 1)
    assert pool.outcomes == {
        "auth": 1, "local_429": 1, "ok": 2, "overloaded": 1, "quota": 1,
        "rate_limited": 1, "stream_error": 1,
    }  # fmt: skip
    a, b, c = pool.keys
    assert (a.requests, a.successes, a.failures) == (2, 0, {"overloaded": 1, "rate_limited": 1})
    assert (b.requests, b.successes, b.failures) == (2, 1, {"quota": 1})
    assert (c.requests, c.successes, c.failures) == (3, 1, {"auth": 1, "stream_error": 1})
    # shares are of the attempts that used a key: the locally refused one used none
    assert [k.share_pct for k in pool.keys] == pytest.approx([200 / 7, 200 / 7, 300 / 7])
    assert c.mean_ms == pytest.approx(200.0) and c.median_ms == 200.0
    assert (c.tokens_in, c.tokens_out) == (30, 15)
    assert summary.records == 8


def test_bad_fields_are_ignored_not_trusted() -> None:
    records = [
        rec("a", total_ms="slow", tokens_in=None, tokens_out=True, attempt="2"),
        {"pool": "kimi", "key": "a"},
        rec("a", ts=None),
    ]
    (pool,) = summarize(records, [("kimi", "a")]).pools
    (a,) = pool.keys
    assert (a.requests, a.mean_ms, a.tokens_in, a.tokens_out) == (3, 100.0, 10, 5)
    assert pool.retries == 0


def test_pools_in_configuration_order_then_unknown_ones() -> None:
    records = [rec("x", pool="gone"), rec("a"), rec("z", pool="claude")]
    keys = [("claude", "z"), ("kimi", "a"), ("empty", "e")]
    summary = summarize(records, keys)
    assert [p.name for p in summary.pools] == ["claude", "kimi", "empty", "gone"]
    gone = summary.pools[-1]
    assert (gone.fairness_pct, gone.usable_keys, gone.unused) == (None, 0, ())
    assert "pool empty: 0 requests" in render_summary(summary)
    assert "fairness: no traffic" in render_summary(summary)


def test_summary_to_dict_is_json_ready() -> None:
    data = json.loads(json.dumps(summarize(traffic(a=1), KEYS3).to_dict()))
    assert data["pools"][0]["unused"] == ["b", "c"]
    assert data["pools"][0]["keys"][0]["label"] == "a"


# The command ----------------------------------------------------------------------------------

CONFIG = """
state_dir = "state"

[[pools]]
name = "kimi"
provider = "kimi-code"

[[pools.keys]]
label = "alpha"
key = "sk-alphaalphaalphaalpha1111"

[[pools.keys]]
label = "beta"
key = "sk-betabetabetabetabeta2222"

[[pools.keys]]
label = "gamma"
key = "sk-gammagammagammagamma3333"

[[pools.keys]]
label = "off"
key = "sk-offoffoffoffoffoffoff4444"
disabled = true
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "rotor.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def write_trace(conf: Path, records: list[TraceRecord]) -> None:
    w = TraceWriter(conf.parent / "state" / "trace.jsonl")
    for r in records:
        w.write(r)
    w.close()


def trace_record(i: int, key: str, ago: float, **changes: Any) -> TraceRecord:
    fields = rec(key, id=f"flow-{i}", ts=time.time() - ago, path=f"/v1/chat?key=SECRET{i}")
    return TraceRecord(**(fields | changes))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="kmi-rotor")
    cli_trace.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trace", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_summary(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_trace(
        conf,
        [trace_record(i, "alpha", 60) for i in range(4)]
        + [trace_record(9, "beta", 30, outcome="rate_limited", status=429, attempt=2)],
    )
    code, out, err = run(capsys, "--summary", "--config", str(conf))
    assert code == 0 and err == ""
    assert "pool kimi: 5 requests" in out and "1 failover retry," in out
    assert "unused: gamma" in out and "off" not in out
    assert "fairness 49.0% over 3 usable keys" in out  # (4 + 1)² / (3 · (16 + 1))
    assert "rate_limited 1" in out


def test_cli_summary_json_since(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_trace(conf, [trace_record(1, "alpha", 7200), trace_record(2, "beta", 60)])
    code, out, _ = run(capsys, "--summary", "--json", "--since", "1h", "--config", str(conf))
    (pool,) = json.loads(out)["pools"]
    assert code == 0
    assert pool["requests"] == 1 and pool["unused"] == ["alpha", "gamma"]


def test_cli_prints_the_last_records_without_query(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_trace(conf, [trace_record(i, "alpha", 100 - i) for i in range(30)])
    code, out, _ = run(capsys, "-n", "3", "--json", "--config", str(conf))
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in lines] == ["flow-27", "flow-28", "flow-29"]
    assert "SECRET" not in out
    _, out, _ = run(capsys, "--config", str(conf))
    assert len(out.splitlines()) == 20


def test_cli_prints_records_for_people_in_local_time(
    conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        record = trace_record(0, "alpha", 250, ts=1_800_000_000.0, attempt=2)
        write_trace(conf, [record])
        code, out, _ = run(capsys, "-n", "1", "--config", str(conf))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert code == 0
    line = out.strip()
    assert line.startswith("2027-01-15 17:00:00  ")  # 08:00 UTC, in Tokyo
    assert "/alpha" in line and "attempt 2" in line and "{" not in line
    assert "SECRET" not in out


def test_cli_without_a_trace_says_so_and_succeeds(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--summary", "--config", str(conf))
    assert code == 0
    assert "no trace yet" in err and "trace.jsonl" in err
    assert "fairness: no traffic" in out and "unused: alpha, beta, gamma" in out
    code, out, _ = run(capsys, "--summary", "--json", "--config", str(conf))
    assert code == 0 and json.loads(out)["records"] == 0
    assert run(capsys, "--config", str(conf))[:2] == (0, "")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1h30m", 5400.0), ("2d", 172800.0),
     ("1w", 604800.0), ("0.5h", 1800.0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert cli_trace.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1y", "-1h", "1h 2m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli_trace.parse_duration(text)
