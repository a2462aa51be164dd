"""Admission control: what a decision costs, and how close the limits let traffic get to them.

(a) In process: CPU µs per `Engine.decide` + `Engine.settle` with 10, 100 and 1,000 keys, each
    key and the whole proxy limited, the injected clock advancing so that limits rarely bind;
    again with the first half of the keys exhausted. Baseline: the strategy alone
    (`RoundRobin.pick`) over the same keys, timed in the same batches.
(b) End to end: a real mitmdump before the fake provider, 3 keys x requests_per_second = 5,
    clients offering about twice that for a while. Reported: upstream rate / configured capacity
    over the steady part, the largest count in any sliding one-second window per key (the
    provider's log) against its limit, and the clients' success rate. Baseline: the same load
    through the same proxy to a pool without limits (achieved / offered), so a machine too
    slow to carry the load shows as such.

    .venv/bin/python scripts/bench_admission.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "addon", ROOT / "scripts", ROOT / "tests" / "e2e"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import aiohttp  # noqa: E402
from _admission_helpers import chat_body, max_in_window  # noqa: E402
from proctools import start_mitmdump  # noqa: E402

import fake_provider  # noqa: E402
from kmi_rotor.config import Pool, from_dict  # noqa: E402
from kmi_rotor.core.rotation import RoundRobin  # noqa: E402
from kmi_rotor.engine import Chosen, Engine  # noqa: E402

KEY_LIMITS = {
    "requests_per_second": 5,
    "requests_per_minute": 300,
    "tokens_per_minute": 1_000_000,
    "concurrency": 2,
}
GLOBAL_LIMITS = {
    "requests_per_second": 100_000,
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 1_000_000_000,
    "concurrency": 10_000,
}
TOKENS, USED = 300, 250
T0 = 1_700_000_000.0

# -- (a) the decision's cost ----------------------------------------------------------------------


def build(n: int, exhausted: bool) -> tuple[Engine, Pool]:
    """An engine over one pool of `n` limited keys; with `exhausted`, the first half of them
    have used their one request of the day."""
    keys = []
    for i in range(n):
        limits = dict(KEY_LIMITS)
        if exhausted and i < n // 2:
            limits["requests_per_day"] = 1
        keys.append({"label": f"k{i}", "key": f"sk-bench-{i:06d}-{'x' * 24}", "limits": limits})
    raw = {
        "limits": {**GLOBAL_LIMITS, "max_wait_seconds": 0},
        "pools": [{"name": "p", "provider": "generic", "hosts": ["127.0.0.1:9"], "keys": keys}],
    }
    settings = from_dict(raw, Path(tempfile.gettempdir()) / "bench-admission.toml", {})
    engine = Engine(settings)
    pool = settings.pools[0]
    for k in pool.keys[: n // 2] if exhausted else ():
        admitted = engine.limiter.try_admit([k.fingerprint], TOKENS, T0 - 1.0)
        engine.limiter.release(admitted.reservation)  # type: ignore[union-attr]
    return engine, pool


def time_engine(engine: Engine, pool: Pool, iters: int, clock: list[float], step: float) -> float:
    """CPU µs per decide + settle; `clock` carries the injected time from batch to batch."""
    decide, settle, now = engine.decide, engine.settle, clock[0]
    refused = 0
    start = time.thread_time()
    for _ in range(iters):
        d = decide(pool, TOKENS, now, deadline=now)
        if isinstance(d, Chosen):
            settle(d.key, d.reservation, USED)
        else:
            refused += 1
        now += step
    elapsed = time.thread_time() - start
    clock[0], clock[1] = now, clock[1] + refused
    return elapsed / iters * 1e6


def time_strategy(rr: RoundRobin, pool: Pool, iters: int, skip: frozenset[str]) -> float:
    """CPU µs per pick of a key outside `skip`; `rr` keeps its cursor from batch to batch, as the
    engine's strategy does."""
    keys = pool.keys
    ready: Callable[[Any], bool] = lambda k: k.fingerprint not in skip  # noqa: E731
    start = time.thread_time()
    for _ in range(iters):
        rr.pick(keys, ready)
    return (time.thread_time() - start) / iters * 1e6


@dataclass
class CostRow:
    keys: int
    variant: str
    engine_us: float
    strategy_us: float
    refused: float


