"""``/metrics``: the Prometheus exposition of a snapshot, checked through the library's parser."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from werkzeug.test import Client

from kmi_rotor.web import make_app

from .sample import HOSTILE, hostile, realistic

NOW = 1_764_260_000.0

COUNTERS = {
    "kmi_rotor_requests": ("requests", {"alpha": 412, "beta": 388, "gamma": 57}),
    "kmi_rotor_errors": ("errors", {"alpha": 3, "beta": 1, "gamma": 9}),
    "kmi_rotor_upstream_429": ("upstream_429", {"alpha": 1, "beta": 4, "gamma": 0}),
    "kmi_rotor_local_429": ("local_429", {"alpha": 2, "beta": 0, "gamma": 0}),
    "kmi_rotor_retries": ("retries", {"alpha": 1, "beta": 0, "gamma": 0}),
    "kmi_rotor_tokens": ("tokens", {"alpha": 148_230, "beta": 131_904, "gamma": 12_660}),
}
GAUGES = (
    "kmi_rotor_key_status",
    "kmi_rotor_key_quota_remaining",
    "kmi_rotor_key_quota_limit",
    "kmi_rotor_key_cooldown_seconds",
    "kmi_rotor_key_inflight",
    "kmi_rotor_inflight",
    "kmi_rotor_uptime_seconds",
)


def scrape(snapshot: Callable[[], dict[str, Any]]) -> dict[str, tuple[str, list[Sample]]]:
    """Family name -> (type, samples), as a Prometheus server would read them."""
    text = Client(make_app(snapshot)).get("/metrics").text
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def by_key(samples: list[Sample], **match: str) -> dict[str, float]:
    return {
        s.labels["key"]: s.value
        for s in samples
        if all(s.labels.get(k) == v for k, v in match.items())
    }


@pytest.fixture(scope="module")
def families() -> dict[str, tuple[str, list[Sample]]]:
    return scrape(lambda: realistic(NOW))


def test_every_family_is_there_with_its_type(families: dict) -> None:
    assert {n: families[n][0] for n in COUNTERS} == dict.fromkeys(COUNTERS, "counter")
    assert {n: families[n][0] for n in GAUGES} == dict.fromkeys(GAUGES, "gauge")
    assert all(name.startswith("kmi_rotor_") for name in families)


@pytest.mark.parametrize("family", sorted(COUNTERS))
def test_per_key_counters(families: dict, family: str) -> None:
    _, samples = families[family]
    assert {s.name for s in samples} == {f"{family}_total"}
    assert {s.labels["pool"] for s in samples} == {"kimi"}
    assert by_key(samples) == COUNTERS[family][1]


def test_key_status_is_one_series_per_key(families: dict) -> None:
    _, samples = families["kmi_rotor_key_status"]
    assert sorted((s.labels["key"], s.labels["status"], s.value) for s in samples) == [
        ("alpha", "ready", 1.0),
        ("beta", "cooling", 1.0),
        ("gamma", "disabled", 1.0),
    ]


def test_quota_gauges_carry_the_quota_name(families: dict) -> None:
    for family, expected in (
        ("kmi_rotor_key_quota_remaining", {"requests_per_minute": 12, "tokens_per_minute": 6400}),
        ("kmi_rotor_key_quota_limit", {"requests_per_minute": 20, "tokens_per_minute": 32000}),
    ):
        _, samples = families[family]
        alpha = {s.labels["quota"]: s.value for s in samples if s.labels["key"] == "alpha"}
        assert alpha == expected
        beta = [
            (s.labels["quota"], s.labels["source"]) for s in samples if s.labels["key"] == "beta"
        ]
        assert beta == [("requests_per_minute", "provider")]


def test_cooldown_is_seconds_until_usable(families: dict) -> None:
    # gamma is disabled with no end: no number would be true for it
    _, samples = families["kmi_rotor_key_cooldown_seconds"]
    assert by_key(samples) == {"alpha": 0.0, "beta": pytest.approx(37.0)}


def test_process_gauges(families: dict) -> None:
    assert families["kmi_rotor_inflight"][1][0].value == 1
    assert families["kmi_rotor_uptime_seconds"][1][0].value == 3 * 3600 + 14 * 60 + 5
    assert by_key(families["kmi_rotor_key_inflight"][1]) == {"alpha": 1, "beta": 0, "gamma": 0}


def test_each_scrape_calls_the_snapshot_once() -> None:
    calls: list[float] = []

    def snapshot() -> dict[str, Any]:
        calls.append(NOW)
        return realistic(NOW)

    client = Client(make_app(snapshot))
    client.get("/metrics")
    assert len(calls) == 1
    client.get("/metrics")
    assert len(calls) == 2


def test_hostile_labels_survive_escaping() -> None:
    fams = scrape(lambda: hostile(NOW))
    keys = by_key(fams["kmi_rotor_requests"][1])
    assert keys[HOSTILE] == 412
    quotas = {s.labels["quota"] for s in fams["kmi_rotor_key_quota_limit"][1]}
    assert "<svg onload=alert(3)>" in quotas


def test_an_empty_snapshot_still_lists_the_families() -> None:
    fams = scrape(dict)
    assert set(COUNTERS) | set(GAUGES) <= set(fams)
    assert all(not samples for _, samples in fams.values())


def test_missing_and_odd_values_produce_no_series() -> None:
    snap = {
        "uptime_s": math.nan,
        "totals": {"inflight": "many"},
        "pools": [
            {"name": "p", "keys": [{"label": "a", "requests": True, "errors": -1, "tokens": 5}]},
            {"name": "q", "keys": "not a list"},
            "not a pool",
        ],
    }
    fams = scrape(lambda: snap)
    present = {name for name, (_, samples) in fams.items() if samples}
    assert present == {"kmi_rotor_tokens"}


def test_duplicate_quota_names_keep_the_exposition_valid() -> None:
    snap = realistic(NOW)
    alpha = snap["pools"][0]["keys"][0]
    alpha["quota"].append(dict(alpha["quota"][0], remaining=1))
    _, samples = scrape(lambda: snap)["kmi_rotor_key_quota_remaining"]
    alpha_rpm = [
        s.value
        for s in samples
        if s.labels["key"] == "alpha" and s.labels["quota"] == "requests_per_minute"
    ]
    assert alpha_rpm == [12]
