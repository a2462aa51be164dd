"""What kmi-rotor costs per request: mitmdump with it against bare mitmdump, side by side.

One fast local upstream (`bench_load.py upstream`: TLS with a trustme certificate, a canned
chat completion with OpenAI's rate-limit headers, or an SSE stream) and, for each case, a bare
mitmdump and a mitmdump with kmi-rotor started with the same options. Runs alternate between
the two (the order flips each round) so that a shared machine's noise falls on both; one
asyncio load generator keeps `--concurrency` keep-alive requests in flight against one of them
at a time. Per run: throughput, p50/p99 latency, and mitmdump's own CPU time per request
(/proc/PID/stat, all its threads), which the load generator's cost does not blur; of it, the
CPU of the threads other than the event loop's (kmi-rotor's trace and state writers).

Cases:
- reverse: `--mode reverse:https://upstream`, plain HTTP from the client; 2 keys.
- regular: `--mode regular`, the client tunnels (CONNECT) and speaks TLS trusting the proxy's
  CA from a temporary confdir; 2 keys.
- keys1000: reverse mode, 1,000 keys in the pool.
- stream: reverse mode, streamed answers of `--events` SSE events; bare mitmdump streams
  every answer through a one-line script (`flow.response.stream = True` in
  `responseheaders`: mitmproxy's stream flag; `stream_large_bodies` would also stream the
  requests and re-parse its size on every chunk), kmi-rotor streams SSE itself. The added cost
  per event is the added CPU per streamed request less the added CPU per plain request, over
  the events.
- agent: reverse mode, streamed answers, each request carrying a conversation of `--body-kb`
  KB (200 by default; an agent sends its whole history every turn): what reading (and, for
  a chat completion's usage, rewriting) a long body costs, beside the `stream` case.
- cluster: reverse mode, kmi-rotor with `[cluster]` on a throwaway redis-server.
- cluster1000: the same, 1,000 keys in the pool.
- decision: in process, CPU µs per admission + selection (+ settle) with 1,000 keys
  (`bench_admission.measure_cost`).

`--spin US` runs a third proxy in the same rounds whose addon has kmi-rotor's option and request
hooks and only spins in them, US µs of CPU per request in all (shared among the hooks as
kmi-rotor's in-place costs are, `SPIN_SHARES`), touching no memory: the throughput a proxy
keeps when an addon costs that much CPU and takes nothing else from mitmproxy (its caches),
which turns a ratio into a CPU budget on the machine of the day.

`--together` loads every proxy of a case at the same time instead of in turn, each with its own
`--concurrency` connections, all on the one CPU they are pinned to, which the scheduler shares
equally among them: each proxy's throughput is its share over its CPU per request, so the
ratio of two is the ratio of their costs, and both are measured under the same disturbance at
the same moment. Alternating runs see the machine change between them; on a shared machine
that moves one run's ratio by 0.1 and more. A round where the proxies used less than `BUSY` of
their CPU (the load generator or the upstream held them back) is reported: its ratios lean
towards 1. Latencies under `--together` are those of a proxy with a part of a CPU.

`--profile DIR` also samples each mitmdump (bare, with kmi-rotor, and `--before`'s) in the
reverse and stream cases, after the measured rounds: every proxy of those cases then loads
`sampler.py` (a profiler inside the process, idle until a signal starts it; one sample per
millisecond of CPU, collapsed stacks in `DIR/{bare,rotor,before}-CASE.txt`), and the heaviest
frames are printed (kmi-rotor's own, and any function's by self time).
`bench_overhead.py summarise FILE` prints them again.

    .venv/bin/python scripts/bench_overhead.py [--quick] [--cases reverse,stream] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "addon", ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import trustme  # noqa: E402
from bench_load import READY, Load, Target, drive  # noqa: E402
from proctools import LISTEN_RE, MITMDUMP, clean_env  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from rotor_toml import pool, rotor_config  # noqa: E402

BUSY = 0.9
"""With `--together`, the least CPU the proxies must use together for their ratios to be their
costs' (the CPU they are pinned to is one)."""
CASES = ("reverse", "regular", "keys1000", "stream", "agent", "cluster", "cluster1000", "decision")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    port: int

    def cpu_seconds(self) -> float:
        """utime + stime of the process, all its threads."""
        return _stat_cpu(Path(f"/proc/{self.proc.pid}/stat"))

    def cpu_split(self) -> tuple[float, float]:
        """`cpu_seconds` split: the main thread's (the event loop, where the hooks run) and the
        other threads' (the trace and state writers, `to_thread`'s workers)."""
        return thread_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _stat_cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of process `pid`: its main thread's, and its other threads' together (a
    thread that ended meanwhile is not counted)."""
    main, others = 0.0, 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            spent = _stat_cpu(task / "stat")
        except (OSError, IndexError, ValueError):  # the thread ended while being read
            continue
        if task.name == str(pid):
            main = spent
        else:
            others += spent
    return main, others


def launch(
    argv: Sequence[str],
    log: Path,
    ready: re.Pattern[str],
    timeout: float = 30,
    env: dict[str, str] | None = None,
    cpus: frozenset[int] | None = None,
) -> Child:
    """A child writing to `log` (no pipe to pump), once a line of its output matches `ready`
    (whose last group is the port); `env` is added to the clean environment; with `cpus`, the
    child runs on those CPUs only."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**clean_env(), **(env or {})},
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = ready.search(log.read_text(errors="replace"))
        if m:
            return Child(proc, int(m.groups()[-1]))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{argv[0]} did not get ready:\n{log.read_text(errors='replace')[-3000:]}")


