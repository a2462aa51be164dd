"""The rotation engine: which key serves a request, and what each answer does to the pool.

It joins the strategy (order of preference), the keys' health (what providers said) and the
limiter (local limits). Synchronous and free of I/O: the addon calls it from hooks and waits
where it says so; tests drive it with a fake clock.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Key, LimitsConfig, Pool, Settings
from .core import admission
from .core import health as hl
from .core.admission import Wait
from .core.budget import Budgets
from .core.health import SCOPE_TTL, KeyHealth, Policy
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
from .core.rotation import RoundRobin, Sticky, Strategy, make
from .core.signals import FailureKind, Signal, Window
from .core.tokens import MAX_TOKENS
from .scrubbing import scrubber

OUTAGE_WINDOW = 30.0
"""Overloads on every key of a pool within this many seconds are the provider's outage."""
AFFINITY_SIZE = 10_000


@dataclass(slots=True)
class Chosen:
    """The key a request was admitted on and what it holds there. Not changed once made (not
    frozen: made for every request, and a frozen dataclass costs about four times more)."""

    key: Key
    reservation: Reservation


Decision = Chosen | Wait | Refusal


@dataclass(slots=True)
class Plan:
    """One admission's candidates, in order, and what chose them. Not changed once made (not
    frozen, for the cost: see `Chosen`)."""

    pool: Pool
    candidates: Sequence[str]
    exclude: frozenset[str]
    affinity: str | None
    pinned: bool
    """Whether the first candidate is the affinity's key (it stays first)."""
    scope: str = ""
    """The request's limit scope (`core/scope.py`): whose budgets and cooldowns apply."""
    model: str | None = None
    """The model the request asks for: its local `model_limits` apply."""


