"""Rotation strategies: the order each one yields, skipping unusable keys, and laziness."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from kmi_rotor.core.rotation import (
    STRATEGY_NAMES,
    Headroom,
    KeyLike,
    RoundRobin,
    Sticky,
    Weighted,
    make,
)


@dataclass(frozen=True)
class K:
    label: str


KEYS = tuple(K(x) for x in "abcde")
AnyStrategy = RoundRobin | Sticky | Weighted | Headroom


def keys(labels: str) -> tuple[K, ...]:
    return tuple(K(x) for x in labels)


def picks(
    strategy: AnyStrategy,
    ks: Sequence[K],
    n: int,
    usable: Callable[[KeyLike], bool] = lambda k: True,
) -> str:
    """Labels of `n` consecutive picks ('-' when nothing is usable)."""
    out = []
    for _ in range(n):
        key = strategy.pick(ks, usable)
        out.append(key.label if key is not None else "-")
    return "".join(out)


def only(labels: str) -> Callable[[KeyLike], bool]:
    return lambda k: k.label in labels


class Counting:
    """A `usable` predicate that counts how often it was asked."""

    def __init__(self, usable: Callable[[KeyLike], bool] = lambda k: True) -> None:
        self.calls = 0
        self._usable = usable

    def __call__(self, key: KeyLike) -> bool:
        self.calls += 1
        return self._usable(key)


def weighted(weights: dict[str, float]) -> Weighted:
    return Weighted(lambda k: weights[k.label])


def headroom(values: dict[str, float]) -> Headroom:
    return Headroom(lambda k: values[k.label])


# -- round-robin ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "usable", "n", "expected"),
    [
        ("abc", "abc", 9, "abcabcabc"),
        ("a", "a", 3, "aaa"),
        ("abcde", "abcde", 7, "abcdeab"),
        ("abc", "ac", 6, "acacac"),
        ("abc", "b", 3, "bbb"),
        ("abc", "", 2, "--"),
        ("", "", 2, "--"),
    ],
)
def test_round_robin_exact_cycle(labels: str, usable: str, n: int, expected: str) -> None:
    assert picks(RoundRobin(), keys(labels), n, only(usable)) == expected


def test_round_robin_resumes_after_the_key_actually_chosen() -> None:
    """Admission may skip the first candidate: the cursor follows the key really used."""
    rr, ks = RoundRobin(), keys("abcd")
    assert [k.label for k in rr.candidates(ks, lambda k: True)] == list("abcd")
    rr.chose(ks, ks[2])  # c was used (a and b had no capacity)
    assert picks(rr, ks, 4) == "dabc"


def test_round_robin_candidates_do_not_move_the_cursor() -> None:
    rr, ks = RoundRobin(), keys("abc")
    for _ in range(3):
        assert next(iter(rr.candidates(ks, lambda k: True))).label == "a"
    assert picks(rr, ks, 3) == "abc"


def test_round_robin_key_coming_back_takes_its_place_in_the_cycle() -> None:
    rr, ks = RoundRobin(), keys("abc")
    assert picks(rr, ks, 2, only("ac")) == "ac"
    assert picks(rr, ks, 6) == "abcabc"


# -- sticky -------------------------------------------------------------------------------------


def test_sticky_stays_until_unusable_then_stays_on_the_next() -> None:
    st, ks = Sticky(), keys("abc")
    assert picks(st, ks, 4) == "aaaa"
    assert picks(st, ks, 3, only("bc")) == "bbb"
    # a is usable again, but sticky does not go back by itself
    assert picks(st, ks, 3) == "bbb"
    assert st.active == 1


@pytest.mark.parametrize(("rotations", "expected"), [(0, "a"), (1, "b"), (2, "c"), (3, "a")])
def test_sticky_rotate_moves_on_and_wraps(rotations: int, expected: str) -> None:
    st, ks = Sticky(), keys("abc")
    for _ in range(rotations):
        st.rotate(ks)
    assert picks(st, ks, 3) == expected * 3


def test_sticky_rotate_onto_an_unusable_key_lands_on_the_next_usable() -> None:
    st, ks = Sticky(), keys("abc")
    st.rotate(ks)
    assert picks(st, ks, 2, only("ac")) == "cc"


def test_sticky_rotate_on_no_keys_is_harmless() -> None:
    st = Sticky()
    st.rotate(())
    assert st.active == 0 and st.pick((), lambda k: True) is None


# -- weighted ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 1, "b": 1, "c": 1},
        {"a": 5, "b": 1, "c": 1},
        {"a": 3, "b": 2},
        {"a": 1, "b": 4, "c": 2, "d": 7},
        {"a": 10},
    ],
)
def test_weighted_exact_counts_over_each_full_period(weights: dict[str, int]) -> None:
    ks = keys("".join(weights))
    w = weighted(weights)
    period = sum(weights.values())
    for _ in range(5):
        assert Counter(picks(w, ks, period)) == Counter(weights)


def test_weighted_interleaves_rather_than_bursts() -> None:
    """The smooth weighted round-robin order (as nginx's upstream module gives it)."""
    assert picks(weighted({"a": 5, "b": 1, "c": 1}), keys("abc"), 14) == "aabacaaaabacaa"
    assert picks(weighted({"a": 2, "b": 1, "c": 1}), keys("abc"), 8) == "abcaabca"


def test_weighted_float_weights_proportions_over_many_picks() -> None:
    weights = {"a": 0.5, "b": 1.5, "c": 3.0}
    got = Counter(picks(weighted(weights), keys("abc"), 5000))
    for label, share in (("a", 0.1), ("b", 0.3), ("c", 0.6)):
        assert abs(got[label] / 5000 - share) < 0.002


def test_weighted_skips_unusable_keys_and_shares_among_the_rest() -> None:
    w, ks = weighted({"a": 2, "b": 5, "c": 1}), keys("abc")
    seq = picks(w, ks, 30, only("ac"))
    assert "b" not in seq
    assert Counter(seq) == {"a": 20, "c": 10}


def test_weighted_ignores_a_choice_it_did_not_offer() -> None:
    w, ks = weighted({"a": 1, "b": 1}), keys("ab")
    w.chose(ks, K("zz"))
    assert picks(w, ks, 4) == "abab"


# -- headroom ----------------------------------------------------------------------------------


def test_headroom_prefers_the_key_with_most_headroom() -> None:
    h, ks = headroom({"a": 0.2, "b": 0.9, "c": 0.5}), keys("abc")
    assert [k.label for k in h.candidates(ks, lambda k: True)] == ["b", "c", "a"]
    assert picks(h, ks, 3) == "bbb"


def test_headroom_ties_keep_the_cyclic_order() -> None:
    h, ks = headroom({"a": 1.0, "b": 1.0, "c": 1.0}), keys("abc")
    assert picks(h, ks, 7) == "abcabca"


def test_headroom_differences_below_a_thousandth_are_ties() -> None:
    h, ks = headroom({"a": 0.5001, "b": 0.5004, "c": 0.1}), keys("abc")
    assert picks(h, ks, 4) == "abab"


def test_headroom_follows_changing_headroom() -> None:
    values = {"a": 1.0, "b": 1.0}
    h, ks = headroom(values), keys("ab")
    assert picks(h, ks, 1) == "a"
    values["b"] = 0.1
    assert picks(h, ks, 2) == "aa"
    values["a"] = 0.0
    assert picks(h, ks, 1) == "b"


# -- every strategy ----------------------------------------------------------------------------


FACTORIES: dict[str, Callable[[], AnyStrategy]] = {
    "RoundRobin": RoundRobin,
    "Sticky": Sticky,
    "Weighted": lambda: weighted({k.label: float(i + 1) for i, k in enumerate(KEYS)}),
    "Headroom": lambda: headroom({k.label: 1.0 - i / 10 for i, k in enumerate(KEYS)}),
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("usable", ["", "a", "be", "acd", "abcde"])
def test_every_strategy_yields_exactly_the_usable_keys(name: str, usable: str) -> None:
    strategy = FACTORIES[name]()
    for _ in range(12):
        offered = [k.label for k in strategy.candidates(KEYS, only(usable))]
        assert sorted(offered) == sorted(usable)
        if offered:
            strategy.chose(KEYS, K(offered[0]))
    assert set(picks(strategy, KEYS, 20, only(usable))) <= set(usable or "-")


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_make_builds_each_named_strategy(name: str) -> None:
    classes = {"round-robin": RoundRobin, "sticky": Sticky, "weighted": Weighted}
    assert type(make(name)) is classes.get(name, Headroom)


def test_make_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        make("random")


@pytest.mark.parametrize("name", FACTORIES)
def test_candidates_evaluate_nothing_before_being_read(name: str) -> None:
    counting = Counting()
    FACTORIES[name]().candidates(KEYS, counting)
    assert counting.calls == 0


LAZY_BUG = (
    "Weighted/Headroom.candidates call `usable` on every key before yielding the first "
    "candidate, although the module promises lazy candidates"
)


@pytest.mark.parametrize(
    "name",
    [
        "RoundRobin",
        "Sticky",
    ],
)
def test_first_candidate_does_not_evaluate_every_key(name: str) -> None:
    counting = Counting()
    first = next(iter(FACTORIES[name]().candidates(KEYS, counting)))
    assert first in KEYS
    assert counting.calls == 1


def test_round_robin_reads_only_up_to_the_first_usable_key() -> None:
    counting = Counting(only("cde"))
    first = next(iter(RoundRobin().candidates(KEYS, counting)))
    assert first.label == "c" and counting.calls == 3


def test_round_robin_over_many_keys_takes_one_step_per_pick() -> None:
    ks = tuple(K(f"k{i}") for i in range(10_000))
    rr, counting = RoundRobin(), Counting()
    for expected in itertools.islice(ks, 100):
        assert rr.pick(ks, counting) is expected
    assert counting.calls == 100


# -- round-robin over plain labels -------------------------------------------------------


def _picks(keys: list[str], unusable: set[str], n: int) -> list[str | None]:
    rr = RoundRobin()
    return [rr.pick(keys, lambda k: k not in unusable) for _ in range(n)]


@pytest.mark.parametrize(
    ("keys", "unusable", "expected"),
    [
        (["a"], set(), ["a", "a", "a", "a"]),
        (["a", "b"], set(), ["a", "b", "a", "b", "a", "b"]),
        (["a", "b", "c"], set(), ["a", "b", "c", "a", "b", "c", "a"]),
        (["a", "b", "c"], {"b"}, ["a", "c", "a", "c", "a", "c"]),
        (["a", "b", "c"], {"a"}, ["b", "c", "b", "c"]),
        (["a", "b", "c"], {"c"}, ["a", "b", "a", "b"]),
        (["a", "b", "c"], {"a", "c"}, ["b", "b", "b"]),
        (["a", "b"], {"b"}, ["a", "a", "a"]),
        (["a"], {"a"}, [None, None]),
        (["a", "b", "c"], {"a", "b", "c"}, [None, None, None]),
        ([], set(), [None, None]),
    ],
)
def test_round_robin_order(keys: list[str], unusable: set[str], expected: list[str | None]) -> None:
    assert _picks(keys, unusable, len(expected)) == expected


def test_round_robin_follows_keys_becoming_unusable_and_usable_again() -> None:
    rr = RoundRobin()
    keys = ["a", "b", "c"]
    down: set[str] = set()

    def pick() -> str | None:
        return rr.pick(keys, lambda k: k not in down)

    assert [pick(), pick()] == ["a", "b"]
    down.add("c")
    assert [pick(), pick(), pick()] == ["a", "b", "a"]
    down.clear()
    assert [pick(), pick(), pick(), pick()] == ["b", "c", "a", "b"]
    down.update(keys)
    assert pick() is None
    down.clear()
    assert pick() == "c"  # an empty round does not move the cursor


def test_round_robin_gives_each_usable_key_an_equal_share() -> None:
    picks = _picks(["a", "b", "c", "d"], {"b"}, 300)
    assert {k: picks.count(k) for k in "abcd"} == {"a": 100, "b": 0, "c": 100, "d": 100}


def test_make_round_robin() -> None:
    assert isinstance(make("round-robin"), RoundRobin)
