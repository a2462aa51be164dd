"""Admission limiter: exact sliding windows, tokens, concurrency, candidates, persistence."""

from __future__ import annotations

import json
import random
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from kmi_rotor.core import limiter as limiter_module
from kmi_rotor.core.limiter import (
    GLOBAL,
    WINDOWS,
    Admitted,
    Exhausted,
    Limiter,
    Limits,
    Rejected,
    Reservation,
    enforced_length,
    global_binds,
    rejected_in_turn,
)

T0 = 1_000.0
EPS = 1e-6
UNLIMITED = Limits()


def admit(
    lim: Limiter, now: float, candidates: tuple[str, ...] = ("a",), tokens: int = 0
) -> Admitted:
    result = lim.try_admit(candidates, tokens, now)
    assert isinstance(result, Admitted), result
    return result


def reject(
    lim: Limiter, now: float, candidates: tuple[str, ...] = ("a",), tokens: int = 0
) -> Rejected:
    result = lim.try_admit(candidates, tokens, now)
    assert isinstance(result, Rejected), result
    return result


def on(scope: str, limits: Limits) -> Limiter:
    """A limiter with `limits` on `scope` ("global" or key "a") and nothing elsewhere."""
    if scope == GLOBAL:
        return Limiter(limits, {"a": UNLIMITED})
    return Limiter(UNLIMITED, {"a": limits})


# -- Limits ----------------------------------------------------------------------------------


def test_merged_override_wins_where_set() -> None:
    pool = Limits(requests_per_minute=60, tokens_per_day=1_000, concurrency=4)
    override = Limits(requests_per_minute=10, requests_per_second=1)
    assert pool.merged(override) == Limits(
        requests_per_second=1, requests_per_minute=10, tokens_per_day=1_000, concurrency=4
    )
    assert pool.merged(UNLIMITED) == pool


def test_is_unlimited() -> None:
    assert UNLIMITED.is_unlimited()
    assert not Limits(concurrency=1).is_unlimited()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_limits_reject_non_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="requests_per_second"):
        Limits(requests_per_second=bad)  # type: ignore[arg-type]


# -- each window alone: exact boundaries -----------------------------------------------------

REQUEST_CASES = [(name, 3) for name in WINDOWS if name.startswith("requests_")]


@pytest.mark.parametrize("scope", [GLOBAL, "key:a"])
@pytest.mark.parametrize(("name", "limit"), REQUEST_CASES)
def test_request_window_boundary_is_exact(scope: str, name: str, limit: int) -> None:
    lim = on(scope, Limits(**{name: limit}))
    for _ in range(limit):
        admit(lim, T0)
    refused = reject(lim, T0)
    assert refused.exhausted == (Exhausted(scope, name, T0 + WINDOWS[name]),)
    assert refused.retry_at == T0 + WINDOWS[name]
    assert refused.possible
    reject(lim, T0 + WINDOWS[name] - EPS)
    admit(lim, T0 + WINDOWS[name])


@pytest.mark.parametrize("scope", [GLOBAL, "key:a"])
@pytest.mark.parametrize("name", ["tokens_per_minute", "tokens_per_day"])
def test_token_window_boundary_is_exact(scope: str, name: str) -> None:
    lim = on(scope, Limits(**{name: 100}))
    admit(lim, T0, tokens=60)
    admit(lim, T0, tokens=40)
    refused = reject(lim, T0, tokens=1)
    assert refused.exhausted == (Exhausted(scope, name, T0 + WINDOWS[name]),)
    reject(lim, T0 + WINDOWS[name] - EPS, tokens=1)
    admit(lim, T0 + WINDOWS[name], tokens=100)


def test_staggered_admissions_free_one_by_one() -> None:
    lim = on("key:a", Limits(requests_per_second=2))
    admit(lim, 0.0)
    admit(lim, 0.5)
    assert reject(lim, 0.9).retry_at == 1.0
    admit(lim, 1.0)
    assert reject(lim, 1.2).retry_at == 1.5
    admit(lim, 1.5)


