"""`kmi-rotor env`, `kimi` and `init` without a proxy: arguments, Node versions, starter files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kmi_rotor import cli, cli_env, config
from kmi_rotor.core.secrets import fingerprint


@pytest.mark.parametrize(
    ("argv", "own", "passed"),
    [
        (["kimi", "-p", "hello"], ["kimi"], ["-p", "hello"]),
        (["kimi", "--", "-p", "hello"], ["kimi"], ["-p", "hello"]),
        (["kimi", "--port", "9", "-p", "x"], ["kimi", "--port", "9"], ["-p", "x"]),
        (["kimi", "--port=9", "--", "--port", "3"], ["kimi", "--port=9"], ["--port", "3"]),
        (["kimi", "--help"], ["kimi", "--help"], []),
        (["kimi"], ["kimi"], []),
        (["kimi", "chat", "--", "x"], ["kimi"], ["chat", "--", "x"]),
        (["status", "--json"], ["status", "--json"], None),
    ],
)
def test_split_kimi(argv: list[str], own: list[str], passed: list[str] | None) -> None:
    assert cli_env.split_kimi(argv) == (own, passed)


@pytest.mark.parametrize(
    ("version", "support"),
    [
        ((20, 20, 2), "none"),
        ((22, 20, 0), "none"),
        ((22, 21, 0), "all"),
        ((23, 11, 0), "none"),
        ((24, 0, 0), "fetch"),
        ((24, 4, 1), "fetch"),
        ((24, 5, 0), "all"),
        ((25, 0, 0), "all"),
    ],
)
def test_which_node_honours_node_use_env_proxy(version: tuple[int, int, int], support: str) -> None:
    assert cli_env.node_env_proxy(version) == support
    advice = cli_env.node_advice(version, None)
    assert (advice is None) == (support == "all")
    if advice:
        assert "reverse" in advice and "OPENAI_BASE_URL" in advice
        assert all(line.startswith("#") for line in advice.splitlines())


def test_node_advice_names_the_running_proxys_reverse_addresses() -> None:
    proxy = {
        "servers": [
            {"mode": "regular", "spec": "regular", "addresses": [["127.0.0.1", 8080]]},
            {
                "mode": "reverse",
                "spec": "reverse:https://api.kimi.com",
                "addresses": [["::1", 8091]],
            },
        ]
    }
    advice = cli_env.node_advice((20, 1, 0), proxy)
    assert advice is not None and "reverse:https://api.kimi.com: http://127.0.0.1:8091/" in advice


KIMI = 'default_model = "k2"\n[providers.kimi]\napi_key = "sk-kimi-cli-0000000000000001"\n'
ENV = "KMI_API_KEY=sk-auths-00000000000000000002\nKMI_KEY_LABEL=old\n"


def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    (h / ".kimi").mkdir(parents=True)
    (h / ".kimi" / "config.toml").write_text(KIMI)
    (h / ".kmi" / "_auths").mkdir(parents=True)
    (h / ".kmi" / "_auths" / "one.env").write_text(ENV)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.chdir(tmp_path)
    return h


def test_init_references_the_keys_it_finds_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    h = home(tmp_path, monkeypatch)
    assert cli.main(["init"]) == 0
    path = h / ".kmi-rotor" / "rotor.toml"
    text = path.read_text()
    assert "sk-" not in text  # referenced, not copied
    assert f'kimi_config = "{h}/.kimi/config.toml"' in text and "auths_dir" in text
    assert text.startswith("# kmi-rotor configuration")
    settings = config.load(path)  # a valid configuration, as the proxy reads it
    assert {k.label: k.fingerprint for k in settings.keys} == {
        "kimi-kimi": fingerprint("sk-kimi-cli-0000000000000001"),
        "old": fingerprint("sk-auths-00000000000000000002"),
    }
    path.write_text("# mine\n")
    assert cli.main(["init"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert path.read_text() == "# mine\n"


def test_init_inline_copies_keys_into_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home(tmp_path, monkeypatch)
    path = tmp_path / "elsewhere" / "rotor.toml"
    assert cli.main(["init", "--inline", "--path", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert 'key = "sk-kimi-cli-0000000000000001"' in path.read_text()
    assert len(config.load(path).keys) == 2


def test_init_without_keys_writes_an_example_the_proxy_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KIMI_API_KEY", raising=False)
    assert cli.main(["init"]) == 0
    path = tmp_path / "empty" / ".kmi-rotor" / "rotor.toml"
    with pytest.raises(config.ConfigError, match="KIMI_API_KEY is not set"):
        config.load(path)
    monkeypatch.setenv("KIMI_API_KEY", "sk-from-the-environment-0001")
    assert [k.label for k in config.load(path).keys] == ["first"]