class _Lazy:
    """`first` (when given), then the fingerprint of each key of `keys`, each once: a sequence
    over an iterator, materialised only as far as it is read (twice at most). One object, not
    a chain of generators: a plan's first candidate is read for every request."""

    __slots__ = ("_given", "_it", "_seen")

    def __init__(self, first: str | None, keys: Iterable[Any]):
        self._it = iter(keys)
        self._seen: list[str] = [first] if first else []
        self._given: set[str] = set(self._seen)

    def __iter__(self) -> Iterator[str]:
        yield from self._seen
        seen, given = self._seen, self._given
        for key in self._it:
            name = key.fingerprint
            if name not in given:
                given.add(name)
                seen.append(name)
                yield name

    def __len__(self) -> int:
        for _ in self:  # read to the end
            pass
        return len(self._seen)

    def __bool__(self) -> bool:
        """Whether there is a candidate at all: read as far as the first one."""
        return next(iter(self), None) is not None

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
        # In-flight reservations by key (fingerprint), then by id: scope, admitted at. By key,
        # so that an answer looks only at its own key's requests, not at every one in flight.
        self._open: dict[str, dict[int, tuple[str, float]]] = {}
        self._strategy_names: dict[str, str] = {}
        self._now = 0.0  # the decision's clock and scope, for strategies that ask for headroom
        self._scope = ""
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
        self._paced = {k.fingerprint: (k, _paced(k)) for k in settings.keys}
        """Each key's paced dimensions, worked out once per configuration (asked per candidate
        of every admission); a key object of another configuration is worked out anew."""
        self.limiter.configure(
            limits_of(settings.limits),
            {fp: limits_of(k.limits) for fp, k in self.keys.items()},
            _model_limits(settings),
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
                    headroom=lambda k: self.headroom(
                        getattr(k, "fingerprint", ""), self._now, self._scope
                    ),
                )
        self._strategy_names = {p.name: p.strategy for p in settings.pools}

    # -- admission --------------------------------------------------------------------------

    def health_of(self, fp: str) -> KeyHealth:
        return self.health.get(fp) or KeyHealth()

    def usable(self, key: Key, now: float, scope: str = "") -> bool:
        """Whether the key may take a request of `scope` now (its and the scope's cooldowns,
        reports and budgets)."""
        fp = key.fingerprint
        if key.disabled or self.budgets.blocked_until(fp, now, scope) is not None:
            return False
        h = self.health.get(fp)
        if h is None:
            return True
        known = self._paced.get(fp)  # `_paced_of(key)`, inline: asked for every candidate
        paced = known[1] if known is not None and known[0] is key else _paced(key)
        if hl.usable(h, now, paced, self.policy.max_cooldown_seconds, scope):
            return True
        return self._recheck_due(h, now)

    def _paced_of(self, key: Key) -> frozenset[str]:
        """`_paced(key)`, as worked out for this configuration when `key` is one of its keys."""
        known = self._paced.get(key.fingerprint)
        return known[1] if known is not None and known[0] is key else _paced(key)

    def _recheck_due(self, h: KeyHealth, now: float) -> bool:
        at = hl.next_usable_at(h, now, self.policy) if h.disabled_reason else None
        return at is not None and at <= now

    def headroom(self, fp: str, now: float, scope: str = "") -> float:
        """The key's remaining fraction for a request of `scope` (reports, budgets, limits)."""
        reported = hl.headroom(self.health_of(fp), now, scope)
        own = min(reported, self.budgets.fraction(fp, now, scope))
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
        scope: str = "",
        model: str | None = None,
    ) -> Decision:
        """Admit a request of `scope` (asking for `model`) on a key, say how long to wait, or
        refuse it (never blocks)."""
        if not affinity:
            chosen = self._first_fit(pool, tokens, now, exclude, scope, model)
            if chosen is not None:
                return chosen
        return self._decide_planned(pool, tokens, now, deadline, exclude, affinity, scope, model)

    def _decide_planned(
        self,
        pool: Pool,
        tokens: int,
        now: float,
        deadline: float,
        exclude: frozenset[str],
        affinity: str | None,
        scope: str,
        model: str | None,
    ) -> Decision:
        """`decide` in general: a plan, the limiter's answer on its candidates, and what
        that means for the request."""
        plan = self.plan(pool, now, exclude=exclude, affinity=affinity, scope=scope, model=model)
        result = self.limiter.try_admit(plan.candidates, tokens, now, plan.model)
        return self.conclude(plan, result, now, deadline=deadline)

    def _first_fit(
        self,
        pool: Pool,
        tokens: int,
        now: float,
        exclude: frozenset[str],
        scope: str,
        model: str | None,
    ) -> Chosen | None:
        """The usual case of `decide` without affinity, decided as `_decide_planned` would
        decide it, without a plan: the strategy's first usable key has room. None when it has
        not, or when the strategy cannot name its first candidate alone: nothing is taken then
        (the limiter remembers what stopped it, as it would anyway) and the general path
        decides."""
        strategy = self.strategies[pool.name]
        start = getattr(strategy, "start", None)
        if start is None:
            return None
        self._now, self._scope = now, scope
        # The strategy's first candidate: the first usable key of its cycle (`rotation._cycle`)
        keys, usable = pool.keys, self.usable
        n, at = len(keys), start()
        for step in range(n):
            key = keys[(at + step) % n]
            if key.fingerprint not in exclude and usable(key, now, scope):
                break
        else:
            return None
        fp = key.fingerprint
        reservation = self.limiter.admit_on(fp, tokens, now, model)
        if reservation is None:
            return None
        # What `_chosen` does with the limiter's answer, for a request without affinity.
        key = self.keys[fp]
        strategy.chose(pool.keys, key)
        self.budgets.admitted(fp, now, scope)
        mine = self._open.get(fp)
        if mine is None:  # (not `setdefault`, which makes a dict for every request)
            mine = self._open[fp] = {}
        mine[id(reservation)] = (scope, now)
        return Chosen(key, reservation)

    def plan(
        self,
        pool: Pool,
        now: float,
        *,
        exclude: frozenset[str] = frozenset(),
        affinity: str | None = None,
        scope: str = "",
        model: str | None = None,
    ) -> Plan:
        """The keys usable for `scope` in the strategy's order (affinity's key first): what
        admission, in-process or shared, tries in turn."""
        self._now, self._scope = now, scope
        strategy = self.strategies[pool.name]

        def ok(k: Any) -> bool:
            return k.fingerprint not in exclude and self.usable(k, now, scope)

        sticky = self._affine(pool, affinity, ok) if affinity else None
        candidates = _Lazy(sticky, strategy.candidates(pool.keys, ok))
        return Plan(pool, candidates, exclude, affinity, sticky is not None, scope, model)

    def conclude(
        self, plan: Plan, result: Admitted | Rejected, now: float, *, deadline: float
    ) -> Decision:
        """What an admission attempt on `plan`'s candidates means for the request."""
        if isinstance(result, Admitted):
            return self._chosen(plan, result, now)
        if not plan.candidates:
            return self._no_usable_key(plan, now, deadline)
        return admission.after_rejection(
            result,
            self._next_health_change(plan.pool, now, plan.exclude, plan.scope),
            now,
            deadline,
            name=lambda scope: _scope_name(scope, self.keys),
            limit_value=self._limit_value,
        )

    def _chosen(self, plan: Plan, result: Admitted, now: float) -> Chosen:
        """The limiter admitted the request on a key: the strategy, budgets and affinity learn."""
        key = self.keys[result.key]
        self.strategies[plan.pool.name].chose(plan.pool.keys, key)
        self.budgets.admitted(key.fingerprint, now, plan.scope)
        self._open.setdefault(key.fingerprint, {})[id(result.reservation)] = (plan.scope, now)
        if plan.affinity:
            self._remember(plan.pool, plan.affinity, key.fingerprint)
        return Chosen(key, result.reservation)

    def health_hold(self, key: Key, now: float, scope: str = "") -> tuple[bool, float | None]:
        """Whether the key's health (what providers said of it, not its budgets) keeps it
        out of `scope` now, and until when (None: until an operator or a recheck)."""
        if key.disabled:
            return True, None
        h = self.health_of(key.fingerprint)
        paced, cap = _paced(key), self.policy.max_cooldown_seconds
        if hl.usable(h, now, paced, cap, scope) or self._recheck_due(h, now):
            return False, None
        return True, hl.next_usable_at(h, now, self.policy, paced, scope)

    def _no_usable_key(self, plan: Plan, now: float, deadline: float) -> Decision:
        pool, scope = plan.pool, plan.scope
        times = [
            self._available_at(k, now, scope)
            for k in pool.keys
            if k.fingerprint not in plan.exclude
        ]
        reasons = tuple(self.key_status(k, now, scope) for k in pool.keys)
        return admission.no_usable_key(pool.name, times, reasons, deadline)

    def _available_at(self, key: Key, now: float, scope: str = "") -> float | None:
        """When the key can take a request of `scope` (None: disabled, no recheck due)."""
        if key.disabled:
            return None
        h = self.health_of(key.fingerprint)
        at = hl.next_usable_at(h, now, self.policy, _paced(key), scope)
        spent = self.budgets.blocked_until(key.fingerprint, now, scope)
        return at if at is None or spent is None else max(at, spent)

    def _next_health_change(
        self, pool: Pool, now: float, exclude: frozenset[str], scope: str = ""
    ) -> float | None:
        times = [
            self._available_at(k, now, scope)
            for k in pool.keys
            if k.fingerprint not in exclude and not self.usable(k, now, scope)
        ]
        return min((t for t in times if t is not None and t > now), default=None)

    def _limit_value(self, binding: Exhausted | None) -> int | None:
        if binding is None:
            return None
        if binding.scope == GLOBAL:
            cfg: LimitsConfig = self.settings.limits
        else:
            fp, _, model = binding.scope.removeprefix("key:").partition("/model:")
            key = self.keys.get(fp)
            found = None if key is None else self._model_limits(key, model) if model else key.limits
            if found is None:
                return None
            cfg = found
        value = getattr(cfg, binding.limit, None)
        return value if isinstance(value, int) else None

    def _model_limits(self, key: Key, model: str) -> LimitsConfig | None:
        pool = next((p for p in self.settings.pools if p.name == key.pool), None)
        return dict(pool.model_limits).get(model) if pool else None

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
        mine = self._open.get(reservation.key)
        if mine is not None:
            mine.pop(id(reservation), None)
            if not mine:
                del self._open[reservation.key]
        # `limiter_of(reservation)`, inline: the limiter that made it (`adjust` would look
        # it up again).
        shared = self.shared
        limiter = shared if shared is not None and shared.owns(reservation) else self.limiter
        if tokens is not None:
            limiter.adjust(reservation, min(max(0, tokens), MAX_TOKENS))
        limiter.release(reservation)

    def adjust(self, reservation: Reservation, tokens: int) -> None:
        """Correct a reservation's tokens, at its original time."""
        self.limiter_of(reservation).adjust(reservation, min(max(0, tokens), MAX_TOKENS))

    def limiter_of(self, reservation: Reservation) -> Any:
        """The limiter that made the reservation: the shared one (if any) or the local one."""
        shared = self.shared
        return shared if shared is not None and shared.owns(reservation) else self.limiter

    def observe(
        self,
        key: Key,
        sig: Signal,
        now: float,
        answered: Reservation | None = None,
        scope: str = "",
    ) -> KeyHealth:
        """What an answer (or an in-stream error) to a request of `scope` says about the key;
        returns its new health. `answered`: the answered request's reservation. Every other
        request of the scope in flight on the key may be missing from what the provider
        reported, whenever it was admitted: transit times differ, so an earlier one can arrive
        later."""
        fp, windows = key.fingerprint, sig.windows
        if windows and "requests" not in self._paced_of(key):
            mine = self._open.get(fp)
            if mine is None:
                after = []
            else:
                skip = None if answered is None else id(answered)
                after = [
                    at
                    for rid, (sc, at) in mine.items()
                    if (not scope or sc == scope) and rid != skip
                ]
            budgets = self.budgets
            budgets.observe(fp, windows, after, now, scope)
            budgets.prune(fp, now, SCOPE_TTL)
            shared = self.shared
            if answered is not None and shared is not None and shared.owns(answered):
                # Every process counts its requests against the same report.
                shared.report(answered, windows, now, guard=budgets.guard, cap=budgets.cap)
        outage = sig.kind is FailureKind.OVERLOADED and self._is_outage(key, now)
        health = self.health
        old = health.get(fp) or KeyHealth()  # `health_of(fp)`, inline
        h = hl.apply_signal(old, sig, now, self.policy, outage=outage, scope=scope)
        health[fp] = h
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

    def seek(self, pool: Pool, start: int) -> bool:
        """Begin the pool's cycle (round-robin, sticky) at place `start` of its keys, where
        the processes sharing it moved it; False for strategies without one."""
        strategy = self.strategies.get(pool.name)
        if not isinstance(strategy, RoundRobin | Sticky) or not 0 <= start < len(pool.keys):
            return False
        strategy.seek(start)
        return True

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

    def key_status(self, key: Key, now: float, scope: str = "") -> dict[str, Any]:
        """The key's state for a request of `scope` (the whole key by default)."""
        state = self.standing(key, now, scope)
        state["reason"] = scrubber(self.settings)(state["reason"], 120) or None
        return {"label": key.label, **state}

    def standing(self, key: Key, now: float, scope: str = "") -> dict[str, Any]:
        """`status` and `until` of the key for a request of `scope`, and its `reason` as
        recorded: not scrubbed, for what does not show it (`key_status` is for what does)."""
        h = self.health_of(key.fingerprint)
        spent = self.budgets.blocked_until(key.fingerprint, now, scope)
        return key_state(key, h, now, self.policy, spent, scope)

    # -- what the shell reads and hands in ------------------------------------------------------

    def observe_usage(self, key: Key, windows: tuple[Window, ...], now: float) -> KeyHealth:
        """What the provider's usage endpoint said of the key's windows; its new health."""
        h = hl.observe_windows(self.health_of(key.fingerprint), windows, now)
        self.health[key.fingerprint] = h
        return h

    def available_at(self, key: Key, now: float, scope: str = "") -> float | None:
        """When the key can take a request of `scope`: `now` when it can now, None while it is
        disabled."""
        return now if self.usable(key, now, scope) else self._available_at(key, now, scope)

    def pool_available_at(
        self, pool: Pool, now: float, exclude: frozenset[str], scope: str = ""
    ) -> float | None:
        """When the pool can next serve a request of `scope` on a key outside `exclude` (see
        the function of the same name)."""
        return pool_available_at(self, pool, now, exclude, scope)

    def spent_until(self, fp: str, now: float, scope: str = "") -> float | None:
        """Until when the provider's reported budget of the key (for `scope`) is spent; None
        when it is not."""
        return self.budgets.blocked_until(fp, now, scope)

    def budget_scopes(self, fp: str, now: float) -> list[str]:
        """The limit scopes the key holds a provider budget for ("" the key-wide one)."""
        return list(self.budgets.scopes(fp, now))

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
    return _paced_by(key.limits)


