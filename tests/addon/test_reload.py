"""Live configuration through mitmproxy's test helpers: key files, `rotor.reload`, broken edits."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from mitmproxy.test import taddons

from kmi_rotor import presence
from kmi_rotor.addon import Rotor
from kmi_rotor.core.secrets import fingerprint

OLD, NEW = "sk-reload-old-000000000000000001", "sk-reload-new-000000000000000002"


def write(path: Path, text: str) -> None:
    path.write_text(text)


def config_text(state: Path, strategy: str = "round-robin") -> str:
    return (
        f'state_dir = "{state}"\n[[pools]]\nname = "p"\nprovider = "generic"\n'
        f'hosts = ["llm.test"]\nstrategy = "{strategy}"\n'
        '[[pools.keys]]\nlabel = "filed"\nkey_file = "filed.key"\n'
    )


async def eventually(check, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the timeout"
        await asyncio.sleep(0.05)


async def test_a_changed_key_file_and_rotor_reload_apply_without_a_restart(tmp_path: Path) -> None:
    cfg, keyfile = tmp_path / "rotor.toml", tmp_path / "filed.key"
    write(keyfile, OLD + "\n")
    write(cfg, config_text(tmp_path / "state"))
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(cfg))
        addon.watcher.start()
        try:
            assert addon.settings is not None
            assert addon.settings.keys[0].fingerprint == fingerprint(OLD)
            write(keyfile, NEW + "\n")  # the key file alone changes
            await eventually(lambda: addon.settings.keys[0].fingerprint == fingerprint(NEW))

            # An edit the file's identity does not show (same inode, size and mtime): only
            # rotor.reload picks it up.
            st = os.stat(cfg)
            text = config_text(tmp_path / "state", strategy="headroom")
            text = text.replace('"headroom"', '"headroom"   ')  # as long as "round-robin"
            assert len(text) == st.st_size
            with open(cfg, "r+") as f:
                f.write(text)
            os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
            await asyncio.sleep(1.2)
            assert addon.settings.pools[0].strategy == "round-robin"
            assert "reloading" in tctx.command(addon.commands.cmd_reload)
            await eventually(lambda: addon.settings.pools[0].strategy == "headroom")

            write(cfg, "[[pools]\n")  # broken: the last good configuration stays
            await eventually(lambda: addon.watcher.reload_error is not None)
            assert "malformed TOML" in addon.watcher.reload_error
            assert addon.settings.pools[0].strategy == "headroom"
            assert addon.snapshot()["config_error"] == addon.watcher.reload_error
            await eventually(lambda: (presence.read(tmp_path / "state") or {}).get("config_error"))
            doc = presence.read(tmp_path / "state")
            assert doc is not None and doc["pid"] == os.getpid()
            assert "malformed TOML" in doc["config_error"]
            assert NEW not in json.dumps(doc) and OLD not in json.dumps(doc)
        finally:
            addon.done()
    assert presence.read(tmp_path / "state", alive_only=False) is None  # removed at shutdown
