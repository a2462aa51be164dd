#!/usr/bin/env python3
"""Strategies under load: kmi-rotor's four strategies against a naive round-robin rotor.

The fake provider enforces a request limit per key and per "minute", time-compressed to one
second, and reports what is left in OpenAI-style headers (remaining, reset). Clients send at
a steady rate, first at about 60 % of the pool's capacity, then at about 200 %, for a bounded
time. Each configuration runs behind its own mitmdump, on the same keys and the same provider:

- `naive`: `scripts/naive_rotor.py`, blind round-robin injection (no health, limits, failover);
- each kmi-rotor strategy steered by the provider's headers alone (no local limits);
- round-robin with local limits set equal to the provider's, with and without waiting.

For each run it prints the client success rate (and the 95th percentile latency of the
successes: the cost of waiting), upstream 429s per 100 requests sent upstream,
goodput (requests the provider served per second, over the steady part of the run) as a
fraction of the pool's capacity and against the naive rotor, and the peak load of any key:
the most requests sent to one key within one window, over its limit (above 1.00 = over).

    .venv/bin/python scripts/bench_strategies.py            # under 2 minutes
    .venv/bin/python scripts/bench_strategies.py --quick    # under 20 seconds
    .venv/bin/python scripts/bench_strategies.py --stream   # streams failing over (see
                                                            # bench_failover.py)
    .venv/bin/python scripts/bench_strategies.py --models   # mixed models, limits per model
                                                            # (see bench_models.py)

Everything runs on 127.0.0.1. Figures are ratios measured in the same run (the machine is
shared and noisy); the script asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctools import MITMDUMP, ROOT, Mitmdump, Process, clean_env, spawn, start_mitmdump

WINDOW = 1.0
"""The provider's "minute", in seconds: one second, so that a local `requests_per_second`
can match the provider's limit exactly."""
LIMITS = {"k1": 8, "k2": 10, "k3": 10, "k4": 12}
"""Requests per window of each key; the pool's capacity is their sum per window."""
LOADS = (0.6, 2.0)
MAX_WAIT = 2.0
"""kmi-rotor's max_wait_seconds: two windows, long enough for a key to free up."""
CLIENT_TIMEOUT = 10.0
"""How long a client waits for an answer; a request still unanswered then is a failure."""
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def secret(label: str) -> str:
    return f"sk-bench-{label}-" + "0" * 24


@dataclass(frozen=True)
class Setup:
    name: str
    strategy: str | None
    """None: the naive rotor."""
    local_limits: bool = False
    max_wait: float = MAX_WAIT


SETUPS = (
    Setup("naive round-robin", None),
    Setup("round-robin", "round-robin"),
    Setup("headroom", "headroom"),
    Setup("sticky", "sticky"),
    Setup("weighted", "weighted"),
    Setup("round-robin + local limits", "round-robin", local_limits=True),
    Setup("round-robin + local limits, no wait", "round-robin", local_limits=True, max_wait=0),
)
QUICK = (SETUPS[0], SETUPS[5])


@dataclass
class Row:
    setup: str
    load: float
    sent: int
    success: float
    upstream_429_per_100: float
    goodput: float
    """Provider-served requests per second in the steady part, over the pool's capacity."""
    peak: float
    """Most requests sent to one key within one window, over that key's limit."""
    p95_ms: float


# -- processes ------------------------------------------------------------------------------------


def start_provider(work: Path) -> tuple[Process, str]:
    keys = {secret(k): {"rpm": n, "headers": "openai"} for k, n in LIMITS.items()}
    argv = [
        sys.executable,
        str(ROOT / "scripts" / "fake_provider.py"),
        "--keys",
        json.dumps(keys),
        "--time-scale",
        str(WINDOW / 60),
    ]
    p = spawn(argv, clean_env(), work / "provider.log")
    url = p.wait_for(r"fake-provider listening on (\S+)").group(1)
    return p, url


def rotor_config(work: Path, setup: Setup, port: int) -> Path:
    lines = [
        f'state_dir = "{work / "state" / setup.name.replace(" ", "_")}"',
        "[limits]",
        f"max_wait_seconds = {setup.max_wait}",
        "[[pools]]",
        'name = "bench"',
        'provider = "generic"',
        f'hosts = ["127.0.0.1:{port}"]',
        f'strategy = "{setup.strategy}"',
    ]
    for label, limit in LIMITS.items():
        lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{secret(label)}"']
        lines.append(f"weight = {limit}")
        if setup.local_limits:  # the provider's limit, per its time-compressed minute
            lines.append(f"limits = {{ requests_per_second = {int(limit / WINDOW)} }}")
    path = work / f"{setup.name.replace(' ', '_')}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_proxy(work: Path, confdir: Path, setup: Setup, upstream: str) -> Mitmdump:
    log = work / f"{setup.name.replace(' ', '_')}.log"
    port = int(upstream.rsplit(":", 1)[1])
    if setup.strategy is not None:
        cfg = rotor_config(work, setup, port)
        return start_mitmdump(cfg, confdir, log, mode=f"reverse:{upstream}")
    keys = work / "naive-keys.txt"
    keys.write_text("".join(secret(k) + "\n" for k in LIMITS))
    argv = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--mode", f"reverse:{upstream}"]
    argv += ["--set", f"confdir={confdir}", "-s", str(ROOT / "scripts" / "naive_rotor.py")]
    argv += ["--set", f"naive_keys_file={keys}", "--set", f"naive_host=127.0.0.1:{port}"]
    p = spawn(argv, clean_env(), log)
    m = p.wait_for(r"listening at (?:http://)?\[?([0-9a-f.:]+)\]?:(\d+)")
    return Mitmdump(p, m.group(1), int(m.group(2)))


