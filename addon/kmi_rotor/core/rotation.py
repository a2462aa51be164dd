"""Choosing the next key of a pool. Strategies see only which keys are usable, never why.

A strategy yields the usable keys in its order of preference (the caller, admission, takes the
first one that also has capacity and usually stops at the first), and is told which key was
finally used, so that its cursor moves only on a real choice. RoundRobin and Sticky yield
lazily (a decision costs the same with 10 keys or 1,000); Weighted and Headroom must score every
usable key before they know the best, so they cost O(keys) per decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol


class KeyLike(Protocol):
    @property
    def label(self) -> str: ...


class Strategy(Protocol):
    def candidates(
        self, keys: Sequence[KeyLike], usable: Callable[[KeyLike], bool]
    ) -> Iterator[KeyLike]:
        """The usable keys, best first."""
        ...

    def chose(self, keys: Sequence[KeyLike], key: KeyLike) -> None:
        """The key that was used (it may not be the first candidate: admission can skip some)."""
        ...


class _Base:
    def candidates(
        self, keys: Sequence[KeyLike], usable: Callable[[KeyLike], bool]
    ) -> Iterator[KeyLike]:
        raise NotImplementedError

    def chose(self, keys: Sequence[KeyLike], key: KeyLike) -> None:
        raise NotImplementedError

    def pick(self, keys: Sequence[KeyLike], usable: Callable[[KeyLike], bool]) -> KeyLike | None:
        """The first candidate, taken (for callers with no capacity limits to consult)."""
        for key in self.candidates(keys, usable):
            self.chose(keys, key)
            return key
        return None


class RoundRobin(_Base):
    """Exact cyclic order over the usable keys: with N usable keys, each gets every N-th request."""

    def __init__(self) -> None:
        self._next = 0

    def candidates(
        self, keys: Sequence[KeyLike], usable: Callable[[KeyLike], bool]
    ) -> Iterator[KeyLike]:
        return _cycle(keys, self._next, usable)

    def start(self) -> int:
        """Where `candidates` begins its cycle: they are the usable keys of
        `keys[(start + i) % len(keys)]` for i = 0, 1, ... (for a caller that walks them
        itself, without a generator)."""
        return self._next

    def chose(self, keys: Sequence[KeyLike], key: KeyLike) -> None:
        self._next = _index(keys, key) + 1

    def seek(self, start: int) -> None:
        """Begin the cycle at `start` (a place another process's choices moved it to)."""
        self._next = start


class Sticky(_Base):
    """Stay on the active key until it becomes unusable (or an operator rotates), then move on."""

    def __init__(self) -> None:
        self._active = 0

    def candidates(
        self, keys: Sequence[KeyLike], usable: Callable[[KeyLike], bool]
    ) -> Iterator[KeyLike]:
        return _cycle(keys, self._active, usable)

    def start(self) -> int:
        """Where `candidates` begins its cycle: they are the usable keys of
        `keys[(start + i) % len(keys)]` for i = 0, 1, ... (for a caller that walks them
        itself, without a generator)."""
        return self._active

    def chose(self, keys: Sequence[KeyLike], key: KeyLike) -> None:
        self._active = _index(keys, key)

    def seek(self, start: int) -> None:
        """Make the key at `start` the active one (as another process did)."""
        self._active = start

    def rotate(self, keys: Sequence[KeyLike]) -> None:
        """Move the active key on by one (the manual mode of `kmi-rotor rotate`)."""
        if keys:
            self._active = (self._active + 1) % len(keys)

    @property
    def active(self) -> int:
        return self._active


class Weighted(_Base):
    """Smooth weighted round-robin: over any window, key i gets weight_i / sum(weights) of the
    requests, interleaved rather than in bursts; unusable keys are skipped without losing turns."""

    def __init__(self, weight: Callable[[KeyLike], float]) -> None:
        self._weight = weight
        self._current: dict[str, float] = {}

    def candidates(
        self, keys: Sequence[KeyLike], usable: Callable[[KeyLike], bool]
    ) -> Iterator[KeyLike]:
        live = [k for k in keys if usable(k)]
        total = sum(self._weight(k) for k in live)
        score = {_label(k): self._current.get(_label(k), 0.0) + self._weight(k) for k in live}
        self._pending = (score, total)
        yield from sorted(live, key=lambda k: -score[_label(k)])

    def chose(self, keys: Sequence[KeyLike], key: KeyLike) -> None:
        score, total = getattr(self, "_pending", ({}, 0.0))
        if _label(key) not in score:
            return
        score[_label(key)] -= total
        self._current = score


class Headroom(_Base):
    """The usable key with the most remaining capacity (provider headers and local limits), so
    that traffic moves away from a key before it runs dry; ties keep round-robin order."""

    def __init__(self, headroom: Callable[[KeyLike], float]) -> None:
        self._headroom = headroom
        self._rr = RoundRobin()

    def candidates(
        self, keys: Sequence[KeyLike], usable: Callable[[KeyLike], bool]
    ) -> Iterator[KeyLike]:
        ordered = list(self._rr.candidates(keys, usable))
        # sorted() is stable: equal headroom keeps the cyclic order, spreading load evenly.
        yield from sorted(ordered, key=lambda k: -round(self._headroom(k), 3))

    def chose(self, keys: Sequence[KeyLike], key: KeyLike) -> None:
        self._rr.chose(keys, key)


def _cycle(
    keys: Sequence[KeyLike], start: int, usable: Callable[[KeyLike], bool]
) -> Iterator[KeyLike]:
    """The usable keys in cyclic order from `start`, lazily."""
    n = len(keys)
    for step in range(n):
        key = keys[(start + step) % n]
        if usable(key):
            yield key


def _label(key: KeyLike) -> str:
    return getattr(key, "label", None) or str(key)


_positions: dict[int, tuple[Sequence[KeyLike], dict[int, int]]] = {}


def _index(keys: Sequence[KeyLike], key: KeyLike) -> int:
    """Where `key` stands in `keys`: a lookup, not a scan (a pool may hold 1,000 keys)."""
    cached = _positions.get(id(keys))
    if cached is None or cached[0] is not keys:
        if len(_positions) > 64:  # pools are few; old tuples of a reloaded config go
            _positions.clear()
        cached = (keys, {id(k): i for i, k in enumerate(keys)})
        _positions[id(keys)] = cached
    i = cached[1].get(id(key))
    if i is not None:
        return i
    for i, k in enumerate(keys):  # an equal key that is another object
        if k == key:
            return i
    return -1


STRATEGY_NAMES = ("round-robin", "headroom", "sticky", "weighted")


def make(
    name: str,
    *,
    weight: Callable[[KeyLike], float] = lambda k: 1.0,
    headroom: Callable[[KeyLike], float] = lambda k: 1.0,
) -> Strategy:
    """A fresh strategy by its config name."""
    if name == "round-robin":
        return RoundRobin()
    if name == "sticky":
        return Sticky()
    if name == "weighted":
        return Weighted(weight)
    if name == "headroom":
        return Headroom(headroom)
    raise ValueError(f"unknown strategy {name!r}")