@functools.lru_cache(maxsize=1024)
def _paced_by(limits: LimitsConfig) -> frozenset[str]:
    # Asked on every answer and for every key a selection looks at: the limits are frozen
    # (hashed by their values), and a configuration has few different ones.
    return paced(limits)


def _scope_name(scope: str, keys: dict[str, Key]) -> str:
    if scope == GLOBAL:
        return "the proxy"
    fp, _, model = scope.removeprefix("key:").partition("/model:")
    key = keys.get(fp)
    name = f"key {key.label!r}" if key else "a key"
    return f"{name} for model {model!r}" if model else name


def _model_limits(settings: Settings) -> dict[str, dict[str, Limits]]:
    """Each key's local limits per model, from its pool's `model_limits`."""
    return {
        k.fingerprint: {model: limits_of(cfg) for model, cfg in p.model_limits}
        for p in settings.pools
        if p.model_limits
        for k in p.keys
    }


def pool_available_at(
    engine: Engine, pool: Pool, now: float, exclude: frozenset[str], scope: str = ""
) -> float | None:
    """When the pool can next serve a request of `scope` on a key outside `exclude`: `now`
    when a key is ready now, None when every such key is disabled."""
    times = [
        now if engine.usable(k, now, scope) else engine._available_at(k, now, scope)
        for k in pool.keys
        if k.fingerprint not in exclude
    ]
    known = [t for t in times if t is not None]
    return min(known) if known else None
