#!/usr/bin/env python3
"""Regenerate the README's screenshots from a real run: the fake provider, no real key.

- docs/status-page.png: the status page served by a real mitmdump with kmi-rotor, after a short
  mixed run (one key cooling after a 429, one disabled after a 401, quota from the provider's
  rate-limit headers and from Kimi Code's usage endpoint).
- docs/mitmweb-flow.png: mitmweb with kmi-rotor, its flow list showing kmi-rotor's comments
  (failovers, a local 429) and one flow's request with its key masked.

    .venv/bin/python scripts/screenshots.py [--out DIR]

Needs Chromium at /usr/bin/chromium. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import trustme
from proctools import BIN, ROOT, Mitmdump, clean_env, spawn, start_mitmdump, wait_until

import fake_provider
from fake_provider import FakeProvider, KeyBehaviour

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
KEYS = {
    "alpha": "sk-kimi-alpha-6c1f0e9a4b7d2c85e31a",
    "beta": "sk-kimi-beta-93ad5e7f20c4b1d68f52",
    "gamma": "sk-kimi-gamma-0b8e4d2a7c9f61e3a4d7",
    "delta": "sk-kimi-delta-5f2a9c7e1d3b80c46e19",
}
CHAT = "/coding/v1/chat/completions"
WORDS = "Refactor the retry loop so that a cancelled request releases its slot. " * 8


def chat_body(turn: int, stream: bool) -> dict[str, Any]:
    """A chat request whose size varies, so token counts look like real use."""
    content = WORDS * (2 + turn % 5)
    body: dict[str, Any] = {
        "model": "kimi-for-coding",
        "messages": [{"role": "user", "content": content}],
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def usages(used: int, limit: int, reset_in: float) -> dict[str, Any]:
    """Kimi Code's `/usages` answer for a plan with `limit` requests per cycle."""
    reset_at = datetime.fromtimestamp(time.time() + reset_in, UTC).isoformat()
    return {
        "usage": {"used": used, "limit": limit, "remaining": limit - used, "reset_at": reset_at}
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chromium(url: str, out: Path, size: str, *flags: str, budget_ms: int = 5000) -> None:
    """One headless Chromium run with a throw-away profile, writing a screenshot to `out`."""
    with tempfile.TemporaryDirectory(prefix="kmi-shot-") as profile:
        cmd = [
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size}",
            f"--screenshot={out}",
            *flags,
            url,
        ]
        subprocess.run(
            cmd, capture_output=True, timeout=90, check=True, env=os.environ | {"HOME": profile}
        )


def write_config(folder: Path, port: int, *extra: str) -> Path:
    """One kimi-code pool on the fake provider; its quota endpoint is the fake's too."""
    lines = [
        f'state_dir = "{folder / "state"}"',
        *extra,
        "[[pools]]",
        'name = "kimi"',
        'provider = "kimi-code"',
        f'hosts = ["127.0.0.1:{port}"]',
        f'usages_url = "https://127.0.0.1:{port}/coding/v1/usages"',
        "usage_poll_seconds = 2",
    ]
    for label, key in KEYS.items():
        lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{key}"']
    path = folder / "rotor.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


PLAN_USED = {"alpha": 1240, "beta": 1730, "gamma": 0, "delta": 310}


def behaviour(label: str, **changes: Any) -> KeyBehaviour:
    """A key of the fake: OpenAI-style rate-limit headers, a Kimi plan; gamma is revoked."""
    base: dict[str, Any] = {
        "headers": "openai",
        "rpm": 20,
        "tpm": 20_000,
        "mode": "invalid" if label == "gamma" else "ok",
        "usages": usages(PLAN_USED[label], 2000, 3 * 86400 + 7200),
    }
    return KeyBehaviour(**(base | changes))


@contextmanager
def fake_kimi(ca: trustme.CA) -> Iterator[FakeProvider]:
    provider = FakeProvider({KEYS[k]: behaviour(k) for k in KEYS}, tls=ca, event_delay=0.01)
    with fake_provider.run_in_thread(provider) as running:
        yield running


def send(client: httpx.Client, url: str, turn: int, stream: bool) -> int:
    """One chat completion (streamed bodies are read to the end); its status."""
    headers = {"x-fake-events": str(8 + turn * 7 % 40)}
    with client.stream("POST", url, json=chat_body(turn, stream), headers=headers) as r:
        r.read()
        return r.status_code


def drive(base: str, turns: int, client_kwargs: dict[str, Any] | None = None) -> list[int]:
    """`turns` requests one after another, every third one streamed; their statuses."""
    with httpx.Client(trust_env=False, timeout=60.0, **(client_kwargs or {})) as client:
        return [send(client, base + CHAT, turn, turn % 3 == 1) for turn in range(turns)]


def live_keys(m: Mitmdump) -> dict[str, dict[str, Any]]:
    snap = httpx.get(m.url + "/_kmi-rotor/api/status", trust_env=False).json()
    return {k["label"]: k for p in snap["pools"] for k in p["keys"]}