def test_a_token_request_waits_for_enough_to_expire() -> None:
    lim = on("key:a", Limits(tokens_per_minute=100))
    for at, tokens in ((0.0, 10), (10.0, 50), (20.0, 40)):
        admit(lim, at, tokens=tokens)
    # 60 tokens need both the 10 and the 50 gone, not only the oldest entry.
    assert reject(lim, 30.0, tokens=60).retry_at == 70.0
    reject(lim, 70.0 - EPS, tokens=60)
    admit(lim, 70.0, tokens=60)


# -- combinations, scopes, candidates --------------------------------------------------------


def test_strictest_window_binds() -> None:
    lim = on("key:a", Limits(requests_per_second=5, requests_per_minute=7))
    for _ in range(5):
        admit(lim, 0.0)
    assert reject(lim, 0.0).exhausted == (Exhausted("key:a", "requests_per_second", 1.0),)
    admit(lim, 2.0)
    admit(lim, 2.0)
    refused = reject(lim, 2.0)
    assert refused.exhausted == (Exhausted("key:a", "requests_per_minute", 60.0),)
    # Both full at once: both named, and the later one decides.
    for _ in range(5):
        admit(lim, 60.0)
    refused = reject(lim, 60.0)
    assert refused.exhausted == (
        Exhausted("key:a", "requests_per_second", 61.0),
        Exhausted("key:a", "requests_per_minute", 62.0),
    )
    assert refused.retry_at == 62.0
    reject(lim, 62.0 - EPS)
    admit(lim, 62.0)


def test_global_limit_binds_across_keys() -> None:
    lim = Limiter(Limits(requests_per_second=2), {"a": UNLIMITED, "b": UNLIMITED})
    admit(lim, 0.0, ("a",))
    admit(lim, 0.0, ("b",))
    refused = reject(lim, 0.0, ("a", "b"))
    assert refused.exhausted == (Exhausted(GLOBAL, "requests_per_second", 1.0),)
    assert refused.retry_at == 1.0


def test_key_limit_leaves_global_room_for_other_keys() -> None:
    lim = Limiter(Limits(requests_per_second=10), {"a": Limits(requests_per_second=1)})
    admit(lim, 0.0, ("a",))
    reject(lim, 0.0, ("a",))
    assert admit(lim, 0.0, ("a", "b")).key == "b"  # "b" is unconfigured: unlimited


def test_first_candidate_that_fits_wins() -> None:
    keys = {k: Limits(requests_per_minute=1) for k in "abc"}
    lim = Limiter(UNLIMITED, keys)
    assert admit(lim, 0.0, ("b", "a", "c")).key == "b"
    assert admit(lim, 0.0, ("b", "a", "c")).key == "a"  # full first candidate falls through
    assert admit(lim, 0.0, ("b", "a", "c")).key == "c"
    reject(lim, 0.0, ("a", "b", "c"))


def test_rejection_names_every_limit_and_the_earliest_retry() -> None:
    keys = {"a": Limits(requests_per_minute=1), "b": Limits(requests_per_second=1)}
    lim = Limiter(Limits(requests_per_hour=10), keys)
    admit(lim, 0.0, ("a",))
    admit(lim, 0.5, ("b",))
    refused = reject(lim, 0.7, ("a", "b"))
    assert refused.exhausted == (
        Exhausted("key:a", "requests_per_minute", 60.0),
        Exhausted("key:b", "requests_per_second", 1.5),
    )
    assert refused.retry_at == 1.5  # the earliest key


def test_retry_waits_for_both_global_and_some_key() -> None:
    lim = Limiter(Limits(requests_per_minute=2), {"a": Limits(requests_per_second=1)})
    admit(lim, 0.0)
    admit(lim, 59.5)
    refused = reject(lim, 59.6)
    assert [e.scope for e in refused.exhausted] == [GLOBAL, "key:a"]
    assert refused.retry_at == 60.5  # global frees at 60.0, the key only at 60.5