# -- set-up ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    tmp: Path
    ca_pem: Path
    upstream: Child
    redis: RedisServer | None = None
    children: list[Child] = field(default_factory=list)
    proxy_cpus: frozenset[int] | None = None
    """With `--pin`: the CPU every proxy runs on (the load, the upstream and Redis run on the
    others), so that the proxies measured do not share their core with their own load."""

    @property
    def upstream_authority(self) -> str:
        return f"127.0.0.1:{self.upstream.port}"

    def stop(self) -> None:
        """Stop every process this set-up started: the proxies, the upstream, Redis."""
        for child in self.children:
            child.stop()
        self.upstream.stop()
        if self.redis is not None:
            self.redis.stop()


def start_upstream(tmp: Path, events: int) -> Setup:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certs = tmp / "upstream-certs"
    certs.mkdir()
    cert.private_key_and_cert_chain_pem.write_to_path(str(certs / "server.pem"))
    ca_pem = tmp / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    argv = [sys.executable, str(ROOT / "scripts" / "bench_load.py"), "upstream"]
    argv += ["--cert-dir", str(certs), "--events", str(events)]
    up = launch(argv, tmp / "upstream.log", re.compile(READY + r" (\d+)"))
    return Setup(tmp, ca_pem, up)


def write_config(setup: Setup, name: str, keys: int, cluster: bool) -> Path:
    labels = {f"k{i}": f"sk-bench-{name}-{i:05d}-{'x' * 24}" for i in range(keys)}
    pools = [pool("bench", [setup.upstream_authority], labels, provider="openai")]
    tables = {}
    if cluster:
        assert setup.redis is not None
        tables["cluster"] = {"redis_url": setup.redis.url, "prefix": f"bench-{name}"}
    return rotor_config(setup.tmp / f"{name}.toml", setup.tmp / f"state-{name}", pools, **tables)


def stream_script(tmp: Path) -> Path:
    """The bare proxy's way to stream every answer: mitmproxy's own flag, set per flow."""
    path = tmp / "stream_all.py"
    path.write_text("def responseheaders(flow):\n    flow.response.stream = True\n")
    return path


SPIN_SHARES = {"requestheaders": 0.13, "request": 0.32, "responseheaders": 0.12, "response": 0.43}
"""How kmi-rotor's four request hooks share their cost in place (`hook_timer.py`, reverse
mode, 20 connections: 20, 50, 18 and 67 µs)."""

