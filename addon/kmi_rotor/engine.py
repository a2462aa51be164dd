"""The rotation engine: which key serves a request, and what each answer does to the pool.

It joins the strategy (order of preference), the keys' health (what providers said) and the
limiter (local limits). Synchronous and free of I/O: the addon calls it from hooks and waits
where it says so; tests drive it with a fake clock.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Key, LimitsConfig, Pool, Settings
from .core import health as hl
from .core.budget import Budgets
from .core.health import KeyHealth, Policy
from .core.key_state import in_service, key_state, paced
from .core.limiter import (
    GLOBAL,
    Admitted,
    Exhausted,
    Limiter,
    Limits,
    Rejected,
    Reservation,
)
from .core.refusal import Refusal
from .core.rotation import Sticky, Strategy, make
from .core.signals import FailureKind, Signal, Window
from .core.tokens import MAX_TOKENS
from .scrubbing import scrubber

OUTAGE_WINDOW = 30.0
"""Overloads on every key of a pool within this many seconds are the provider's outage."""
AFFINITY_SIZE = 10_000


@dataclass(frozen=True)
class Chosen:
    key: Key
    reservation: Reservation


@dataclass(frozen=True)
class Wait:
    until: float | None
    """When capacity may free; None when only a finishing request can free it."""
    reason: str


Decision = Chosen | Wait | Refusal


@dataclass(frozen=True)
class Plan:
    """One admission's candidates, in order, and what chose them."""

    pool: Pool
    candidates: Sequence[str]
    exclude: frozenset[str]
    affinity: str | None
    pinned: bool
    """Whether the first candidate is the affinity's key (it stays first)."""


class _Lazy:
    """A sequence over an iterator, materialised only as far as it is read (twice at most)."""

    def __init__(self, it: Iterator[str]) -> None:
        self._it, self._seen = it, []  # type: tuple[Iterator[str], list[str]]

    def __iter__(self) -> Iterator[str]:
        yield from self._seen
        for item in self._it:
            self._seen.append(item)
            yield item

    def __len__(self) -> int:
        self._seen.extend(self._it)
        return len(self._seen)

    def __getitem__(self, i: int) -> str:
        self.__len__()
        return self._seen[i]


