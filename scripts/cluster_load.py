"""Several kmi-rotor processes in front of one fake provider, under Poisson load from the openai
SDK: what `bench_cluster.py` prints and what the cluster's end-to-end tests assert."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctools import ROOT, Mitmdump, Process, clean_env, spawn, start_mitmdump

KEYS = {"k1": 2, "k2": 2, "k3": 2}
"""Requests per second each key takes at the provider (sliding one-second windows)."""
CAPACITY = float(sum(KEYS.values()))
CHAT = [{"role": "user", "content": "hello"}]
GUARD = 0.03
"""Each window enforced 30 ms longer: on a shared, loaded machine the time between admission
and the provider's count varies by more than the default 15 ms."""


def secret(label: str) -> str:
    return f"sk-cluster-{label}-" + "0" * 24


def start_provider(work: Path, *, told: bool = False) -> tuple[Process, str]:
    """The fake provider holding KEYS. `told`: the same limits, but told in every answer's
    rate-limit headers (limit, remaining, reset: OpenAI's), as a per-minute limit on a clock
    sped up 60 times, so that the headers are all a proxy has to go by."""
    field = "rpm" if told else "rps"
    keys = {secret(k): {field: n, "headers": "openai"} for k, n in KEYS.items()}
    argv = [sys.executable, str(ROOT / "scripts" / "fake_provider.py"), "--keys", json.dumps(keys)]
    if told:
        argv += ["--time-scale", repr(1 / 60)]
    log = work / ("provider-told.log" if told else "provider.log")
    p = spawn(argv, clean_env(), log)
    return p, p.wait_for(r"fake-provider listening on (\S+)").group(1)


def write_config(
    path: Path,
    upstream: str,
    state_dir: Path,
    *,
    redis_url: str | None = None,
    lease: float | None = None,
    limits: bool = True,
    concurrency: int | None = None,
    on_redis_down: str = "local",
    max_wait: float = 10.0,
    guard: float = GUARD,
) -> Path:
    """A generic pool of KEYS on the provider, with each key's limit configured (`limits`)."""
    port = upstream.rsplit(":", 1)[1]
    lines = [
        f'state_dir = "{state_dir}"',
        "[limits]",
        f"max_wait_seconds = {max_wait}",
        f"guard = {guard}",
    ]
    if redis_url:
        lines += ["[cluster]", f'redis_url = "{redis_url}"', f'on_redis_down = "{on_redis_down}"']
        if lease is not None:
            lines.append(f"lease_seconds = {lease}")
    lines += [
        "[[pools]]",
        'name = "team"',
        'provider = "generic"',
        f'hosts = ["127.0.0.1:{port}"]',
        'strategy = "round-robin"',
    ]
    for label, n in KEYS.items():
        lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{secret(label)}"']
        own = [f"requests_per_second = {n}"] if limits else []
        if concurrency is not None:
            own.append(f"concurrency = {concurrency}")
        if own:
            lines.append(f"limits = {{ {', '.join(own)} }}")
    path.write_text("\n".join(lines) + "\n")
    return path


def start_proxies(
    work: Path, confdir: Path, configs: Sequence[Path], upstream: str, env: dict[str, str]
) -> list[Mitmdump]:
    out: list[Mitmdump] = []
    try:
        for i, cfg in enumerate(configs):
            out.append(
                start_mitmdump(
                    cfg, confdir, work / f"{cfg.stem}-{i}.log", mode=f"reverse:{upstream}", env=env
                )
            )
    except BaseException:
        for m in out:
            m.stop()
        raise
    return out


@dataclass
class Outcome:
    sent: int
    ok: int
    upstream: list[dict[str, Any]]
    """The provider's log of the run: time, credential, status."""
    seconds: float
    latencies: list[float]

    @property
    def success(self) -> float:
        return self.ok / max(1, self.sent)

    @property
    def upstream_429_per_100(self) -> float:
        return 100 * sum(r["status"] == 429 for r in self.upstream) / max(1, self.sent)

    def goodput(self, settle: float = 1.0) -> float:
        """Requests the provider served per second over the run's steady part, per capacity."""
        times = sorted(r["time"] for r in self.upstream if r["status"] == 200)
        if len(times) < 2:
            return 0.0
        steady = [t for t in times if times[0] + settle <= t <= times[0] + self.seconds]
        return len(steady) / max(1e-9, self.seconds - settle) / CAPACITY

    def refusals(self) -> list[list[tuple[float, int]]]:
        """For each upstream 429: the key's arrivals within the second before it (offset from
        the 429, status): what to look at when a limit was overrun."""
        out = []
        for r in self.upstream:
            if r["status"] == 429:
                near = [
                    (round(x["time"] - r["time"], 4), x["status"])
                    for x in self.upstream
                    if x["credential"] == r["credential"] and -1.1 < x["time"] - r["time"] <= 0
                ]
                out.append(near)
        return out

    def peak(self, slack: float = 0.002) -> float:
        """Most requests any key received within any one-second window, over its limit;
        arrivals closer than `slack` to a second apart count as a second apart (the jitter
        between admission and arrival that the guard absorbs)."""
        by_key: dict[str, list[float]] = defaultdict(list)
        for r in self.upstream:
            by_key[r["credential"]].append(r["time"])
        worst = 0.0
        for label, limit in KEYS.items():
            times, i, best = sorted(by_key[secret(label)]), 0, 0
            for j, t in enumerate(times):
                while t - times[i] >= 1.0 - slack:
                    i += 1
                best = max(best, j - i + 1)
            worst = max(worst, best / limit)
        return worst


async def drive(
    urls: Sequence[str], demand: float, seconds: float, *, seed: int = 7, timeout: float = 30.0
) -> tuple[int, list[float]]:
    """Poisson arrivals at `demand` x capacity for `seconds`, spread evenly over `urls`, each
    through the openai SDK with 2 retries; returns successes and their latencies."""
    rng = random.Random(seed)
    clients = [
        openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=2, timeout=timeout)
        for u in urls
    ]
    latencies: list[float] = []

    async def one(client: openai.AsyncOpenAI) -> None:
        start = time.monotonic()
        try:
            await client.chat.completions.create(model="fake-model", messages=CHAT)  # type: ignore[arg-type]
        except openai.OpenAIError:
            return
        latencies.append(time.monotonic() - start)

    loop = asyncio.get_running_loop()
    tasks, at, t0 = [], 0.0, loop.time()
    while True:
        at += rng.expovariate(demand * CAPACITY)
        if at >= seconds:
            break
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        tasks.append(asyncio.create_task(one(clients[len(tasks) % len(clients)])))
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    return len(tasks), latencies


def run(upstream: str, urls: Sequence[str], demand: float, seconds: float) -> Outcome:
    """One run: the provider's windows and log reset first."""
    with httpx.Client(base_url=upstream, timeout=10) as admin:
        admin.post("/_fake/reset").raise_for_status()
        sent, latencies = asyncio.run(drive(urls, demand, seconds))
        log = admin.get("/_fake/requests").json()
    return Outcome(sent, len(latencies), log, seconds, latencies)
