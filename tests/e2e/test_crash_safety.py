"""Crash safety of the state folder: mitmdump killed with SIGKILL at random moments under
load, the CLI and a second proxy writing the same folder; real processes throughout."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest
from proctools import Mitmdump, start_mitmdump, wait_until

import fake_provider
from fake_provider import KeyBehaviour

from ._crash_helpers import (
    CHAT,
    Faults,
    Load,
    Target,
    cli,
    key_status,
    provider_counts,
    quiet_requests,
    read_state,
    requests_by_label,
    secret,
    state_folder,
    write_config,
)

SEED = 20261127
LABELS = ("k1", "k2", "k3", "k4")
SECRETS = {secret(label): label for label in LABELS}
BUDGET = 30.0  # seconds of kill-and-restart cycles: ~2 s each on an idle 2-core machine
MIN_ITERATIONS = 8
MAX_ITERATIONS = 40
DEBOUNCE = 0.5  # the proxy's pause between state writes under steady traffic
KILL_AFTER = (0.2, 1.5)  # seconds of load between readiness and SIGKILL
CLIENTS = 6  # the load's threads, so at most this many requests in flight at a kill
LAG = 1.0  # the state may miss what arrived this close to a kill: debounce 0.5 s + margin
CLI_AT = 4  # this iteration disables k3 with the CLI; the next two check it and undo it
FAULTS = (429, 429, 500, 503)
HEALTH = {
    "rate_limit_backoff": 0.2,
    "overload_backoff": 0.1,
    "overload_backoff_max": 0.5,
    "max_cooldown_seconds": 2.0,
}


@pytest.fixture
def plain_provider() -> Iterator[fake_provider.FakeProvider]:
    """A plain-HTTP fake provider (no TLS: restarts and load stay cheap) with four keys."""
    fp = fake_provider.FakeProvider(
        {secret(label): KeyBehaviour() for label in LABELS}, event_delay=0.005
    )
    with fake_provider.run_in_thread(fp) as running:
        yield running


@dataclass
class Iteration:
    index: int
    ran: float  # seconds from readiness to the kill
    sent: int  # requests the provider received from this process
    counted: int  # requests the state gained from this process
    lag: float | None  # kill time minus arrival of the first request the state missed
    temps: int  # .state.*.tmp files in the folder after the kill
    aimed: bool = False  # killed when the next state write was due, not at a random moment


@dataclass
class Rig:
    """One state folder, one config, proxies started and killed on it one after another."""

    tmp_path: Path
    confdir: Path
    provider: fake_provider.FakeProvider
    target: Target = field(default_factory=Target)
    procs: list[Mitmdump] = field(default_factory=list)
    seen: int = 0  # provider records that belong to proxies already killed
    counted: Counter[str] = field(default_factory=Counter)  # state's counters after last kill
    temps: int = 0  # temporary files in the folder after the last kill

    def __post_init__(self) -> None:
        self.state_dir = self.tmp_path / "state"
        self.config = write_config(
            self.tmp_path / "rotor.toml",
            f"127.0.0.1:{self.provider.port}",
            self.state_dir,
            LABELS,
            limits={"max_wait_seconds": 1.0},
            health=HEALTH,
        )

    def start(self, name: str = "") -> Mitmdump:
        m = start_mitmdump(
            self.config,
            self.confdir,
            self.tmp_path / f"mitmdump-{name or len(self.procs)}.log",
            mode=f"reverse:{self.provider.url}",
            extra=("--set", "flow_detail=0"),  # no per-flow output: the load stays cheap
        )
        self.procs.append(m)
        return m

    def stop_all(self) -> None:
        for m in self.procs:
            m.stop()

    def since_start(self) -> list[fake_provider.RecordedRequest]:
        """What the provider received from the live proxy so far."""
        return self.provider.requests[self.seen :]

    def kill(self, m: Mitmdump, index: int, started: float) -> Iteration:
        """SIGKILL `m` mid-traffic, then check the folder and the counters it left."""
        self.target.set(None)
        killed = time.time()
        m.stop(signal.SIGKILL)
        records = quiet_requests(self.provider)
        window, self.seen = records[self.seen :], len(records)
        doc = read_state(self.state_dir)  # raises on a torn or invalid document
        folder = state_folder(self.state_dir)
        assert not folder.corrupt, f"iteration {index}: {folder.corrupt}"
        now = requests_by_label(doc)
        gained = {label: now[label] - self.counted[label] for label in LABELS}
        sent = provider_counts(window, SECRETS)
        early = provider_counts((r for r in window if r.time <= killed - LAG), SECRETS)
        assert set(sent) <= set(LABELS), f"a request went upstream without a pool key: {sent}"
        for label in LABELS:
            assert early[label] <= gained[label], (
                f"iteration {index}, key {label}: state gained {gained[label]}, the provider "
                f"received {sent[label]} ({early[label]} of them over {LAG}s before the kill)"
            )
        # A request is counted when it is admitted, a moment before its bytes leave: a state
        # write in that moment, then the kill, counts a request the provider never received.
        # At most one per client in flight, never more.
        over = {
            label: gained[label] - sent[label] for label in LABELS if gained[label] > sent[label]
        }
        assert sum(over.values()) <= CLIENTS, (
            f"iteration {index}: the state counted more than the provider received: {over}"
        )
        # A kill mid-write may leave its temporary file behind: one per kill at most.
        assert len(folder.temps) <= self.temps + 1, folder.temps
        self.counted, self.temps = now, len(folder.temps)
        counted = sum(gained.values())
        lag = _lag(window, counted, killed)
        return Iteration(index, killed - started, len(window), counted, lag, self.temps)


def _lag(window: list[fake_provider.RecordedRequest], counted: int, killed: float) -> float | None:
    """How long before the kill the first request the state missed arrived (None: none)."""
    times = sorted(r.time for r in window)
    return None if counted >= len(times) else max(0.0, killed - times[counted])


def _operators(rig: Rig) -> dict[str, str | None]:
    doc = read_state(rig.state_dir)
    assert doc is not None
    return {r.label: r.operator.action if r.operator else None for r in doc.keys.values()}


def _disabled_on_disk(rig: Rig, label: str) -> bool:
    doc = read_state(rig.state_dir)
    recs = [r for r in (doc.keys.values() if doc else ()) if r.label == label]
    return bool(recs and recs[0].health.disabled_reason)


def _disable_k3(rig: Rig, m: Mitmdump) -> None:
    """Under load: the CLI disables k3; the proxy applies it and its own writes keep it."""
    cli(rig.config, "disable", "k3")
    wait_until(lambda: key_status(m.url)["k3"] == "disabled", 5, "the proxy applies the disable")
    wait_until(lambda: _disabled_on_disk(rig, "k3"), 5, "the disable reaches the state")


def _check_disabled_then_reset(rig: Rig, m: Mitmdump) -> None:
    """After the restart k3 is still disabled and unused; then `reset all` brings it back."""
    assert _operators(rig)["k3"] == "disable"
    assert key_status(m.url)["k3"] == "disabled"
    wait_until(lambda: len(rig.since_start()) >= 30, 10, "traffic after the restart")
    assert "k3" not in provider_counts(rig.since_start(), SECRETS)
    cli(rig.config, "reset", "all")
    wait_until(lambda: key_status(m.url)["k3"] != "disabled", 5, "the proxy applies the reset")
    wait_until(lambda: not _disabled_on_disk(rig, "k3"), 5, "the reset reaches the state")


def _check_reset_kept(rig: Rig, m: Mitmdump) -> None:
    assert set(_operators(rig).values()) == {"reset"}
    wait_until(lambda: "k3" in provider_counts(rig.since_start(), SECRETS), 5, "k3 serves again")


HOOKS: dict[int, Callable[[Rig, Mitmdump], None]] = {
    CLI_AT: _disable_k3,
    CLI_AT + 1: _check_disabled_then_reset,
    CLI_AT + 2: _check_reset_kept,
}


def _report(its: list[Iteration]) -> str:
    lines = [f"{len(its)} kills", "iter  kill    ran_s  sent  counted  missed  lag_s  tmp"]
    for it in its:
        lag = "-" if it.lag is None else f"{it.lag:.2f}"
        lines.append(
            f"{it.index:>4}  {'aimed' if it.aimed else 'random':6}  {it.ran:5.2f}  {it.sent:4}  "
            f"{it.counted:7}  {it.sent - it.counted:6}  {lag:>5}  {it.temps:3}"
        )
    return "\n".join(lines)


def _aim_at_next_write(rig: Rig, rng: random.Random) -> None:
    """Return about when the proxy writes the state next: one debounce after a write ended.
    A uniformly random kill lands in the few milliseconds of a write only now and then."""
    path = rig.state_dir / "state.json"

    def identity() -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    first, end = identity(), time.monotonic() + 5
    while identity() == first:  # 1 ms polls: the write ends with a rename, a new inode
        assert time.monotonic() < end, "the proxy wrote no state for 5 s under load"
        time.sleep(0.001)
    time.sleep(DEBOUNCE + rng.uniform(-0.005, 0.03))


def _cycles(rig: Rig, rng: random.Random) -> list[Iteration]:
    """Start, load, kill, check; until the budget is spent. Every third kill is aimed at the
    next state write, the others fall at a random moment."""
    its: list[Iteration] = []
    deadline = time.monotonic() + BUDGET
    while len(its) < MIN_ITERATIONS or (time.monotonic() < deadline and len(its) < MAX_ITERATIONS):
        i = len(its)
        aimed = i % 3 == 2 and i not in HOOKS
        m = rig.start()
        started = time.time()
        rig.target.set(m.url)
        if i in HOOKS:
            HOOKS[i](rig, m)
        if aimed:
            _aim_at_next_write(rig, rng)
        else:
            time.sleep(rng.uniform(*KILL_AFTER))  # the random moment of the crash
        its.append(rig.kill(m, i, started))
        its[-1].aimed = aimed
    return its


@pytest.mark.long(30)
def test_sigkill_at_random_moments_keeps_state_valid_and_counters_exact_enough(
    tmp_path, mitm_confdir, plain_provider
):
    rig = Rig(tmp_path, mitm_confdir, plain_provider)
    # What a kill in the middle of a write leaves: a torn temporary file. It must be ignored.
    rig.state_dir.mkdir(mode=0o700)
    (rig.state_dir / ".state.torn0000.tmp").write_text('{"schema_version": 1, "keys": {"sha')
    rig.temps = 1
    base = {secret(label): KeyBehaviour() for label in LABELS}
    load = Load(rig.target, threads=CLIENTS, seed=SEED).start()
    faults = Faults(plain_provider, base, FAULTS, seed=SEED).start()
    try:
        its = _cycles(rig, random.Random(SEED))
    finally:
        faults.stop()
        outcomes = load.stop()
        rig.stop_all()
    print(f"\n{_report(its)}\nclient outcomes: {dict(sorted(outcomes.items()))}")
    print("state folder:", state_folder(rig.state_dir))

    statuses = Counter(r.status for r in plain_provider.requests)
    assert statuses[200] and statuses[429] and statuses[500] + statuses[503], statuses
    assert outcomes["stream:200"] and outcomes["chat:200"], outcomes
    assert sum(it.sent for it in its) >= 20 * len(its)
    # The trace is appended from a thread too: a kill must not leave a torn line in it.
    lines = (rig.state_dir / "trace.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["id"] for line in lines)


def test_two_proxies_sharing_a_state_folder_add_up_exactly(tmp_path, mitm_confdir, plain_provider):
    rig = Rig(tmp_path, mitm_confdir, plain_provider)
    with ThreadPoolExecutor(2) as pool:  # side by side: each start costs a second or more
        first, second = pool.map(rig.start, ("first", "second"))
    targets = (Target(), Target())
    loads = [Load(t, threads=3, seed=SEED + n).start() for n, t in enumerate(targets)]
    base = {secret(label): KeyBehaviour() for label in LABELS}
    faults = Faults(plain_provider, base, FAULTS, seed=SEED).start()
    for t, m in zip(targets, (first, second), strict=True):
        t.set(m.url)

    def served(n: int) -> bool:
        return all(load.outcomes["chat:200"] + load.outcomes["stream:200"] >= n for load in loads)

    try:
        wait_until(lambda: served(60), 30, "both proxies served traffic")
    finally:
        faults.stop()
        for load in loads:
            load.stop()
    for m in (first, second):
        m.process.proc.send_signal(signal.SIGTERM)  # once: a second SIGTERM kills outright
    assert [m.process.proc.wait(30) for m in (first, second)] == [0, 0]

    doc = read_state(rig.state_dir)
    assert doc is not None and not state_folder(rig.state_dir).corrupt
    records = plain_provider.requests
    sent = provider_counts(records, SECRETS)
    got_429 = provider_counts((r for r in records if r.status == 429), SECRETS)
    assert requests_by_label(doc) == sent
    assert Counter({r.label: r.upstream_429 for r in doc.keys.values()}) == got_429
    assert sum(got_429.values()) > 0


def test_operator_action_just_before_a_kill_holds_after_restart(
    tmp_path, mitm_confdir, plain_provider
):
    rig = Rig(tmp_path, mitm_confdir, plain_provider)
    load = Load(rig.target, threads=2, seed=SEED).start()
    try:
        m = rig.start()
        rig.target.set(m.url)
        wait_until(lambda: read_state(rig.state_dir), 10, "the proxy wrote its state")
        cli(rig.config, "disable", "k2")
        rig.kill(m, 0, time.time())  # before the proxy's next two writes
        assert _operators(rig)["k2"] == "disable"
        m = rig.start()
        assert key_status(m.url)["k2"] == "disabled"
    finally:
        load.stop()
        rig.stop_all()


def test_temporary_file_of_a_write_cut_by_a_kill_is_cleaned_up(
    tmp_path, mitm_confdir, plain_provider
):
    rig = Rig(tmp_path, mitm_confdir, plain_provider)
    rig.state_dir.mkdir(mode=0o700)
    torn = rig.state_dir / ".state.torn0000.tmp"  # as a SIGKILL between mkstemp and rename
    torn.write_text('{"schema_version": 1, "keys": {"sha')
    m = rig.start()
    with httpx.Client(trust_env=False, timeout=10) as c:
        assert c.post(m.url + "/v1/chat/completions", json=CHAT).status_code == 200
    wait_until(lambda: sum(requests_by_label(read_state(rig.state_dir)).values()) == 1, 5)
    assert m.stop() == 0
    assert state_folder(rig.state_dir).temps == []
