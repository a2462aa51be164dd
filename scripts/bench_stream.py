"""Streaming through kmi-rotor: time to first byte, latency added per event, memory over a stream.

Three ways to reach the same fake provider (loopback, plain HTTP/1.1, keep-alive), measured in
one run with their rounds interleaved in random order, so that the noise of a shared machine
falls on all of them alike:

- direct: the client talks to the provider (the baseline);
- bare: mitmdump in reverse mode without any addon (mitmproxy's own cost; it buffers SSE);
- rotor: mitmdump in reverse mode with kmi-rotor (`-s addon/rotor.py`).

The provider runs in a process of its own and stamps every event with `time.monotonic_ns()`
just before writing it (CLOCK_MONOTONIC is shared by all processes), so the client knows how
long each event took to reach it, not only when it arrived.

- TTFB: from sending a one-event streamed request to the arrival of its event.
- Per event: a stream of events a few ms apart; latency = arrival - the provider's stamp.
- Memory: mitmdump's VmRSS (/proc/PID/status) while a 10,000-event stream goes through it:
  idle before, at the first, 5,000th and last event, and the peak sampled every 20 ms. A proxy
  that streams stays flat; the bare mitmdump buffers the whole answer and shows what that looks
  like.

    .venv/bin/python scripts/bench_stream.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "addon", ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import httpx2  # noqa: E402
from aiohttp import web  # noqa: E402
from proctools import LISTEN_RE, MITMDUMP, clean_env  # noqa: E402

import fake_provider  # noqa: E402

KEY = "sk-bench-stream-0000000000000000000001"
STAMP_RE = re.compile(rb'"t_ns":(\d+)')
READY_RE = re.compile(r"fake-provider listening on (\S+)")
STREAM_EVENTS = 10_000
TIMEOUT = 60.0
"""Seconds a client waits for data: a buffering proxy sends nothing until the stream ends."""


@dataclass(frozen=True)
class Plan:
    """How much to measure: `--quick` keeps the whole run under 20 s."""

    ttfb_rounds: int
    event_runs: int
    events_per_run: int
    event_gap_us: int
    stream_gap_us: int
    pad: int


FULL = Plan(ttfb_rounds=300, event_runs=8, events_per_run=200, event_gap_us=5000,
            stream_gap_us=1000, pad=1024)  # fmt: skip
QUICK = Plan(ttfb_rounds=60, event_runs=2, events_per_run=100, event_gap_us=5000,
             stream_gap_us=0, pad=1024)  # fmt: skip


# -- the stamping provider (runs in a child process) ----------------------------------------------


class StampingProvider(fake_provider.FakeProvider):
    """The fake provider, with OpenAI-style streams whose events carry their send time.

    Request headers: `x-fake-events` (count), `x-bench-gap-us` (sleep before each event; 0 = none),
    `x-bench-pad` (bytes of content per event). Usage and `[DONE]` end the stream as usual.
    """

    async def _stream_openai(  # type: ignore[override]
        self,
        request: web.Request,
        response: web.StreamResponse,
        behaviour: fake_provider.KeyBehaviour,
        model: str,
        prompt_tokens: int,
        events: int,
        delay: float,
        include_usage: bool,
    ) -> None:
        gap = int(request.headers.get("x-bench-gap-us", "0")) / 1e6
        pad = "x" * int(request.headers.get("x-bench-pad", "1"))
        head = '{"object":"chat.completion.chunk","model":"%s","i":%d,"t_ns":'
        tail = ',"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
        for i in range(events):
            if gap:
                await asyncio.sleep(gap)
            prefix = (head % (model, i)).encode()
            body = (tail % pad).encode()
            # Stamped last, right before the write: the latency excludes building the event.
            await response.write(
                b"data: " + prefix + str(time.monotonic_ns()).encode() + body + b"\n\n"
            )
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": events}
            await response.write(
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()


async def _serve_provider() -> None:
    provider = StampingProvider(accept_any=True, event_delay=0.0)
    await provider.start()
    print(f"fake-provider listening on {provider.url}", flush=True)
    await asyncio.Event().wait()  # until the parent terminates this process


# -- child processes ------------------------------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    match: re.Match[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(argv: Sequence[str], log: Path, ready: re.Pattern[str], timeout: float = 30) -> Child:
    """Start a child writing to `log` (no pipe: no reader thread competes with the client for
    the GIL) and wait until a line of its output matches `ready`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = ready.search(log.read_text(errors="replace"))
        if m:
            return Child(proc, m)
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{argv[0]} did not get ready:\n{log.read_text(errors='replace')[-2000:]}")


