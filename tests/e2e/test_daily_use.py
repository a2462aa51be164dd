"""A new user's steps as the README writes them: mitmweb, which key served, the CLI.

Every check runs real processes (mitmdump, mitmweb, the CLI, bash) against the fake provider."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
from proctools import BIN, LISTEN_RE, ROOT, clean_env, spawn, start_mitmdump, wait_until

import fake_provider
from kmi_rotor import cli_env

from ._daily_helpers import cli_bin, free_port, user_env
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


# -- a new user's shell: env in an empty HOME, curl, the status page, the Kimi CLI --------------

STAND_IN_KIMI = """#!{python}
import json, os, sys
import httpx2 as httpx
# A stand-in for the Kimi CLI: it reports its arguments and sends one request the way the real
# one does, through HTTPS_PROXY and trusting SSL_CERT_FILE.
url = os.environ["STAND_IN_URL"]
with httpx.Client(trust_env=True, timeout=30) as c:
    r = c.post(url, json={{"model": "m", "messages": [{{"role": "user", "content": "hi"}}]}})
print(json.dumps({{"argv": sys.argv[1:], "status": r.status_code,
                  "key": r.headers.get("kmi-rotor-key"),
                  "proxy": os.environ.get("HTTPS_PROXY"), "no_proxy": os.environ.get("NO_PROXY")}}))
