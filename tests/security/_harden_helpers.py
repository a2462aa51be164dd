"""Shared pieces of the hardening tests: real mitmdump processes against the fake provider,
and a search for a key in every form it could be written in."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from proctools import MITMDUMP, Mitmdump, clean_env, spawn, start_mitmdump

import fake_provider
from fake_provider import KeyBehaviour

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def secret(label: str) -> str:
    """A distinct, realistic-looking key for a label."""
    return f"sk-harden-{label}-" + "7" * 24


def write_config(
    path: Path,
    host: str,
    state_dir: Path,
    labels: Sequence[str],
    *,
    key_limits: dict[str, object] | None = None,
    extra: str = "",
) -> Path:
    """A rotor.toml with one pool `main` on `host` and keys `secret(label)`."""
    lines = [f'state_dir = "{state_dir}"', extra, "[[pools]]", 'name = "main"']
    lines += ['provider = "generic"', f'hosts = ["{host}"]']
    if key_limits:
        lines += ["[pools.key_limits]"] + [f"{k} = {v!r}" for k, v in key_limits.items()]
    for label in labels:
        lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{secret(label)}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def encodings(value: str) -> dict[str, bytes]:
    """`value` as it could sit in a file: raw, percent-encoded, hex, and base64 (standard and
    URL-safe) at each of the three alignments a longer base64 text could give it, without the
    characters that depend on its neighbours."""
    raw = value.encode()
    forms = {"raw": raw, "url": urllib.parse.quote(value, safe="").encode()}
    forms["hex"] = binascii.hexlify(raw)
    for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
        for shift in range(3):
            text = enc(b"\0" * shift + raw).rstrip(b"=")
            start = 4 if shift else 0
            end = len(text) - (len(text) % 4 or 4) if (shift + len(raw)) % 3 else len(text)
            forms[f"{name}+{shift}"] = text[start:end]
    return forms


def leaks(data: bytes, values: Sequence[str]) -> list[str]:
    """Every (value, form) found in `data`, case-insensitive for the hex form."""
    found = []
    lowered = data.lower()
    for v in values:
        for form, needle in encodings(v).items():
            hay = lowered if form == "hex" else data
            if needle and needle in hay:
                found.append(f"{v[:8]}… as {form}")
    return found


def make_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mitmproxy confdir with its CA made (generating it costs a second per process)."""
    confdir = tmp_path_factory.mktemp("harden-mitm-conf")
    p = spawn(
        [MITMDUMP, "--set", f"confdir={confdir}", "--listen-host", "127.0.0.1", "-p", "0"],
        clean_env(),
        confdir / "gen.log",
    )
    p.wait_for("listening at")
    p.stop()
    return confdir


def run_provider(
    labels: Sequence[str], **behaviour: object
) -> Iterator[fake_provider.FakeProvider]:
    """A plain-HTTP fake provider on 127.0.0.1 whose keys all behave alike."""
    keys = {secret(label): KeyBehaviour(**behaviour) for label in labels}  # type: ignore[arg-type]
    with fake_provider.run_in_thread(fake_provider.FakeProvider(keys, event_delay=0.01)) as fp:
        yield fp


def start_proxy(config: Path, confdir: Path, log: Path, provider_url: str, *extra: str) -> Mitmdump:
    return start_mitmdump(config, confdir, log, mode=f"reverse:{provider_url}", extra=extra)


__all__ = [
    "CHAT",
    "encodings",
    "leaks",
    "make_confdir",
    "run_provider",
    "secret",
    "start_proxy",
    "write_config",
]
