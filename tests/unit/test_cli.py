"""`kmi-rotor status`: JSON and table output, and how a bad configuration is reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from testkit import kd

from kmi_rotor import cli, config
from kmi_rotor import status as status_module
from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.secrets import fingerprint
from kmi_rotor.core.state import Delta
from kmi_rotor.store import StateStore

S_WORK = "sk-workworkworkworkwork1111"
S_HOME = "sk-homehomehomehomehome2222"
S_SPARE = "sk-sparesparesparespare3333"
S_SHORT = "tiny-secret"
SECRETS = (S_WORK, S_HOME, S_SPARE, S_SHORT)

CONFIG = f"""
state_dir = "state"

[[pools]]
name = "kimi"
provider = "kimi-code"

[[pools.keys]]
label = "work"
key = "{S_WORK}"

[[pools.keys]]
label = "home"
key_file = "home.key"

[[pools.keys]]
label = "spare"
key = "{S_SPARE}"
disabled = true

[[pools]]
name = "claude"
provider = "anthropic"

[[pools.keys]]
label = "short"
key = "{S_SHORT}"
"""

# label -> (pool, masked, status, requests, errors, last_status, last_error)
EXPECTED = {
    "work": ("kimi", "sk-…1111", "ready", 3, 0, 429, None),
    "home": ("kimi", "sk-…2222", "ready", 1, 1, None, "connection reset"),
    "spare": ("kimi", "sk-…3333", "disabled", 0, 0, None, None),
    "short": ("claude", "…", "ready", 0, 0, None, None),
}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "home.key").write_text(S_HOME + "\n", encoding="utf-8")
    path = folder / "rotor.toml"
    path.write_text(CONFIG, encoding="utf-8")
    now = time.time()
    state = Delta(
        keys={
            fingerprint(S_WORK): kd(
                "work",
                "kimi",
                requests=3,
                upstream_429=1,
                tokens_in=40,
                last_status=429,
                last_used=now - 120,
                health=KeyHealth(rate_limit_streak=1, updated_at=now - 120),
            ),
            fingerprint(S_HOME): kd(
                "home", "kimi", requests=1, errors=1, last_error="connection reset", last_used=now
            ),
            "sha256:0000000000000000": kd("gone", "old", requests=7),
        },
        limiter={"format": 1, "at": now, "scopes": {}},
        limiter_at=now,
    )
    state.pool_add("kimi", "local_429", 2)
    StateStore(folder / "state").commit(state)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_status_json(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["status", "--json", "--config", str(cfg)], capsys)
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert Path(data["state_dir"]) == (cfg.parent / "state").resolve()
    rows = {r["label"]: r for r in data["keys"]}
    assert list(rows) == ["work", "home", "spare", "short"]
    for label, (
        pool,
        masked,
        status,
        requests,
        errors,
        last_status,
        last_error,
    ) in EXPECTED.items():
        row = rows[label]
        assert (
            row["pool"],
            row["key"],
            row["status"],
            row["requests"],
            row["errors"],
            row["last_status"],
            row["last_error"],
        ) == (pool, masked, status, requests, errors, last_status, last_error), label
    secrets = {"work": S_WORK, "home": S_HOME, "spare": S_SPARE, "short": S_SHORT}
    for label, secret in secrets.items():
        assert rows[label]["fingerprint"] == fingerprint(secret)
    assert rows["spare"]["last_used"] is None
    assert isinstance(rows["work"]["last_used"], float)
    assert (rows["work"]["upstream_429"], rows["work"]["tokens"]) == (1, 40)
    assert data["local_429"] == {"kimi": 2}
    for secret in SECRETS:
        assert secret not in out


TABLE_HEAD = status_module.TABLE_HEAD


def table_cells(head_line: str, line: str) -> list[str]:
    """A table line cut at the header's column starts (cells may hold spaces)."""
    starts, at = [], 0
    for title in TABLE_HEAD:
        at = head_line.index(title, at)
        starts.append(at)
        at += len(title)
    return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]