def quota_polled(m: Mitmdump) -> dict[str, dict[str, Any]] | None:
    """The live keys once the plan of every key that can answer has been read."""
    keys = live_keys(m)
    working = [k for label, k in keys.items() if label != "gamma"]
    polled = all(any(q["name"] == "requests:plan" for q in k["quota"]) for k in working)
    return keys if polled else None


def status_page(folder: Path, provider: FakeProvider, ca: Path, out: Path) -> None:
    """Run mitmdump in reverse mode, drive mixed traffic, screenshot the page it serves."""
    # beta answers three times, then a 429 that cools it down; gamma's first answer is a 401
    provider.set_keys({KEYS["beta"]: behaviour("beta", fail_next=[200, 200, 200, 429])})
    config = write_config(folder, provider.port, "[health]", "rate_limit_backoff = 75")
    m = start_mitmdump(
        config,
        folder / "mitmproxy",
        folder / "mitmdump.log",
        mode=f"reverse:{provider.url}",
        extra=("--set", f"ssl_verify_upstream_trusted_ca={ca}"),
    )
    try:
        statuses = drive(m.url, 16)
        states = wait_until(lambda: quota_polled(m), 15, "every working key's plan read", 0.1)
        print(f"status page: answers {statuses}")
        print("  " + ", ".join(f"{label} {k['status']}" for label, k in states.items()))
        chromium(m.url + "/_kmi-rotor/", out, "1280,1114")
    finally:
        m.stop()


WEB_LISTENING = re.compile(r"Web server listening at (http://127\.0\.0\.1:\d+)/\?token=(\w+)")
PROXY_LISTENING = re.compile(r"listening at 127\.0\.0\.1:(\d+)")
WEB_COLUMNS = ("tls", "icon", "path", "method", "status", "size", "time", "comment")


def start_mitmweb(folder: Path, config: Path, ca: Path, upstream: str) -> tuple[Any, str, str, str]:
    """mitmweb with kmi-rotor in reverse mode: (process, proxy URL, web URL, token)."""
    argv = [str(BIN / "mitmweb"), "--listen-host", "127.0.0.1", "-p", "0"]
    argv += ["--mode", f"reverse:{upstream}", "-s", str(ROOT / "addon" / "rotor.py")]
    argv += ["--web-host", "127.0.0.1", "--web-port", str(free_port())]
    options = {
        "web_open_browser": "false",
        "confdir": folder / "mitmproxy",
        "rotor_config": config,
        "ssl_verify_upstream_trusted_ca": ca,
    }
    for name, value in options.items():
        argv += ["--set", f"{name}={value}"]
    for column in WEB_COLUMNS:  # a sequence option: one --set per item
        argv += ["--set", f"web_columns={column}"]
    p = spawn(argv, clean_env(), folder / "mitmweb.log")
    proxy = p.wait_for(PROXY_LISTENING)
    web = p.wait_for(WEB_LISTENING)
    return p, f"http://127.0.0.1:{proxy.group(1)}", web.group(1), web.group(2)


def mitmweb_flows(folder: Path, provider: FakeProvider, ca: Path, out: Path) -> None:
    """A few requests through mitmweb (failovers, a local 429), then its UI in Chromium."""
    provider.set_keys({KEYS[k]: behaviour(k) for k in KEYS})
    provider.set_keys({KEYS["beta"]: behaviour("beta", fail_next=[429])})
    config = write_config(
        folder, provider.port, "[limits]", "max_wait_seconds = 0", "requests_per_minute = 7"
    )
    p, proxy, web, token = start_mitmweb(folder, config, ca, provider.url)
    try:
        statuses = drive(proxy, 7)
        print(f"mitmweb: answers {statuses}")
        auth = {"Authorization": f"Bearer {token}"}
        flows = wait_until(
            lambda: [
                f
                for f in httpx.get(web + "/flows", headers=auth, trust_env=False).json()
                if f.get("comment")
            ],
            10,
            "flows with comments",
            0.1,
        )
        for f in flows:
            print(f"  {f['response']['status_code'] if f.get('response') else '-'}  {f['comment']}")
        # Open the flow that failed over, on its Comment tab: the list's column is narrow.
        shown = next(f for f in flows if "retried on" in f["comment"])
        chromium(f"{web}/?token={token}#/flows/{shown['id']}/comment", out, "1440,480")
    finally:
        p.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"screenshots: {CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="kmi-rotor-shots-") as tmp:
        folder = Path(tmp)
        ca_path = folder / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        with fake_kimi(ca) as provider:
            (folder / "page").mkdir()
            status_page(folder / "page", provider, ca_path, args.out / "status-page.png")
            (folder / "web").mkdir()
            mitmweb_flows(folder / "web", provider, ca_path, args.out / "mitmweb-flow.png")
    print(f"wrote {args.out / 'status-page.png'} and {args.out / 'mitmweb-flow.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
