"""`kmi-rotor`: look at the pool's state from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import config
from .config import ConfigError, Settings
from .core.secrets import mask
from .store import StateStore


def key_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per configured key, joined with its persisted record by fingerprint."""
    doc = StateStore(settings.state_dir).read()
    rows = []
    for key in settings.keys:
        rec = doc.keys.get(key.fingerprint)
        rows.append(
            {
                "label": key.label,
                "pool": key.pool,
                "key": mask(key.secret.get_secret_value()),
                "fingerprint": key.fingerprint,
                "status": "disabled" if key.disabled else "ready",
                "requests": rec.requests if rec else 0,
                "errors": rec.errors if rec else 0,
                "last_status": rec.last_status if rec else None,
                "last_error": rec.last_error if rec else None,
                "last_used": rec.last_used if rec else None,
            }
        )
    return rows


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def render_table(rows: list[dict[str, Any]], now: float) -> str:
    head = ("POOL", "KEY", "MASKED", "STATUS", "REQUESTS", "ERRORS", "LAST", "LAST USED")
    body = [
        (
            r["pool"],
            r["label"],
            r["key"],
            r["status"],
            str(r["requests"]),
            str(r["errors"]),
            str(r["last_status"] or (r["last_error"] and "error") or "-"),
            _ago(r["last_used"], now),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    )


def cmd_status(args: argparse.Namespace) -> int:
    settings = config.load(config.find_config(args.config))
    rows = key_rows(settings)
    if args.json:
        print(json.dumps({"state_dir": str(settings.state_dir), "keys": rows}, indent=2))
    else:
        print(render_table(rows, time.time()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmi-rotor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="each key's status and counters")
    status.add_argument("--config", metavar="PATH", help="config file (default: as the addon)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"kmi-rotor: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