def test_no_candidate_is_never_possible() -> None:
    refused = reject(Limiter(UNLIMITED, {}), 0.0, ())
    assert (refused.exhausted, refused.retry_at, refused.possible) == ((), None, False)


def test_negative_tokens_are_an_error() -> None:
    with pytest.raises(ValueError):
        Limiter(UNLIMITED, {}).try_admit(["a"], -1, 0.0)


# -- tokens: reservation, correction, oversized ---------------------------------------------


def test_a_later_admission_moves_the_free_time_of_a_larger_request() -> None:
    lim = on("key:a", Limits(tokens_per_minute=100))
    admit(lim, 0.0, tokens=50)
    assert reject(lim, 0.0, tokens=80).retry_at == 60.0
    admit(lim, 10.0, tokens=30)  # a smaller request still fits
    assert reject(lim, 20.0, tokens=80).retry_at == 70.0


def test_correction_down_frees_tokens_at_once() -> None:
    lim = on("key:a", Limits(tokens_per_minute=100))
    held = admit(lim, 0.0, tokens=80).reservation
    reject(lim, 10.0, tokens=50)
    lim.adjust(held, 20)
    admit(lim, 10.0, tokens=80)


def test_correction_up_keeps_the_original_time() -> None:
    lim = on("key:a", Limits(tokens_per_minute=100))
    held = admit(lim, 0.0, tokens=10).reservation
    lim.adjust(held, 95)
    refused = reject(lim, 30.0, tokens=10)
    assert refused.exhausted == (Exhausted("key:a", "tokens_per_minute", 60.0),)
    admit(lim, 60.0, tokens=100)


def test_correction_after_expiry_changes_nothing() -> None:
    lim = on("key:a", Limits(tokens_per_minute=100))
    held = admit(lim, 0.0, tokens=10).reservation
    admit(lim, 61.0, tokens=50)
    lim.adjust(held, 1_000)
    assert lim.usage("key:a", 61.0)["tokens_per_minute"]["used"] == 50
    admit(lim, 61.0, tokens=50)


def test_corrections_apply_to_both_scopes_and_repeat() -> None:
    lim = Limiter(Limits(tokens_per_day=1_000), {"a": Limits(tokens_per_minute=100)})
    held = admit(lim, 0.0, tokens=50).reservation
    lim.adjust(held, 70)
    lim.adjust(held, 30)
    assert lim.usage(GLOBAL, 1.0)["tokens_per_day"]["used"] == 30
    assert lim.usage("key:a", 1.0)["tokens_per_minute"]["used"] == 30
    with pytest.raises(ValueError):
        lim.adjust(held, -1)


@pytest.mark.parametrize("scope", [GLOBAL, "key:a"])
def test_oversized_request_is_refused_outright(scope: str) -> None:
    lim = on(scope, Limits(tokens_per_minute=100))
    refused = reject(lim, 0.0, tokens=101)
    assert refused.exhausted == (Exhausted(scope, "tokens_per_minute", None),)
    assert (refused.retry_at, refused.possible) == (None, False)
    admit(lim, 0.0, tokens=100)


def test_oversized_for_one_key_falls_through_to_another() -> None:
    keys = {"a": Limits(tokens_per_minute=100), "b": Limits(tokens_per_minute=1_000)}
    lim = Limiter(UNLIMITED, keys)
    assert admit(lim, 0.0, ("a", "b"), tokens=500).key == "b"
    refused = reject(lim, 1.0, ("a", "b"), tokens=600)
    assert refused.possible
    assert refused.retry_at == 60.0  # only "b" can ever take it
    assert refused.exhausted[0] == Exhausted("key:a", "tokens_per_minute", None)


# -- concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [GLOBAL, "key:a"])
def test_concurrency_slot_frees_on_release_once(scope: str) -> None:
    lim = on(scope, Limits(concurrency=1))
    held = admit(lim, 0.0).reservation
    refused = reject(lim, 5.0)
    assert refused.exhausted == (Exhausted(scope, "concurrency", None),)
    assert (refused.retry_at, refused.possible) == (None, True)
    lim.release(held)
    lim.release(held)  # the error path after the response path: no second slot
    admit(lim, 5.0)
    reject(lim, 5.0)


