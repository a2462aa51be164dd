"""A key of a provider that limits per model: its scopes on the status page and in /metrics."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import Client

from kmi_rotor.web import make_app

from .browser import dump_dom, serve
from .dom import parse
from .sample import realistic, scoped

NOW = 1_764_260_000.0


def test_metrics_have_a_series_per_key_and_scope() -> None:
    text = Client(make_app(lambda: scoped(NOW))).get("/metrics").text
    fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
    status = {(s.labels["scope"], s.labels["status"]) for s in fams["kmi_rotor_key_scope_status"]}
    assert status == {("model:gpt-4o", "ready"), ("model:gpt-4o-mini", "cooling")}
    cool = {s.labels["scope"]: s.value for s in fams["kmi_rotor_key_scope_cooldown_seconds"]}
    assert cool["model:gpt-4o"] == 0.0
    assert 0 < cool["model:gpt-4o-mini"] <= 25
    left = {s.labels["scope"]: s.value for s in fams["kmi_rotor_key_scope_quota_remaining"]}
    assert left == {"model:gpt-4o": 40.0, "model:gpt-4o-mini": 0.0}
    assert all(s.labels["key"] == "omega" for s in fams["kmi_rotor_key_scope_status"])


def test_metrics_of_key_wide_pools_have_no_scope_series() -> None:
    text = Client(make_app(lambda: realistic(NOW))).get("/metrics").text
    fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
    assert fams["kmi_rotor_key_scope_status"] == []


def test_page_shows_each_scope_under_its_key(chromium: Path) -> None:
    with serve(make_app(scoped)) as url:
        page = parse(dump_dom(url))
    pool = page.find("section", "pool", {"data-pool": "oai"})
    rows = [c for c in pool.find("tbody").children if not isinstance(c, str)]
    kinds = [(r.attrs.get("data-key"), r.attrs.get("data-scope")) for r in rows]
    assert kinds == [
        ("omega", None),
        ("omega", "model:gpt-4o"),
        ("omega", "model:gpt-4o-mini"),
    ]
    mini = pool.find("tr", "scope-row", {"data-scope": "model:gpt-4o-mini"})
    assert mini.find(cls="badge").text() == "cooling"
    assert re.fullmatch(r"resets in \d{1,2}s", mini.find(cls="status-until").text())
    assert mini.find(cls="reason").text() == "429 rate limited"
    assert mini.find(cls="quota").attrs["data-quota"] == "requests"
    kimi = page.find("section", "pool", {"data-pool": "kimi"})
    assert kimi.find_all("tr", "scope-row") == []
