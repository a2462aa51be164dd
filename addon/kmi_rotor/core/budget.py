"""What a key has left at the provider, counting the requests the provider has not seen yet.

A provider's `remaining` describes the moment it answered. Requests sent since (and those in
flight when it answered) spend from it too, so kmi-rotor counts them: a key whose budget is
spent is skipped until its reset, before the provider refuses it; and when a window resets,
the key gets back its `limit`, not an unbounded rush of every waiting request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .signals import Window

COUNTED = ("requests",)
"""Dimensions spent one per request (tokens are corrected later, by the limiter)."""


@dataclass
class Budget:
    """One provider window of one key, as last reported, and what was sent since."""

    limit: float | None
    remaining: float
    reset_at: float
    observed_at: float
    sent: list[float] = field(default_factory=list)
    """Admission times of requests the report may not include."""

    @property
    def period(self) -> float:
        """The window's length as far as one report tells (reset minus report, at least 1 s)."""
        return max(1.0, self.reset_at - self.observed_at)

    def _window(self, now: float) -> tuple[float, float]:
        """Start and end of the window `now` falls in (windows after the reset are guessed to
        last `period` each, until a fresh report says otherwise)."""
        if now < self.reset_at:
            return self.observed_at, self.reset_at
        n = math.floor((now - self.reset_at) / self.period)
        start = self.reset_at + n * self.period
        return start, start + self.period

    def left(self, now: float) -> float:
        """Requests the key can still take in this window (may be negative)."""
        if now < self.reset_at:
            return self.remaining - len(self.sent)
        if self.limit is None:
            return math.inf
        # A new window began at the reset: it holds `limit`, less what was sent since.
        start, _ = self._window(now)
        return self.limit - sum(1 for t in self.sent if t >= start)

    def blocked_until(self, now: float) -> float | None:
        """When the key may be tried again if the budget is spent (None: it is not)."""
        if self.left(now) > 0:
            return None
        return self._window(now)[1]

    def fraction(self, now: float) -> float | None:
        if self.limit is None or self.limit <= 0:
            return None
        return max(0.0, min(1.0, self.left(now) / self.limit))


class Budgets:
    """The budgets of every key, by fingerprint and window name."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[str, Budget]] = {}

    def observe(
        self, fp: str, windows: tuple[Window, ...], in_flight_after: list[float], now: float
    ) -> None:
        """A response reported these windows; `in_flight_after` are the admission times of the
        key's requests still in flight that were admitted after the answered one."""
        budgets = self._by_key.setdefault(fp, {})
        for w in windows:
            if w.dimension not in COUNTED or w.remaining is None or w.reset_at is None:
                continue
            name = w.dimension if w.period is None else f"{w.dimension}:{w.period}"
            budgets[name] = Budget(w.limit, w.remaining, w.reset_at, now, sorted(in_flight_after))

    def forget(self, fp: str) -> None:
        """An operator reset: what the provider said before no longer holds."""
        self._by_key.pop(fp, None)

    def blocked_until(self, fp: str, now: float) -> float | None:
        """None when every window has room; else when the last spent one ends."""
        ends = [b.blocked_until(now) for b in self._by_key.get(fp, {}).values()]
        known = [e for e in ends if e is not None]
        return max(known) if known else None

    def fraction(self, fp: str, now: float) -> float:
        """Remaining fraction of the tightest window (1.0 when nothing is known)."""
        known = [b.fraction(now) for b in self._by_key.get(fp, {}).values()]
        return min((f for f in known if f is not None), default=1.0)

    def admitted(self, fp: str, at: float) -> None:
        for b in self._by_key.get(fp, {}).values():
            start, _ = b._window(at)
            if b.sent and b.sent[0] < start and at >= b.reset_at:
                b.sent = [t for t in b.sent if t >= start]  # earlier windows no longer count
            b.sent.append(at)