def test_release_needs_a_reservation_of_this_limiter() -> None:
    with pytest.raises(TypeError):
        Limiter(UNLIMITED, {}).release(Reservation("a", 0.0, 0, handle=object()))


def test_correction_and_release_in_either_order() -> None:
    lim = on("key:a", Limits(tokens_per_minute=100, concurrency=1))
    held = admit(lim, 0.0, tokens=90).reservation
    lim.release(held)
    lim.adjust(held, 10)
    admit(lim, 0.0, tokens=90)


# -- headroom and usage ----------------------------------------------------------------------


def test_headroom_is_the_tightest_remaining_fraction() -> None:
    limits = Limits(requests_per_minute=10, concurrency=2, tokens_per_day=1_000)
    lim = Limiter(UNLIMITED, {"a": limits, "b": UNLIMITED})
    assert lim.headroom("a", 0.0) == 1.0
    for _ in range(3):
        lim.release(admit(lim, 0.0, tokens=100).reservation)
    assert lim.headroom("a", 1.0) == pytest.approx(0.7)
    admit(lim, 1.0)
    assert lim.headroom("a", 1.0) == pytest.approx(0.5)  # one of two slots taken
    assert lim.headroom("b", 1.0) == lim.headroom("unknown", 1.0) == 1.0


def test_usage_reports_limit_used_and_free_at() -> None:
    lim = on("key:a", Limits(requests_per_second=1, tokens_per_minute=100, concurrency=3))
    admit(lim, 10.0, tokens=40)
    assert lim.usage("key:a", 10.5) == {
        "requests_per_second": {"limit": 1, "used": 1, "free_at": 11.0},
        "tokens_per_minute": {"limit": 100, "used": 40, "free_at": None},
        "concurrency": {"limit": 3, "used": 1, "free_at": None},
    }
    assert lim.usage("key:zzz", 0.0) == lim.usage("nonsense", 0.0) == {}


# -- persistence and reconfiguration ---------------------------------------------------------


def test_snapshot_restore_keeps_day_counters() -> None:
    limits = Limits(requests_per_second=5, requests_per_day=3, tokens_per_day=1_000)
    lim = Limiter(limits, {"a": limits})
    admit(lim, 100.0, tokens=300)
    admit(lim, 50_000.0, tokens=300)
    data = json.loads(json.dumps(lim.snapshot(60_000.0)))
    assert "requests_per_second" not in data["scopes"]["key:a"]  # expired: not kept

    again = Limiter(limits, {"a": limits})
    again.restore(data, 60_000.0)
    admit(again, 60_000.0, tokens=300)
    refused = reject(again, 60_000.0, tokens=300)
    assert Exhausted("key:a", "requests_per_day", 86_500.0) in refused.exhausted
    assert Exhausted(GLOBAL, "tokens_per_day", 86_500.0) in refused.exhausted
    admit(again, 86_500.0, tokens=300)


def test_restore_drops_expired_and_unconfigured() -> None:
    lim = on("key:a", Limits(requests_per_day=1))
    admit(lim, 0.0)
    data = lim.snapshot(0.0)
    fresh = on("key:a", Limits(requests_per_day=1))
    fresh.restore(data, 86_400.0)
    admit(fresh, 86_400.0)
    other = Limiter(UNLIMITED, {"b": Limits(requests_per_day=1)})
    other.restore(data, 0.0)
    admit(other, 0.0, ("b",))
    with pytest.raises(ValueError, match="format"):
        other.restore({"format": 99}, 0.0)


def test_configure_keeps_history_of_remaining_scopes() -> None:
    lim = Limiter(UNLIMITED, {"a": Limits(requests_per_minute=2), "b": Limits(concurrency=1)})
    admit(lim, 0.0, ("a",))
    admit(lim, 0.0, ("a",))
    held = admit(lim, 0.0, ("b",)).reservation
    lim.configure(UNLIMITED, {"a": Limits(requests_per_minute=3), "b": Limits(concurrency=1)})
    admit(lim, 1.0, ("a",))
    reject(lim, 1.0, ("a",))
    reject(lim, 1.0, ("b",))  # the in-flight request still holds its slot
    lim.release(held)
    admit(lim, 1.0, ("b",))