"""


def new_user_config(home: Path, provider) -> Path:
    """What a new user writes into ~/.kmi-rotor/rotor.toml, for the fake provider."""
    path = home / ".kmi-rotor" / "rotor.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ['state_dir = "~/.kmi-rotor"', "[[pools]]", 'name = "main"', 'provider = "generic"']
    lines.append(f'hosts = ["127.0.0.1:{provider.port}"]')
    for label, key in KEYS.items():
        lines += ["[[pools.keys]]", f'label = "{label}"', f'key = "{key}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def shell(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=90, env=env
    )


def test_env_in_an_empty_home_then_curl_the_page_and_the_kimi_cli(tmp_path, provider, upstream_ca):
    home = tmp_path / "home"
    env = user_env(home, cli_bin(tmp_path / "bin"))
    cfg = new_user_config(home, provider)
    first = shell("kmi-rotor env", env)  # before any proxy ever ran: no CA yet
    assert first.returncode == 0, first.stderr
    ca = home / ".mitmproxy" / "mitmproxy-ca-cert.pem"
    assert ca.is_file() and "created mitmproxy's CA" in first.stderr
    assert "export HTTPS_PROXY=http://127.0.0.1:8080" in first.stdout  # no proxy runs yet
    for name in ("CURL_CA_BUNDLE", "HTTP_PROXY", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"):
        assert f"export {name}=" in first.stdout

    m = start_mitmdump(
        cfg,
        home / ".mitmproxy",
        tmp_path / "mitmdump.log",
        extra=("--set", f"ssl_verify_upstream_trusted_ca={upstream_ca[1]}"),
        env=env,
    )
    try:
        wait_until(lambda: (home / ".kmi-rotor" / "proxy.json").exists(), 15, "proxy.json")
        url = provider.url + "/v1/chat/completions"
        body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        out = shell(
            'eval "$(kmi-rotor env)" && echo "port=$HTTPS_PROXY" && '
            f"curl -sS -D - -o /dev/null -H 'content-type: application/json' -d '{body}' {url} && "
            "curl -sS http://kmi-rotor.local/api/status",
            env,
        )
        assert out.returncode == 0, out.stderr
        assert f"port=http://127.0.0.1:{m.port}" in out.stdout  # the running proxy's port
        page = out.stdout.splitlines()[-1]
        assert "HTTP/1.1 200 OK" in out.stdout and "kmi-rotor-key: alpha" in out.stdout
        assert [k["label"] for k in json.loads(page)["pools"][0]["keys"]] == list(KEYS)

        stand_in = tmp_path / "bin" / "kimi"
        stand_in.write_text(STAND_IN_KIMI.format(python=sys.executable))
        stand_in.chmod(0o755)
        runs = {}
        for args in (["-p", "hello"], ["--", "-p", "hello"], ["--host", "127.0.0.1", "chat"]):
            r = shell(
                "kmi-rotor kimi " + " ".join(args),
                {**env, "STAND_IN_URL": url, "NO_PROXY": "127.0.0.1"},
            )
            assert r.returncode == 0, r.stderr
            runs[" ".join(args)] = json.loads(r.stdout)
    finally:
        m.stop()
    assert [r["argv"] for r in runs.values()] == [["-p", "hello"], ["-p", "hello"], ["chat"]]
    for r in runs.values():
        assert (r["status"], r["proxy"], r["no_proxy"]) == (200, m.url, None)
    assert [r["key"] for r in runs.values()] == ["beta", "gamma", "alpha"]
    assert [req.credential for req in provider.requests] == [
        KEYS[x] for x in ("alpha", "beta", "gamma", "alpha")
    ]
    node = shutil.which("node", path=env["PATH"])
    if node and cli_env.node_env_proxy(cli_env.node_version(node) or (0, 0, 0)) != "all":
        assert "reverse mode" in first.stderr  # this machine's Node ignores the proxy settings


def test_status_watch_piped_into_head_ends_quietly(tmp_path):
    pool = PoolSpec("main", ["127.0.0.1:9"], KEYS)
    cfg = write_config(tmp_path, [pool])
    env = user_env(tmp_path / "home", cli_bin(tmp_path / "bin"))
    r = shell(f"kmi-rotor status --watch --interval 0.05 --config {cfg} | head -n 2", env)
    assert r.returncode == 0
    assert r.stderr == "" and len(r.stdout.splitlines()) == 2
    assert r.stdout.startswith("POOL")  # no screen-clearing codes into a pipe


# -- the configuration applies live -------------------------------------------------------------

LIVE_ENV = "E2E_ROTOR_LIVE_ALPHA"


def live_config(path: Path, provider, labels: list[str], provider_name: str = "generic") -> None:
    """alpha's key comes from the proxy's environment only; the others are inline."""
    lines = [f'state_dir = "{path.parent / "state"}"', "[health]", "rate_limit_backoff = 300"]
    lines += ["[[pools]]", 'name = "main"', f'provider = "{provider_name}"']
    lines.append(f'hosts = ["127.0.0.1:{provider.port}"]')
    for label in labels:
        source = f'key_env = "{LIVE_ENV}"' if label == "alpha" else f'key = "{KEYS[label]}"'
        lines += ["[[pools.keys]]", f'label = "{label}"', source]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # as editors save


def test_an_edited_config_applies_live_and_a_broken_one_is_reported(
    tmp_path, provider, mitm_confdir, upstream_ca
):
    provider.set_keys({KEYS["beta"]: fake_provider.KeyBehaviour(fail_next=[200, 429])})
    cfg = tmp_path / "rotor.toml"
    live_config(cfg, provider, ["alpha", "beta"])
    m = start_mitmdump(
        cfg,
        mitm_confdir,
        tmp_path / "mitmdump.log",
        mode=f"reverse:{provider.url}",
        extra=("--set", f"ssl_verify_upstream_trusted_ca={upstream_ca[1]}"),
        env=clean_env(**{LIVE_ENV: KEYS["alpha"]}),
    )
    cli_env_ = user_env(tmp_path / "home", cli_bin(tmp_path / "bin"))  # without LIVE_ENV
    client = httpx.Client(base_url=m.url, trust_env=False, timeout=30)

    def key_of_next() -> str | None:
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        return r.headers.get("kmi-rotor-key")

    try:
        # alpha, beta (200), alpha, beta (429: cooling 300 s, the request failed over to alpha)
        assert [key_of_next() for _ in range(4)] == ["alpha", "beta", "alpha", "alpha"]
        wait_until(lambda: (tmp_path / "state" / "proxy.json").exists(), 15, "proxy.json")

        edited = time.monotonic()
        live_config(cfg, provider, ["alpha", "beta", "gamma"])
        m.process.wait_for("kmi-rotor: 1 pool, 3 keys", timeout=15)
        applied = time.monotonic() - edited
        assert [key_of_next() for _ in range(2)] == ["gamma", "alpha"]  # beta is still cooling
        live = {
            k["label"]: k for k in client.get("/_kmi-rotor/api/status").json()["pools"][0]["keys"]
        }
        assert live["beta"]["status"] == "cooling" and live["alpha"]["requests"] == 4

        live_config(cfg, provider, ["alpha", "gamma"], provider_name="nope")
        m.process.wait_for("unknown provider 'nope' .*keeping the previous configuration", 15)
        assert key_of_next() in ("gamma", "alpha")
        broken = shell(f"kmi-rotor status --config {cfg}", cli_env_)
        assert broken.returncode == 2 and "unknown provider 'nope'" in broken.stderr
        assert "the running proxy" in broken.stderr and "keeps the configuration" in broken.stderr

        live_config(cfg, provider, ["alpha", "gamma"])
        wait_until(lambda: m.process.output.count("kmi-rotor: 1 pool, 2 keys") == 2, 15, "reload")
        assert {key_of_next() for _ in range(4)} == {"alpha", "gamma"}
        pool = client.get("/_kmi-rotor/api/status").json()["pools"][0]
        assert [k["label"] for k in pool["keys"]] == ["alpha", "gamma"]  # beta is gone
        ok = shell(f"kmi-rotor status --config {cfg}", cli_env_)
    finally:
        client.close()
        m.stop()
    assert ok.returncode == 0, ok.stderr
    assert (
        f"key alpha: its secret is not available here (key_env: environment variable {LIVE_ENV}"
        in ok.stdout
    )
    assert re.search(r"main\s+alpha\s+\?\s+ready", ok.stdout)
    print(f"config edit applied after {applied:.2f} s")
    assert applied < 5  # the promise is 2 s; the margin is for a loaded machine


# -- clients as the README's "Clients" section sets them up --------------------------------------

PY_CLIENTS = """
import os, sys, anthropic, openai
which = sys.argv[1]
if which == "openai":  # OPENAI_BASE_URL / OPENAI_API_KEY (or HTTPS_PROXY) from the environment
    c = openai.OpenAI(max_retries=0, **({"base_url": sys.argv[2]} if len(sys.argv) > 2 else {}))
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True) if ch.choices]
else:  # ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY (or HTTPS_PROXY) from the environment
    c = anthropic.Anthropic(max_retries=0, **({"base_url": sys.argv[2]} if len(sys.argv) > 2 else {}))
    with c.messages.stream(model="m", max_tokens=64,
                           messages=[{"role": "user", "content": "hi"}]) as s:
        parts = list(s.text_stream)
