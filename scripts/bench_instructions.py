"""What kmi-rotor costs per request, counted in instructions: bare mitmdump and mitmdump with
kmi-rotor each run under valgrind's callgrind, which counts every instruction the process
executes. Unlike throughput on a shared machine, the count hardly moves between runs (about
1%), whatever else the machine is doing.

Setup as `bench_overhead.py`'s case of that name (`--case`: reverse, 2 keys, by default; regular
mode with TLS; 1,000 keys; streamed answers, which bare mitmdump streams by its own flag;
`[cluster]` on a throwaway redis-server, whose own work is not counted, with 2 keys or 1,000):
the same fast TLS upstream and the same mitmdump options. Each proxy starts under callgrind
with counting off; two keep-alive connections send `--warmup` requests, counting starts,
`--warmup` more run, the counters are zeroed, and exactly `--requests` requests are counted.
Reported: instructions per request of each proxy (all its threads), and bare's over
kmi-rotor's, the throughput ratio the same work would give if an instruction cost the same time
everywhere. Rounds alternate the proxies.

What the count leaves out, and what it weighs wrongly:
- Time: cache misses, branch mispredictions, system calls' kernel time, waits on the GIL.
- Work on timers (the configuration watch every 0.5 s, state saves): under valgrind a request
  takes about 50 times longer, so such work weighs about 50 times more per request than at
  full speed. The figure overstates kmi-rotor's cost by that much.

`--cycles`: estimated cycles rather than instructions: callgrind simulates the caches and the
branch predictor, and a miss or a misprediction weighs what KCachegrind's formula gives it.
An instruction of Python's interpreter loop (most of kmi-rotor's) misses more often than one of
OpenSSL's ciphers (much of bare mitmdump's), so this ratio is nearer the throughput's. About
twice as slow.

`--functions`: one more run of kmi-rotor with Python's perf trampolines
(`PYTHONPERFSUPPORT=1`), whose addresses `/tmp/perf-PID.map` names: its instructions per
request by Python function, inclusive, kmi-rotor's own and mitmproxy's hook dispatch. The
trampolines add instructions of their own: these figures are for comparing functions, not
for the ratio.

Needs valgrind (Debian: `apt-get install valgrind`).

    .venv/bin/python scripts/bench_instructions.py [--case reverse] [--requests 150]
        [--rounds 2] [--before TREE] [--functions]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "addon", ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_load import Clients  # noqa: E402
from bench_overhead import CASES, CaseSetup, Setup, case_setup, launch, proxy_argv, start_upstream  # noqa: E402
from proctools import LISTEN_RE  # noqa: E402

CALLGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
EVENTS = 50
"""Content events per streamed answer, as in `bench_overhead.py`."""


# -- reading callgrind's output -------------------------------------------------------------


def summary(dump: Path) -> dict[str, int]:
    """The totals of a callgrind output file by event (its `events:` and `summary:` lines)."""
    names: list[str] = []
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("summary:"):
            return dict(zip(names or ["Ir"], map(int, line.split()[1:]), strict=False))
    raise ValueError(f"{dump}: no summary line")


def total_instructions(dump: Path) -> int:
    """The instruction count of a callgrind output file."""
    return summary(dump)["Ir"]


def estimated_cycles(events: dict[str, int]) -> int:
    """Cycles as callgrind's simulation of the caches and branch predictor estimates them
    (KCachegrind's formula): an instruction 1, a first-level cache miss 10 more, a last-level
    miss 100 more, a mispredicted branch 10 more."""
    l1 = events["I1mr"] + events["D1mr"] + events["D1mw"]
    ll = events["ILmr"] + events["DLmr"] + events["DLmw"]
    return events["Ir"] + 10 * l1 + 100 * ll + 10 * (events["Bcm"] + events["Bim"])


@dataclass(frozen=True)
class PerfMap:
    """`/tmp/perf-PID.map`: the address range of each Python function's trampoline."""

    starts: list[int]
    ends: list[int]
    names: list[str]

    @classmethod
    def parse(cls, text: str) -> PerfMap:
        rows = []
        for line in text.splitlines():
            start, size, name = line.split(" ", 2)
            rows.append((int(start, 16), int(size, 16), name))
        rows.sort()
        return cls([s for s, _, _ in rows], [s + n for s, n, _ in rows], [n for *_, n in rows])

    def name_of(self, address: int) -> str | None:
        i = bisect.bisect_right(self.starts, address) - 1
        return self.names[i] if i >= 0 and address < self.ends[i] else None


_ANNOTATED = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\?\?\?:0x([0-9a-f]+)('\d+)? \[\?\?\?\]")


def by_function(annotated: str, perf_map: PerfMap) -> dict[str, int]:
    """Inclusive instructions by Python function, from `callgrind_annotate --inclusive=yes`:
    the trampolines' anonymous addresses named by the perf map (a recursive call's entry,
    `'2` and deeper, is inside its outer one and not added again)."""
    out: dict[str, int] = {}
    for line in annotated.splitlines():
        m = _ANNOTATED.match(line)
        if m is None or m.group(3):
            continue
        name = perf_map.name_of(int(m.group(2), 16))
        if name is not None:
            out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out


# -- runs ------------------------------------------------------------------------------------


def counted(
    setup: Setup,
    case: CaseSetup,
    name: str,
    args: argparse.Namespace,
    tree: Path | None = ROOT,
    functions: bool = False,
) -> tuple[int, Path]:
    """Instructions of `args.requests` requests through one proxy under callgrind (kmi-rotor
    from `tree`, bare mitmdump when None); and the dump."""
    out = setup.tmp / f"callgrind-{name}.out"
    config, extra = (None, case.bare_extra) if tree is None else (case.config, [])
    argv = proxy_argv(setup, case.mode, config, extra, tree or ROOT)
    simulate = ["--cache-sim=yes", "--branch-sim=yes"] if args.cycles else []
    argv = [*CALLGRIND, *simulate, f"--callgrind-out-file={out}", *argv]
    env = {"PYTHONPERFSUPPORT": "1"} if functions else None
    child = launch(argv, setup.tmp / f"{name}.log", LISTEN_RE, timeout=600, env=env)
    pid = str(child.proc.pid)

    def control(*flags: str) -> None:
        subprocess.run(["callgrind_control", *flags, pid], check=True, capture_output=True)

    async def go() -> int:
        clients = await Clients.open(case.target(setup, child), 2, stream=case.stream)
        try:
            await clients.send(args.warmup)  # counting off: imports, first-use caches
            control("--instr=on")
            await clients.send(args.warmup)  # counting on: callgrind's own first translations
            control("--zero")
            ok = await clients.send(args.requests)
            control("--dump")
            return ok
        finally:
            clients.close()

    try:
        ok = asyncio.run(go())
    finally:
        perf_map = Path(f"/tmp/perf-{pid}.map")
        if perf_map.exists():
            shutil.move(perf_map, setup.tmp / f"perf-{name}.map")
        child.stop()
    if ok != args.requests:
        raise SystemExit(f"{name}: {args.requests - ok} of {args.requests} requests failed")
    dump = Path(f"{out}.1")
    events = summary(dump)
    return (estimated_cycles(events) if args.cycles else events["Ir"]), dump


TIMERS = (
    "StateKeeper._run",
    "StateKeeper._commit",
    "StateStore.changed",
    "ConfigWatcher._run",
    "signature",
    "RedisState._heartbeat",
)
"""kmi-rotor's work on timers rather than per request (the state saves, in the event loop and
in their thread; the configuration watch; with `[cluster]`, the heartbeat): none runs inside
another."""


def on_timers(costs: dict[str, int]) -> int:
    """Of `by_function`'s costs, the inclusive instructions of the work on timers."""
    return sum(n for f, n in costs.items() if "kmi_rotor" in f and _name(f) in TIMERS)


def _name(frame: str) -> str:
    return frame[4:].split(":", 1)[0]


def functions_report(
    setup: Setup, case: CaseSetup, args: argparse.Namespace, per: dict[str, list[float]],
    top: int = 30,
) -> str:  # fmt: skip
    total, dump = counted(setup, case, "rotor-functions", args, functions=True)
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    perf_map = PerfMap.parse((setup.tmp / "perf-rotor-functions.map").read_text())
    costs = by_function(annotated, perf_map)
    ours = sorted(
        ((n, f) for f, n in costs.items() if "kmi_rotor" in f and "open_connection" not in f),
        reverse=True,
    )
    lines = ["kmi-rotor's functions, inclusive instructions per request (with trampolines):"]
    for n, f in ours[:top]:
        lines.append(f"  {n / args.requests / 1000:8.1f} K  {_short(f)}")
    # The timers' share of this run, applied to the runs without trampolines.
    share = on_timers(costs) / total
    bare, with_ = statistics.median(per["bare"]), statistics.median(per["after"])
    timers = share * with_
    lines.append(
        f"of kmi-rotor's, on timers (state saves, configuration watch; {', '.join(TIMERS)}): "
        f"{share:.1%} of the process's instructions, about {timers / 1e3:.0f} K per request, "
        "about 50 times their weight at full speed; without them, "
        f"bare / with = {bare / (with_ - timers):.3f}"
    )
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`py::Rotor.request:/path/to/addon.py` -> `Rotor.request (addon.py)`."""
    m = re.match(r"py::(.*):(?:.*/)?([^/]+)$", frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="reverse", choices=[c for c in CASES if c != "decision"])
    parser.add_argument("--requests", type=int, default=150, help="counted per proxy and round")
    parser.add_argument("--warmup", type=int, default=40, help="before counting, twice")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, default=None, help="another checkout, as a third")
    parser.add_argument("--functions", action="store_true", help="by Python function too")
    parser.add_argument(
        "--cycles",
        action="store_true",
        help="count estimated cycles (callgrind's cache and branch simulation) instead",
    )
    args = parser.parse_args(argv)
    if args.cycles and args.functions:
        parser.error("--functions counts instructions: give it without --cycles")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    per: dict[str, list[float]] = {"bare": [], "after": []}
    if args.before is not None:
        per["before"] = []
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as d:
        setup = start_upstream(Path(d), EVENTS)
        try:
            case = case_setup(setup, args.case)
            trees = {"bare": None, "after": ROOT, "before": args.before}
            unit = "estimated cycles" if args.cycles else "instructions"
            for i in range(args.rounds):
                names = list(per)
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    total, _ = counted(setup, case, f"{name}-{i}", args, trees[name])
                    per[name].append(total / args.requests)
                    print(f"round {i + 1} {name:6} {total / args.requests / 1e6:7.3f} M {unit} per request", flush=True)  # fmt: skip
            print(report(per, EVENTS + 2 if case.stream else 0, unit))
            if args.functions:
                print(functions_report(setup, case, args, per))
        finally:
            setup.stop()
    return 0


def report(per: dict[str, list[float]], events: int = 0, unit: str = "instructions") -> str:
    """Each kmi-rotor's median `unit` per request, added over bare's, and the ratio; with
    `events` per streamed answer, what it adds per event too."""
    bare = statistics.median(per["bare"])
    lines = [f"bare mitmdump: {bare / 1e6:.3f} M {unit} per request"]
    for name in ("before", "after"):
        if per.get(name):
            with_ = statistics.median(per[name])
            lines.append(
                f"kmi-rotor ({name}): {with_ / 1e6:.3f} M (+{(with_ - bare) / 1e3:.0f} K); "
                f"bare / with = {bare / with_:.3f}"
            )
            if events:
                lines[-1] += (
                    f"; at most +{(with_ - bare) / events / 1e3:.1f} K per event (the request's own included)"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
