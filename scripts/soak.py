#!/usr/bin/env python3
"""Soak: sustained mixed traffic through a real mitmdump with kmi-rotor, watched for leaks.

    .venv/bin/python scripts/soak.py                # 10 minutes
    .venv/bin/python scripts/soak.py --minutes 1    # a quick look
    .venv/bin/python scripts/soak.py --quick        # 20 s smoke run

Traffic (seeded): plain and streamed chat completions, streams the client abandons after the
first chunk, upstream 429s with retry-after (a key with a provider-side rps limit), 5xx and
hint-less 429s injected on two keys, a quota error now and then on another, a key whose
streams are always cut short, a key that answers 401 (re-tried every few seconds), and local
429s from a tight proxy-wide rate limit. Everything runs on 127.0.0.1.

Every `--interval` seconds it samples mitmdump's RSS and open file descriptors, the requests
in flight it reports at /_kmi-rotor/api/status, and the state file (parsed and validated; its
request total against what the fake provider received). It prints the series, then one verdict
per metric: flat when the last quarter's mean (after warm-up) is within 10% plus a small
absolute margin of the first quarter's, else growing. Finally, with traffic stopped, nothing
may be left in flight and, after SIGTERM, the state's per-key totals must equal the provider's.
It never asserts: it prints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addon"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from _crash_helpers import (
    Faults,
    Load,
    Mix,
    Target,
    api_status,
    provider_counts,
    quiet_requests,
    read_state,
    requests_by_label,
    secret,
    write_config,
)
from proctools import Mitmdump, start_mitmdump

import fake_provider
from fake_provider import KeyBehaviour

BEHAVIOURS = {
    "paced": KeyBehaviour(rps=4, headers="openai"),  # 429 + retry-after beyond 4 req/s
    "cut": KeyBehaviour(truncate_after=2),  # every stream stops after two events
    "revoked": KeyBehaviour(mode="invalid"),  # 401
    "billing": KeyBehaviour(),  # a quota error now and then
    "k5": KeyBehaviour(),
    "k6": KeyBehaviour(),
}
FAULTY = ("k5", "k6")
FAULTS = (429, 500, 502, 503)
LIMITS = {"requests_per_second": 35, "max_wait_seconds": 0.25}
HEALTH = {
    "rate_limit_backoff": 0.5,
    "overload_backoff": 0.2,
    "overload_backoff_max": 2.0,
    "max_cooldown_seconds": 10.0,
    "quota_block_seconds": 4.0,
    "auth_recheck_seconds": 5.0,
}
MIX = Mix(chat=5.0, stream=3.0, abandon=1.0, events=(2, 8), delay_ms=(5, 30), patience=1.0)
WARMUP = 0.15  # share of the samples left out of the verdicts
GROWTH = 0.10  # relative tolerance between the first and the last quarter


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    inflight: int
    received: int  # requests the provider received
    counted: int  # requests in state.json
    valid: bool  # state.json parsed and validated
    local_429: int

    @property
    def behind(self) -> int:
        return self.received - self.counted


@dataclass
class Metric:
    name: str
    margin: float  # absolute tolerance on top of GROWTH
    values: list[float] = field(default_factory=list)


# -- sampling ----------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def take_sample(m: Mitmdump, provider: fake_provider.FakeProvider, state: Path, t: float) -> Sample:
    pid = m.process.proc.pid
    totals = api_status(m.url)["totals"]
    received = provider.stats()["requests"]
    try:
        counted, valid = sum(requests_by_label(read_state(state)).values()), True
    except ValueError:  # invalid JSON or a document that does not validate
        counted, valid = -1, False
    return Sample(
        t,
        _rss_mb(pid),
        len(list(Path(f"/proc/{pid}/fd").iterdir())),
        int(totals["inflight"]),
        received,
        counted,
        valid,
        int(totals["local_429"]),
    )


def _per_second(s: Sample, prev: Sample | None, attr: str) -> float:
    dt = s.t - (prev.t if prev else 0.0)
    return (getattr(s, attr) - (getattr(prev, attr) if prev else 0)) / dt if dt > 0 else 0.0


def _lag_s(s: Sample, prev: Sample | None) -> float:
    """How far the state trails the provider, in seconds of the current upstream rate."""
    rate = _per_second(s, prev, "received")
    return s.behind / rate if rate > 0 else 0.0


def _row(s: Sample, prev: Sample | None) -> str:
    rate, local = _per_second(s, prev, "received"), _per_second(s, prev, "local_429")
    return (
        f"{s.t:6.0f}  {s.rss_mb:7.1f}  {s.fds:4}  {s.inflight:8}  {rate:7.1f}  {local:9.1f}  "
        f"{s.received:8}  {s.counted:8}  {s.behind:6}  {_lag_s(s, prev):6.2f}  "
        f"{'yes' if s.valid else 'NO':5}"
    )


HEADER = (
    "   t_s   rss_MB   fds  inflight  upstr/s  local429/s  provider     state  behind  lag_s  valid"
)


# -- verdicts ----------------------------------------------------------------------------------


def verdict(metric: Metric) -> str:
    """flat / growing: last quarter's mean against the first quarter's, after warm-up."""
    values = metric.values[int(len(metric.values) * WARMUP) :]
    if len(values) < 2:
        return f"{metric.name:<14} too few samples"
    q = max(1, len(values) // 4)
    first, last = statistics.fmean(values[:q]), statistics.fmean(values[-q:])
    grows = last > first * (1 + GROWTH) + metric.margin
    ratio = f"x{last / first:.2f}" if first else "  -  "
    return (
        f"{metric.name:<12} first quarter {first:8.2f}  last quarter {last:8.2f}  {ratio:>6}  "
        f"(allowed: 10% + {metric.margin:g})  {'GROWING' if grows else 'flat'}"
    )


def metrics(samples: list[Sample], threads: int) -> list[Metric]:
    previous: list[Sample | None] = [None, *samples[:-1]]
    return [
        Metric("rss_MB", 8.0, [s.rss_mb for s in samples]),
        Metric("open_fds", 8.0, [s.fds for s in samples]),
        Metric("inflight", float(threads), [s.inflight for s in samples]),
        Metric("state_lag_s", 0.5, [_lag_s(s, p) for s, p in zip(samples, previous, strict=True)]),
    ]


# -- the run -----------------------------------------------------------------------------------


class QuotaFlips:
    """Every `period` s, the `billing` key answers with a quota error for `length` s."""

    def __init__(self, provider: fake_provider.FakeProvider, period: float, length: float):
        self.provider, self.period, self.length = provider, period, length
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> QuotaFlips:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        key = secret("billing")
        while not self._stop.wait(self.period):
            self.provider.set_keys({key: KeyBehaviour(mode="quota")})
            self._stop.wait(self.length)
            self.provider.set_keys({key: KeyBehaviour()})


def _drive(
    args: argparse.Namespace, m: Mitmdump, fp: fake_provider.FakeProvider, state: Path
) -> tuple[list[Sample], Counter[str]]:
    """Run the traffic for the whole duration, sampling as it goes; the samples and outcomes."""
    target = Target()
    target.set(m.url)
    base = {secret(label): BEHAVIOURS[label] for label in FAULTY}
    load = Load(target, args.threads, args.seed, MIX).start()
    faults = Faults(fp, base, FAULTS, seed=args.seed, period=0.4).start()
    flips = QuotaFlips(fp, period=8.0, length=0.5).start()
    samples: list[Sample] = []
    start = time.monotonic()
    end = start + args.minutes * 60
    print(HEADER, flush=True)
    try:
        while (now := time.monotonic()) < end:
            time.sleep(min(args.interval, end - now))
            samples.append(take_sample(m, fp, state, time.monotonic() - start))
            print(_row(samples[-1], samples[-2] if len(samples) > 1 else None), flush=True)
    finally:
        flips.stop()
        faults.stop()
        outcomes = load.stop()
    return samples, outcomes


def _drained_inflight(m: Mitmdump, timeout: float = 15.0) -> int:
    """Requests the proxy still holds once every client is gone (0 unless it leaks)."""
    end = time.monotonic() + timeout
    while (n := int(api_status(m.url)["totals"]["inflight"])) and time.monotonic() < end:
        time.sleep(0.1)
    return n


def _final(m: Mitmdump, fp: fake_provider.FakeProvider, state: Path) -> None:
    quiet_requests(fp)
    left = _drained_inflight(m)
    code = m.stop()
    doc = read_state(state)
    labels = {secret(label): label for label in BEHAVIOURS}
    sent = provider_counts(fp.requests, labels)
    kept = requests_by_label(doc)
    print(f"\nafter the traffic stopped: {left} request(s) still in flight at the proxy")
    print(f"mitmdump exit code after SIGTERM: {code}")
    print("key        provider  state  diff")
    for label in BEHAVIOURS:
        print(f"{label:<9} {sent[label]:9} {kept[label]:6} {kept[label] - sent[label]:5}")
    exact = all(sent[label] == kept[label] for label in BEHAVIOURS)
    print(f"state vs provider after shutdown: {'exact' if exact else 'DIFFERENT'}")


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="kmi-soak-") as tmp_name:
        tmp = Path(tmp_name)
        fp = fake_provider.FakeProvider(
            {secret(label): b for label, b in BEHAVIOURS.items()}, event_delay=0.005
        )
        with fake_provider.run_in_thread(fp):
            state = tmp / "state"
            cfg = write_config(
                tmp / "rotor.toml",
                f"127.0.0.1:{fp.port}",
                state,
                list(BEHAVIOURS),
                limits=LIMITS,
                health=HEALTH,
            )
            m = start_mitmdump(
                cfg,
                tmp / "mitm",
                tmp / "mitmdump.log",
                mode=f"reverse:{fp.url}",
                extra=("--set", "flow_detail=0"),
            )
            try:
                pid = m.process.proc.pid
                print(
                    f"soak: {args.minutes * 60:.0f} s, {args.threads} clients, mitmdump pid {pid}"
                )
                samples, outcomes = _drive(args, m, fp, state)
                _report(samples, outcomes, fp, args.threads)
                _final(m, fp, state)
            finally:
                m.stop()


def _report(
    samples: list[Sample], outcomes: Counter[str], fp: fake_provider.FakeProvider, threads: int
) -> None:
    statuses = Counter(r.status for r in fp.requests)
    print(f"\nclient outcomes: {dict(sorted(outcomes.items()))}")
    print(f"provider statuses: {dict(sorted(statuses.items()))}")
    over = sum(1 for s in samples if s.valid and s.counted > s.received)
    invalid = sum(1 for s in samples if not s.valid)
    print(f"samples: {len(samples)}; state invalid in {invalid}; state ahead of provider in {over}")
    print()
    for metric in metrics(samples, threads):
        print(verdict(metric))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--quick", action="store_true", help="20 s, a sample every 2 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.interval = 1 / 3, 2.0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
