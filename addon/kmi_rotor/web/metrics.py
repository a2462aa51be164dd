"""Prometheus exposition of a status snapshot, through ``prometheus_client``.

The snapshot is produced elsewhere; this module only translates it. Every field of the snapshot
is optional: a missing or non-numeric value produces no series rather than a made-up zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

Snapshot = Callable[[], Mapping[str, Any]]

KEY_LABELS = ("pool", "key")
QUOTA_LABELS = ("pool", "key", "quota", "source")
SCOPE_LABELS = ("pool", "key", "scope")
"""A key's series for one limit scope (a model, a model class) of a provider that limits so."""

# (snapshot field, metric name without "_total", help text) for the per-key counters.
KEY_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("requests", "kmi_rotor_requests", "Requests sent with this key."),
    ("errors", "kmi_rotor_errors", "Requests with this key that ended in an error."),
    ("upstream_429", "kmi_rotor_upstream_429", "429 answers the provider gave for this key."),
    ("local_429", "kmi_rotor_local_429", "Requests refused locally because of this key's quota."),
    ("retries", "kmi_rotor_retries", "Requests retried after failing on this key."),
    ("tokens", "kmi_rotor_tokens", "Tokens accounted to this key."),
)


def number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def text(value: Any) -> str:
    """A label value: None becomes the empty string, anything else its ``str``."""
    return "" if value is None else str(value)


def mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (the snapshot may be partial)."""
    return value if isinstance(value, Mapping) else {}


def sequence(value: Any) -> list[Any]:
    """``value`` if it is a list or tuple, else an empty list."""
    return list(value) if isinstance(value, list | tuple) else []


def iter_keys(snap: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield ``(pool name, key record)`` for every key of every pool in the snapshot."""
    for pool in sequence(snap.get("pools")):
        pool = mapping(pool)
        for key in sequence(pool.get("keys")):
            if isinstance(key, Mapping):
                yield text(pool.get("name")), key


def cooldown_seconds(key: Mapping[str, Any], now: float) -> float | None:
    """Seconds until the key can be used: 0 when ready, None when no end is known.

    A disabled key has no end: reporting 0 would claim it is usable, so it gets no series
    (``kmi_rotor_key_status`` says why).
    """
    if key.get("status") == "ready":
        return 0.0
    until = number(key.get("until"))
    return max(0.0, until - now) if until is not None else None


class _Families:
    """The metric families of one collection, with duplicate series dropped.

    A valid exposition needs unique label sets; the snapshot is not trusted to provide them
    (two quotas may share a name), so the first series wins.
    """

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self._seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(self, family: Metric) -> None:
        self.families[family.name] = family

    def sample(self, name: str, labels: tuple[str, ...], value: float | None) -> None:
        if value is None or (name, labels) in self._seen:
            return
        self._seen.add((name, labels))
        fam = self.families[name]
        assert isinstance(fam, CounterMetricFamily | GaugeMetricFamily)
        fam.add_metric(list(labels), value)


class SnapshotCollector(Collector):
    """A custom collector: each ``collect`` calls ``snapshot()`` exactly once.

    ``snapshot`` raising propagates, so the caller can answer with an error instead of an
    exposition that silently lacks every series.
    """

    def __init__(self, snapshot: Snapshot, clock: Callable[[], float] = time.time) -> None:
        self.snapshot = snapshot
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = mapping(self.snapshot())
        now = number(snap.get("generated_at")) or self.clock()
        fams = _Families()
        _declare(fams)
        _global_samples(fams, snap)
        for pool, key in iter_keys(snap):
            _key_samples(fams, pool, key, now)
        return iter(fams.families.values())