def test_configure_forgets_removed_keys_and_starts_new_windows_empty() -> None:
    lim = Limiter(UNLIMITED, {"a": Limits(requests_per_minute=1)})
    admit(lim, 0.0)
    lim.configure(UNLIMITED, {})
    lim.configure(UNLIMITED, {"a": Limits(requests_per_minute=1, requests_per_hour=5)})
    admit(lim, 1.0)
    assert lim.usage("key:a", 1.0)["requests_per_hour"]["used"] == 1


def test_coalesced_day_window_is_conservative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limiter_module, "EXACT_ENTRIES", 1)
    lim = on("key:a", Limits(requests_per_day=2, tokens_per_day=100))
    admit(lim, 10.2, tokens=50)
    admit(lim, 10.7, tokens=50)
    # Same second: one entry stamped 10.7, so the first admission counts 0.5 s longer.
    refused = reject(lim, 86_410.2)
    assert refused.retry_at == 86_410.7
    admit(lim, 86_410.7, tokens=100)


# -- randomized: no window ever holds more than its limit ------------------------------------

KEY_LIMITS = Limits(
    requests_per_second=3,
    requests_per_minute=20,
    requests_per_hour=60,
    requests_per_day=150,
    tokens_per_minute=3_000,
    tokens_per_day=20_000,
    concurrency=3,
)
GLOBAL_LIMITS = Limits(requests_per_second=6, requests_per_minute=45, tokens_per_minute=6_000)


STEPS = (0.0, 0.0, 0.01, 0.2, 1.0, 7.0)  # ties, bursts, pauses; plus random gaps below


def step(rng: random.Random) -> float:
    if rng.random() < 0.003:
        return 3_600.0  # reach the hour and day windows
    return rng.choice(STEPS) if rng.random() < 0.5 else rng.expovariate(3.0)


@dataclass
class Ledger:
    """Every admission per scope, with its final token count."""

    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


def check_windows(ledger: Ledger, scope: str, limits: Limits) -> None:
    times, tokens = ledger.times[scope], ledger.tokens[scope]
    assert times == sorted(times)
    prefix = [0]
    for amount in tokens:
        prefix.append(prefix[-1] + amount)
    for name, length in WINDOWS.items():
        limit = getattr(limits, name)
        if limit is None:
            continue
        for i, start in enumerate(times):  # the busiest [a, a + W) starts at an admission
            end = bisect_left(times, start + length)
            used = end - i if name.startswith("requests_") else prefix[end] - prefix[i]
            assert used <= limit, (scope, name, start, used)


def test_checker_catches_an_overfull_window() -> None:
    ledger = Ledger()
    ledger.times["a"], ledger.tokens["a"] = [0.0, 0.5, 0.999], [0, 0, 0]
    with pytest.raises(AssertionError):
        check_windows(ledger, "a", Limits(requests_per_second=2))
    ledger.times["a"][2] = 1.0  # [0, 1) holds two, [0.5, 1.5) holds two
    check_windows(ledger, "a", Limits(requests_per_second=2))


