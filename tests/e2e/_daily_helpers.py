"""Helpers for the daily-use tests: this checkout's `kmi-rotor` as a command on PATH, free ports."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from proctools import ROOT, clean_env


def cli_bin(folder: Path) -> Path:
    """A folder holding a `kmi-rotor` command that runs this checkout's CLI (the installed one
    may belong to another checkout); put it first on PATH to run the user's steps as written."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "kmi-rotor"
    exe.write_text(
        f'#!/bin/sh\nPYTHONPATH={ROOT / "addon"} exec {sys.executable} -m kmi_rotor.cli "$@"\n'
    )
    exe.chmod(0o755)
    return folder


def user_env(home: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """A new user's environment: an empty HOME, this checkout's `kmi-rotor` and the venv first
    on PATH, no proxy settings or CA bundles inherited from this machine."""
    home.mkdir(parents=True, exist_ok=True)
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = clean_env(HOME=str(home), PATH=path, **extra)
    env.pop("NODE_EXTRA_CA_CERTS", None)
    env.pop("NODE_USE_ENV_PROXY", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
