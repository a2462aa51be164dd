"""Choosing the next key of a pool. Strategies see only which keys are usable, never why."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

K = TypeVar("K")


class Strategy(Protocol):
    def pick(self, keys: Sequence[K], usable: Callable[[K], bool]) -> K | None:
        """The key to use next, or None when no key is usable."""
        ...


class RoundRobin:
    """Exact cyclic order over the usable keys: with N usable keys, each gets every N-th request."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, keys: Sequence[K], usable: Callable[[K], bool]) -> K | None:
        n = len(keys)
        for step in range(n):
            index = (self._next + step) % n
            if usable(keys[index]):
                self._next = index + 1
                return keys[index]
        return None


STRATEGIES: dict[str, Callable[[], Strategy]] = {"round-robin": RoundRobin}


def make(name: str) -> Strategy:
    return STRATEGIES[name]()
