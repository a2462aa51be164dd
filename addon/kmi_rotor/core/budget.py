"""What a key has left at the provider, counting the requests the provider has not seen yet.

A provider's `remaining` describes the moment it answered. Requests sent since (and those in
flight when it answered) spend from it too, so kmi-rotor counts them: a key whose budget is
spent is skipped until its reset, before the provider refuses it; and when a window resets,
the key gets back its `limit`, not an unbounded rush of every waiting request.

No report benches a key for good: a report binds until its reset and at most `cap` seconds
after it was made. Past that, a window that holds nothing (`limit` 0), or one whose report was
cut short by the cap, lets one request through at a time to probe it; the probe's answer brings
a fresh report.

Budgets are held per key and scope (see `core/scope.py`): scope "" is the whole key and binds
every request on it; a scope's own budget ("model:gpt-4o") binds only requests of that scope.
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
    longest: float = 0.0
    """The longest time to a reset any report of this window gave: its length, at least."""
    guard: float = 0.0
    """Seconds added to the window, for the jitter between admission and the provider."""
    cap: float = math.inf
    """The longest a report may hold the key back, from when it was made."""

    @property
    def period(self) -> float:
        """The window's length as far as the reports tell (at least 1 s)."""
        return max(1.0, self.longest, self.reset_at - self.observed_at)

    @property
    def free_at(self) -> float:
        """When the report stops binding: its reset, or `cap` after it was made if sooner."""
        return min(self.reset_at, self.observed_at + self.cap) + self.guard

    def _recent(self, now: float) -> list[float]:
        return [t for t in self.sent if t > now - self.period - self.guard]

    def _sliding(self, now: float) -> bool:
        """Past the reset of a window that holds requests: its limit, spread as it slides."""
        return self.limit is not None and self.limit >= 1 and now >= self.reset_at + self.guard

    def _probes(self, now: float) -> list[float]:
        """Requests sent to probe a report that no longer binds, within the probe interval."""
        every = min(self.period, self.cap)
        return [t for t in self.sent if t >= self.free_at and t > now - every - self.guard]

    def left(self, now: float) -> float:
        """Requests the key can still take (may be negative). While the report binds: what it
        said, less what was sent since. After the reset (the provider said the window is then
        fully replenished): the limit, less what was sent within the last period, since a
        provider's window may slide. Otherwise (a window of nothing, or a report cut short by
        the cap): one probe at a time."""
        if now < self.free_at:
            return self.remaining - len(self.sent)
        if self._sliding(now):
            assert self.limit is not None
            return math.floor(self.limit) - len(self._recent(now))
        if self.limit is None and now >= self.reset_at + self.guard:
            return math.inf
        return 1 - len(self._probes(now))

    def blocked_until(self, now: float) -> float | None:
        """When the key may be tried again if the budget is spent (None: it is not); always
        a fixed time, never one that moves on with `now`."""
        if self.left(now) > 0:
            return None
        if now < self.free_at:
            return self.free_at
        if self._sliding(now):
            assert self.limit is not None
            recent = sorted(self._recent(now))
            # One more fits once all but limit - 1 of the recent ones have left the window.
            return recent[len(recent) - int(self.limit)] + self.period + self.guard
        return max(self._probes(now)) + min(self.period, self.cap) + self.guard

    def fraction(self, now: float) -> float | None:
        if self.limit is None or self.limit <= 0:
            return None
        return max(0.0, min(1.0, self.left(now) / self.limit))


MAX_SCOPES = 64
"""Scoped budgets kept per key at most; the least recently reported go first."""


