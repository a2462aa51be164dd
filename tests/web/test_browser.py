"""The status page in a real headless Chromium, served over loopback by ``wsgiref``."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmi_rotor.web import make_app

from .browser import dump_dom, screenshot, serve
from .dom import Node, parse
from .sample import HOSTILE, RECENT, hostile, realistic

PREFIX = "/_kmi-rotor"
COUNTDOWN = r"resets in \d{1,2}s"


def render(snapshot: Callable[[], dict[str, Any]], prefix: str = "") -> Node:
    with serve(make_app(snapshot, prefix=prefix)) as url:
        return parse(dump_dom(url + prefix.lstrip("/") + ("/" if prefix else "")))


@pytest.fixture(scope="module")
def page(chromium: Path) -> Node:
    # under a prefix: proves the page finds its data through a relative URL
    return render(realistic, PREFIX)


def key_row(page: Node, label: str) -> Node:
    return page.find("tr", "key-row", {"data-key": label})


def test_page_is_live_and_shows_totals(page: Node) -> None:
    assert page.find(attrs={"id": "conn"}).attrs["data-state"] == "live"
    tiles = {
        t.attrs["data-total"]: t.find(cls="tile-value").text() for t in page.find_all(cls="tile")
    }
    assert tiles["requests"] == "857"
    assert tiles["keys_ready"] == "1 / 3"
    assert tiles["tokens"] == "292.8k"


def test_each_key_has_its_label_mask_and_status_badge(page: Node) -> None:
    pool = page.find("section", "pool", {"data-pool": "kimi"})
    assert [r.attrs["data-key"] for r in pool.find_all("tr", "key-row")] == [
        "alpha",
        "beta",
        "gamma",
    ]
    for label, status, masked in (
        ("alpha", "ready", "sk-…wxyz"),
        ("beta", "cooling", "sk-…9f3c"),
        ("gamma", "disabled", "sk-…a7e1"),
    ):
        row = key_row(page, label)
        assert row.find(cls="key-label").text() == label
        assert row.find(cls="key-masked").text() == masked
        badge = row.find(cls="badge")
        assert badge.text() == status
        assert f"status-{status}" in badge.classes


def test_cooling_key_counts_down_and_says_why(page: Node) -> None:
    cell = key_row(page, "beta").find(cls="status-cell")
    assert re.fullmatch(COUNTDOWN, cell.find(cls="countdown").text())
    assert cell.find(cls="reason").text() == "429 rate limited (provider retry-after 37s)"
    assert key_row(page, "alpha").find_all(cls="status-until") == []


def test_quota_bars_have_the_right_width_colour_and_text(page: Node) -> None:
    bars = key_row(page, "alpha").find_all(cls="quota")
    expected = [
        ("requests_per_minute", "60%", "level-ok", "12/20 requests_per_minute"),
        ("tokens_per_minute", "20%", "level-low", "6,400/32,000 tokens_per_minute"),
    ]
    for quota, (name, width, level, amount) in zip(bars, expected, strict=True):
        assert quota.attrs["data-quota"] == name
        fill = quota.find(cls="quota-bar").find(cls="quota-fill")
        assert fill.style()["width"] == width
        assert level in fill.classes
        assert re.fullmatch(rf"{amount} · {COUNTDOWN}", quota.find(cls="quota-text").text())
    empty = key_row(page, "beta").find(cls="quota")
    assert empty.find(cls="quota-fill").style()["width"] == "0%"
    assert "level-empty" in empty.find(cls="quota-fill").classes
    assert key_row(page, "gamma").find(cls="quota-cell").text() == "no quota data"


def test_timeline_lists_recent_requests_newest_first(page: Node) -> None:
    rows = page.find(attrs={"id": "timeline"}).find_all("tr", "tl-row")
    assert [r.attrs["data-key"] for r in rows] == [r[1] for r in RECENT]
    assert [r.attrs["data-outcome"] for r in rows] == [r[3] for r in RECENT]
    failed = [r.attrs["data-outcome"] for r in rows if "fail" in r.classes]
    limited = [r.attrs["data-outcome"] for r in rows if "limited" in r.classes]
    assert failed == ["error"]
    assert limited == ["upstream_429", "local_429"]
    first = rows[0].text()
    assert "200" in first and "813 ms" in first and "/coding/v1/chat/completions" in first
    assert len(page.find(attrs={"id": "strip"}).find_all(cls="tick")) == len(RECENT)


def test_hostile_labels_render_as_text(chromium: Path) -> None:
    page = render(hostile)
    tags = {n.tag for n in page.iter()}
    assert not tags & {"img", "svg", "b", "i"}
    assert len(page.find_all("script")) == 1  # only the page's own
    assert key_row(page, HOSTILE).find(cls="key-label").text() == HOSTILE
    assert page.find(cls="pool").find("h2").text() == "<b>pool</b>"
    assert key_row(page, HOSTILE).find(cls="reason").text() == "<script>alert(2)</script>"
    assert page.find_all("tr", "tl-row")[0].find(cls="key-label").text() == HOSTILE


def test_a_failed_poll_shows_disconnected_and_keeps_the_data(chromium: Path) -> None:
    calls: list[int] = []

    def flaky() -> dict[str, Any]:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("proxy restarting")
        return realistic()

    page = render(flaky)
    assert len(calls) > 1  # it did poll again
    conn = page.find(attrs={"id": "conn"})
    assert conn.attrs["data-state"] == "disconnected"
    assert "disconnected" in conn.text()
    assert len(page.find_all("tr", "key-row")) == 3
    assert len(page.find_all("tr", "tl-row")) == len(RECENT)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_screenshot(chromium: Path, tmp_path: Path) -> None:
    with serve(make_app(realistic)) as url:
        shot = screenshot(url, tmp_path / "status.png", "1280,900")
    assert png_size(shot) == (1280, 900)
    # a blank or error page compresses to a few KB; the rendered tables are far larger
    assert shot.stat().st_size > 40_000


def test_a_configuration_the_proxy_could_not_apply_is_shown(chromium: Path) -> None:
    broken = "rotor.toml: pools[0].provider: unknown provider 'nope'"
    page = render(lambda: {**realistic(), "config_error": broken})
    banner = page.find(attrs={"id": "config-error"})
    assert "hidden" not in banner.attrs
    assert broken in banner.text() and "last good configuration" in banner.text()
    assert "hidden" in render(realistic).find(attrs={"id": "config-error"}).attrs
