"""`<state_dir>/proxy.json`: what a running proxy tells the CLI about itself.

Its process id, where it listens (so `kmi-rotor env` finds the port), which configuration it
runs, and what is wrong with a newer one it could not apply (so `kmi-rotor status` can say so).
Written by the proxy from a thread, read by the CLI; never holds a secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FILE = "proxy.json"


def listening(servers: Any) -> list[dict[str, Any]]:
    """Each server of mitmproxy's proxyserver addon: its mode and the addresses it listens on."""
    out = []
    for instance in servers or ():
        mode = instance.mode
        out.append(
            {
                "mode": mode.type_name,
                "spec": mode.full_spec,
                "addresses": [[str(a[0]), int(a[1])] for a in instance.listen_addrs],
            }
        )
    return out


def write(state_dir: Path, doc: dict[str, Any]) -> None:
    """Replace the file atomically (0600, like the state). Blocking: call it from a thread."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".proxy.", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, state_dir / FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(state_dir: Path, pid: int) -> None:
    """Remove the file at shutdown, if it is still this process's."""
    doc = read(state_dir, alive_only=False)
    if doc is not None and doc.get("pid") == pid:
        with contextlib.suppress(OSError):
            (state_dir / FILE).unlink()


def read(state_dir: Path, *, alive_only: bool = True) -> dict[str, Any] | None:
    """The running proxy's file; None when there is none, it is unreadable, or (with
    `alive_only`) its process has ended."""
    try:
        doc = json.loads((state_dir / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int):
        return None
    if alive_only and not _alive(doc["pid"]):
        return None
    return doc


def regular_port(doc: dict[str, Any] | None) -> int | None:
    """The port of the proxy's first regular-mode server (what HTTPS_PROXY points at)."""
    for server in (doc or {}).get("servers", []):
        if isinstance(server, dict) and server.get("mode") == "regular":
            for address in server.get("addresses", []):
                if isinstance(address, list) and len(address) == 2 and isinstance(address[1], int):
                    return address[1]
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True
