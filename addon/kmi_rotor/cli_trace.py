"""`kmi-rotor trace`: the last records of the request trace, or how fairly keys shared it."""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from . import config
from .config import Settings
from .core.fairness import render_summary, summarize
from .trace import read_trace, trace_path

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in `90`, `90s`, `15m`, `1h30m`, `2d`, `1w`; argparse-friendly errors."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not text or not re.fullmatch(rf"(?:{_DURATION.pattern})+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 90s, 15m, 1h30m, 2d)")
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))


def count(text: str) -> int:
    """A record count for `-n` (argparse names the type in its errors)."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the `trace` subcommand to the `kmi-rotor` parser's subcommands."""
    p = sub.add_parser(
        "trace",
        help="the request trace: the last records, or a per-key summary with --summary",
        description="Print the last records of <state_dir>/trace.jsonl, or summarize them.",
    )
    p.add_argument("--config", metavar="PATH", help="config file (default: as the addon)")
    p.add_argument("--summary", action="store_true", help="per-key counts, latency, fairness")
    p.add_argument(
        "--json", action="store_true", help="raw output: records as JSON lines, the summary as JSON"
    )
    p.add_argument(
        "--since", metavar="DURATION", type=parse_duration, help="only records this recent (1h)"
    )
    p.add_argument("-n", type=count, default=20, metavar="N", help="records to print (default 20)")
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    """Run `kmi-rotor trace`; a missing trace is reported and reads as empty (exit 0)."""
    settings = config.load(config.find_config(args.config), lenient=True)
    path = trace_path(settings.state_dir)
    if not path.exists():
        print(f"kmi-rotor: no trace yet at {path}", file=sys.stderr)
    records = read_trace(path)
    if args.since is not None:
        records = _since(records, time.time() - args.since)
    if args.summary:
        summary = summarize(records, usable_keys(settings))
        if args.json:
            print(json.dumps(summary.to_dict(), indent=2))
        else:
            print(render_summary(summary))
        return 0
    for record in collections.deque(records, maxlen=args.n):
        print(json.dumps(record, separators=(",", ":")) if args.json else render_record(record))
    return 0


def render_record(r: dict[str, Any]) -> str:
    """One trace record for people: local time, pool/key, request, status, outcome, timings."""
    ts = r.get("ts")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
        if isinstance(ts, int | float)
        else "?"
    )
    parts = [
        when,
        f"{r.get('pool') or '-'}/{r.get('key') or '-'}",
        f"{r.get('method') or '?'} {r.get('path') or ''}".strip(),
        str(r.get("status") or "-"),
        str(r.get("outcome") or "-"),
    ]
    for name, label in (("ttfb_ms", "first byte"), ("total_ms", "total")):
        if isinstance(r.get(name), int | float):
            parts.append(f"{label} {r[name]:.0f} ms")
    if r.get("tokens_in") is not None or r.get("tokens_out") is not None:
        parts.append(f"tokens {r.get('tokens_in') or 0} in, {r.get('tokens_out') or 0} out")
    if isinstance(r.get("attempt"), int) and r["attempt"] > 1:
        parts.append(f"attempt {r['attempt']}")
    if r.get("stream"):
        parts.append("streamed")
    if isinstance(r.get("scope"), str) and r["scope"]:
        parts.append(f"scope {r['scope']}")
    return "  ".join(parts)


def usable_keys(settings: Settings) -> list[tuple[str, str]]:
    """(pool, label) of every configured key that is not disabled, in configuration order."""
    return [(p.name, k.label) for p in settings.pools for k in p.keys if not k.disabled]


def _since(records: Iterable[dict[str, Any]], cutoff: float) -> Iterator[dict[str, Any]]:
    for r in records:
        ts = r.get("ts")
        if isinstance(ts, int | float) and ts >= cutoff:
            yield r