print(len([p for p in parts if p]), "".join(parts))
"""

NODE_FETCH = """
const r = await fetch(process.env.OPENAI_BASE_URL + "/chat/completions", {
  method: "POST",
  headers: {"content-type": "application/json",
            "authorization": "Bearer " + process.env.OPENAI_API_KEY},
  body: JSON.stringify({model: "m", stream: true,
                        messages: [{role: "user", content: "hi"}]}),
});
let chunks = 0, text = "";
for await (const piece of r.body) { chunks += 1; text += Buffer.from(piece).toString(); }
console.log(r.status, r.headers.get("kmi-rotor-key"), chunks, text.includes("[DONE]"));
"""


def streamed(out: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    assert out.returncode == 0, out.stderr[-2000:]
    count, _, text = out.stdout.strip().partition(" ")
    return int(count), text


def test_reverse_mode_clients_from_their_environment_variables(tmp_path, provider, proxy_factory):
    pool = PoolSpec("main", [f"127.0.0.1:{provider.port}"], KEYS)
    m = proxy_factory(write_config(tmp_path, [pool]), mode=f"reverse:{provider.url}")
    script = tmp_path / "clients.py"
    script.write_text(PY_CLIENTS)
    env = user_env(tmp_path / "home", cli_bin(tmp_path / "bin"))
    env |= {"OPENAI_BASE_URL": m.url + "/v1", "OPENAI_API_KEY": "client-placeholder"}
    env |= {"ANTHROPIC_BASE_URL": m.url, "ANTHROPIC_API_KEY": "client-placeholder"}
    for which in ("openai", "anthropic"):
        run = subprocess.run(
            [sys.executable, str(script), which],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        chunks, text = streamed(run)
        assert chunks > 1 and text, which  # streamed, event by event
    curl = shell(
        'curl -sS -D - "$OPENAI_BASE_URL/chat/completions" -H "authorization: Bearer x" '
        '-H \'content-type: application/json\' -d \'{"model": "m", "messages": []}\'',
        env,
    )
    assert curl.returncode == 0 and "kmi-rotor-key: gamma" in curl.stdout
    node = shutil.which("node")
    if node:
        (tmp_path / "client.mjs").write_text(NODE_FETCH)
        run = subprocess.run(
            [node, str(tmp_path / "client.mjs")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        status, key, chunks, done = run.stdout.split()
        assert (status, key, done) == ("200", "alpha", "true") and int(chunks) > 1
    served = [r.credential for r in provider.requests]
    assert served[:3] == [KEYS["alpha"], KEYS["beta"], KEYS["gamma"]]
    assert "client-placeholder" not in served


def test_regular_mode_python_sdks_after_eval_env_and_node_20_goes_around(
    tmp_path, provider, upstream_ca
):
    home = tmp_path / "home"
    env = user_env(home, cli_bin(tmp_path / "bin"))
    cfg = new_user_config(home, provider)
    assert shell("kmi-rotor env > /dev/null", env).returncode == 0  # creates the CA
    m = start_mitmdump(
        cfg,
        home / ".mitmproxy",
        tmp_path / "mitmdump.log",
        extra=("--set", f"ssl_verify_upstream_trusted_ca={upstream_ca[1]}"),
        env=env,
    )
    script = tmp_path / "clients.py"
    script.write_text(PY_CLIENTS)
    try:
        wait_until(lambda: (home / ".kmi-rotor" / "proxy.json").exists(), 15, "proxy.json")
        env |= {"OPENAI_API_KEY": "client-placeholder", "ANTHROPIC_API_KEY": "client-placeholder"}
        for which in ("openai", "anthropic"):
            base = provider.url + ("/v1" if which == "openai" else "")
            run = shell(f'eval "$(kmi-rotor env)" && python {script} {which} {base}', env)
            chunks, text = streamed(run)
            assert chunks > 1 and text, which
        node = shutil.which("node")
        version = cli_env.node_version(node) if node else None
        if version and cli_env.node_env_proxy(version) == "none":
            (tmp_path / "client.mjs").write_text(NODE_FETCH)
            run = shell(
                f'eval "$(kmi-rotor env 2>/dev/null)" && OPENAI_BASE_URL={provider.url}/v1 '
                f"NODE_TLS_REJECT_UNAUTHORIZED=0 node {tmp_path / 'client.mjs'}",
                env,
            )
            assert run.returncode == 0, run.stderr
            # this Node ignores the proxy settings: the request reached the provider directly
            assert run.stdout.split()[:2] == ["401", "null"]  # its placeholder, refused
    finally:
        m.stop()
    served = [r.credential for r in provider.requests]
    assert served[:2] == [KEYS["alpha"], KEYS["beta"]]
    assert served[2:] == (["client-placeholder"] if len(served) == 3 else [])
