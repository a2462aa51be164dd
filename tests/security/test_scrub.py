"""Upstream text is scrubbed of every key and client token before anything keeps or shows it,
and a refusal to one client never quotes another client's upstream error.

The scrubber is tested alone (tables), then end to end: an upstream whose in-stream error
echoes the key it was sent, in clear and in base64, through real mitmdump; the state file, the
status API, `kmi-rotor status --json`, the proxy's log and the local 429 another client gets
are searched for the key in every form."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from proctools import ROOT, clean_env

from kmi_rotor.core.scrub import REDACTED, Scrubber, only_own_words

from ._harden_helpers import CHAT, leaks, make_confdir, secret, start_proxy, write_config

KEY = "sk-scrub-0123456789abcdefghijklmnopqrstuv"
TOKEN = "client-token-ZYXWVUTSRQPONMLK"
b64 = base64.b64encode


@pytest.mark.parametrize(
    "form",
    [
        KEY,
        f"Bearer {KEY}",
        urllib.parse.quote(KEY, safe=""),
        KEY.encode().hex(),
        KEY.encode().hex().upper(),
        b64(KEY.encode()).decode(),
        b64(f"Bearer {KEY}".encode()).decode(),  # each base64 alignment
        b64(f"user:{KEY}".encode()).decode(),
        b64(f"x{KEY}".encode()).decode(),
        base64.urlsafe_b64encode(f"ab{KEY}".encode()).decode(),
        TOKEN,
        b64(TOKEN.encode()).decode(),
    ],
)
def test_every_form_of_a_secret_is_taken_out(form: str) -> None:
    scrub = Scrubber([KEY, TOKEN])
    out = scrub(f"upstream says: invalid key {form}, try again")
    assert out.startswith("upstream says: invalid key ") and out.endswith(", try again")
    assert REDACTED in out
    assert leaks(out.encode(), [KEY, TOKEN]) == []


@pytest.mark.parametrize("cut", [6, 12, 30])
def test_a_secret_cut_off_at_the_end_of_a_truncated_text_is_taken_out(cut: int) -> None:
    scrub = Scrubber([KEY])
    assert scrub(f"bad key {KEY[:cut]}") == f"bad key {REDACTED}"


def test_the_cap_never_leaves_the_start_of_a_secret() -> None:
    scrub = Scrubber([KEY], limit=40)
    text = "x" * 25 + " " + KEY  # the cap would fall in the middle of the key
    out = scrub(text)
    assert len(out) <= 40 and KEY[:6] not in out
    assert scrub("y" * 500, 100) == "y" * 99 + "…"


def test_control_characters_cannot_forge_lines_and_plain_text_is_left_alone() -> None:
    scrub = Scrubber([KEY])
    assert scrub("one\ntwo\r\n\x1b[31mthree") == "one two [31mthree"
    assert scrub("rate limited (429)") == "rate limited (429)"
    assert scrub(None) == ""
    assert Scrubber(["short"])("short words") == "short words"  # too short to be hunted


@pytest.mark.parametrize(
    ("message", "own"),
    [
        ("Server disconnected.", "Server disconnected."),
        ("Invalid HTTP response: b'sk-whatever'", "Invalid HTTP response"),
        ('HTTP/2 protocol error: "quoted"', "HTTP/2 protocol error"),
        ("", "network error"),
        ("z" * 200, "z" * 79 + "…"),
    ],
)
def test_a_network_error_reason_quotes_nothing(message: str, own: str) -> None:
    assert only_own_words(message) == own


def test_what_an_older_writer_kept_is_shown_scrubbed() -> None:
    from kmi_rotor import status
    from kmi_rotor.config import from_dict
    from kmi_rotor.core.health import KeyHealth
    from kmi_rotor.core.state import KeyRecord, StateDoc
    from kmi_rotor.engine import Engine

    pool = {"name": "p", "provider": "generic", "hosts": ["llm.test"]}
    pool["keys"] = [{"label": "a", "key": KEY}]
    raw = {"state_dir": "/tmp/s", "pools": [pool], "clients": [{"label": "c", "token": TOKEN}]}
    settings = from_dict(raw, Path("/tmp/rotor.toml"), env={})
    fp = settings.keys[0].fingerprint
    echo = f"bad key {KEY} from {b64(TOKEN.encode()).decode()}"
    health = KeyHealth(cooling_until=2e9, cooling_reason=echo)
    doc = StateDoc(keys={fp: KeyRecord(label="a", fingerprint=fp, last_error=echo, health=health)})
    row = status.rows(settings, doc, 1.9e9)[0]
    engine = Engine(settings)
    engine.adopt(fp, health)
    told = engine.key_status(settings.keys[0], 1.9e9)
    for text in (row["reason"], row["last_error"], told["reason"]):
        assert text.startswith("bad key ") and leaks(text.encode(), [KEY, TOKEN]) == []


# -- end to end ----------------------------------------------------------------------------------

MARKER = "UPSTREAM-ERROR-TEXT-7f3a"
LABEL = "echoed"
ECHOED = secret(LABEL)


class EchoingUpstream:
    """An Anthropic-style upstream whose streamed answer fails with an in-stream rate-limit
    error that quotes the credential it got, in clear and in base64; plain HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        seen: list[str] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                cred = self.headers.get("authorization", "").removeprefix("Bearer ")
                seen.append(cred)
                echo = f"{MARKER} key={cred} b64={base64.b64encode(cred.encode()).decode()}"
                err = {"type": "error", "error": {"type": "rate_limit_error", "message": echo}}
                body = (
                    f"event: message_start\ndata: {{}}\n\nevent: error\ndata: {json.dumps(err)}\n\n"
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def harden_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_confdir(tmp_path_factory)


@pytest.fixture
def upstream() -> Iterator[EchoingUpstream]:
    u = EchoingUpstream()
    yield u
    u.close()


def _cooling_reason_on_disk(state: Path) -> bytes:
    """The state file once it records a key cooling (b"" before)."""
    try:
        raw = (state / "state.json").read_bytes()
        keys = json.loads(raw).get("keys", {}).values()
    except (FileNotFoundError, ValueError):
        return b""
    return raw if any(k.get("health", {}).get("cooling_reason") for k in keys) else b""


def _cli_status(config: Path) -> str:
    env = clean_env(PYTHONPATH=str(ROOT / "addon"))
    out = subprocess.run(
        [sys.executable, "-m", "kmi_rotor.cli", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.e2e
def test_an_echoed_key_is_kept_nowhere_and_told_to_no_other_client(
    tmp_path: Path, harden_confdir: Path, upstream: EchoingUpstream
) -> None:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "rotor.toml",
        f"127.0.0.1:{upstream.port}",
        state,
        [LABEL],
        extra=(
            "[limits]\nmax_wait_seconds = 0\n[health]\nrate_limit_backoff = 600\n"
            f'[[clients]]\nlabel = "laptop"\ntoken = "{TOKEN}"'
        ),
    )
    proxy = start_proxy(config, harden_confdir, tmp_path / "mitmdump.log", upstream.url)
    try:
        # Client A: its stream fails with the upstream's echo (that much is its own answer).
        with httpx.stream(
            "POST",
            proxy.url + "/v1/messages",
            json={**CHAT, "stream": True},
            headers={"authorization": "Bearer placeholder"},
            timeout=30,
        ) as r:
            assert r.status_code == 200
            b"".join(r.iter_bytes())
        assert upstream.seen == [ECHOED]
        # Client B: the only key is cooling; its local 429 quotes nothing of A's error.
        other = httpx.post(proxy.url + "/v1/messages", json=CHAT, timeout=30)
        assert other.status_code == 429, other.text
        assert other.json()["error"]["keys"][0]["status"] == "cooling"
        status_api = httpx.get(proxy.url + "/_kmi-rotor/api/status", timeout=30).text
        # Wait until the state file has the error (it is written off the request path).
        for _ in range(500):
            raw = _cooling_reason_on_disk(state)
            if raw:
                break
            threading.Event().wait(0.02)
        cli = _cli_status(config)
    finally:
        proxy.stop()
    secrets = [ECHOED, TOKEN]
    assert raw, "the state file never recorded the failure"
    places = {
        "state.json": raw,
        "local 429": other.content,
        "status API": status_api.encode(),
        "status --json": cli.encode(),
        "proxy log": proxy.process.output.encode(),
        "trace": (state / "trace.jsonl").read_bytes(),
    }
    for where, data in places.items():
        assert leaks(data, secrets) == [], where
    assert MARKER not in other.text  # never another client's upstream text
    assert MARKER not in status_api and MARKER not in raw.decode()
    assert os.path.exists(state / "state.json")