_SPIN_ADDON = """import time

_clock = time.thread_time_ns


def _spin(ns):
    end = _clock() + ns
    while _clock() < end:
        pass


class Spin:
    def load(self, loader):
        loader.add_option("rotor_config", str, "", "")

    async def requestheaders(self, flow):
        _spin({requestheaders})

    async def request(self, flow):
        _spin({request})

    def responseheaders(self, flow):
        _spin({responseheaders})

    async def response(self, flow):
        _spin({response})


addons = [Spin()]
"""


def spin_tree(tmp: Path, us: float) -> Path:
    """A tree (as `--before` takes one) whose `addon/rotor.py` spins `us` µs of CPU per request
    in kmi-rotor's hooks, shared as `SPIN_SHARES` says."""
    tree = tmp / f"spin-{us:g}"
    script = tree / "addon" / "rotor.py"
    if not script.exists():
        script.parent.mkdir(parents=True)
        ns = {hook: round(us * share * 1000) for hook, share in SPIN_SHARES.items()}
        script.write_text(_SPIN_ADDON.format(**ns))
    return tree


def proxy_argv(
    setup: Setup, mode: str, config: Path | None, extra: Sequence[str] = (), tree: Path = ROOT
) -> list[str]:
    """The command line of a mitmdump on a free loopback port in `mode`, with `extra`; with
    `config`, kmi-rotor too (from `tree`, a checkout of this repository). Options otherwise
    equal for every proxy."""
    confdir = setup.tmp / "confdir"  # one CA for every proxy, trusted by the regular clients
    argv = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--mode", mode]
    argv += [
        "--set",
        f"confdir={confdir}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={setup.ca_pem}",
    ]
    argv += ["--set", "flow_detail=0", *extra]
    if config is not None:
        argv += ["-s", str(tree / "addon" / "rotor.py"), "--set", f"rotor_config={config}"]
    return argv


def start_proxy(
    setup: Setup,
    name: str,
    mode: str,
    config: Path | None,
    extra: Sequence[str],
    tree: Path = ROOT,
    samples: Path | None = None,
) -> Child:
    """`proxy_argv`'s mitmdump, started; with `samples`, the sampler too, writing there."""
    env = None
    if samples is not None:
        extra = [*extra, "-s", str(ROOT / "scripts" / "sampler.py")]
        env = {"KMI_ROTOR_SAMPLES": str(samples)}
    argv = proxy_argv(setup, mode, config, extra, tree)
    log = setup.tmp / f"{name}.log"
    child = launch(argv, log, LISTEN_RE, env=env, cpus=setup.proxy_cpus)
    setup.children.append(child)
    return child


# -- runs -----------------------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    errors: int
    threads_us: float = float("nan")
    """Of `cpu_us`, the CPU of threads other than the event loop's (the writers' threads)."""
    p50_1_ms: float = float("nan")
    """p50 with one connection: the time a request spends in the proxy, without queueing."""


def measure(
    child: Child, target: Target, args: argparse.Namespace, stream: bool, body_size: int = 0
) -> Run:
    """One proxy's run under `--concurrency` connections, then one connection."""
    runs, _ = measure_together({"one": child}, {"one": target}, args, stream, body_size)
    return runs["one"]