def limits_of(cfg: LimitsConfig) -> Limits:
    return Limits(**cfg.model_dump(include=set(LimitsConfig.model_fields), exclude_none=True))


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.health: dict[str, KeyHealth] = {}
        self.limiter = Limiter(Limits(), {}, guard=settings.limits.guard)
        self.strategies: dict[str, Strategy] = {}
        self._affinity: dict[str, OrderedDict[str, str]] = {}
        self._overloads: dict[str, float] = {}
        self.budgets = Budgets(settings.limits.guard)
        self._open: dict[int, tuple[str, float]] = {}  # in-flight reservations: key, admitted at
        self._strategy_names: dict[str, str] = {}
        self._now = 0.0  # the decision's clock, for strategies that ask for headroom
        self.shared: Any = None
        """The cluster's limiter when the state is shared: it settles its own reservations."""
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        """Take a new configuration; health and limiter history of surviving keys are kept."""
        self.settings = settings
        h = settings.health
        self.policy = Policy(**h.model_dump())
        self.budgets.cap = self.policy.max_cooldown_seconds
        self.keys = {k.fingerprint: k for k in settings.keys}
        self.limiter.configure(
            limits_of(settings.limits), {fp: limits_of(k.limits) for fp, k in self.keys.items()}
        )
        old, self.strategies = self.strategies, {}
        for p in settings.pools:
            # A reload keeps a pool's cursor (its place in the cycle) unless the strategy changed.
            same = old.get(p.name)
            if same is not None and self._strategy_names.get(p.name) == p.strategy:
                self.strategies[p.name] = same
            else:
                self.strategies[p.name] = make(
                    p.strategy,
                    weight=lambda k: getattr(k, "weight", 1.0),
                    headroom=lambda k: self.headroom(getattr(k, "fingerprint", ""), self._now),
                )
        self._strategy_names = {p.name: p.strategy for p in settings.pools}

    # -- admission --------------------------------------------------------------------------

    def health_of(self, fp: str) -> KeyHealth:
        return self.health.get(fp) or KeyHealth()

    def usable(self, key: Key, now: float) -> bool:
        if key.disabled or self.budgets.blocked_until(key.fingerprint, now) is not None:
            return False
        h = self.health.get(key.fingerprint)
        cap = self.policy.max_cooldown_seconds
        return h is None or hl.usable(h, now, _paced(key), cap) or self._recheck_due(h, now)

    def _recheck_due(self, h: KeyHealth, now: float) -> bool:
        at = hl.next_usable_at(h, now, self.policy) if h.disabled_reason else None
        return at is not None and at <= now

    def headroom(self, fp: str, now: float) -> float:
        own = min(hl.headroom(self.health_of(fp), now), self.budgets.fraction(fp, now))
        return min(own, self.limiter.headroom(fp, now))

    def decide(
        self,
        pool: Pool,
        tokens: int,
        now: float,
        *,
        deadline: float,
        exclude: frozenset[str] = frozenset(),
        affinity: str | None = None,
    ) -> Decision:
        """Admit the request on a key, say how long to wait, or refuse it (never blocks)."""
        plan = self.plan(pool, now, exclude=exclude, affinity=affinity)
        result = self.limiter.try_admit(plan.candidates, tokens, now)
        return self.conclude(plan, result, now, deadline=deadline)

    def plan(
        self,
        pool: Pool,
        now: float,
        *,
        exclude: frozenset[str] = frozenset(),
        affinity: str | None = None,
    ) -> Plan:
        """The usable keys in the strategy's order (affinity's key first): what admission,
        in-process or shared, tries in turn."""
        self._now = now
        strategy = self.strategies[pool.name]

        def ok(k: Any) -> bool:
            return k.fingerprint not in exclude and self.usable(k, now)

        order = (k.fingerprint for k in strategy.candidates(pool.keys, ok))
        sticky = self._affine(pool, affinity, ok)
        candidates = _Lazy(_unique(([sticky] if sticky else []), order))
        return Plan(pool, candidates, exclude, affinity, sticky is not None)

    def conclude(
        self, plan: Plan, result: Admitted | Rejected, now: float, *, deadline: float
    ) -> Decision:
        """What an admission attempt on `plan`'s candidates means for the request."""
        pool, candidates, exclude, affinity = (
            plan.pool,
            plan.candidates,
            plan.exclude,
            plan.affinity,
        )
        if isinstance(result, Admitted):
            key = self.keys[result.key]
            self.strategies[pool.name].chose(pool.keys, key)
            self.budgets.admitted(key.fingerprint, now)
            self._open[id(result.reservation)] = (key.fingerprint, now)
            if affinity:
                self._remember(pool, affinity, key.fingerprint)
            return Chosen(key, result.reservation)
        if not len(candidates):
            return self._no_usable_key(pool, now, deadline, exclude)
        if not result.possible:
            first = result.exhausted[0] if result.exhausted else None
            return Refusal(
                413,
                "request_too_large",
                "the request's token estimate exceeds a token limit",
                limit=first.limit if first else None,
                scope=_scope_name(first.scope, self.keys) if first else None,
            )
        wake = _min(result.retry_at, self._next_health_change(pool, now, exclude))
        # A key coming back cannot free the proxy's own limits: those bound the wait from below.
        glob = [e.free_at for e in result.exhausted if e.scope == GLOBAL and e.free_at is not None]
        if wake is not None and glob:
            wake = max(wake, *glob)
        binding = _binding(result.exhausted, result.retry_at, now)
        if (wake is None and deadline > now) or (wake is not None and wake <= deadline):
            return Wait(wake, binding.limit if binding else "capacity")
        retry_at = wake if wake is not None else now + 1.0
        what = (
            f"{binding.limit} of {_scope_name(binding.scope, self.keys)}" if binding else "capacity"
        )
        return Refusal(
            429,
            "local_rate_limit",
            f"{what} is exhausted",
            retry_at,
            limit=binding.limit if binding else None,
            limit_value=self._limit_value(binding),
            scope=_scope_name(binding.scope, self.keys) if binding else None,
        )

    def _no_usable_key(
        self, pool: Pool, now: float, deadline: float, exclude: frozenset[str]
    ) -> Decision:
        times = [self._available_at(k, now) for k in pool.keys if k.fingerprint not in exclude]
        known = [t for t in times if t is not None]
        reasons = tuple(self.key_status(k, now) for k in pool.keys)
        if not known:
            return Refusal(
                503,
                "all_keys_disabled",
                f"every key of pool {pool.name!r} is disabled",
                keys=reasons,
            )
        wake = min(known)
        if wake <= deadline:
            return Wait(wake, "no usable key")
        return Refusal(
            429, "pool_exhausted", f"no key of pool {pool.name!r} can serve now", wake, keys=reasons
        )

    def health_hold(self, key: Key, now: float) -> tuple[bool, float | None]:
        """Whether the key's health (what providers said of it, not its budgets) keeps it
        out now, and until when (None: until an operator or a recheck)."""
        if key.disabled:
            return True, None
        h = self.health_of(key.fingerprint)
        paced, cap = _paced(key), self.policy.max_cooldown_seconds
        if hl.usable(h, now, paced, cap) or self._recheck_due(h, now):
            return False, None
        return True, hl.next_usable_at(h, now, self.policy, paced)

    def _available_at(self, key: Key, now: float) -> float | None:
        if key.disabled:
            return None
        at = hl.next_usable_at(self.health_of(key.fingerprint), now, self.policy, _paced(key))
        spent = self.budgets.blocked_until(key.fingerprint, now)
        return at if at is None or spent is None else max(at, spent)

    def _next_health_change(self, pool: Pool, now: float, exclude: frozenset[str]) -> float | None:
        times = [
            self._available_at(k, now)
            for k in pool.keys
            if k.fingerprint not in exclude and not self.usable(k, now)
        ]
        return min((t for t in times if t is not None and t > now), default=None)

    def _limit_value(self, binding: Exhausted | None) -> int | None:
        if binding is None:
            return None
        if binding.scope == GLOBAL:
            cfg: LimitsConfig = self.settings.limits
        else:
            key = self.keys.get(binding.scope.removeprefix("key:"))
            if key is None:
                return None
            cfg = key.limits
        value = getattr(cfg, binding.limit, None)
        return value if isinstance(value, int) else None

    # -- affinity ---------------------------------------------------------------------------

    def _affine(self, pool: Pool, affinity: str | None, ok: Any) -> str | None:
        if not affinity:
            return None
        fp = self._affinity.get(pool.name, OrderedDict()).get(affinity)
        key = self.keys.get(fp) if fp else None
        return fp if key is not None and ok(key) else None

    def _remember(self, pool: Pool, affinity: str, fp: str) -> None:
        table = self._affinity.setdefault(pool.name, OrderedDict())
        table[affinity] = fp
        table.move_to_end(affinity)
        while len(table) > AFFINITY_SIZE:
            table.popitem(last=False)

    # -- outcomes ---------------------------------------------------------------------------

    def settle(self, key: Key, reservation: Reservation | None, tokens: int | None) -> None:
        """The request is over (whatever happened): correct its tokens and free its slot."""
        if reservation is None:
            return
        self._open.pop(id(reservation), None)
        if tokens is not None:
            self.adjust(reservation, tokens)
        self.limiter_of(reservation).release(reservation)

    def adjust(self, reservation: Reservation, tokens: int) -> None:
        """Correct a reservation's tokens, at its original time."""
        self.limiter_of(reservation).adjust(reservation, min(max(0, tokens), MAX_TOKENS))

    def limiter_of(self, reservation: Reservation) -> Any:
        """The limiter that made the reservation: the shared one (if any) or the local one."""
        shared = self.shared
        return shared if shared is not None and shared.owns(reservation) else self.limiter

    def observe(
        self, key: Key, sig: Signal, now: float, answered: Reservation | None = None
    ) -> KeyHealth:
        """What an answer (or an in-stream error) says about the key; returns its new health.
        `answered`: the answered request's reservation. Every other request in flight on the
        key may be missing from what the provider reported, whenever it was admitted: transit
        times differ, so an earlier one can arrive later."""
        if sig.windows and "requests" not in _paced(key):
            after = [
                at
                for rid, (fp, at) in self._open.items()
                if fp == key.fingerprint and (answered is None or rid != id(answered))
            ]
            self.budgets.observe(key.fingerprint, sig.windows, after, now)
            if answered is not None and self.shared is not None and self.shared.owns(answered):
                # Every process counts its requests against the same report.
                self.shared.report(
                    answered, sig.windows, now, guard=self.budgets.guard, cap=self.budgets.cap
                )
        outage = sig.kind is FailureKind.OVERLOADED and self._is_outage(key, now)
        h = hl.apply_signal(self.health_of(key.fingerprint), sig, now, self.policy, outage=outage)
        self.health[key.fingerprint] = h
        return h

    def network_error(self, key: Key, now: float, reason: str) -> KeyHealth:
        outage = self._is_outage(key, now)
        h = hl.apply_network_error(
            self.health_of(key.fingerprint), now, self.policy, outage=outage, reason=reason
        )
        self.health[key.fingerprint] = h
        return h

    def _is_outage(self, key: Key, now: float) -> bool:
        """Whether every other key of the pool that could have been tried also failed this way
        just now (keys disabled, blocked or cooling for a rate limit got no traffic to fail)."""
        self._overloads[key.fingerprint] = now
        pool = next((p for p in self.settings.pools if p.name == key.pool), None)
        others = [
            k for k in (pool.keys if pool else ()) if k is not key and self._in_service(k, now)
        ]
        return bool(others) and all(
            now - self._overloads.get(k.fingerprint, -math.inf) <= OUTAGE_WINDOW for k in others
        )

    def _in_service(self, key: Key, now: float) -> bool:
        return in_service(key, self.health_of(key.fingerprint), now)

    # -- operators and other processes ----------------------------------------------------------

    def operate(self, key: Key, action: str, now: float) -> KeyHealth:
        """`disable`, `enable` or `reset` a key by hand."""
        h = self.health_of(key.fingerprint)
        if action == "disable":
            h = h.model_copy(
                update={
                    "disabled_reason": "disabled by operator",
                    "disabled_at": now,
                    "updated_at": now,
                }
            )
        elif action in ("enable", "reset"):
            h = hl.operator_reset(h, now)
            self.budgets.forget(key.fingerprint)
        else:
            raise ValueError(f"unknown action {action!r}")
        self.health[key.fingerprint] = h
        return h

    def rotate(self, pool_name: str, times: int = 1) -> bool:
        """Move a sticky pool's active key on; False for pools of other strategies."""
        strategy = self.strategies.get(pool_name)
        pool = next((p for p in self.settings.pools if p.name == pool_name), None)
        if not isinstance(strategy, Sticky) or pool is None:
            return False
        for _ in range(times):
            strategy.rotate(pool.keys)
        return True

    def adopt(self, fp: str, h: KeyHealth) -> bool:
        """Take a key's health written elsewhere (the CLI, another proxy) when it is newer."""
        mine = self.health.get(fp)
        if mine is not None and mine.updated_at >= h.updated_at:
            return False
        self.health[fp] = h
        return True

    def key_status(self, key: Key, now: float) -> dict[str, Any]:
        h = self.health_of(key.fingerprint)
        spent = self.budgets.blocked_until(key.fingerprint, now)
        state = key_state(key, h, now, self.policy, spent)
        state["reason"] = scrubber(self.settings)(state["reason"], 120) or None
        return {"label": key.label, **state}

    # -- what the shell reads and hands in ------------------------------------------------------

    def observe_usage(self, key: Key, windows: tuple[Window, ...], now: float) -> KeyHealth:
        """What the provider's usage endpoint said of the key's windows; its new health."""
        h = hl.observe_windows(self.health_of(key.fingerprint), windows, now)
        self.health[key.fingerprint] = h
        return h

    def available_at(self, key: Key, now: float) -> float | None:
        """When the key can take a request: `now` when it can now, None while it is disabled."""
        return now if self.usable(key, now) else self._available_at(key, now)

    def pool_available_at(self, pool: Pool, now: float, exclude: frozenset[str]) -> float | None:
        """When the pool can next serve a request on a key outside `exclude` (see the function
        of the same name)."""
        return pool_available_at(self, pool, now, exclude)

    def spent_until(self, fp: str, now: float) -> float | None:
        """Until when the provider's reported budget of the key is spent; None when it is not."""
        return self.budgets.blocked_until(fp, now)

    def usage(self, scope: str, now: float) -> dict[str, dict[str, float | None]]:
        """The local limits' use of a scope (`global`, `key:<fingerprint>`): used, limit,
        when it frees, per window."""
        return self.limiter.usage(scope, now)

    def limiter_windows(self, now: float) -> Callable[[], dict[str, Any]]:
        """The limiter's windows as they are now, copied cheaply; call the result (in any
        thread) for the document the state file keeps."""
        return self.limiter.capture(now)

    def limiter_snapshot(self, now: float) -> dict[str, Any]:
        """The limiter's windows as the state file keeps them."""
        return self.limiter.snapshot(now)

    def restore_limiter(self, data: Mapping[str, Any], now: float) -> None:
        """Take back windows from the state file (raises on a malformed document)."""
        self.limiter.restore(data, now)

    def limit_locally(self, global_limits: Limits, key_limits: Mapping[str, Limits]) -> None:
        """Enforce these limits in this process (a cluster member's share of the shared ones)."""
        self.limiter.configure(global_limits, key_limits)