class Budgets:
    """The budgets of every key, by fingerprint, scope and window name."""

    def __init__(self, guard: float = 0.0, cap: float = math.inf) -> None:
        """`guard`: the fraction added to windows (as the limiter's, at most 0.25 s); `cap`:
        the longest a report may hold a key back."""
        self.guard = guard
        self.cap = cap
        self._by_key: dict[str, dict[str, dict[str, Budget]]] = {}
        self._reported_since: dict[str, float] = {}
        """By key: no scoped budget of the key was last reported before this (so that `prune`
        can tell at once, on every answer, that none is old enough to go)."""

    def observe(
        self,
        fp: str,
        windows: tuple[Window, ...],
        in_flight_after: list[float],
        now: float,
        scope: str = "",
    ) -> None:
        """A response to a request of `scope` reported these windows; `in_flight_after` are
        the admission times of the key's requests of that scope still in flight that were
        admitted after the answered one."""
        # Not `setdefault(…, {})`: that makes a dict on every answer, to throw it away.
        scopes = self._by_key.get(fp)
        if scopes is None:
            scopes = self._by_key[fp] = {}
        budgets = scopes.get(scope)
        new_scope = budgets is None
        if budgets is None:
            budgets = scopes[scope] = {}
        for w in windows:
            if w.dimension not in COUNTED or w.remaining is None or w.reset_at is None:
                continue
            name = w.dimension if w.period is None else f"{w.dimension}:{w.period}"
            old = budgets.get(name)
            longest = old.period if old is not None else 0.0
            period = max(1.0, longest, w.reset_at - now)  # the new budget's `period`
            budgets[name] = Budget(
                w.limit,
                w.remaining,
                w.reset_at,
                now,
                sorted(in_flight_after),
                longest,
                min(self.guard * period, 0.25),
                self.cap,
            )
        if len(scopes) > MAX_SCOPES:
            oldest = min((s for s in scopes if s), key=lambda s: _last_report(scopes[s]))
            del scopes[oldest]
        if scope and new_scope:  # an old scope's last report is now later, if anything
            since = self._reported_since.get(fp, math.inf)
            self._reported_since[fp] = min(since, _last_report(budgets))

    def forget(self, fp: str) -> None:
        """An operator reset: what the provider said before no longer holds."""
        self._by_key.pop(fp, None)
        self._reported_since.pop(fp, None)

    def prune(self, fp: str, now: float, ttl: float) -> None:
        """The key's scoped budgets with no report for `ttl` seconds dropped."""
        if self._reported_since.get(fp, -math.inf) >= now - ttl:
            return  # none is that old
        scopes = self._by_key.get(fp, {})
        for scope in [s for s, b in scopes.items() if s and _last_report(b) < now - ttl]:
            del scopes[scope]
        reports = (_last_report(b) for s, b in scopes.items() if s)
        self._reported_since[fp] = min(reports, default=math.inf)

    def _binding(self, fp: str, scope: str) -> list[Budget]:
        """The budgets a request of `scope` spends from: the key's, and the scope's own."""
        scopes = self._by_key.get(fp)
        if not scopes:  # a key no answer reported on (asked for every candidate)
            return []
        own = scopes.get("")  # not `get("", {})`: no dict made for nothing
        found = list(own.values()) if own else []
        if scope and (mine := scopes.get(scope)):
            found.extend(mine.values())
        return found

    def blocked_until(self, fp: str, now: float, scope: str = "") -> float | None:
        """None when every window binding `scope` has room; else when the last spent one ends."""
        latest = None
        for b in self._binding(fp, scope):
            end = b.blocked_until(now)
            if end is not None and (latest is None or end > latest):
                latest = end
        return latest

    def fraction(self, fp: str, now: float, scope: str = "") -> float:
        """Remaining fraction of the tightest window binding `scope` (1.0 when none known)."""
        known = [b.fraction(now) for b in self._binding(fp, scope)]
        return min((f for f in known if f is not None), default=1.0)

    def admitted(self, fp: str, at: float, scope: str = "") -> None:
        """A request of `scope` went to the key at `at`: it spends from every budget binding
        that scope."""
        for b in self._binding(fp, scope):
            if at >= b.reset_at and b.sent and b.sent[0] <= at - b.period - b.guard:
                b.sent = b._recent(at)  # older ones no longer count, whatever the window
            b.sent.append(at)

    def scopes(self, fp: str, now: float) -> dict[str, dict[str, dict[str, float | None]]]:
        """What the status shows of a key's budgets, by scope and window: `left`, `limit`,
        and `until` when spent."""
        return {
            scope: {
                name: {"left": b.left(now), "limit": b.limit, "until": b.blocked_until(now)}
                for name, b in budgets.items()
            }
            for scope, budgets in self._by_key.get(fp, {}).items()
            if budgets
        }


def _last_report(budgets: dict[str, Budget]) -> float:
    return max((b.observed_at for b in budgets.values()), default=-math.inf)
