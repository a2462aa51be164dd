"""`kmi-rotor`: look at the pool and act on it from the command line.

Actions are written to the state file; a running proxy applies them within two seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from . import cli_check, cli_env, cli_trace, config, status
from .config import ConfigError, Key, Settings
from .core.state import Delta, Operator
from .store import StateStore

ACTIONS = ("disable", "enable", "reset")


def _settings(args: argparse.Namespace) -> Settings:
    return config.load(config.find_config(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = StateStore(settings.state_dir)
    while True:
        now = time.time()
        doc = store.read()
        rows = status.rows(settings, doc, now)
        if args.json:
            print(
                json.dumps(
                    {
                        "state_dir": str(settings.state_dir),
                        "keys": rows,
                        "local_429": status.local_429(doc),
                    },
                    indent=2,
                )
            )
        else:
            if args.watch:
                print("\033[H\033[2J", end="")
            print(status.render_table(rows, now, status.local_429(doc)))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.interval)


def _keys_named(settings: Settings, target: str, allow_all: bool) -> list[Key]:
    if allow_all and target == "all":
        return list(settings.keys)
    found = [k for k in settings.keys if k.label == target]
    if not found:
        labels = ", ".join(k.label for k in settings.keys)
        raise ConfigError(f"no key labelled {target!r} (known: {labels})")
    return found


def cmd_action(args: argparse.Namespace) -> int:
    settings = _settings(args)
    keys = _keys_named(settings, args.label, allow_all=args.command == "reset")
    delta, now = Delta(), time.time()
    for key in keys:
        delta.key(key.fingerprint, key.label, key.pool).operator = Operator(
            action=args.command, at=now
        )
    StateStore(settings.state_dir).commit(delta, now)
    print(
        f"{args.command}: {', '.join(k.label for k in keys)} (a running proxy applies it within 2 s)"
    )
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    sticky = [p for p in settings.pools if p.strategy == "sticky"]
    pools = [p for p in settings.pools if p.name == args.pool] if args.pool else sticky
    if args.pool and not pools:
        raise ConfigError(f"no pool named {args.pool!r}")
    if not pools or any(p.strategy != "sticky" for p in pools):
        raise ConfigError(
            'rotate moves the active key of pools with strategy = "sticky"; none given'
        )
    delta = Delta()
    for p in pools:
        delta.pool_add(p.name, "rotations")
    StateStore(settings.state_dir).commit(delta)
    print(f"rotate: {', '.join(p.name for p in pools)} (a running proxy applies it within 2 s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmi-rotor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="PATH", help="config file (default: as the addon)")
        return p

    st = with_config(sub.add_parser("status", help="each key's status and counters"))
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until interrupted")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    st.set_defaults(func=cmd_status)
    for action in ACTIONS:
        what = {
            "disable": "stop using a key",
            "enable": "use a key again",
            "reset": "clear cooldowns and blocks",
        }
        p = with_config(sub.add_parser(action, help=what[action]))
        p.add_argument("label", help="the key's label" + (" or 'all'" if action == "reset" else ""))
        p.set_defaults(func=cmd_action)
    rot = with_config(sub.add_parser("rotate", help="move a sticky pool on to its next key"))
    rot.add_argument("pool", nargs="?", help="pool name (default: every sticky pool)")
    rot.set_defaults(func=cmd_rotate)
    cli_trace.register(sub)
    cli_check.register(sub)
    cli_env.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"kmi-rotor: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
