"""Admission under rate limits: exact sliding logs for requests and tokens, plus concurrency slots.

Scopes are "global" (the whole proxy) and "key:<fingerprint>" (one key). A request is admitted
when the global scope and one candidate key both have room; several windows on a scope combine
and the strictest binds. A window of length W is half-open: what was admitted at t counts at
every `now` with t <= now < t + W and no longer at t + W, so with a limit R no interval
[a, a + W) at any offset ever holds more than R admissions.

Time is passed in as `now` (seconds) and must not go backwards. To carry a snapshot across a
restart, `now` must be wall-clock time. The module does no I/O and never wakes anyone: callers
that release or correct a reservation notify their own waiters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from math import inf
from typing import Any, NamedTuple

GLOBAL = "global"
CONCURRENCY = "concurrency"
_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3_600.0, "day": 86_400.0}
REQUEST_WINDOWS: dict[str, float] = {f"requests_per_{u}": s for u, s in _SECONDS.items()}
TOKEN_WINDOWS: dict[str, float] = {f"tokens_per_{u}": _SECONDS[u] for u in ("minute", "day")}
WINDOWS: dict[str, float] = {**REQUEST_WINDOWS, **TOKEN_WINDOWS}
GUARD_MAX = 0.25


def enforced_length(name: str, guard: float = 0.0) -> float:
    """A window's length as enforced: the nominal one plus `guard` of it (at most 0.25 s).

    Admission happens at the proxy; a provider counts arrivals. The event loop, the network
    and the provider's own queue put a few milliseconds between the two, differently for each
    request, so a window exact at the proxy can hold one request too many at the provider; a
    guard of 0.015 absorbs that at a cost of 1.5% of a one-second limit's throughput."""
    nominal = WINDOWS[name]
    return nominal + min(guard * nominal, GUARD_MAX)


