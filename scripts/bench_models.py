#!/usr/bin/env python3
"""Mixed-model load on a provider that limits per model (`bench_strategies.py --models`).

Four keys of an OpenAI-style provider (the fake, its "minute" compressed to one second); each
key has a limit of its own for each of two models, reported in OpenAI-style headers that
describe the model asked for. 80 % of the requests ask for `gpt-4o-mini`, 20 % for `gpt-4o`,
at a total rate that asks 1.2 times the mini model's capacity and 0.3 times the big one's.

The same load runs behind two kmi-rotors, round-robin without local limits:
- `per model`: the openai preset's `limit_scope = "model"`: each model's budgets and 429s
  held apart;
- `key-wide`: `limit_scope = "key"`: one budget per key, as if the provider limited per key.

For each model it prints what was sent, the client success rate, upstream 429s, and goodput:
requests of that model the provider served per second over the steady part of the run, as a
fraction of that model's capacity and of its offered rate.

    .venv/bin/python scripts/bench_strategies.py --models               # about 30 seconds
    .venv/bin/python scripts/bench_strategies.py --models --seconds 10

Everything runs on 127.0.0.1; the script asserts nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctools import ROOT, Mitmdump, Process, clean_env, spawn, start_mitmdump
from rotor_toml import pool, rotor_config

WINDOW = 1.0
KEYS = ("k1", "k2", "k3", "k4")
MODELS = {"gpt-4o-mini": 10, "gpt-4o": 10}
"""Each key's requests per window, per model."""
SHARE = {"gpt-4o-mini": 0.8, "gpt-4o": 0.2}
LOAD = 1.2
"""The total rate, as a multiple of the busy model's capacity share."""
MAX_WAIT = 2.0
SCOPES = (("per model", "model"), ("key-wide", "key"))


def secret(label: str) -> str:
    return f"sk-bench-models-{label}-" + "0" * 20


@dataclass
class ModelRow:
    setup: str
    model: str
    sent: int
    success: float
    upstream_429: int
    goodput: float
    """Provider-served requests per second, steady part, over the model's capacity."""
    of_offered: float
    """The same, over the rate the clients offered for this model."""


def capacity(model: str) -> float:
    return len(KEYS) * MODELS[model] / WINDOW


def total_rate() -> float:
    busy = max(SHARE, key=lambda m: SHARE[m])
    return LOAD * capacity(busy) / SHARE[busy]


def start_provider(work: Path) -> tuple[Process, str]:
    limits = {m: {"rpm": n} for m, n in MODELS.items()}
    keys = {secret(k): {"rpm": 100_000, "headers": "openai", "model_limits": limits} for k in KEYS}
    argv = [sys.executable, str(ROOT / "scripts" / "fake_provider.py")]
    argv += ["--keys", json.dumps(keys), "--time-scale", str(WINDOW / 60)]
    p = spawn(argv, clean_env(), work / "provider.log")
    return p, p.wait_for(r"fake-provider listening on (\S+)").group(1)


def start_proxy(work: Path, scope: str, upstream: str) -> Mitmdump:
    port = int(upstream.rsplit(":", 1)[1])
    spec = pool(
        "bench",
        [f"127.0.0.1:{port}"],
        {k: secret(k) for k in KEYS},
        provider="openai",
        strategy="round-robin",
        limit_scope=scope,
    )
    state = work / f"state-{scope}"
    cfg = rotor_config(work / f"{scope}.toml", state, [spec], limits={"max_wait_seconds": MAX_WAIT})
    return start_mitmdump(cfg, work / "mitm", work / f"{scope}.log", mode=f"reverse:{upstream}")


async def one(client: httpx.AsyncClient, model: str) -> tuple[str, int]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    try:
        return model, (await client.post("/v1/chat/completions", json=body)).status_code
    except httpx.HTTPError:
        return model, 0


async def drive(url: str, duration: float) -> list[tuple[str, int]]:
    """Requests evenly spaced at the total rate; every fifth one (20 %) for gpt-4o."""
    rate = total_rate()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=10.0, limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0, tasks = loop.time(), []
        for i in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
            model = "gpt-4o" if i % 5 == 4 else "gpt-4o-mini"
            tasks.append(asyncio.create_task(one(client, model)))
        return list(await asyncio.gather(*tasks))


def measure(
    setup: str, results: list[tuple[str, int]], log: list[dict[str, Any]], t0: float, seconds: float
) -> list[ModelRow]:
    rows = []
    for model in MODELS:
        mine = [s for m, s in results if m == model]
        seen = [r for r in log if isinstance(r["body"], dict) and r["body"].get("model") == model]
        steady = [r for r in seen if t0 + WINDOW <= r["time"] < t0 + seconds]
        per_s = sum(r["status"] == 200 for r in steady) / (seconds - WINDOW)
        rows.append(
            ModelRow(
                setup,
                model,
                len(mine),
                sum(s == 200 for s in mine) / max(1, len(mine)),
                sum(r["status"] == 429 for r in seen),
                per_s / capacity(model),
                per_s / (total_rate() * SHARE[model]),
            )
        )
    return rows


def run(scope: str, setup: str, work: Path, upstream: str, seconds: float) -> list[ModelRow]:
    proxy = start_proxy(work, scope, upstream)
    try:
        with httpx.Client(base_url=upstream, timeout=10) as admin:
            admin.post("/_fake/reset").raise_for_status()
            t0 = time.time()
            results = asyncio.run(drive(proxy.url, seconds))
            log = admin.get("/_fake/requests").json()
    finally:
        proxy.stop()
    print(f"  {setup}: done", file=sys.stderr, flush=True)
    return measure(setup, results, log, t0, seconds)


def table(rows: Sequence[ModelRow]) -> str:
    head = ("setup", "model", "sent", "success", "up429", "goodput/cap", "goodput/offered")
    body = [
        (
            r.setup,
            r.model,
            str(r.sent),
            f"{r.success:.1%}",
            str(r.upstream_429),
            f"{r.goodput:.2f}",
            f"{r.of_offered:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip()
        for b in (head, *body)
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(seconds: float = 10.0) -> int:
    rows: list[ModelRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        work = Path(tmp)
        provider, upstream = start_provider(work)
        try:
            for setup, scope in SCOPES:
                rows += run(scope, setup, work, upstream, seconds)
        finally:
            provider.stop()
    each = ", ".join(f"{m} {n}" for m, n in MODELS.items())
    print(
        f"pool: {len(KEYS)} keys, each limited per model ({each} requests per {WINDOW:g} s); "
        f"{total_rate():g} requests/s, "
        + ", ".join(f"{SHARE[m]:.0%} {m}" for m in MODELS)
        + f"; runs of {seconds:g} s, goodput over the last {seconds - WINDOW:g} s; "
        f"max_wait_seconds = {MAX_WAIT:g}"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0))