def _declare(fams: _Families) -> None:
    """Create every family up front, so the exposition lists them even with no keys."""
    for _, name, doc in KEY_COUNTERS:
        fams.add(CounterMetricFamily(name, doc, labels=KEY_LABELS))
    gauges: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
        ("kmi_rotor_key_status", "1 for the key's current status.", (*KEY_LABELS, "status")),
        ("kmi_rotor_key_quota_remaining", "Remaining units of a key's quota.", QUOTA_LABELS),
        ("kmi_rotor_key_quota_limit", "Size of a key's quota window.", QUOTA_LABELS),
        ("kmi_rotor_key_cooldown_seconds", "Seconds until the key is usable.", KEY_LABELS),
        ("kmi_rotor_key_inflight", "Requests in flight on this key.", KEY_LABELS),
        (
            "kmi_rotor_key_scope_status",
            "1 for the key's status for one limit scope (model, model class).",
            (*SCOPE_LABELS, "status"),
        ),
        (
            "kmi_rotor_key_scope_cooldown_seconds",
            "Seconds until the key is usable for one limit scope.",
            SCOPE_LABELS,
        ),
        (
            "kmi_rotor_key_scope_quota_remaining",
            "Remaining units of a key's provider window for one limit scope.",
            (*SCOPE_LABELS, "quota"),
        ),
        (
            "kmi_rotor_key_scope_quota_limit",
            "Size of a key's provider window for one limit scope.",
            (*SCOPE_LABELS, "quota"),
        ),
        ("kmi_rotor_inflight", "Requests in flight through the rotor.", None),
        ("kmi_rotor_uptime_seconds", "Seconds since the rotor started.", None),
        (
            "kmi_rotor_cluster_shared",
            "1 while limits are shared through Redis, 0 when this "
            "process enforces its own share (Redis unreachable).",
            None,
        ),
        ("kmi_rotor_cluster_processes", "Processes of the cluster alive in the last minute.", None),
    )
    for name, doc, labels in gauges:
        fams.add(GaugeMetricFamily(name, doc, labels=labels or ()))


def _global_samples(fams: _Families, snap: Mapping[str, Any]) -> None:
    totals = mapping(snap.get("totals"))
    fams.sample("kmi_rotor_inflight", (), number(totals.get("inflight")))
    fams.sample("kmi_rotor_uptime_seconds", (), number(snap.get("uptime_s")))
    cluster = mapping(snap.get("cluster"))
    if cluster.get("mode") not in (None, "local"):
        fams.sample("kmi_rotor_cluster_shared", (), float(cluster.get("mode") == "shared"))
        fams.sample("kmi_rotor_cluster_processes", (), number(cluster.get("alive")))


def _key_samples(fams: _Families, pool: str, key: Mapping[str, Any], now: float) -> None:
    labels = (pool, text(key.get("label")))
    for field, name, _ in KEY_COUNTERS:
        value = number(key.get(field))
        # a counter never goes negative; a negative field is a bug upstream, not a reading
        fams.sample(name, labels, value if value is not None and value >= 0 else None)
    status = key.get("status")
    if status is not None:
        fams.sample("kmi_rotor_key_status", (*labels, text(status)), 1.0)
    fams.sample("kmi_rotor_key_cooldown_seconds", labels, cooldown_seconds(key, now))
    fams.sample("kmi_rotor_key_inflight", labels, number(key.get("inflight")))
    for quota in sequence(key.get("quota")):
        quota = mapping(quota)
        qlabels = (*labels, text(quota.get("name")), text(quota.get("source")))
        fams.sample("kmi_rotor_key_quota_remaining", qlabels, number(quota.get("remaining")))
        fams.sample("kmi_rotor_key_quota_limit", qlabels, number(quota.get("limit")))
    for scoped in sequence(key.get("scopes")):
        _scope_samples(fams, labels, mapping(scoped), now)


def _scope_samples(
    fams: _Families, labels: tuple[str, str], scoped: Mapping[str, Any], now: float
) -> None:
    slabels = (*labels, text(scoped.get("scope")))
    status = scoped.get("status")
    if status is not None:
        fams.sample("kmi_rotor_key_scope_status", (*slabels, text(status)), 1.0)
    fams.sample("kmi_rotor_key_scope_cooldown_seconds", slabels, cooldown_seconds(scoped, now))
    for quota in sequence(scoped.get("quota")):
        quota = mapping(quota)
        qlabels = (*slabels, text(quota.get("name")))
        fams.sample("kmi_rotor_key_scope_quota_remaining", qlabels, number(quota.get("remaining")))
        fams.sample("kmi_rotor_key_scope_quota_limit", qlabels, number(quota.get("limit")))


def make_registry(snapshot: Snapshot) -> CollectorRegistry:
    """A private registry holding only the snapshot collector (no process/GC metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (see ``prometheus_client.CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)
