"""A plan's candidates: the affinity's key first, then the strategy's order, each once, read
only as far as the reader goes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kmi_rotor.engine import _Lazy


@dataclass(frozen=True)
class K:
    fingerprint: str


def keys(names: str, pulled: list[str]) -> Iterator[K]:
    for n in names:
        pulled.append(n)
        yield K(n)


@pytest.mark.parametrize(
    ("first", "names", "expected"),
    [
        (None, "ab", ["a", "b"]),
        ("b", "abc", ["b", "a", "c"]),  # the affinity's key once, first
        ("", "a", ["a"]),
        (None, "aab", ["a", "b"]),
        ("x", "", ["x"]),
        (None, "", []),
        ("a", "aaa", ["a"]),
    ],
)
def test_candidates_of_keys(first: str | None, names: str, expected: list[str]) -> None:
    pulled: list[str] = []
    c = _Lazy(first, keys(names, pulled))
    assert list(c) == expected
    assert list(c) == expected  # read twice: the same
    assert len(c) == len(expected)
    assert [c[i] for i in range(len(expected))] == expected


def test_candidates_are_read_only_as_far_as_asked() -> None:
    pulled: list[str] = []
    c = _Lazy(None, keys("abcd", pulled))
    assert next(iter(c)) == "a" and pulled == ["a"]
    assert list(c) == ["a", "b", "c", "d"]  # a second reading goes on where the first stopped
    pulled.clear()
    c = _Lazy("c", keys("abcd", pulled))
    assert next(iter(c)) == "c" and pulled == []  # the affinity's key asks nothing
    it = iter(c)
    assert [next(it), next(it)] == ["c", "a"] and pulled == ["a"]
    assert len(c) == 4 and pulled == ["a", "b", "c", "d"]
    assert c[3] == "d" and list(c) == ["c", "a", "b", "d"]