def test_status_table(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["status", "--config", str(cfg)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert table_cells(lines[0], lines[0]) == list(TABLE_HEAD)
    assert len(lines) == 1 + len(EXPECTED) + 1
    disabled = "disabled in the configuration"
    # label -> every cell but LAST USED, and how LAST USED starts
    expected_cells = {
        "work": (["kimi", "work", "sk-…1111", "ready", "-", "-", "-", "3", "0", "1", "429"], "2m"),
        "home": (["kimi", "home", "sk-…2222", "ready", "-", "-", "-", "1", "1", "0", "error"], ""),
        "spare": (
            ["kimi", "spare", "sk-…3333", "disabled", "-", disabled, "-", "0", "0", "0", "-"],
            "never",
        ),
        "short": (["claude", "short", "…", "ready", "-", "-", "-", "0", "0", "0", "-"], "never"),
    }
    for line, (label, (cells, last_used)) in zip(lines[1:-1], expected_cells.items(), strict=True):
        *got, got_last_used = table_cells(lines[0], line)
        assert got == cells, label
        assert got_last_used.startswith(last_used), label
        assert got_last_used == "never" or got_last_used.endswith(" ago"), label
    assert lines[-1] == "pool kimi: 2 requests refused locally (429)"
    columns = lines[0].index("MASKED")
    assert all(line[columns:].startswith(("sk-", "…")) for line in lines[1:-1])
    for secret in SECRETS:
        assert secret not in out


def test_status_without_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rotor.toml"
    path.write_text(
        f'state_dir = "fresh"\n[[pools]]\nname = "p"\nprovider = "openai"\n'
        f'[[pools.keys]]\nlabel = "a"\nkey = "{S_WORK}"\n',
        encoding="utf-8",
    )
    code, out, _ = run(["status", "--json", "--config", str(path)], capsys)
    assert code == 0
    [row] = json.loads(out)["keys"]
    assert (row["requests"], row["errors"], row["last_status"], row["last_used"]) == (
        0,
        0,
        None,
        None,
    )
    assert not (tmp_path / "fresh" / "state.json").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(None, "does not exist", id="missing-file"),
        pytest.param("[[pools]\n", "malformed TOML", id="malformed-toml"),
        pytest.param(
            'colour = "red"\n[[pools]]\nname = "p"\nprovider = "openai"\n'
            f'[[pools.keys]]\nlabel = "a"\nkey = "{S_WORK}"\n',
            "colour: unknown field",
            id="unknown-field",
        ),
        pytest.param(
            '[[pools]]\nname = "p"\nprovider = "nope"\n'
            f'[[pools.keys]]\nlabel = "a"\nkey = "{S_WORK}"\n',
            "unknown provider",
            id="unknown-provider",
        ),
        pytest.param(
            '[[pools]]\nname = "p"\nprovider = "openai"\n'
            f'[[pools.keys]]\nlabel = "a"\nkey = "{S_WORK}"\n'
            f'[[pools.keys]]\nlabel = "b"\nkey = "{S_WORK}"\n',
            "duplicate key",
            id="duplicate-key",
        ),
        pytest.param(
            '[[pools]]\nname = "p"\nprovider = "openai"\n'
            '[[pools.keys]]\nlabel = "a"\nkey = "sk-work work"\n',
            "whitespace",
            id="key-with-space",
        ),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_invalid_config_exits_2_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str | None,
    problem: str,
    as_json: bool,
) -> None:
    monkeypatch.delenv("KMI_ROTOR_UNIT_TEST_UNSET_VAR", raising=False)
    path = tmp_path / "rotor.toml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    argv = ["status", *(["--json"] if as_json else []), "--config", str(path)]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1
    assert err.startswith("kmi-rotor: ")
    assert problem in err
    assert str(path) in err
    for secret in (*SECRETS, "sk-work work"):
        assert secret not in err


def test_no_config_anywhere_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["status"], capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("kmi-rotor: no configuration found")


def test_config_from_the_environment_variable(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(config.CONFIG_ENV, str(cfg))
    code, out, _ = run(["status", "--json"], capsys)
    assert code == 0
    assert [r["label"] for r in json.loads(out)["keys"]] == list(EXPECTED)


# -- the CLI needs no secret --------------------------------------------------------------------


def test_status_and_actions_work_without_the_keys_secrets(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The proxy has its own environment: a key variable unset in the operator's shell, or a
    key file they cannot read, leaves the key known by its label and the state's fingerprint."""
    monkeypatch.delenv("KMI_ROTOR_UNIT_TEST_UNSET_VAR", raising=False)
    text = cfg.read_text().replace(
        'key = "' + S_WORK + '"', 'key_env = "KMI_ROTOR_UNIT_TEST_UNSET_VAR"'
    )
    cfg.write_text(text)
    (cfg.parent / "home.key").unlink()
    code, out, err = run(["status", "--json", "--config", str(cfg)], capsys)
    assert (code, err) == (0, "")
    rows = {r["label"]: r for r in json.loads(out)["keys"]}
    assert rows["work"]["fingerprint"] == fingerprint(S_WORK)  # from the state, by label
    assert (rows["work"]["requests"], rows["work"]["last_status"]) == (3, 429)
    assert "KMI_ROTOR_UNIT_TEST_UNSET_VAR is not set" in rows["work"]["secret_problem"]
    assert rows["home"]["fingerprint"] == fingerprint(S_HOME)
    assert "home.key" in rows["home"]["secret_problem"]
    assert rows["work"]["key"] == "?" and rows["short"]["key"] == "…"

    code, out, err = run(["status", "--config", str(cfg)], capsys)
    assert code == 0
    assert "key work: its secret is not available here" in out
    assert "KMI_ROTOR_UNIT_TEST_UNSET_VAR is not set" in out

    code, out, err = run(["disable", "work", "--config", str(cfg)], capsys)
    assert (code, err) == (0, "")
    doc = StateStore(cfg.parent / "state").read()
    op = doc.keys[fingerprint(S_WORK)].operator
    assert op is not None and op.action == "disable"


def test_an_action_on_a_key_known_neither_by_secret_nor_by_state_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KMI_ROTOR_UNIT_TEST_UNSET_VAR", raising=False)
    path = tmp_path / "rotor.toml"
    path.write_text(
        'state_dir = "s"\n[[pools]]\nname = "p"\nprovider = "openai"\n'
        '[[pools.keys]]\nlabel = "a"\nkey_env = "KMI_ROTOR_UNIT_TEST_UNSET_VAR"\n'
    )
    code, out, _ = run(["status", "--json", "--config", str(path)], capsys)
    assert code == 0 and json.loads(out)["keys"][0]["status"] == "unknown"
    code, out, err = run(["disable", "a", "--config", str(path)], capsys)
    assert code == 2 and "state has no record of it yet" in err and out == ""


def test_rotate_on_a_round_robin_pool_says_what_rotate_is_for(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["rotate", "kimi", "--config", str(cfg)], capsys)
    assert code == 2
    assert "pool 'kimi' uses strategy = \"round-robin\"" in err and "sticky" in err
    code, _, err = run(["rotate", "--config", str(cfg)], capsys)
    assert code == 2 and "no pool has strategy" in err and "kimi (round-robin)" in err


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for command, expected in (("status", "default: 2.0"), ("env", "else 8080")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert expected in out, command
