"""A demo of kmi-rotor against the bundled fake provider: no real key, no network."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
from proctools import BIN, clean_env, start_mitmdump

import fake_provider
from kmi_rotor.core.secrets import mask

DEMO_KEYS = {
    "alpha": "sk-demo-alpha-4f1c9a7e2b6d0a11",
    "beta": "sk-demo-beta-8e2d7c6b5a4f3e22",
    "gamma": "sk-demo-gamma-1a2b3c4d5e6f7a33",
}


def write_config(folder: Path, port: int) -> Path:
    lines = [
        f'state_dir = "{folder / "state"}"',
        "[[pools]]",
        'name = "demo"',
        'provider = "generic"',
        f'hosts = ["127.0.0.1:{port}"]',
        'strategy = "round-robin"',
    ]
    for label, key in DEMO_KEYS.items():
        lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{key}"']
    path = folder / "rotor.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kmi-rotor-demo-") as tmp:
        folder = Path(tmp)
        behaviours = {
            k: fake_provider.KeyBehaviour(headers="openai", rpm=100) for k in DEMO_KEYS.values()
        }
        # beta's first answer is a 429: kmi-rotor cools it down and retries on another key.
        behaviours[DEMO_KEYS["beta"]] = fake_provider.KeyBehaviour(
            fail_next=[429], headers="openai", rpm=100
        )
        provider = fake_provider.FakeProvider(behaviours, event_delay=0.15)
        with fake_provider.run_in_thread(provider):
            config = write_config(folder, provider.port)
            print(f"fake provider   {provider.url}  (keys: {', '.join(DEMO_KEYS)})")
            proxy = start_mitmdump(
                config,
                folder / "mitmproxy",
                folder / "mitmdump.log",
                mode=f"reverse:{provider.url}",
            )
            print(f"kmi-rotor       {proxy.url}  (mitmdump -s addon/rotor.py, reverse mode)\n")
            try:
                run_client(proxy.url, provider)
            finally:
                proxy.stop()
        print("\n$ kmi-rotor status")
        subprocess.run(
            [str(BIN / "kmi-rotor"), "status", "--config", str(config)], check=True, env=clean_env()
        )
    return 0


LABELS = {v: k for k, v in DEMO_KEYS.items()}


def run_client(proxy_url: str, provider: fake_provider.FakeProvider) -> None:
    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="placeholder", max_retries=0)
    seen = 0
    for i in range(1, 7):
        reply = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": f"request {i}"}]
        )
        attempts = provider.requests[seen:]
        seen += len(attempts)
        upstream = " then ".join(
            f"{LABELS.get(r.credential or '', '?')} ({mask(r.credential or '')}) -> {r.status}"
            for r in attempts
        )
        print(
            f"request {i}: client got {reply.choices[0].message.content[:20]!r}; upstream: {upstream}"
        )
    print("streamed request: ", end="", flush=True)
    start = time.monotonic()
    stream = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "stream"}],
        stream=True,
        extra_headers={"x-fake-events": "6"},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(f"[+{time.monotonic() - start:.2f}s]", end=" ", flush=True)
    print(
        f"\n  events arrived as they were generated; key {mask(provider.requests[-1].credential or '')}"
    )


if __name__ == "__main__":
    sys.exit(main())