def measure_together(
    children: dict[str, Child],
    targets: dict[str, Target],
    args: argparse.Namespace,
    stream: bool,
    body_size: int = 0,
) -> tuple[dict[str, Run], float]:
    """A run of every proxy at once: each carries its own load at the same time, on the
    one CPU they are pinned to, where the scheduler gives each an equal share. Each one's
    throughput is then its share over its CPU per request, so their ratio is the ratio of
    their costs, measured under the same disturbance at the same moment (alternating runs
    see a shared machine change between them). Also returned: the proxies' CPU over the
    window, in CPUs; below about 1 they were not all busy (the load generator or the
    upstream held them back), and the ratios lean towards 1."""
    names = list(children)

    async def go() -> tuple[list[Load], dict[str, tuple[float, float]], float]:
        async def window() -> tuple[dict[str, tuple[float, float]], float]:
            await asyncio.sleep(args.warmup)
            before = {n: children[n].cpu_split() for n in names}
            started = time.monotonic()
            await asyncio.sleep(args.seconds)
            after = {n: children[n].cpu_split() for n in names}
            spent = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in names}
            return spent, time.monotonic() - started

        kw = dict(seconds=args.seconds, warmup=args.warmup, concurrency=args.concurrency)
        kw |= dict(stream=stream, body_size=body_size)
        *loads, (spent, wall) = await asyncio.gather(
            *(drive(targets[n], **kw) for n in names), window()
        )
        return loads, spent, wall

    loads, spent, wall = asyncio.run(go())
    busy = sum(a + b for a, b in spent.values()) / wall if wall else float("nan")
    runs = {}
    for name, load in zip(names, loads, strict=True):
        loop_cpu, threads_cpu = spent[name]
        # Then half a run with one connection: the time a request spends in it, unqueued.
        one = asyncio.run(
            drive(
                targets[name],
                seconds=args.seconds / 2,
                warmup=0.5,
                concurrency=1,
                stream=stream,
                body_size=body_size,
            )
        )
        runs[name] = _run_of(load, loop_cpu, threads_cpu, one)
    return runs, busy


