"""The status WSGI application: routes, methods, prefixes, content types and failures."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.addons.asgiapp import WSGIApp
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.test import Client, TestResponse

from kmi_rotor.web import make_app
from kmi_rotor.web import page as page_module

from .sample import HOSTILE, hostile, realistic

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_764_260_000.0
PREFIX = "/_kmi-rotor"


def client(snapshot: Callable[[], dict[str, Any]] | None = None, prefix: str = "") -> Client:
    return Client(make_app(snapshot or (lambda: realistic(NOW)), prefix=prefix))


def error_code(resp: TestResponse) -> str:
    assert resp.content_type == "application/json"
    return resp.get_json()["error"]["code"]


# -- routes and content types ----------------------------------------------------------------


def test_page_is_html_and_does_not_need_the_snapshot() -> None:
    def snapshot() -> dict[str, Any]:
        raise AssertionError("the page itself carries no data")

    resp = client(snapshot).get("/")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.text.startswith("<!doctype html>")
    assert 'id="timeline"' in resp.text


def test_api_status_round_trips_the_snapshot_as_json() -> None:
    resp = client().get("/api/status")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.get_json() == json.loads(json.dumps(realistic(NOW)))


def test_api_status_turns_non_finite_numbers_into_null() -> None:
    snap = {"uptime_s": math.nan, "totals": {"tokens": math.inf}, "pools": [{"x": (1, -math.inf)}]}
    resp = client(lambda: snap).get("/api/status")
    # strict parsing, as a browser does: a bare NaN would make the whole document unreadable
    body = json.loads(resp.text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert body == {"uptime_s": None, "totals": {"tokens": None}, "pools": [{"x": [1, None]}]}


def test_metrics_has_the_prometheus_content_type() -> None:
    resp = client().get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert "kmi_rotor_requests_total" in resp.text


@pytest.mark.parametrize("path", ["/nope", "/api", "/api/status/", "/metrics/x", "/index.html"])
def test_unknown_paths_are_404_json(path: str) -> None:
    resp = client().get(path)
    assert resp.status_code == 404
    assert error_code(resp) == "not_found"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/api/status", "/metrics"])
def test_other_methods_are_405_json(method: str, path: str) -> None:
    resp = client().open(path, method=method)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET, HEAD"
    assert error_code(resp) == "method_not_allowed"


@pytest.mark.parametrize("path", ["/", "/api/status", "/metrics"])
def test_head_has_the_get_headers_and_no_body(path: str) -> None:
    c = client()
    get, head = c.get(path), c.head(path)
    assert head.status_code == 200
    assert head.data == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert head.headers["Content-Length"] == str(len(get.data))


# -- prefix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [PREFIX, PREFIX + "/", "_kmi-rotor", "_kmi-rotor/"])
def test_routes_live_under_the_prefix(prefix: str) -> None:
    c = client(prefix=prefix)
    assert c.get(f"{PREFIX}/").status_code == 200
    assert c.get(f"{PREFIX}/api/status").get_json()["version"] == "0.1.0"
    assert c.get(f"{PREFIX}/metrics").status_code == 200
    for outside in ("/", "/api/status", "/metrics", f"{PREFIX}x/api/status", "/_kmi/api/status"):
        assert c.get(outside).status_code == 404, outside


def test_bare_prefix_redirects_to_the_slash_so_relative_urls_resolve() -> None:
    resp = client(prefix=PREFIX).get(f"{PREFIX}?x=1")
    assert resp.status_code == 308
    assert resp.headers["Location"] == f"{PREFIX}/?x=1"


def test_prefix_may_arrive_as_script_name() -> None:
    c = client(prefix=PREFIX)
    resp = c.get("/api/status", environ_overrides={"SCRIPT_NAME": PREFIX})
    assert resp.status_code == 200


def test_empty_prefix_serves_at_the_root() -> None:
    assert client(prefix="/").get("/").status_code == 200


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/status", "/metrics"])
def test_a_failing_snapshot_is_a_500_json_without_details(path: str) -> None:
    def snapshot() -> dict[str, Any]:
        raise RuntimeError("boom with sk-live-secret-123")

    resp = client(snapshot).get(path)
    assert resp.status_code == 500
    assert error_code(resp) == "status_failed"
    for leak in ("Traceback", "RuntimeError", "sk-live-secret", "boom", "File "):
        assert leak not in resp.text


def test_a_snapshot_that_is_not_a_dict_is_a_500() -> None:
    resp = client(lambda: ["not", "a", "dict"]).get("/api/status")  # type: ignore[arg-type,return-value]
    assert resp.status_code == 500


def test_each_request_calls_the_snapshot_once() -> None:
    calls: list[int] = []

    def snapshot() -> dict[str, Any]:
        calls.append(1)
        return realistic(NOW)

    c = client(snapshot)
    c.get("/api/status")
    c.get("/metrics")
    assert len(calls) == 2


# -- the page template -----------------------------------------------------------------------


def inline(tag: str, html: str) -> str:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    assert len(found) == 1
    return found[0]


def test_template_builds_the_dom_without_html_parsing() -> None:
    js = page_module.JS
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js
    assert "new Function" not in js
    assert "textContent" in js


def test_template_polls_a_relative_url_every_two_seconds() -> None:
    js = page_module.JS
    assert 'fetch("api/status"' in js
    assert "POLL_MS = 2000" in js


def test_page_loads_nothing_from_elsewhere() -> None:
    html = client().get("/").text
    assert not re.search(r"https?://", html)
    assert "@import" not in html and "url(" not in html
    assert not re.search(r"<(link|script|img|iframe)[^>]+(src|href)=\"(?!data:)", html)


def test_csp_allows_exactly_the_inline_script_and_style() -> None:
    resp = client().get("/")
    csp = resp.headers["Content-Security-Policy"]

    def digest(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

    assert f"script-src 'sha256-{digest(inline('script', resp.text))}'" in csp
    assert f"style-src 'sha256-{digest(inline('style', resp.text))}'" in csp
    assert "default-src 'none'" in csp
    assert "unsafe-inline" not in csp


def test_page_parts_are_package_data_that_an_install_ships() -> None:
    """Every file the page reads is declared as package data, so a wheel carries it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["kmi_rotor.web"]
    web = ROOT / "addon" / "kmi_rotor" / "web"
    parts = sorted(p.relative_to(web) for p in (web / "static").iterdir())
    assert [p.name for p in parts] == ["status.css", "status.html", "status.js"]
    for part in parts:
        assert any(fnmatch.fnmatch(str(part), pattern) for pattern in patterns), part
    body = client().get("/").text
    assert inline("style", body).strip() == page_module.CSS.strip() != ""
    assert inline("script", body).strip() == page_module.JS.strip() != ""
    assert page_module.HTML_BODY.strip() in body


def test_hostile_labels_only_travel_as_json_data() -> None:
    c = client(lambda: hostile(NOW))
    assert HOSTILE not in c.get("/").text
    assert c.get("/api/status").get_json()["pools"][0]["keys"][0]["label"] == HOSTILE


# -- hosted by mitmproxy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "ctype"),
    [
        (f"{PREFIX}/", 200, "text/html; charset=utf-8"),
        (f"{PREFIX}/api/status", 200, "application/json"),
        (f"{PREFIX}/metrics", 200, CONTENT_TYPE_LATEST),
        (f"{PREFIX}/nope", 404, "application/json"),
    ],
)
async def test_mitmproxy_wsgiapp_serves_it(path: str, status: int, ctype: str) -> None:
    addon = WSGIApp(make_app(lambda: realistic(NOW), prefix=PREFIX), "kmi-rotor.local", None)
    with taddons.context(addon):
        flow = tflow.tflow(req=tutils.treq(host="kmi-rotor.local", path=path.encode()))
        await addon.request(flow)
    assert flow.response is not None
    assert flow.response.status_code == status
    assert flow.response.headers["content-type"] == ctype