# -- load -----------------------------------------------------------------------------------------


async def one(client: httpx.AsyncClient) -> tuple[int, float]:
    start = time.monotonic()
    try:
        r = await client.post("/v1/chat/completions", json=CHAT)
        status = r.status_code
    except httpx.HTTPError:
        status = 0
    return status, time.monotonic() - start


async def drive(url: str, rate: float, duration: float) -> list[tuple[int, float]]:
    """Send at `rate` per second, evenly spaced, for `duration` s; wait for every answer."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT, limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0, tasks = loop.time(), []
        for i in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one(client)))
        return list(await asyncio.gather(*tasks))


def peak(times: list[float], limit: int) -> float:
    """Most entries within any window, over `limit` (2 ms of slack for the two clocks)."""
    times, best, i = sorted(times), 0, 0
    for j, t in enumerate(times):
        while t - times[i] >= WINDOW - 0.002:
            i += 1
        best = max(best, j - i + 1)
    return best / limit


def measure(
    setup: Setup,
    load: float,
    results: list[tuple[int, float]],
    log: list[dict[str, Any]],
    t0: float,
    duration: float,
) -> Row:
    """One table row from the clients' answers and the provider's log of the run."""
    capacity = sum(LIMITS.values()) / WINDOW
    steady = [r for r in log if t0 + WINDOW <= r["time"] < t0 + duration]
    served = sum(1 for r in steady if r["status"] == 200)
    by_key: dict[str, list[float]] = defaultdict(list)
    for r in log:
        by_key[r["credential"]].append(r["time"])
    ok = sorted(lat for status, lat in results if status == 200)
    return Row(
        setup=setup.name,
        load=load,
        sent=len(results),
        success=len(ok) / max(1, len(results)),
        upstream_429_per_100=100 * sum(r["status"] == 429 for r in log) / max(1, len(log)),
        goodput=served / (duration - WINDOW) / capacity,
        peak=max(peak(by_key[secret(k)], n) for k, n in LIMITS.items()),
        p95_ms=1000 * ok[int(0.95 * (len(ok) - 1))] if ok else float("nan"),
    )


def run_setup(setup: Setup, work: Path, confdir: Path, upstream: str, duration: float) -> list[Row]:
    proxy = start_proxy(work, confdir, setup, upstream)
    rows = []
    try:
        with httpx.Client(base_url=upstream, timeout=10) as admin:
            for load in LOADS:
                admin.post("/_fake/reset").raise_for_status()
                t0 = time.time()
                rate = load * sum(LIMITS.values()) / WINDOW
                results = asyncio.run(drive(proxy.url, rate, duration))
                log = admin.get("/_fake/requests").json()
                rows.append(measure(setup, load, results, log, t0, duration))
                print(f"  {setup.name} at {load:.0%}: done", file=sys.stderr, flush=True)
    finally:
        proxy.stop()
    return rows


# -- report ---------------------------------------------------------------------------------------


def table(rows: Sequence[Row]) -> str:
    naive = {r.load: r.goodput for r in rows if r.setup == SETUPS[0].name}
    head = (
        "setup",
        "load",
        "sent",
        "success",
        "p95 ms",
        "up429/100",
        "goodput",
        "vs naive",
        "peak/limit",
    )
    body = [
        (
            r.setup,
            f"{r.load:.0%}",
            str(r.sent),
            f"{r.success:.1%}",
            f"{r.p95_ms:.0f}",
            f"{r.upstream_429_per_100:.1f}",
            f"{r.goodput:.2f}",
            f"{r.goodput / naive[r.load]:.2f}" if naive.get(r.load) else "-",
            f"{r.peak:.2f}" + (" OVER" if r.peak > 1.0 else ""),
        )
        for r in sorted(rows, key=lambda r: (r.load, [s.name for s in SETUPS].index(r.setup)))
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in body
    ]
    title = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    return "\n".join([title, "-" * len(title), *lines])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="two setups, short runs (< 20 s)")
    ap.add_argument("--seconds", type=float, help="length of each run (default 4, quick 2)")
    ap.add_argument("--only", action="append", help="run this setup (repeatable; naive always)")
    ap.add_argument(
        "--stream",
        action="store_true",
        help="streaming clients without retries, a revoked and a rate-limited key, 0.8 of "
        "capacity (bench_failover.py; --seconds default 20)",
    )
    ap.add_argument(
        "--models",
        action="store_true",
        help="two models limited apart on every key, 80%% of requests on one: goodput per "
        "model with limits held per model against key-wide (bench_models.py; --seconds "
        "default 10)",
    )
    args = ap.parse_args(argv)
    if args.models:
        import bench_models

        return bench_models.main(args.seconds or 10.0)
    if args.stream:
        import bench_failover

        return bench_failover.main(args.seconds or 20.0)
    duration = args.seconds or (2.0 if args.quick else 4.0)
    setups = QUICK if args.quick else SETUPS
    if args.only:
        setups = tuple(s for s in SETUPS if s.name in args.only or s == SETUPS[0])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-strategies-") as tmp:
        work = Path(tmp)
        provider, upstream = start_provider(work)
        try:
            for setup in setups:
                rows += run_setup(setup, work, work / "mitm", upstream, duration)
        finally:
            provider.stop()
    capacity = sum(LIMITS.values()) / WINDOW
    print(
        f"pool: {len(LIMITS)} keys, {capacity:g} requests/s in all "
        f"(limits {', '.join(map(str, LIMITS.values()))} per {WINDOW:g} s window); "
        f"runs of {duration:g} s, goodput over the last {duration - WINDOW:g} s; "
        f"max_wait_seconds = {MAX_WAIT:g} unless the setup says otherwise"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