def measure_cost(n: int, exhausted: bool, iters: int, batches: int) -> CostRow:
    """Best of interleaved batches (both sides see the same moments of a shared machine). A
    batch walks whole cycles of the round-robin cursor: the strategy's cost depends on where
    the cursor stands, so a partial cycle would favour some batches."""
    iters = n * -(-iters // n)
    engine, pool = build(n, exhausted)
    # Each usable key is asked about 4 times a second: under its 5/s, 300/min, 2 in flight.
    step, clock = 0.25 / (n - n // 2 if exhausted else n), [T0, 0.0]
    # Both walk the same cursor positions (the strategy's cost depends on where it stands).
    # With keys exhausted, the strategy alone skips the same keys (as if it knew).
    skip = frozenset(k.fingerprint for k in pool.keys[: n // 2]) if exhausted else frozenset()
    rr = RoundRobin()
    time_engine(engine, pool, iters // 4, clock, step)  # warm-up
    time_strategy(rr, pool, iters // 4, skip)
    clock[1] = 0.0
    eng, strat = [], []
    for _ in range(batches):
        eng.append(time_engine(engine, pool, iters, clock, step))
        strat.append(time_strategy(rr, pool, iters, skip))
    variant = "first half exhausted" if exhausted else "limits rarely bind"
    return CostRow(n, variant, min(eng), min(strat), clock[1] / (iters * batches))


def print_costs(rows: Sequence[CostRow]) -> None:
    print("\n(a) admission decision (decide + settle) vs the strategy alone (RoundRobin.pick),")
    print("    CPU µs per request (thread time: a shared machine's other load does not count),")
    print("    best of interleaved batches; 'beyond' = engine - strategy")
    head = f"{'keys':>6}  {'variant':<22}{'engine':>9}{'strategy':>10}{'ratio':>8}{'beyond':>9}"
    print(head + f"{'engine vs 10 keys':>19}{'refused':>9}")
    first: dict[str, float] = {}
    for r in rows:
        base = first.setdefault(r.variant, r.engine_us)
        print(
            f"{r.keys:>6}  {r.variant:<22}{r.engine_us:>9.2f}{r.strategy_us:>10.2f}"
            f"{r.engine_us / r.strategy_us:>7.1f}x{r.engine_us - r.strategy_us:>9.2f}"
            f"{r.engine_us / base:>18.2f}x{r.refused:>9.1%}"
        )


# -- (b) achieved rate through a real proxy --------------------------------------------------------


@dataclass
class Offered:
    statuses: list[int]
    latencies: list[float]
    sent: list[float]

    @property
    def rate(self) -> float:
        """The rate actually offered (the sender may fall behind on a busy machine)."""
        return (len(self.sent) - 1) / max(1e-9, max(self.sent) - min(self.sent))


async def offer(url: str, proxy: str, rate: float, seconds: float, timeout: float) -> Offered:
    """Open loop through `proxy`: one new request every 1/rate s for `seconds`, each on its
    own connection (as separate clients would), whatever the earlier ones are doing."""
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        sent: list[float] = []

        async def one(i: int) -> tuple[int, float]:
            t = time.monotonic()
            sent.append(time.time())
            try:
                async with session.post(
                    url + "/v1/chat/completions",
                    data=chat_body(f"bench-{i}"),
                    headers={"authorization": "Bearer x", "content-type": "application/json"},
                    proxy=proxy,
                ) as r:
                    await r.read()
                    return r.status, time.monotonic() - t
            except (aiohttp.ClientError, TimeoutError):
                return 0, time.monotonic() - t

        loop, tasks = asyncio.get_running_loop(), []
        started = loop.time()
        for i in range(round(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one(i)))
        done = await asyncio.gather(*tasks)
    return Offered([s for s, _ in done], [lat for _, lat in done], sent)


Run = tuple[Offered, list[Any]]
"""What clients got, and the provider's request log."""


def steady_rate(times: Sequence[float]) -> float:
    """Mean count in a sliding one-second window, over the part where the backlog keeps the
    proxy busy: from a second after the first upstream request to a second before the last."""
    ts = sorted(times)
    lo, hi = ts[0] + 1.0, ts[-1] - 1.0
    if hi <= lo:
        return float("nan")
    samples, t, j, i = [], lo, 0, 0
    while t < hi:
        while i < len(ts) and ts[i] < t:
            i += 1
        j = max(j, i)
        while j < len(ts) and ts[j] < t + 1.0:
            j += 1
        samples.append(j - i)
        t += 0.005
    return statistics.fmean(samples)


def write_config(work: Path, pools: dict[str, tuple[int, dict[str, str], int | None]]) -> Path:
    """Pools by name: (provider port, label -> key, requests_per_second per key or None)."""
    lines = [f'state_dir = "{work / "state"}"', "[limits]", "max_wait_seconds = 120"]
    for name, (port, keys, rps) in pools.items():
        lines += ["[[pools]]", f'name = "{name}"', 'provider = "generic"']
        lines.append(f'hosts = ["127.0.0.1:{port}"]')
        if rps is not None:
            lines.append(f"key_limits = {{ requests_per_second = {rps} }}")
        for label, key in keys.items():
            lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{key}"']
    path = work / "rotor.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_through_proxy(
    work: Path, rate: float, seconds: float, base_seconds: float
) -> tuple[Run, Run]:
    """One mitmdump (regular mode) in front of two fake providers of 3 keys each: pool `free`
    without limits, pool `limited` at 5 req/s per key. Offer `rate` req/s to the first for
    `base_seconds`, then to the second for `seconds`; waiting is allowed for two minutes."""
    keys = {
        pool: {f"{pool}{i}": f"sk-bench-{pool}-{i}-{'y' * 24}" for i in range(3)}
        for pool in ("free", "limited")
    }
    fakes = {
        pool: fake_provider.FakeProvider({k: fake_provider.KeyBehaviour() for k in ks.values()})
        for pool, ks in keys.items()
    }
    with (
        fake_provider.run_in_thread(fakes["free"]) as free,
        fake_provider.run_in_thread(fakes["limited"]) as limited,
    ):
        cfg = write_config(
            work,
            {
                "free": (free.port, keys["free"], None),
                "limited": (limited.port, keys["limited"], 5),
            },
        )
        m = start_mitmdump(cfg, work / "mitm", work / "mitmdump.log")
        try:
            base = asyncio.run(offer(free.url, m.url, rate, base_seconds, timeout=150))
            result = asyncio.run(offer(limited.url, m.url, rate, seconds, timeout=150))
        finally:
            m.stop()
        return (result, limited.requests), (base, free.requests)


def print_live(capacity: float, rate: float, limited: Run, base: Run) -> None:
    off, reqs = limited
    b_off, b_reqs = base
    achieved = steady_rate([r.time for r in reqs])
    per_key = {}
    for r in reqs:
        per_key.setdefault(r.credential, []).append(r.time)
    worst = max(max_in_window(v) for v in per_key.values())
    # The shortest time in which the provider saw limit + 1 requests on one key (>= 1 s: fine).
    tightest = min(
        (ts[i + 5] - ts[i] for ts in map(sorted, per_key.values()) for i in range(len(ts) - 5)),
        default=float("nan"),
    )
    ok = sum(s == 200 for s in off.statuses)
    span = max(r.time for r in b_reqs) - min(r.time for r in b_reqs)
    b_rate = (len(b_reqs) - 1) / max(1e-9, span)
    lat = sorted(off.latencies)
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"\n(b) 3 keys x 5 req/s = {capacity:.0f} req/s, offered {rate:.0f} req/s")
    print(f"{'figure':<48}{'value':>12}  target")
    rows = [
        ("baseline, no limits: upstream / offered rate", f"{b_rate / b_off.rate:.3f}", "~1"),
        ("rate offered with limits, req/s", f"{off.rate:.1f}", f"~{rate:.0f}"),
        ("achieved upstream rate (steady part), req/s", f"{achieved:.2f}", ""),
        ("achieved / capacity", f"{achieved / capacity:.3f}", ">= 0.98"),
        ("max requests in any 1-s window, per key", f"{worst} / 5", "<= 5"),
        ("overshoot (requests above the limit)", f"{max(0, worst - 5)}", "0"),
        ("shortest span holding 6 requests of a key, s", f"{tightest:.3f}", ">= 1"),
        ("client success rate", f"{ok / len(off.statuses):.1%}", "100%"),
        ("client latency p50 / p99, s", f"{p50:.2f} / {p99:.2f}", ""),
        ("requests offered / served upstream", f"{len(off.statuses)} / {len(reqs)}", ""),
    ]  # fmt: skip
    for name, value, target in rows:
        print(f"{name:<48}{value:>12}  {target}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run of under 20 s")
    args = ap.parse_args(argv)
    iters, batches = (200, 3) if args.quick else (500, 15)
    seconds, base_seconds = (5.0, 1.5) if args.quick else (10.0, 4.0)
    measure_cost(10, False, iters, 1)  # the first run pays for the interpreter's warm-up
    print_costs(
        [measure_cost(n, ex, iters, batches) for ex in (False, True) for n in (10, 100, 1000)]
    )
    capacity, rate = 15.0, 30.0
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as d:
        limited, base = run_through_proxy(Path(d), rate, seconds, base_seconds)
    print_live(capacity, rate, limited, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