@pytest.mark.parametrize("exact_entries", [100_000, 1])  # 1: hour and day logs coalesce
def test_random_admissions_never_overfill_any_window(
    exact_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limiter_module, "EXACT_ENTRIES", exact_entries)
    rng = random.Random(20240611)
    keys = [f"k{i}" for i in range(4)]
    lim = Limiter(GLOBAL_LIMITS, {k: KEY_LIMITS for k in keys})
    ledger = Ledger()
    held_open: list[tuple[Reservation, int, int]] = []  # with its index in each ledger
    binding: set[str] = set()
    now, admitted = 0.0, 0
    for _ in range(12_000):
        now += step(rng)
        while held_open and rng.random() < 0.6:
            held, in_global, in_key = held_open.pop(rng.randrange(len(held_open)))
            actual = rng.randint(0, held.estimate)  # estimates are upper bounds here
            lim.adjust(held, actual)
            ledger.tokens[GLOBAL][in_global] = ledger.tokens[held.key][in_key] = actual
            lim.release(held)
        candidates = rng.sample(keys, rng.randint(1, len(keys)))
        result = lim.try_admit(candidates, rng.choice((0, 50, 200, 800)), now)
        if isinstance(result, Rejected):
            binding.update(e.limit for e in result.exhausted)
            continue
        admitted += 1
        r = result.reservation
        for scope in (GLOBAL, r.key):
            ledger.times[scope].append(now)
            ledger.tokens[scope].append(r.estimate)
        held_open.append((r, len(ledger.times[GLOBAL]) - 1, len(ledger.times[r.key]) - 1))
    check_windows(ledger, GLOBAL, GLOBAL_LIMITS)
    for key in keys:
        check_windows(ledger, key, KEY_LIMITS)
    assert admitted > 1_000
    assert binding == {*WINDOWS, "concurrency"}  # every kind of limit was hit


@pytest.mark.parametrize("seed", range(3))
def test_retry_at_is_the_earliest_moment(seed: int) -> None:
    """Refused just before retry_at, admitted at it, when nothing else changes in between."""
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(3)]
    limits = Limits(requests_per_second=2, requests_per_minute=9, tokens_per_minute=2_000)
    lim = Limiter(Limits(requests_per_minute=20, tokens_per_day=60_000), {k: limits for k in keys})
    now, waited = 0.0, 0
    for _ in range(3_000):
        now += step(rng)
        candidates, tokens = rng.sample(keys, rng.randint(1, 3)), rng.choice((0, 300, 900))
        result = lim.try_admit(candidates, tokens, now)
        if isinstance(result, Rejected):
            assert result.possible and result.retry_at is not None and result.retry_at > now
            reject(lim, result.retry_at - EPS, tuple(candidates), tokens)
            now = result.retry_at
            admit(lim, now, tuple(candidates), tokens)
            waited += 1
    assert waited > 300


@pytest.mark.parametrize(
    ("name", "guard", "expected"),
    [
        ("requests_per_second", 0.0, 1.0),
        ("requests_per_second", 0.02, 1.02),
        ("requests_per_minute", 0.02, 60.25),  # capped at 0.25 s
        ("requests_per_day", 0.02, 86400.25),
    ],
)
def test_the_guard_lengthens_windows(name: str, guard: float, expected: float) -> None:
    assert enforced_length(name, guard) == pytest.approx(expected)
    lim = Limiter(Limits(**{name: 1}), {}, guard=guard)
    admit(lim, T0)
    reject(lim, T0 + expected - EPS)
    admit(lim, T0 + expected)


# -- rejections of candidates asked in turns (the shared admission's) ---------------------------


def _asked_in_turns(
    lim: Limiter, keys: list[str], tokens: int, now: float
) -> tuple[list[Rejected], bool]:
    """Each turn's rejection, the candidates asked as the shared admission asks them (1, then
    4 times as many of the rest...), stopping where the global limits bind; and whether
    candidates were left unasked then."""
    rejections, at, size = [], 0, 1
    while at < len(keys):
        r = lim.try_admit(keys[at : at + size], tokens, now)
        assert isinstance(r, Rejected)
        rejections.append(r)
        at, size = at + size, size * 4
        if global_binds(r):
            return rejections, at < len(keys)
    return rejections, False


