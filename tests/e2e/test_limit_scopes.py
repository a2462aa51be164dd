"""Limits per model, end to end: real SDK clients, mitmdump with kmi-rotor and the fake
provider limiting each model of each key apart. A key exhausted for one model keeps serving
the others, with no 429 from the provider; Anthropic models share a limit by class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from proctools import clean_env

from ._operating_helpers import STATUS_PATH, PoolSpec, live_status, write_config

pytestmark = pytest.mark.e2e

TWO = {
    "alpha": "sk-scope-alpha-0000000000000000000a1",
    "beta": "sk-scope-beta-00000000000000000000b2",
}
SMALL_RPM = 3

CLIENT = """
import json, sys, anthropic, openai
which, base, models = sys.argv[1], sys.argv[2], sys.argv[3:]
out = []
if which == "openai":
    c = openai.OpenAI(base_url=base + "/v1", api_key="placeholder", max_retries=0)
    ask = lambda m: c.chat.completions.with_raw_response.create(
        model=m, messages=[{"role": "user", "content": "hi"}])
else:
    c = anthropic.Anthropic(base_url=base, api_key="placeholder", max_retries=0)
    ask = lambda m: c.messages.with_raw_response.create(
        model=m, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
for m in models:
    try:
        r = ask(m)
        out.append([m, r.status_code, r.headers.get("kmi-rotor-key")])
    except openai.APIStatusError as e:
        out.append([m, e.status_code, e.response.headers.get("kmi-rotor-key")])
    except anthropic.APIStatusError as e:
        out.append([m, e.status_code, e.response.headers.get("kmi-rotor-key")])
print(json.dumps(out))
"""


def ask(tmp_path: Path, which: str, base: str, models: list[str]) -> list[tuple[str, int, Any]]:
    """Each model asked once, in order, by the real SDK: (model, status, serving key)."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    run = subprocess.run(
        [sys.executable, str(script), which, base, *models],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return [tuple(x) for x in json.loads(run.stdout)]


def upstream_429s(provider: Any) -> int:
    return sum(1 for r in provider.requests if r.status == 429)


@pytest.fixture
def scoped_keys(provider) -> None:
    """Both keys: a small per-model limit on the mini model, a large one on the big model."""
    limits = {"gpt-4o-mini": {"rpm": SMALL_RPM}, "gpt-4o": {"rpm": 100}}
    provider.set_keys(
        {k: {"headers": "openai", "rpm": 1000, "model_limits": limits} for k in TWO.values()},
        replace=True,
    )


def start_openai_pool(tmp_path, provider, proxy_factory, **extra: Any):
    spec = PoolSpec("oai", [f"127.0.0.1:{provider.port}"], TWO, provider="openai", extra=extra)
    config = write_config(tmp_path, [spec], limits={"max_wait_seconds": 0})
    return config, proxy_factory(config, mode=f"reverse:{provider.url}")


def test_a_model_exhausted_on_every_key_leaves_the_other_model_served(
    tmp_path, provider, proxy_factory, scoped_keys
) -> None:
    config, m = start_openai_pool(tmp_path, provider, proxy_factory)
    small = ask(tmp_path, "openai", m.url, ["gpt-4o-mini"] * (2 * SMALL_RPM + 1))
    # each key's mini limit is used up, the next one is refused here, not by the provider
    assert [s for _, s, _ in small] == [200] * (2 * SMALL_RPM) + [429]
    assert sorted(k for _, _, k in small[:-1]) == ["alpha"] * SMALL_RPM + ["beta"] * SMALL_RPM
    big = ask(tmp_path, "openai", m.url, ["gpt-4o"] * 8)
    assert [s for _, s, _ in big] == [200] * 8
    assert {k for _, _, k in big} == {"alpha", "beta"}  # both keys, spent for mini, still serve
    assert upstream_429s(provider) == 0
    keys = live_status(m.url + STATUS_PATH)
    for label in TWO:
        scopes = {s["scope"]: s for s in keys[label]["scopes"]}
        assert keys[label]["status"] == "ready"
        assert scopes["model:gpt-4o-mini"]["status"] == "cooling"
        assert scopes["model:gpt-4o"]["status"] == "ready"
    # the scoped records survive a restart: mini still refused at once, gpt-4o served
    m.stop()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert all("model:gpt-4o-mini" in r["health"]["scopes"] for r in state["keys"].values())
    m2 = proxy_factory(config, mode=f"reverse:{provider.url}")
    again = ask(tmp_path, "openai", m2.url, ["gpt-4o-mini", "gpt-4o", "gpt-4o"])
    assert [s for _, s, _ in again] == [429, 200, 200]
    assert upstream_429s(provider) == 0


def test_key_wide_steering_loses_the_other_model(
    tmp_path, provider, proxy_factory, scoped_keys
) -> None:
    """The same traffic with `limit_scope = "key"`: the mini model's report holds back every
    request on the key, so the big model, with room to spare at the provider, is refused."""
    _, m = start_openai_pool(tmp_path, provider, proxy_factory, limit_scope="key")
    small = ask(tmp_path, "openai", m.url, ["gpt-4o-mini"] * (2 * SMALL_RPM))
    assert [s for _, s, _ in small] == [200] * (2 * SMALL_RPM)
    big = ask(tmp_path, "openai", m.url, ["gpt-4o"] * 2)
    assert [s for _, s, _ in big] == [429, 429]


HAIKU_RPM = 2


def test_anthropic_models_share_a_limit_by_class(tmp_path, provider, proxy_factory) -> None:
    limits = {"claude-3-5-haiku-latest": {"rpm": HAIKU_RPM}}
    provider.set_keys(
        {k: {"headers": "anthropic", "rpm": 1000, "model_limits": limits} for k in TWO.values()},
        replace=True,
    )
    spec = PoolSpec("claude", [f"127.0.0.1:{provider.port}"], TWO, provider="anthropic")
    config = write_config(tmp_path, [spec], limits={"max_wait_seconds": 0})
    m = proxy_factory(config, mode=f"reverse:{provider.url}")
    haiku = ask(tmp_path, "anthropic", m.url, ["claude-3-5-haiku-latest"] * (2 * HAIKU_RPM))
    assert [s for _, s, _ in haiku] == [200] * (2 * HAIKU_RPM)
    # a dated name of the same class is held by the same limit: refused here, not upstream
    dated = ask(tmp_path, "anthropic", m.url, ["claude-3-5-haiku-20241022"])
    assert [s for _, s, _ in dated] == [429]
    others = ["claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-opus-4-1"] * 2
    served = ask(tmp_path, "anthropic", m.url, others)
    assert [s for _, s, _ in served] == [200] * len(others)
    assert upstream_429s(provider) == 0
    keys = live_status(m.url + STATUS_PATH)
    scopes = {s["scope"]: s["status"] for s in keys["alpha"]["scopes"]}
    assert scopes == {
        "class:haiku-3": "cooling",
        "class:sonnet-4": "ready",
        "class:opus-4": "ready",
    }