def start_mitmdump(tmp: Path, upstream: str, name: str, addon_config: Path | None) -> Child:
    argv = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--mode", f"reverse:{upstream}"]
    argv += ["--set", f"confdir={tmp / 'mitm'}"]
    if addon_config is not None:
        argv += ["-s", str(ROOT / "addon" / "rotor.py"), "--set", f"rotor_config={addon_config}"]
    return launch(argv, tmp / f"{name}.log", LISTEN_RE)


def rotor_config(tmp: Path, provider_url: str) -> Path:
    host = provider_url.removeprefix("http://")
    path = tmp / "rotor.toml"
    path.write_text(
        f'state_dir = "{tmp / "state"}"\n[[pools]]\nname = "bench"\nprovider = "generic"\n'
        f'hosts = ["{host}"]\n[[pools.keys]]\nlabel = "bench"\nkey = "{KEY}"\n'
    )
    return path


def rss_kb(pid: int) -> int:
    """The process's resident set size (VmRSS), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- the client -----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    client: httpx2.Client
    pid: int | None = None


BODY = json.dumps(
    {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "bench"}]}
).encode()


def stream(target: Target, events: int, gap_us: int, pad: int) -> Iterator[tuple[int, bytes]]:
    """POST a streamed chat completion; yield (arrival monotonic ns, chunk) as chunks arrive.

    The first item is (send time, b"") so callers can time from the request's start.
    """
    headers = {
        "authorization": "Bearer client-placeholder",
        "content-type": "application/json",
        "x-fake-events": str(events),
        "x-bench-gap-us": str(gap_us),
        "x-bench-pad": str(pad),
    }
    yield time.monotonic_ns(), b""
    with target.client.stream("POST", target.url, content=BODY, headers=headers) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            yield time.monotonic_ns(), chunk


def first_event_ms(target: Target) -> float:
    """Time from sending a one-event stream to receiving its event; the rest is drained so the
    connection is kept alive."""
    first: float | None = None
    start = 0
    for at, chunk in stream(target, 1, 0, 1):
        if not chunk:
            start = at
        elif first is None and b"t_ns" in chunk:
            first = (at - start) / 1e6
    assert first is not None, "no event arrived"
    return first


def event_latencies_ms(target: Target, events: int, gap_us: int) -> list[float]:
    """Per event: arrival at the client minus the provider's stamp, in ms."""
    out: list[float] = []
    buf = b""
    for at, chunk in stream(target, events, gap_us, 16):
        buf += chunk
        *complete, buf = buf.split(b"\n\n")
        out.extend((at - int(m.group(1))) / 1e6 for e in complete if (m := STAMP_RE.search(e)))
    assert len(out) == events, f"{target.name}: {len(out)} of {events} events"
    return out


@dataclass(frozen=True)
class Memory:
    """mitmdump's RSS (kB) around one long stream, and the stream's size."""

    idle: int
    marks: dict[int, int]
    peak: int
    stream_bytes: int
    seconds: float

    @property
    def growth(self) -> int:
        return self.peak - self.idle


