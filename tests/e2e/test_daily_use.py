"""A new user's steps as the README writes them: mitmweb, which key served, the CLI.

Every check runs real processes (mitmdump, mitmweb, the CLI, bash) against the fake provider."""

from __future__ import annotations

import re
import shlex
import ssl

import httpx2 as httpx
from proctools import BIN, LISTEN_RE, ROOT, clean_env, spawn

import fake_provider

from ._operating_helpers import PoolSpec, write_config
from .conftest import KEYS
from .test_operating import metric_samples

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def readme_command(program: str) -> list[str]:
    """The README's command line that starts `program` (continuation lines joined)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.strip().startswith(f".venv/bin/{program} "))
    argv = shlex.split(line)
    argv[0] = str(BIN / program)
    return [str(ROOT / a) if a == "addon/rotor.py" else a for a in argv]


# -- which key served, and the retries metric ---------------------------------------------------


def test_failover_names_the_serving_key_and_counts_the_retry_on_the_failed_one(
    tmp_path, provider, proxy_factory
):
    provider.set_keys({KEYS["alpha"]: fake_provider.KeyBehaviour(fail_next=[429])})
    pool = PoolSpec("main", [f"127.0.0.1:{provider.port}"], KEYS)
    cfg = write_config(tmp_path, [pool], health={"rate_limit_backoff": 300})
    m = proxy_factory(cfg, mode=f"reverse:{provider.url}")
    with httpx.Client(base_url=m.url, trust_env=False, timeout=30) as c:
        answers = [c.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
        metrics = metric_samples(c.get("/_kmi-rotor/metrics").text)
    assert [r.status_code for r in answers] == [200, 200, 200]
    # alpha's 429 was re-sent on beta: the client learns who served it, and on which attempt
    got = [(r.headers.get("kmi-rotor-key"), r.headers.get("kmi-rotor-attempt")) for r in answers]
    assert got == [("beta", "2"), ("gamma", None), ("beta", None)]
    retries = metrics["kmi_rotor_retries_total"]
    assert retries == {("alpha",): 1.0, ("beta",): 0.0, ("gamma",): 0.0}
    for r in answers:
        assert not any(k in str(r.headers) for k in KEYS.values())


# -- the README's mitmweb command -------------------------------------------------------------


def test_the_readme_mitmweb_command_shows_flows_with_their_key(
    tmp_path, provider, mitm_confdir, upstream_ca
):
    from ._daily_helpers import free_port

    pool = PoolSpec("main", [f"127.0.0.1:{provider.port}"], KEYS)
    cfg = write_config(tmp_path, [pool])
    argv = readme_command("mitmweb")
    web_port, token = free_port(), "kmi-rotor-test-token"
    argv += ["-p", "0", "--set", f"web_port={web_port}", "--set", "web_open_browser=false"]
    argv += ["--set", f"web_password={token}", "--set", f"confdir={mitm_confdir}"]
    argv += ["--set", f"rotor_config={cfg}"]
    argv += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca[1]}"]
    web = spawn(argv, clean_env(), tmp_path / "mitmweb.log", cwd=ROOT)
    try:
        listen = web.wait_for(LISTEN_RE)
        web.wait_for("Web server listening")
        trust = ssl.create_default_context(cafile=str(mitm_confdir / "mitmproxy-ca-cert.pem"))
        proxy = f"http://127.0.0.1:{listen.group(2)}"
        with httpx.Client(proxy=proxy, verify=trust, trust_env=False, timeout=30) as c:
            for _ in range(2):
                assert c.post(provider.url + "/v1/chat/completions", json=CHAT).status_code == 200
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{web_port}",
            headers={"Authorization": f"Bearer {token}"},
            trust_env=False,
        )
        with api:
            columns = api.get("/options").json()["web_columns"]["value"]
            flows = api.get("/flows").json()
    finally:
        web.stop()
    assert columns == ["tls", "icon", "path", "method", "status", "size", "time", "comment"]
    from mitmproxy.tools.web.web_columns import AVAILABLE_WEB_COLUMNS

    assert set(columns) <= set(AVAILABLE_WEB_COLUMNS)
    assert [f["comment"] for f in flows] == ["key alpha · 200", "key beta · 200"]
    assert all(re.fullmatch(r"/v1/chat/completions", f["request"]["path"]) for f in flows)
