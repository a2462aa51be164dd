"""`kmi-rotor`: look at the pool and act on it from the command line.

Actions are written to the state file; a running proxy applies them within two seconds. No
command needs a key's secret: keys are identified by label, and by the fingerprint the state
holds; only the proxy reads the secrets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

from . import cli_check, cli_env, cli_init, cli_trace, config, presence, status
from .cluster import view as cluster_view
from .config import ConfigError, Key, Settings, one_line
from .core.state import Delta, Operator
from .store import StateError, StateStore

ACTIONS = ("disable", "enable", "reset")


def _settings(args: argparse.Namespace) -> Settings:
    """The configuration without any secret: keys the CLI cannot read are noted, not fatal."""
    return config.load(config.find_config(args.config), lenient=True)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ConfigError:
        note = status.proxy_note(presence.read(_state_dir_anyway(args.config)))
        if note:  # the file is broken, but a proxy runs with its last good configuration
            print(f"kmi-rotor: {note}", file=sys.stderr)
        raise
    store = StateStore(settings.state_dir, read_only=True)  # a look changes nothing on disk
    while True:
        now = time.time()
        doc = store.read()
        known = status.identify(settings, doc)
        rows = status.rows(known, doc, now)
        proxy = presence.read(settings.state_dir)
        note = status.proxy_note(proxy)
        if args.json:
            out = {
                "state_dir": str(settings.state_dir),
                "keys": rows,
                "local_429": status.local_429(doc),
                "problems": list(settings.problems),
                "proxy": proxy,
            }
            if settings.cluster:
                out["cluster"] = cluster_view.read(settings)
            print(json.dumps(out, indent=2))
        else:
            if args.watch and sys.stdout.isatty():  # a pipe gets the tables one after another
                print("\033[H\033[2J", end="")
            print(status.render_table(rows, now, status.local_429(doc)))
            for line in [*_folder_problems(settings), *([note] if note else [])]:
                print(line)
            if settings.cluster:
                print(cluster_view.render(cluster_view.read(settings)))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.interval)


def _state_dir_anyway(explicit: str | None) -> Path:
    """Where the state is, from a configuration that does not load: its `state_dir` if the
    file is still TOML, else the default."""
    try:
        path = config.find_config(explicit)
        raw = tomllib.loads(path.read_text(encoding="utf-8")).get("state_dir")
        text = raw if isinstance(raw, str) else config.DEFAULT_STATE_DIR
        folder = Path(text).expanduser()
        return folder if folder.is_absolute() else (path.parent / folder).resolve()
    except (ConfigError, OSError, ValueError, RuntimeError):
        return Path(config.DEFAULT_STATE_DIR).expanduser()


def _folder_problems(settings: Settings) -> list[str]:
    return [p for p in settings.problems if not p.startswith("key ")]


def _keys_named(settings: Settings, target: str, allow_all: bool) -> list[Key]:
    if allow_all and target == "all":
        return [k for k in settings.keys if k.fingerprint]
    found = [k for k in settings.keys if k.label == target]
    if not found:
        labels = ", ".join(k.label for k in settings.keys)
        raise ConfigError(f"no key labelled {target!r} (known: {labels})")
    for k in found:
        if not k.fingerprint:
            raise ConfigError(
                f"key {k.label}: its secret is not available here ({k.problem}) and the state "
                "has no record of it yet; run this where the secret is set"
            )
    return found


def cmd_action(args: argparse.Namespace) -> int:
    settings = _settings(args)
    doc = StateStore(settings.state_dir).read()
    keys = _keys_named(status.identify(settings, doc), args.label, args.command == "reset")
    delta, now = Delta(), time.time()
    for key in keys:
        delta.key(key.fingerprint, key.label, key.pool).operator = Operator(
            action=args.command, at=now, applied=False
        )
    StateStore(settings.state_dir).commit(delta, now)
    print(
        f"{args.command}: {', '.join(k.label for k in keys)} (a running proxy applies it within 2 s)"
    )
    if settings.cluster:
        fps = [k.fingerprint for k in keys]
        print(f"{args.command}: {cluster_view.announce(settings, args.command, fps)}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    sticky = [p for p in settings.pools if p.strategy == "sticky"]
    pools = [p for p in settings.pools if p.name == args.pool] if args.pool else sticky
    if args.pool and not pools:
        raise ConfigError(f"no pool named {args.pool!r}")
    if not pools:
        strategies = ", ".join(f"{p.name} ({p.strategy})" for p in settings.pools)
        raise ConfigError(
            f'no pool has strategy = "sticky" (pools: {strategies}); only a sticky pool has '
            "an active key to move on, the others already change keys on every request"
        )
    if pools[0].strategy != "sticky":
        raise ConfigError(
            f'pool {pools[0].name!r} uses strategy = "{pools[0].strategy}", which already '
            "changes keys on every request; rotate moves the active key of sticky pools"
        )
    delta = Delta()
    for p in pools:
        delta.pool_add(p.name, "rotations")
    StateStore(settings.state_dir).commit(delta)
    print(f"rotate: {', '.join(p.name for p in pools)} (a running proxy applies it within 2 s)")
    for p in pools if settings.cluster else ():
        print(f"rotate: {cluster_view.announce(settings, 'rotate', [p.name], len(p.keys))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmi-rotor", description=__doc__, formatter_class=HELP_FORMAT
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="PATH", help="config file (default: as the addon)")
        return p

    st = with_config(
        sub.add_parser("status", help="each key's status and counters", formatter_class=HELP_FORMAT)
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until interrupted")
    st.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="seconds between refreshes (default: %(default)s)",
    )
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
    cli_init.register(sub)
    return parser


HELP_FORMAT = argparse.RawDescriptionHelpFormatter


def main(argv: Sequence[str] | None = None) -> int:
    own, passed = cli_env.split_kimi(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    if passed is not None:
        args.args = passed
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"kmi-rotor: {e}", file=sys.stderr)
        return 2
    except StateError as e:
        print(f"kmi-rotor: {one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `status --watch | head`: the reader left; so do we, quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