def memory_over_stream(target: Target, gap_us: int, pad: int) -> Memory:
    """Stream STREAM_EVENTS events through `target` while watching its process's RSS."""
    assert target.pid is not None
    pid, idle = target.pid, rss_kb(target.pid)
    peak, stop = [idle], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_kb(pid))

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    marks: dict[int, int] = {}
    seen, size, buf, start = 0, 0, b"", time.monotonic()
    try:
        for _, chunk in stream(target, STREAM_EVENTS, gap_us, pad):
            size += len(chunk)
            *complete, buf = (buf + chunk).split(b"\n\n")
            seen += sum(1 for e in complete if b'"t_ns"' in e)
            for mark in (1, STREAM_EVENTS // 2, STREAM_EVENTS):
                if seen >= mark and mark not in marks:
                    marks[mark] = rss_kb(pid)
    finally:
        stop.set()
        sampler.join()
    assert seen == STREAM_EVENTS, f"{target.name}: {seen} of {STREAM_EVENTS} events"
    return Memory(idle, marks, max(peak[0], *marks.values()), size, time.monotonic() - start)


# -- the measurements -----------------------------------------------------------------------------


def interleaved(
    targets: Sequence[Target], rounds: int, measure: Callable[[Target], Any], seed: int
) -> dict[str, list[Any]]:
    """`measure` each target once per round, in a fresh random order every round."""
    rng = random.Random(seed)
    out: dict[str, list[Any]] = {t.name: [] for t in targets}
    order = list(targets)
    for _ in range(rounds):
        rng.shuffle(order)
        for t in order:
            out[t.name].append(measure(t))
    return out


@dataclass
class Results:
    plan: Plan
    ttfb: dict[str, list[float]] = field(default_factory=dict)
    events: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)


def measure(targets: dict[str, Target], plan: Plan) -> Results:
    res = Results(plan)
    everyone = list(targets.values())
    interleaved(
        everyone, 10, first_event_ms, seed=0
    )  # warm-up: connections, caches, JIT-less paths
    res.ttfb = interleaved(everyone, plan.ttfb_rounds, first_event_ms, seed=1)
    # The bare mitmdump buffers SSE: per-event latency only means something for the other two.
    streaming = [targets["direct"], targets["rotor"]]
    runs = interleaved(
        streaming,
        plan.event_runs,
        lambda t: event_latencies_ms(t, plan.events_per_run, plan.event_gap_us),
        seed=2,
    )
    res.events = {name: [x for run in lists for x in run] for name, lists in runs.items()}
    res.memory["rotor"] = memory_over_stream(targets["rotor"], plan.stream_gap_us, plan.pad)
    # The control only has to show what buffering looks like: no need to make it last.
    res.memory["bare"] = memory_over_stream(targets["bare"], 0, plan.pad)
    return res


def run(plan: Plan) -> Results:
    """Start the provider and both mitmdumps, measure, stop them all."""
    children: list[Child] = []
    clients: list[httpx2.Client] = []
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as d:
        tmp = Path(d)
        try:
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-provider"]
            provider = launch(argv, tmp / "provider.log", READY_RE)
            children.append(provider)
            upstream = provider.match.group(1)
            targets: dict[str, Target] = {}
            for name, cfg in (("bare", None), ("rotor", rotor_config(tmp, upstream))):
                child = start_mitmdump(tmp, upstream, name, cfg)
                children.append(child)
                base = f"http://127.0.0.1:{child.match.group(2)}"
                targets[name] = Target(
                    name, base, httpx2.Client(trust_env=False, timeout=TIMEOUT), child.proc.pid
                )
            targets["direct"] = Target(
                "direct", upstream, httpx2.Client(trust_env=False, timeout=TIMEOUT)
            )
            for t in targets.values():
                t.url += "/v1/chat/completions"
                clients.append(t.client)
            return measure(targets, plan)
        finally:
            for c in clients:
                c.close()
            for child in reversed(children):
                child.stop()


# -- the report -----------------------------------------------------------------------------------