# Past this many entries an hour or day log coalesces admissions of the same second into one
# entry stamped with the latest of them: each then counts up to 1 s longer than it should,
# never shorter, so the limit still holds in every window (precision: 1 s in 86,400).
EXACT_ENTRIES = 100_000
BUCKET = 1.0
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one scope; None means unlimited. Every set value must be a positive integer.

    The one list of limits: the config file's limit tables (`config.schema.LimitsConfig`) are
    generated from these fields, so a limit added here is at once a field of the file."""

    requests_per_second: int | None = None
    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{f.name} must be a positive integer or None, not {value!r}")

    def merged(self, override: Limits) -> Limits:
        """These limits with every field that `override` sets replaced by the override's value."""
        values = {f.name: getattr(override, f.name) for f in fields(self)}
        return Limits(**{k: getattr(self, k) if v is None else v for k, v in values.items()})

    def is_unlimited(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


@dataclass(frozen=True, slots=True)
class Exhausted:
    """One limit that stops a request: `free_at` is when it frees, None when only a release
    frees it (concurrency) or when the request can never fit (estimate above a token limit)."""

    scope: str
    limit: str
    free_at: float | None


@dataclass(slots=True, unsafe_hash=True)
class Reservation:
    """What one admission holds: its concurrency slots and its token entries. Opaque `handle`.
    Not changed once made, and hashed and compared by its fields as a frozen one would be (not
    frozen: one is made for every request, and a frozen dataclass costs about twice as much
    to make)."""

    key: str
    at: float
    estimate: int
    handle: object = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Admitted:
    reservation: Reservation
    key: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """Nothing fits now. `retry_at` is the earliest time something could fit if nothing else
    changes; None when only a release can help, or never. `possible` is False when the request
    can never be admitted as configured (no candidate, or its estimate exceeds a token limit
    of the global scope or of every candidate): answer at once rather than wait."""

    exhausted: tuple[Exhausted, ...]
    retry_at: float | None
    possible: bool = True


def global_binds(result: Rejected) -> bool:
    """Whether a rejection says the proxy-wide limits stop every key: no other candidate can
    be admitted until they free (the request can still be admitted then)."""
    return result.possible and any(e.scope == GLOBAL for e in result.exhausted)


def rejected_in_turn(results: Sequence[Rejected], unasked: bool = False) -> Rejected:
    """One rejection of a request whose candidates were asked in turns (a turn's rejection
    each): what stops them all, and the earliest time one of them could fit, as the limiter
    rejecting them together would say. `unasked`: candidates were left out because the last
    turn's rejection says the proxy-wide limits bind (`global_binds`): one of them may fit as
    soon as those limits free, so the request looks again then."""
    exhausted = tuple(dict.fromkeys(e for r in results for e in r.exhausted))
    possible = [r for r in results if r.possible]
    times = [r.retry_at for r in possible if r.retry_at is not None]
    retry_at = min(times) if times else None
    if unasked:
        frees = [e.free_at for e in results[-1].exhausted if e.scope == GLOBAL]
        timed = [at for at in frees if at is not None]
        if timed and len(timed) == len(frees):  # else it frees on a release: no time known
            retry_at = max(timed)
    return Rejected(exhausted, retry_at, possible=bool(possible))


class _Window:
    """Sliding log of (time, amount) in time order; `used` is the sum of the live amounts.

    Entries have absolute indices (`base` is the index of the oldest kept one) so that a
    reservation can find its entry again to correct it, and knows when it has expired."""

    __slots__ = ("amounts", "base", "bucket", "length", "limit", "name", "times", "used")

    def __init__(self, name: str, limit: int, guard: float = 0.0) -> None:
        self.name = name
        self.length = enforced_length(name, guard)
        self.limit = limit
        self.bucket = _bucket_for(name, limit)
        self.times: deque[float] = deque()
        self.amounts: deque[int] = deque()
        self.base = 0
        self.used = 0

    def prune(self, now: float) -> None:
        # The test is written as `t + length <= now`, the very expression `fit_time` returns,
        # so a caller retrying at the announced time always finds the entry gone.
        times, length = self.times, self.length
        while times and times[0] + length <= now:
            times.popleft()
            self.used -= self.amounts.popleft()
            self.base += 1

    def add(self, now: float, amount: int) -> int:
        """Record `amount` at `now`; returns the entry's absolute index."""
        times, bucket = self.times, self.bucket
        if bucket and times and times[-1] // bucket == now // bucket:
            # Coalesce by moving the entry later, never earlier: it then expires late, not early.
            times[-1] = max(times[-1], now)
            self.amounts[-1] += amount
        else:
            times.append(now)
            self.amounts.append(amount)
        self.used += amount
        return self.base + len(times) - 1

    def correct(self, index: int, delta: int) -> None:
        """Add `delta` to the entry at `index`, at its original time; nothing if it expired."""
        i = index - self.base
        if 0 <= i < len(self.times):
            self.amounts[i] += delta
            self.used += delta

    def fit_time(self, cost: int, now: float) -> float:
        """Earliest time >= now at which `cost` more fits if nothing is added; inf if never."""
        if cost > self.limit:
            return inf
        excess = self.used + cost - self.limit
        if excess <= 0:
            return now
        for t, amount in zip(self.times, self.amounts, strict=True):
            excess -= amount
            if excess <= 0:
                return t + self.length
        return now  # unreachable while `used` matches the entries


def _bucket_for(name: str, limit: int) -> float:
    if WINDOWS[name] < 3_600.0:
        return 0.0
    # A token log holds an entry per request, however high the limit, so day token logs
    # always coalesce; a request log holds at most `limit` entries.
    return BUCKET if name in TOKEN_WINDOWS or limit > EXACT_ENTRIES else 0.0


class _Block(NamedTuple):
    """Why a scope refuses a request of `tokens`: the limits that stop it and `at`, when all of
    them have room (inf: never; None: only a release helps). Holds until `until`."""

    tokens: int
    exhausted: tuple[Exhausted, ...]
    at: float | None
    until: float


class _Scope:
    """The windows and in-flight count of one scope.

    A scope found full remembers why (`block`) until the moment it frees. The answer cannot
    change before then except by a release, a correction, a new admission or new limits, and
    each of those forgets it; so a scan over many full keys costs one comparison per key."""

    __slots__ = (
        "block",
        "concurrency",
        "guard",
        "in_flight",
        "name",
        "requests",
        "tokens",
        "windows",
    )

    def __init__(self, name: str, limits: Limits, guard: float = 0.0) -> None:
        self.guard = guard
        self.name = name
        self.in_flight = 0
        self.windows: dict[str, _Window] = {}
        self.block: _Block | None = None
        self.configure(limits)

    def configure(self, limits: Limits) -> None:
        """Apply new limits, keeping the history of every window that stays configured."""
        self.concurrency = limits.concurrency
        kept: dict[str, _Window] = {}
        for name in WINDOWS:
            limit = getattr(limits, name)
            if limit is not None:
                kept[name] = window = self.windows.get(name) or _Window(name, limit, self.guard)
                window.limit, window.bucket = limit, _bucket_for(name, limit)
        self.bind(kept)

    def bind(self, windows: dict[str, _Window]) -> None:
        """Use `windows` from now on, forgetting any block."""
        self.windows, self.block = windows, None
        self.requests = tuple(w for n, w in windows.items() if n in REQUEST_WINDOWS)
        self.tokens = tuple(w for n, w in windows.items() if n in TOKEN_WINDOWS)

    def fits(self, tokens: int, now: float) -> bool:
        """Whether one more request of `tokens` fits now."""
        block = self.block
        # A larger request never fits sooner than a smaller one, so the block also answers it.
        if block is not None and now < block.until and tokens >= block.tokens:
            return False
        if self._room(tokens, now):
            return True
        self.blocked(tokens, now)  # remembered for the next scans
        return False

    def _room(self, tokens: int, now: float) -> bool:
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            return False
        for w in self.requests:
            w.prune(now)
            if w.used >= w.limit:
                return False
        for w in self.tokens:
            w.prune(now)
            if w.used + tokens > w.limit:
                return False
        return True

    def blocked(self, tokens: int, now: float) -> _Block:
        """What stops a request of `tokens` now (`at` is `now` and nothing stops it if it fits)."""
        block = self.block
        if block is not None and now < block.until and tokens == block.tokens:
            return block
        found: list[Exhausted] = []
        latest: float = now
        for w in self.windows.values():
            w.prune(now)
            at = w.fit_time(1 if w.name in REQUEST_WINDOWS else tokens, now)
            if at > now:
                found.append(Exhausted(self.name, w.name, None if at == inf else at))
                latest = max(latest, at)
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            found.append(Exhausted(self.name, CONCURRENCY, None))
            block = _Block(tokens, tuple(found), inf if latest == inf else None, inf)
        else:
            block = _Block(tokens, tuple(found), latest, latest)
        self.block = block if found else None
        return block

    def reserve(self, tokens: int, now: float, marks: list[tuple[_Window, int]]) -> None:
        """Take a slot and record one request and `tokens`; token entries go to `marks`."""
        self.in_flight += 1
        self.block = None
        for w in self.requests:
            w.add(now, 1)
        for w in self.tokens:
            marks.append((w, w.add(now, tokens)))


def model_scope(key: str, model: str) -> str:
    """The name of a key's scope for one model's local limits."""
    return f"key:{key}/model:{model}"


@dataclass(eq=False, slots=True)
class _Held:
    """Mutable side of a reservation: its scopes, tokens as last corrected, token entries."""

    scopes: tuple[_Scope, ...]
    tokens: int
    marks: list[tuple[_Window, int]] = field(default_factory=list)
    released: bool = False


def _held(reservation: Reservation) -> _Held:
    handle = reservation.handle
    if not isinstance(handle, _Held):
        raise TypeError("reservation was not made by this limiter")
    return handle


class Limiter:
    """The in-memory limiter. Not thread-safe: call it from one thread (the event loop)."""

    def __init__(
        self,
        global_limits: Limits,
        key_limits: Mapping[str, Limits],
        *,
        guard: float = 0.0,
        model_limits: Mapping[str, Mapping[str, Limits]] | None = None,
    ) -> None:
        """`guard`: the fraction added to every window's length (see `enforced_length`)."""
        self.guard = guard
        self._global = _Scope(GLOBAL, global_limits, guard)
        self._keys: dict[str, _Scope] = {}
        self._models: dict[tuple[str, str], _Scope] = {}
        self.configure(global_limits, key_limits, model_limits)

    def configure(
        self,
        global_limits: Limits,
        key_limits: Mapping[str, Limits],
        model_limits: Mapping[str, Mapping[str, Limits]] | None = None,
    ) -> None:
        """Replace the limits. Scopes and windows that remain keep their history; a window that
        is newly configured starts empty. Keys absent from `key_limits` are forgotten (a key
        first seen as a candidate later counts as unlimited). `model_limits`: by key, then
        model name, the limits of that key's requests of that model (over the key's own)."""
        self._global.configure(global_limits)
        old, self._keys = self._keys, {}
        for key, limits in key_limits.items():
            scope = self._keys[key] = old.get(key) or _Scope(f"key:{key}", limits, self.guard)
            scope.configure(limits)
        old_models, self._models = self._models, {}
        for key, models in (model_limits or {}).items():
            for model, limits in models.items():
                name = model_scope(key, model)
                scope = old_models.get((key, model)) or _Scope(name, limits, self.guard)
                scope.configure(limits)
                self._models[(key, model)] = scope

    def _key(self, key: str) -> _Scope:
        scope = self._keys.get(key)
        if scope is None:
            scope = self._keys[key] = _Scope(f"key:{key}", Limits(), self.guard)
        return scope

    def try_admit(
        self, candidates: Sequence[str], tokens: int, now: float, model: str | None = None
    ) -> Admitted | Rejected:
        """Admit on the first candidate (in the caller's order of preference) that has room
        while the global scope has room too (and the candidate's scope for `model`, when it
        has limits for that model), reserving one request and `tokens` in every window of
        those scopes and a concurrency slot in each. Cost: the candidates tried up to the
        first that fits, times the windows; all of them only when nothing fits."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        glob = self._global
        if glob.fits(tokens, now):
            for key in candidates:
                reservation = self._take(glob, key, tokens, now, model)
                if reservation is not None:
                    return Admitted(reservation, key)
        return self._reject(candidates, tokens, now, model)

    def admit_on(
        self, key: str, tokens: int, now: float, model: str | None = None
    ) -> Reservation | None:
        """`try_admit([key], ...)`'s reservation when it admits; None when it would not (and
        nothing is reserved; what stops it is remembered, as `try_admit` does). For a caller
        that tries its first candidate alone before any list of candidates is made."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        glob = self._global
        return self._take(glob, key, tokens, now, model) if glob.fits(tokens, now) else None

    def _take(
        self, glob: _Scope, key: str, tokens: int, now: float, model: str | None
    ) -> Reservation | None:
        """A reservation on `key` when its scopes (its own, then the one for `model`) fit
        (`glob` fits already); None, reserving nothing, when one does not."""
        own = self._keys.get(key) or self._key(key)
        if not own.fits(tokens, now):
            return None
        scoped = self._models.get((key, model)) if model is not None else None
        if scoped is None:
            held = _Held((glob, own), tokens)
        elif scoped.fits(tokens, now):
            held = _Held((glob, own, scoped), tokens)
        else:
            return None
        marks = held.marks
        for s in held.scopes:
            s.reserve(tokens, now, marks)
        return Reservation(key, now, tokens, held)

    def _scopes_of(self, key: str, model: str | None) -> tuple[_Scope, ...]:
        """The key's scope, and its scope for `model` when it has limits for that model."""
        own = self._models.get((key, model)) if model is not None else None
        return (self._key(key),) if own is None else (self._key(key), own)

    def _reject(
        self, candidates: Sequence[str], tokens: int, now: float, model: str | None = None
    ) -> Rejected:
        glob = self._global.blocked(tokens, now)
        exhausted, global_at = list(glob.exhausted), glob.at
        key_at, release_helps = inf, False
        for key in candidates:
            at = self._key_block(key, tokens, now, model, exhausted)
            if at is None:
                release_helps = True
            else:
                key_at = min(key_at, at)
        if global_at == inf or (key_at == inf and not release_helps):
            return Rejected(tuple(exhausted), None, possible=False)
        if global_at is None or key_at == inf:
            return Rejected(tuple(exhausted), None)
        return Rejected(tuple(exhausted), max(global_at, key_at))

    def _key_block(
        self, key: str, tokens: int, now: float, model: str | None, found: list[Exhausted]
    ) -> float | None:
        """When the key fits a request of `tokens` (of `model`): once all its scopes do, so
        never (inf) if one never will, on a release (None) if one waits for a release, else
        when the last of them frees. What stops it is added to `found`."""
        ats = []
        for scope in self._scopes_of(key, model):
            block = scope.blocked(tokens, now)
            found.extend(block.exhausted)
            ats.append(block.at)
        if inf in ats:
            return inf
        timed = [at for at in ats if at is not None]
        return max(timed) if len(timed) == len(ats) else None

    def adjust(self, reservation: Reservation, actual_tokens: int) -> None:
        """Correct the reserved tokens to `actual_tokens`, at the reservation's original time.
        May be called more than once, before or after `release`."""
        if actual_tokens < 0:
            raise ValueError("actual_tokens must be >= 0")
        held = _held(reservation)
        delta = actual_tokens - held.tokens
        held.tokens = actual_tokens
        for window, index in held.marks:
            window.correct(index, delta)
        for scope in held.scopes:
            scope.block = None

    def release(self, reservation: Reservation) -> None:
        """Free the reservation's concurrency slots. Idempotent."""
        held = _held(reservation)
        if held.released:
            return
        held.released = True
        for scope in held.scopes:
            scope.in_flight -= 1
            scope.block = None

    def headroom(self, key: str, now: float) -> float:
        """Remaining fraction (0..1) of the key's tightest limit; 1.0 when it has none."""
        scope = self._keys.get(key)
        if scope is None:
            return 1.0
        left = 1.0
        for w in scope.windows.values():
            w.prune(now)
            left = min(left, (w.limit - w.used) / w.limit)
        if scope.concurrency is not None:
            left = min(left, (scope.concurrency - scope.in_flight) / scope.concurrency)
        return max(0.0, left)

    def usage(self, scope: str, now: float) -> dict[str, dict[str, float | None]]:
        """Per configured limit of `scope` ("global", "key:<fp>" or `model_scope`): its
        `limit`, what is `used`, and `free_at`, when it next has room for one more unit (None
        if it has room now, or for concurrency). Empty for an unknown scope."""
        s = self._global if scope == GLOBAL else None
        if scope.startswith("key:"):
            s = self._keys.get(scope.removeprefix("key:"))
            s = s or next((m for m in self._models.values() if m.name == scope), None)
        if s is None:
            return {}
        out: dict[str, dict[str, float | None]] = {}
        for w in s.windows.values():
            w.prune(now)
            at = w.fit_time(1, now)
            out[w.name] = {"limit": w.limit, "used": w.used, "free_at": at if at > now else None}
        if s.concurrency is not None:
            out[CONCURRENCY] = {"limit": s.concurrency, "used": s.in_flight, "free_at": None}
        return out

    def snapshot(self, now: float) -> dict[str, Any]:
        """JSON-serialisable live window entries, by scope and limit name (concurrency is not
        kept: in-flight requests do not outlive the process)."""
        return self.capture(now)()

    def capture(self, now: float) -> Callable[[], dict[str, Any]]:
        """The live window entries copied now (cheap: C-level copies), and a function that
        makes the snapshot of them later, in any thread, whatever the limiter does meanwhile."""
        copied: list[tuple[str, str, tuple[float, ...], tuple[int, ...]]] = []
        for scope in (self._global, *self._keys.values(), *self._models.values()):
            for w in scope.windows.values():
                w.prune(now)
                if w.times:
                    copied.append((scope.name, w.name, tuple(w.times), tuple(w.amounts)))

        def render() -> dict[str, Any]:
            scopes: dict[str, dict[str, list[list[float]]]] = {}
            for scope_name, name, times, amounts in copied:
                entries = [[t, a] for t, a in zip(times, amounts, strict=True)]
                scopes.setdefault(scope_name, {})[name] = entries
            return {"format": SNAPSHOT_FORMAT, "at": now, "scopes": scopes}

        return render

    def restore(self, data: Mapping[str, Any], now: float) -> None:
        """Replace the history of configured scopes and windows with a snapshot's; entries that
        expired by `now` and scopes or windows no longer configured are dropped. Meant for
        start-up: reservations made before it no longer correct the restored windows."""
        if data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unknown limiter snapshot format: {data.get('format')!r}")
        saved: Mapping[str, Mapping[str, list[list[float]]]] = data.get("scopes", {})
        for scope in (self._global, *self._keys.values(), *self._models.values()):
            entries, fresh = saved.get(scope.name, {}), {}
            for name, old in scope.windows.items():
                # New window objects: reservations made before point at the old ones.
                fresh[name] = window = _Window(name, old.limit, scope.guard)
                for t, amount in sorted((float(t), int(a)) for t, a in entries.get(name, [])):
                    if t + window.length > now:
                        window.add(t, amount)
            scope.bind(fresh)