@pytest.mark.parametrize("seed", range(60))
def test_rejections_asked_in_turns_say_what_one_rejection_of_all_says(seed):
    """Every key full (one request a minute, taken), the global limits sometimes binding too,
    token limits sometimes too small ever to fit: the turns' rejections, put together, are the
    limiter's rejection of all the keys at once; or, when the global limits stopped the turns
    early, they say to look again when those free."""
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(rng.randint(1, 30))]
    glob = Limits(
        requests_per_minute=rng.choice([None, len(keys), len(keys) + 5]),
        concurrency=rng.choice([None, None, len(keys)]),
    )
    token_limits = rng.choice([(None, 100, 10_000), (100, 10_000)])
    per_key = {
        k: Limits(requests_per_minute=1, tokens_per_minute=rng.choice(token_limits)) for k in keys
    }
    lim = Limiter(glob, per_key)
    now = T0
    for k in keys:  # each key's one request a minute, at times of its own
        now += rng.random()
        assert isinstance(lim.try_admit([k], 50, now), Admitted)
    now += rng.random()
    tokens = rng.choice([10, 500, 20_000])  # 20,000: above every token limit set
    whole = lim.try_admit(keys, tokens, now)
    assert isinstance(whole, Rejected)
    rejections, unasked = _asked_in_turns(lim, keys, tokens, now)
    got = rejected_in_turn(rejections, unasked)
    assert got.possible == whole.possible
    if not unasked:
        assert set(got.exhausted) == set(whole.exhausted)
        assert got.retry_at == whole.retry_at
    else:  # stopped where the global limits bind: look again when they free
        frees = [e.free_at for e in whole.exhausted if e.scope == GLOBAL]
        assert got.retry_at == (max(frees) if None not in frees else whole.retry_at)
        assert whole.retry_at is None or got.retry_at <= whole.retry_at
        assert set(got.exhausted) <= set(whole.exhausted)


@pytest.mark.parametrize(
    ("results", "unasked", "expected"),
    [
        # A time from one turn, a release only from another: the time.
        (
            [Rejected((Exhausted("key:a", "concurrency", None),), None),
             Rejected((Exhausted("key:b", "requests_per_minute", 70.0),), 70.0)],
            False,
            Rejected((Exhausted("key:a", "concurrency", None),
                      Exhausted("key:b", "requests_per_minute", 70.0)), 70.0),
        ),
        # A turn that can never fit says nothing of when another can.
        (
            [Rejected((Exhausted("key:a", "tokens_per_minute", None),), None, possible=False),
             Rejected((Exhausted("key:b", "requests_per_minute", 80.0),), 80.0)],
            False,
            Rejected((Exhausted("key:a", "tokens_per_minute", None),
                      Exhausted("key:b", "requests_per_minute", 80.0)), 80.0),
        ),
        # No turn can ever fit: neither can the request.
        (
            [Rejected((Exhausted("key:a", "tokens_per_minute", None),), None, possible=False)],
            False,
            Rejected((Exhausted("key:a", "tokens_per_minute", None),), None, possible=False),
        ),
        # The global limits bind, keys left unasked: look again when the global window frees,
        # and the global entry is said once.
        (
            [Rejected((Exhausted(GLOBAL, "requests_per_minute", 65.0),
                       Exhausted("key:a", "requests_per_minute", 90.0)), 90.0)],
            True,
            Rejected((Exhausted(GLOBAL, "requests_per_minute", 65.0),
                      Exhausted("key:a", "requests_per_minute", 90.0)), 65.0),
        ),
        # ... unless they free on a release only (no time known).
        (
            [Rejected((Exhausted(GLOBAL, "concurrency", None),), None)],
            True,
            Rejected((Exhausted(GLOBAL, "concurrency", None),), None),
        ),
    ],
)  # fmt: skip
def test_rejections_in_turn_table(results, unasked, expected):
    assert rejected_in_turn(results, unasked) == expected


@pytest.mark.parametrize(
    ("result", "binds"),
    [
        (Rejected((Exhausted(GLOBAL, "requests_per_minute", 65.0),), 65.0), True),
        (Rejected((Exhausted("key:a", "requests_per_minute", 65.0),), 65.0), False),
        # The global limits can never fit it: no turn can, but that is not "later".
        (Rejected((Exhausted(GLOBAL, "tokens_per_minute", None),), None, possible=False), False),
    ],
)
def test_global_binds(result, binds):
    assert global_binds(result) is binds