def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _paired_added(res: Results, name: str) -> float:
    """Median over rounds of (target - direct) in the same round."""
    return _med([a - b for a, b in zip(res.ttfb[name], res.ttfb["direct"], strict=True)])


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def report(res: Results, argv: Sequence[str]) -> str:
    p, mem = res.plan, res.memory["rotor"]
    d_ttfb, b_ttfb, r_ttfb = (_med(res.ttfb[n]) for n in ("direct", "bare", "rotor"))
    add_ttfb, add_bare = _paired_added(res, "rotor"), _paired_added(res, "bare")
    addon = _med([a - b for a, b in zip(res.ttfb["rotor"], res.ttfb["bare"], strict=True)])
    d_ev, r_ev = _med(res.events["direct"]), _med(res.events["rotor"])
    add_ev = r_ev - d_ev
    lines = [
        "kmi-rotor streaming benchmark: mitmdump reverse mode vs direct (loopback, HTTP/1.1"
        " keep-alive, rounds interleaved in random order)",
        f"command: {' '.join(argv)}",
        f"{p.ttfb_rounds} TTFB rounds; {p.event_runs} x {p.events_per_run} events "
        f"{p.event_gap_us / 1000:g} ms apart; one {STREAM_EVENTS:,}-event stream of "
        f"{mem.stream_bytes / 2**20:.1f} MB ({mem.seconds:.1f} s)",
        "",
        f"{'latency, median ms':<24}{'direct':>8}{'bare':>8}{'rotor':>8}"
        f"{'added':>9}{'ratio':>8}   target",
        f"{'time to first event':<24}{d_ttfb:>8.2f}{b_ttfb:>8.2f}{r_ttfb:>8.2f}"
        f"{add_ttfb:>+9.2f}{r_ttfb / d_ttfb:>7.1f}x   <= 2 ms: {_verdict(add_ttfb <= 2)}"
        f"  (mitmdump alone {add_bare:+.2f}, the addon {addon:+.2f})",
        f"{'per event':<24}{d_ev:>8.2f}{'buffers':>8}{r_ev:>8.2f}"
        f"{add_ev:>+9.2f}{r_ev / d_ev:>7.1f}x   <= 1 ms: {_verdict(add_ev <= 1)}",
        f"{'per event, p90':<24}{_pct(res.events['direct'], 0.9):>8.2f}{'':>8}"
        f"{_pct(res.events['rotor'], 0.9):>8.2f}",
        "",
        f"{'mitmdump RSS, MB':<18}{'idle':>8}{'ev 1':>8}{'ev 5,000':>10}{'ev 10,000':>11}"
        f"{'peak':>8}{'growth':>8}{'/stream':>9}",
    ]
    for name, label in (("rotor", "kmi-rotor"), ("bare", "bare (buffers)")):
        m = res.memory[name]
        cells = [m.idle, *(m.marks[k] for k in (1, STREAM_EVENTS // 2, STREAM_EVENTS)), m.peak]
        mb = [f"{c / 1024:.1f}" for c in cells]
        ratio = m.growth * 1024 / m.stream_bytes
        lines.append(
            f"{label:<18}{mb[0]:>8}{mb[1]:>8}{mb[2]:>10}{mb[3]:>11}{mb[4]:>8}"
            f"{m.growth / 1024:>+8.1f}{ratio:>8.2f}x"
        )
    flat = mem.growth * 1024 < 0.1 * mem.stream_bytes
    lines.append(f"memory target: flat (growth < 10% of the stream): {_verdict(flat)}")
    return "\n".join(lines)


def _pct(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 20 s)")
    parser.add_argument("--serve-provider", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_provider:
        asyncio.run(_serve_provider())
        return 0
    started = time.monotonic()
    res = run(QUICK if args.quick else FULL)
    shown = [".venv/bin/python", "scripts/bench_stream.py", *(["--quick"] if args.quick else [])]
    print(report(res, shown))
    print(f"(run took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
