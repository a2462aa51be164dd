#!/usr/bin/env python3
"""Streams through a pool with a revoked key and a rate-limited one (`bench_strategies.py
--stream` runs this).

Three keys behind one kmi-rotor (round-robin, no local limits): `revoked` answers 401 to
everything, `limited` allows 30 requests per "minute" (compressed to five seconds) and says
nothing of its budget until it answers 429 with a Retry-After, `healthy` allows 70 and reports
what is left in OpenAI-style headers. The pool's capacity is the two usable keys' 20 requests
per second. Without failover inside the proxy, each 401 and 429 would reach a client. Streaming clients without retries of their own (each request streamed to its end,
`[DONE]` included) ask for 0.8 of that. A request succeeds when its client got status 200 and
the whole stream; every failure of a key before the first byte must be hidden by failover.

It prints the success rate, what the provider saw (answers per key and status), the time to
first byte of the streams (median and 95th percentile) and how many attempts the trace
counted per request.

    .venv/bin/python scripts/bench_strategies.py --stream            # about 30 seconds
    .venv/bin/python scripts/bench_strategies.py --stream --seconds 60
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctools import ROOT, Process, clean_env, spawn, start_mitmdump

WINDOW = 5.0
KEYS = {
    "revoked": {"mode": "invalid"},
    "limited": {"rpm": 30, "headers": "none"},
    "healthy": {"rpm": 70, "headers": "openai"},
}
CAPACITY = 20.0
"""Requests per second the usable keys allow together."""
LOAD = 0.8
EVENTS, DELAY_MS = 5, 20
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "stream": True}


def secret(label: str) -> str:
    return f"sk-bench-{label}-" + "0" * 24


@dataclass
class Result:
    status: int
    whole: bool
    ttfb: float | None


def start_provider(work: Path) -> tuple[Process, str]:
    keys = {secret(k): v for k, v in KEYS.items()}
    argv = [sys.executable, str(ROOT / "scripts" / "fake_provider.py"), "--keys", json.dumps(keys)]
    argv += ["--time-scale", str(WINDOW / 60)]
    p = spawn(argv, clean_env(), work / "provider.log")
    return p, p.wait_for(r"fake-provider listening on (\S+)").group(1)


def config(work: Path, port: int) -> Path:
    lines = [f'state_dir = "{work / "state"}"', "[limits]", "max_wait_seconds = 2"]
    lines += ["[[pools]]", 'name = "bench"', 'provider = "generic"']
    lines += [f'hosts = ["127.0.0.1:{port}"]', 'strategy = "round-robin"']
    for label in KEYS:
        lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{secret(label)}"']
    path = work / "rotor.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def one(client: httpx.AsyncClient) -> Result:
    """One streamed request read to its end; no retry."""
    start = time.monotonic()
    ttfb: float | None = None
    headers = {"x-fake-events": str(EVENTS), "x-fake-delay-ms": str(DELAY_MS)}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=CHAT, headers=headers) as r:
            body = b""
            async for chunk in r.aiter_raw():
                if ttfb is None and r.status_code == 200:
                    ttfb = time.monotonic() - start
                body += chunk
            return Result(r.status_code, b"data: [DONE]" in body, ttfb)
    except httpx.HTTPError:
        return Result(0, False, ttfb)


async def drive(url: str, rate: float, duration: float) -> list[Result]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0, tasks = loop.time(), []
        for i in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one(client)))
        return list(await asyncio.gather(*tasks))


def report(results: list[Result], log: list[dict[str, Any]], trace: list[dict[str, Any]]) -> str:
    ok = [r for r in results if r.status == 200 and r.whole]
    label = {secret(k): k for k in KEYS}
    seen = Counter((label.get(r["credential"], "?"), r["status"]) for r in log)
    ttfbs = sorted(r.ttfb for r in ok if r.ttfb is not None)
    attempts = Counter(t.get("attempt", 1) for t in trace)
    statuses = Counter(r.status for r in results if not (r.status == 200 and r.whole))
    hidden = sum(n for a, n in attempts.items() if a > 1)
    lines = [
        f"streams: {len(results)} at {LOAD:.0%} of {CAPACITY:g}/s; "
        f"success {len(ok) / max(1, len(results)):.2%} ({len(ok)} whole streams)"
        + (f"; failed: {dict(statuses)}" if statuses else ""),
        "provider saw: " + ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(seen.items())),
        "trace attempts: " + ", ".join(f"#{a}: {n}" for a, n in sorted(attempts.items())),
        f"failures hidden from the clients by failover: {hidden} of {len(results)} streams",
    ]
    if ttfbs:
        p95 = ttfbs[int(0.95 * (len(ttfbs) - 1))]
        lines.append(
            f"first byte: median {ttfbs[len(ttfbs) // 2] * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
        )
    return "\n".join(lines)


def main(duration: float = 20.0) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        work = Path(tmp)
        provider, upstream = start_provider(work)
        try:
            port = int(upstream.rsplit(":", 1)[1])
            m = start_mitmdump(
                config(work, port), work / "mitm", work / "mitmdump.log", mode=f"reverse:{upstream}"
            )
            try:
                results = asyncio.run(drive(m.url, LOAD * CAPACITY, duration))
                with httpx.Client(base_url=upstream, timeout=10) as admin:
                    log = admin.get("/_fake/requests").json()
            finally:
                m.stop()
            trace_file = work / "state" / "trace.jsonl"
            trace = [json.loads(x) for x in trace_file.read_text().splitlines() if x.strip()]
        finally:
            provider.stop()
    print(report(results, log, trace))
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0))
