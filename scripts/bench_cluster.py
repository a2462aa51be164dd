#!/usr/bin/env python3
"""Scaling out: one kmi-rotor, three sharing a state folder, three sharing Redis, same load.

The fake provider holds 3 keys to 2 requests per sliding second each; every kmi-rotor has
those limits configured. Clients (the openai SDK, 2 retries) arrive as a Poisson process at
0.8 and 1.5 times the pool's capacity, spread evenly over the processes. Printed: client
success, upstream 429s per 100 requests, goodput (served per second over capacity) and the
most any key got in one second over its limit. The same again ("budgets only") with no
limit configured, against keys that tell their limit in every answer's rate-limit headers
(remaining, limit, reset: as a per-minute limit on a clock sped up 60 times, the same 2
requests per sliding second): only the provider's report paces them. Then the median time
one admission spends in Redis and the throughput of one process with and without [cluster]
(unlimited keys); not with --only, which runs only the setups it names.

    .venv/bin/python scripts/bench_cluster.py [--seconds 20] [--only "budgets"]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addon"))

import httpx2 as httpx
from cluster_load import KEYS, run, secret, start_provider, start_proxies, write_config
from proctools import MITMDUMP, clean_env, spawn
from redis_server import RedisServer

DEMANDS = (0.8, 1.5)


def confdir(work: Path) -> Path:
    d = work / "mitm"
    p = spawn(
        [MITMDUMP, "--set", f"confdir={d}", "--listen-host", "127.0.0.1", "-p", "0"],
        clean_env(),
        work / "gen.log",
    )
    p.wait_for("listening at")
    p.stop()
    return d


def setup_rows(
    work: Path,
    conf: Path,
    upstreams: tuple[str, str],
    redis: RedisServer,
    seconds: float,
    only: str,
) -> list:
    upstream, told = upstreams
    setups = {
        "one kmi-rotor": [write_config(work / "one.toml", upstream, work / "s-one")],
        "three sharing a state folder": [
            write_config(work / f"folder{i}.toml", upstream, work / "s-folder") for i in range(3)
        ],
        "three sharing Redis": [
            write_config(
                work / f"redis{i}.toml", upstream, work / f"s-redis{i}", redis_url=redis.url
            )
            for i in range(3)
        ],
        # Budgets only: no limit configured; the provider's rate-limit headers tell it.
        "one, budgets only": [
            write_config(work / "b-one.toml", told, work / "s-b-one", limits=False)
        ],
        "three Redis, budgets only": [
            write_config(
                work / f"b-redis{i}.toml",
                told,
                work / f"s-b-redis{i}",
                redis_url=redis.url,
                limits=False,
            )
            for i in range(3)
        ],
    }
    rows = []
    for name, cfgs in setups.items():
        if only not in name:
            continue
        target = told if "budgets" in name else upstream
        proxies = start_proxies(work, conf, cfgs, target, clean_env())
        try:
            time.sleep(1.0)  # let the heartbeats register every process
            for demand in DEMANDS:
                o = run(target, [m.url for m in proxies], demand, seconds)
                rows.append((name, demand, o))
                print(f"  {name} at {demand}: done", file=sys.stderr, flush=True)
        finally:
            for m in proxies:
                m.stop()
    return rows


async def admission_latency(redis: RedisServer, n: int = 2000) -> tuple[float, float]:
    """Median seconds of one admission: in Redis, and in process."""
    from kmi_rotor.cluster.limits import SharedLimits
    from kmi_rotor.cluster.settings import connect
    from kmi_rotor.core.limiter import Limiter, Limits

    limits = {fp: Limits(requests_per_second=10_000) for fp in KEYS}
    client = connect(redis.url)
    shared = SharedLimits(client, "bench", "b", 15.0)
    shared.configure(Limits(), limits, 0.015)
    await shared.warm()
    local = Limiter(Limits(), limits, guard=0.015)
    cands = [(fp, i) for i, fp in enumerate(KEYS)]
    remote_t, local_t = [], []
    for _ in range(n):
        t = time.perf_counter()
        await shared.admit(cands, 10, time.time())
        remote_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        local.try_admit(list(KEYS), 10, time.time())
        local_t.append(time.perf_counter() - t)
    await client.aclose()
    return statistics.median(remote_t), statistics.median(local_t)


def throughput(work: Path, conf: Path, upstream: str, redis: RedisServer, n: int = 800) -> dict:
    """Requests per second through one process, unlimited keys, 16 concurrent clients: the
    best of two blasts each, alternated (the machine is shared and noisy)."""
    out: dict[str, float] = {}
    for rep in range(2):
        for name, url in (("without Redis", None), ("with Redis", redis.url)):
            tag = f"{name[:4]}{rep}"
            cfg = write_config(
                work / f"tp-{tag}.toml", upstream, work / f"s-tp-{tag}", redis_url=url, limits=False
            )
            (proxy,) = start_proxies(work, conf, [cfg], upstream, clean_env())
            try:
                time.sleep(1.0)
                out[name] = max(out.get(name, 0.0), asyncio.run(_blast(proxy.url, n)))
            finally:
                proxy.stop()
    return out


async def _blast(url: str, n: int) -> float:
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:

        async def one() -> None:
            async with sem:
                await c.post("/v1/chat/completions", json={"model": "m", "messages": []})

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    ap.add_argument("--only", default="", help="run only the setups whose name has this")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        conf = confdir(work)
        provider, upstream = start_provider(work)
        teller, told = start_provider(work, told=True)
        redis = RedisServer(work / "redis")
        redis.start()
        try:
            rows = setup_rows(work, conf, (upstream, told), redis, args.seconds, args.only)
            if not args.only:
                # Unlimited keys at the provider for the throughput runs.
                with httpx.Client(base_url=upstream, timeout=10) as admin:
                    admin.post("/_fake/keys", json={secret(k): {} for k in KEYS}).raise_for_status()
                tp = throughput(work, conf, upstream, redis)
                remote, local = asyncio.run(admission_latency(redis))
        finally:
            redis.stop()
            teller.stop()
            provider.stop()
    print(
        f"3 keys x 2 req/s (sliding 1 s), Poisson arrivals, openai SDK 2 retries, "
        f"{args.seconds:g} s per run"
    )
    print(
        f"{'setup':30} {'demand':>6} {'sent':>5} {'success':>8} {'up429/100':>9} "
        f"{'goodput':>7} {'peak/limit':>10}"
    )
    for name, demand, o in rows:
        print(
            f"{name:30} {demand:>6} {o.sent:>5} {o.success:>8.1%} "
            f"{o.upstream_429_per_100:>9.1f} {o.goodput():>7.2f} {o.peak():>10.2f}"
        )
    if not args.only:
        print(
            f"admission, median: {remote * 1000:.3f} ms in Redis, {local * 1000:.3f} ms in process"
            f" (Redis adds {(remote - local) * 1000:.3f} ms)"
        )
        print(
            "throughput of one process, unlimited keys: "
            + ", ".join(f"{k} {v:.0f} req/s" for k, v in tp.items())
            + f" (with/without {tp['with Redis'] / tp['without Redis']:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
