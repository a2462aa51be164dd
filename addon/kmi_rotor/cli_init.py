"""`kmi-rotor init`: a commented starter `rotor.toml`, with the keys already on this machine.

Keys found in the Kimi CLI's `~/.kimi/config.toml` or an `_auths` folder of the older tool are
referenced where they are (`kimi_config`, `auths_dir`: the proxy reads them there, and reloads
when they change) or, with `--inline`, copied into the file, which is then private (0600). An
existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import auths
from .config import DEFAULT_STATE_DIR, ConfigError

KIMI_CONFIG = "~/.kimi/config.toml"
AUTHS_DIRS = ("~/.kmi/_auths", "./_auths")

HEADER = """\
# kmi-rotor configuration: a pool of keys behind one endpoint. Every field is in the README
# ("Configure"). A running proxy applies an edit of this file within 2 s.

state_dir = "{state_dir}"        # state.json and trace.jsonl live here

[limits]                          # the whole proxy; absent = unlimited
# requests_per_second = 20
# concurrency = 64
max_wait_seconds = 30             # longest a request may wait for capacity; 0 = never wait

[failover]
max_attempts = 3                  # tries per request, the first included
"""

EXAMPLE_POOL = """
# No key was found on this machine: put yours here (or in a file: key_file = "~/.secrets/k1").
[[pools]]
name = "kimi"
provider = "kimi-code"            # or moonshot, openai, anthropic, openrouter, groq, gemini...
strategy = "round-robin"          # or headroom, sticky, weighted

# [pools.key_limits]              # each key's own limits, if the provider's are not enough
# requests_per_minute = 20

[[pools.keys]]
label = "first"
key_env = "KIMI_API_KEY"          # exactly one of key, key_env, key_file
"""


@dataclass
class Found:
    """What init found: where the keys are (references) or the keys themselves (inline)."""

    references: list[tuple[str, str]] = field(default_factory=list)
    keys: list[auths.FoundKey] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def discover(kimi_config: str, auths_dirs: list[str], inline: bool) -> Found:
    """Look for keys: the Kimi CLI's config, then the first `_auths` folder that holds keys.
    A source whose keys were all found already is not used twice (keys are unique)."""
    found = Found()
    secrets: set[str] = set()
    sources = [("kimi_config", kimi_config, auths.read_kimi)]
    sources += [("auths_dir", d, auths.read_folder) for d in auths_dirs]
    for source_field, where, read in sources:
        path = Path(where).expanduser().resolve()
        if not path.exists() or any(f == source_field for f, _ in found.references):
            continue
        try:
            keys = read(path)
        except auths.AuthsError as e:
            found.notes.append(f"skipped {where}: {e}")
            continue
        values = {k.secret.get_secret_value() for k in keys}
        if values & secrets and not inline:
            found.notes.append(f"skipped {where}: it holds keys found already")
            continue
        fresh = [k for k in keys if k.secret.get_secret_value() not in secrets]
        secrets |= values
        if not fresh:
            continue
        if inline:
            found.keys += fresh
        else:
            found.references.append((source_field, str(path)))
        how = "copied in" if inline else "by reference"
        labels = ", ".join(k.label for k in fresh)
        found.notes.append(f"{len(fresh)} key(s) from {where} {how} ({labels})")
    return found


def render(found: Found, state_dir: str) -> str:
    """The file's text: the commented header, then the pool of the keys found (or an example)."""
    if not found.references and not found.keys:
        return HEADER.format(state_dir=state_dir) + EXAMPLE_POOL
    lines = ["", "[[pools]]", 'name = "kimi"', 'provider = "kimi-code"']
    lines.append('strategy = "round-robin"          # or headroom, sticky, weighted')
    lines += [f"{name} = {_toml(where)}" for name, where in found.references]
    for k in found.keys:
        lines += ["", "[[pools.keys]]", f"label = {_toml(k.label)}"]
        lines.append(f"key = {_toml(k.secret.get_secret_value())}")
        if k.disabled:
            lines.append("disabled = true")
    return HEADER.format(state_dir=state_dir) + "\n".join(lines) + "\n"


def write_new(path: Path, text: str) -> None:
    """Create `path` (0600, in a 0700 folder); never replace an existing file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"{path} exists already; it is left as it is (--path PATH for another)"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot create {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser()
    dirs = [args.auths_dir] if args.auths_dir else list(AUTHS_DIRS)
    found = discover(args.kimi_config, dirs, args.inline)
    write_new(path, render(found, DEFAULT_STATE_DIR))
    print(f"kmi-rotor: wrote {path}" + (" (0600: it holds keys)" if args.inline else ""))
    for note in found.notes:
        print(f"  {note}")
    if not found.references and not found.keys:
        print("  no key found: edit the example pool (KIMI_API_KEY) before starting the proxy")
    print(
        'next: scripts/serve, then in a client\'s shell: eval "$(kmi-rotor env)"', file=sys.stderr
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "init",
        help="write a commented starter rotor.toml with the keys found on this machine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--path",
        default=f"{DEFAULT_STATE_DIR}/rotor.toml",
        help="where to write it (default: %(default)s); an existing file is never replaced",
    )
    p.add_argument(
        "--kimi-config", default=KIMI_CONFIG, help="the Kimi CLI's config (default: %(default)s)"
    )
    p.add_argument(
        "--auths-dir",
        default=None,
        help=f"the older tool's key folder (default: {' or '.join(AUTHS_DIRS)})",
    )
    p.add_argument(
        "--inline",
        action="store_true",
        help="copy the keys into the file (0600) instead of referencing where they are",
    )
    p.set_defaults(func=cmd_init)