def _paced(key: Key) -> frozenset[str]:
    """Dimensions the key's local limits pace exactly (see `core.key_state.paced`)."""
    return paced(key.limits)


def _unique(first: Iterable[str], rest: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for x in itertools.chain(first, rest):
        if x not in seen:
            seen.add(x)
            yield x


def _min(a: float | None, b: float | None) -> float | None:
    known = [x for x in (a, b) if x is not None]
    return min(known) if known else None


def _binding(
    exhausted: tuple[Exhausted, ...], retry_at: float | None, now: float
) -> Exhausted | None:
    """The limit the client waits for: the exhausted one that frees when the request can go
    (`retry_at`), or a concurrency limit when only a finishing request can help."""
    if not exhausted:
        return None
    if retry_at is None:
        return next((e for e in exhausted if e.free_at is None), exhausted[0])
    timed = [e for e in exhausted if e.free_at is not None]
    if not timed:
        return exhausted[0]
    # Equal distance: the global limit binds every key, so it is the one to name.
    return min(timed, key=lambda e: (abs((e.free_at or now) - retry_at), e.scope != GLOBAL))


def _scope_name(scope: str, keys: dict[str, Key]) -> str:
    if scope == GLOBAL:
        return "the proxy"
    key = keys.get(scope.removeprefix("key:"))
    return f"key {key.label!r}" if key else "a key"


def pool_available_at(
    engine: Engine, pool: Pool, now: float, exclude: frozenset[str]
) -> float | None:
    """When the pool can next serve a request on a key outside `exclude`: `now` when a key is
    ready now, None when every such key is disabled."""
    times = [
        now if engine.usable(k, now) else engine._available_at(k, now)
        for k in pool.keys
        if k.fingerprint not in exclude
    ]
    known = [t for t in times if t is not None]
    return min(known) if known else None