def _run_of(load: Load, loop_cpu: float, threads_cpu: float, one: Load) -> Run:
    """A run's figures from its load, its CPU seconds (the event loop's, the other threads')
    and its one-connection load."""
    cpu = loop_cpu + threads_cpu
    lat = sorted(load.latencies) or [float("nan")]
    n = len(load.latencies)
    lat1 = sorted(one.latencies) or [float("nan")]
    return Run(
        rps=n / load.seconds,
        p50_ms=lat[len(lat) // 2] * 1000,
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        cpu_us=cpu / n * 1e6 if n else float("nan"),
        errors=load.errors + one.errors,
        threads_us=threads_cpu / n * 1e6 if n else float("nan"),
        p50_1_ms=lat1[len(lat1) // 2] * 1000,
    )


@dataclass
class CaseResult:
    name: str
    bare: list[Run]
    rotor: list[Run]
    before: list[Run] = field(default_factory=list)
    """kmi-rotor from `--before TREE` (another checkout), when given."""
    spin: list[Run] = field(default_factory=list)
    """The spinning addon of `--spin`, when given."""
    spin_us: float = 0.0
    busy: list[float] = field(default_factory=list)
    """With `--together`, the proxies' CPU in each round, in CPUs (see `measure_together`)."""

    def ratios(self, runs: list[Run] | None = None) -> list[float]:
        runs = self.rotor if runs is None else runs
        return [r.rps / b.rps for b, r in zip(self.bare, runs, strict=True) if b.rps]


@dataclass(frozen=True)
class CaseSetup:
    """What a case runs: mitmdump's mode, kmi-rotor's configuration, the bare proxy's extra
    options (mitmproxy's own stream flag for streams) and the load's target."""

    mode: str
    config: Path
    bare_extra: list[str]
    stream: bool
    body_size: int = 0
    """The size of the conversation each request carries (`bench_load.chat_body`)."""

    def target(self, setup: Setup, child: Child) -> Target:
        if self.mode == "regular":
            ca = setup.tmp / "confdir" / "mitmproxy-ca-cert.pem"
            return Target(("127.0.0.1", child.port), ("127.0.0.1", setup.upstream.port), ca)
        return Target(("127.0.0.1", child.port))


def case_setup(setup: Setup, case: str, body_kb: int = 200) -> CaseSetup:
    """`case`'s set-up; for `cluster` and `cluster1000`, a throwaway redis-server started
    first (once). `body_kb`: the conversation's size in the `agent` case."""
    cluster = case.startswith("cluster")
    if cluster and setup.redis is None:
        setup.redis = RedisServer(setup.tmp / "redis")
        setup.redis.start()
    mode = "regular" if case == "regular" else f"reverse:https://{setup.upstream_authority}"
    keys = 1000 if case.endswith("1000") else 2
    config = write_config(setup, case, keys, cluster=cluster)
    streamed = case in ("stream", "agent")
    bare_extra = ["-s", str(stream_script(setup.tmp))] if streamed else []
    size = body_kb * 1000 if case == "agent" else 0
    return CaseSetup(mode, config, bare_extra, streamed, size)


def run_case(setup: Setup, case: str, args: argparse.Namespace) -> CaseResult:
    cs = case_setup(setup, case, args.body_kb)
    mode, config, bare_extra = cs.mode, cs.config, cs.bare_extra
    proxies = {
        "bare": start_proxy(setup, f"{case}-bare", mode, None, bare_extra),
        "rotor": start_proxy(setup, f"{case}-rotor", mode, config, []),
    }
    if args.before is not None:
        proxies["before"] = start_proxy(setup, f"{case}-before", mode, config, [], args.before)
    if args.spin:
        tree = spin_tree(setup.tmp, args.spin)
        proxies["spin"] = start_proxy(setup, f"{case}-spin", mode, config, [], tree)
    result = CaseResult(case, [], [], spin_us=args.spin or 0.0)
    profiled = args.profile is not None and case in ("reverse", "stream")
    try:
        for i in range(args.runs):
            if args.together:
                targets = {n: cs.target(setup, c) for n, c in proxies.items()}
                runs, busy = measure_together(proxies, targets, args, cs.stream, cs.body_size)
                result.busy.append(busy)
                for name, run in runs.items():
                    getattr(result, name).append(run)
                    print(f"  {case:9} run {i + 1} {name:6} {_fmt_run(run)}", flush=True)
                print(f"  {case:9} run {i + 1} proxies busy {busy:.2f} CPU", flush=True)
                continue
            order = list(proxies.items())
            for name, child in order[i % len(order) :] + order[: i % len(order)]:
                run = measure(child, cs.target(setup, child), args, cs.stream, cs.body_size)
                getattr(result, name).append(run)
                print(f"  {case:9} run {i + 1} {name:5} {_fmt_run(run)}", flush=True)
    finally:
        for child in proxies.values():
            child.stop()
    if profiled:  # after the measured rounds, in proxies of their own: the sampler is loaded
        for name in (n for n in proxies if n != "spin"):  # bare, rotor, --before's
            samples = setup.tmp / f"samples-{name}-{case}.txt"
            extra = bare_extra if name == "bare" else []
            tree = args.before if name == "before" else ROOT
            child = start_proxy(
                setup, f"{case}-{name}-profiled", mode, None if name == "bare" else config,
                extra, tree, samples,
            )  # fmt: skip
            try:
                profile(child, cs.target(setup, child), args, f"{name}-{case}", samples)
            finally:
                child.stop()
    return result


# -- the profile ----------------------------------------------------------------------------------


def profile(
    child: Child, target: Target, args: argparse.Namespace, case: str, samples: Path
) -> None:
    """Sample `child` (started with the sampler writing to `samples`) while it carries the
    load (`case` names the copy in the profile folder, `bare-reverse`, `rotor-stream`...);
    print the heaviest frames."""
    seconds = max(args.seconds, 8)
    quick = argparse.Namespace(**{**vars(args), "seconds": seconds, "warmup": 0.5})
    stream = case.endswith("stream")
    asyncio.run(drive(target, seconds=1.0, warmup=0.5, concurrency=args.concurrency, stream=stream))
    os.kill(child.proc.pid, signal.SIGUSR1)
    measure(child, target, quick, stream=stream)
    os.kill(child.proc.pid, signal.SIGUSR2)
    end = time.monotonic() + 30
    while not samples.exists() and time.monotonic() < end and child.proc.poll() is None:
        time.sleep(0.05)
    raw = samples.read_text() if samples.exists() else ""
    args.profile.mkdir(parents=True, exist_ok=True)
    (args.profile / f"{case}.txt").write_text(raw)
    print(f"{case}: " + summarise(raw))


PASS_THROUGH = ("_wrap.<locals>.open_connection",)
"""kmi-rotor frames that only wrap mitmproxy's own work (the whole life of an upstream
connection runs under `opening.py`'s wrapper): not counted as kmi-rotor's."""


IDLE = ("Condition.wait (", "Event.wait (", "SimpleQueue.get (", "Queue.get (")
"""Frames of a thread asleep (an outside profiler may count a timed wait as running)."""


def summarise(raw: str, top: int = 25) -> str:
    """From py-spy's raw (collapsed) stacks: the share of samples in kmi-rotor's frames, and
    its functions by inclusive share (the sample is anywhere under them) and by self share."""
    total, ours, inclusive, own = 0, 0, Counter[str](), Counter[str]()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE):
            continue  # a thread asleep
        total += n
        mine = [f for f in frames if "kmi_rotor" in f and not f.startswith(PASS_THROUGH)]
        if mine:
            ours += n
            for f in set(mine):
                inclusive[_short(f)] += n
        own[_short(frames[-1])] += n
    if not total:
        return "no samples (py-spy failed?)"
    lines = [f"profile: {total} samples, {ours / total:.1%} under kmi-rotor frames"]
    lines += ["inclusive (kmi-rotor functions):"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["self (any function):"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: lines merged."""
    m = re.match(r"(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$", frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


# -- report ---------------------------------------------------------------------------------------


def _fmt_run(r: Run) -> str:
    return (
        f"{r.rps:7.1f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
        f"cpu {r.cpu_us:6.0f} µs/req (other threads {r.threads_us:3.0f})  p50@1 {r.p50_1_ms:5.2f} ms  errors {r.errors}"
    )


def report(results: list[CaseResult], events: int) -> str:
    """One row per case and kmi-rotor (`after`: this tree; `before`: `--before`'s), each
    against the bare mitmdump of the same rounds."""
    med = statistics.median
    lines = [
        "| case | kmi-rotor | req/s bare / with | ratio (median; runs) | best ratio | "
        "p50 / p99 ms bare; with | p50 at 1 conn. ms bare / with (added) | "
        "CPU µs/req bare / with (added) | least CPU µs/req (added) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    added: dict[tuple[str, str], float] = {}
    for c in results:
        bare = c.bare
        spin = f"spin {c.spin_us:g} µs"
        for label, runs in (("before", c.before), (spin, c.spin), ("after", c.rotor)):
            if not runs:
                continue
            ratios = c.ratios(runs)
            b_cpu, r_cpu = med(r.cpu_us for r in bare), med(r.cpu_us for r in runs)
            b_one, r_one = med(r.p50_1_ms for r in bare), med(r.p50_1_ms for r in runs)
            added[(c.name, label)] = r_cpu - b_cpu
            # A shared machine only ever slows a run down: the best run of each is the one
            # least disturbed, and so the fairest pair when the others are noisy.
            best = max(r.rps for r in runs) / max(r.rps for r in bare)
            b_least, r_least = min(r.cpu_us for r in bare), min(r.cpu_us for r in runs)
            lines.append(
                f"| {c.name} | {label} | {med(r.rps for r in bare):.0f} / "
                f"{med(r.rps for r in runs):.0f} | "
                f"{med(ratios):.2f}; {', '.join(f'{x:.2f}' for x in ratios)} | {best:.2f} | "
                f"{med(r.p50_ms for r in bare):.1f} / {med(r.p99_ms for r in bare):.1f}; "
                f"{med(r.p50_ms for r in runs):.1f} / {med(r.p99_ms for r in runs):.1f} | "
                f"{b_one:.2f} / {r_one:.2f} ({r_one - b_one:+.2f}) | "
                f"{b_cpu:.0f} / {r_cpu:.0f} ({r_cpu - b_cpu:+.0f}) | "
                f"{b_least:.0f} / {r_least:.0f} ({r_least - b_least:+.0f}) |"
            )
    for label in ("before", "after"):
        if ("stream", label) in added and ("reverse", label) in added:
            per_event = (added[("stream", label)] - added[("reverse", label)]) / (events + 2)
            lines.append(
                f"\nadded CPU per streamed event ({label}): {per_event:+.1f} µs "
                f"(stream less reverse, over {events + 2} events)"
            )
    for c in results:
        if c.busy and min(c.busy) < BUSY:
            lines.append(
                f"\nWARNING: {c.name}: the proxies used {min(c.busy):.2f} of their CPU in a "
                "round: the load held them back, and the ratios lean towards 1"
            )
    errors = sum(r.errors for c in results for r in (*c.bare, *c.rotor, *c.before, *c.spin))
    if errors:
        lines.append(f"\nWARNING: {errors} requests failed or were refused")
    return "\n".join(lines)


def pin_cpus() -> frozenset[int]:
    """Keep this process (the load generator) and what it starts from now on off the last
    CPU, which is left to the proxies; that CPU, as a set."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:-1])
    return frozenset(cpus[-1:])


def decision_cost(quick: bool) -> str:
    from bench_admission import measure_cost

    row = measure_cost(1000, False, 2_000 if quick else 20_000, 3 if quick else 7)
    return f"decision (admission + selection + settle), 1,000 keys: {row.engine_us:.1f} µs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s warm-up, 3 s runs, 3 runs")
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {','.join(CASES)}")
    parser.add_argument("--runs", type=int, default=None, help="rounds per case (default 4)")
    parser.add_argument("--seconds", type=float, default=None, help="per run (default 6)")
    parser.add_argument("--warmup", type=float, default=None, help="before each run (default 2)")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--events", type=int, default=50, help="content events per stream")
    parser.add_argument(
        "--body-kb", type=int, default=200, help="the conversation's size in the agent case"
    )
    parser.add_argument("--profile", type=Path, default=None, help="folder for the samples")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout of this repository (say, `git archive` of an older commit): its "
        "kmi-rotor runs as a third proxy in the same rounds, for a before/after in one run",
    )
    parser.add_argument(
        "--spin",
        type=float,
        default=None,
        metavar="US",
        help="a third proxy whose addon only spins US µs of CPU per request in kmi-rotor's hooks",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="load every proxy at the same time, on the one CPU they share, instead of in turn",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=len(os.sched_getaffinity(0)) >= 2,
        help="run the proxies on one CPU and the load, the upstream and Redis on the others "
        "(default: on with 2 CPUs or more)",
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 4)
    args.seconds = args.seconds or (3.0 if args.quick else 6.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if args.together and not args.pin:
        parser.error("--together needs the proxies pinned to one CPU (--pin)")
    proxy_cpus = pin_cpus() if args.pin else None
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as d:
        setup = start_upstream(Path(d), args.events)  # started after pinning: on the others
        setup.proxy_cpus = proxy_cpus
        results = []
        try:
            for case in (c for c in cases if c != "decision"):
                results.append(run_case(setup, case, args))
        finally:
            setup.stop()
    where = f", proxies on CPU {min(proxy_cpus)}, the rest elsewhere" if proxy_cpus else ""
    print(
        f"\n{args.concurrency} connections, {args.runs} "
        + ("rounds, the proxies loaded together," if args.together else "alternating runs")
        + f" of {args.seconds:g} s"
        + where
    )
    if results:
        print(report(results, args.events))
    if "decision" in cases:
        print(decision_cost(args.quick))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["summarise"]:
    print(summarise(Path(sys.argv[2]).read_text()))
elif __name__ == "__main__":
    sys.exit(main())
