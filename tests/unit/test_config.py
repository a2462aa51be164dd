"""The config file: valid layouts, every rejected one as a single-line ConfigError, lookup order."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kmi_rotor import config
from kmi_rotor.config import ConfigError, Key, Settings
from kmi_rotor.core.presets import PRESETS
from kmi_rotor.core.secrets import fingerprint

SECRET_A = "sk-alphaalphaalphaalpha0001"
SECRET_B = "sk-bravobravobravobravo0002"
SECRET_C = "sk-charliecharliecharlie0003"
SECRETS = (SECRET_A, SECRET_B, SECRET_C)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    return config.load(write(tmp_path / "cfg" / "rotor.toml", text), env=env or {})


def pool_toml(name: str, provider: str, *labels_and_keys: tuple[str, str], hosts: str = "") -> str:
    keys = "".join(
        f'[[pools.keys]]\nlabel = "{label}"\nkey = "{key}"\n' for label, key in labels_and_keys
    )
    return f'[[pools]]\nname = "{name}"\nprovider = "{provider}"\n{hosts}\n{keys}'


# -- valid configs ---------------------------------------------------------------------------

PRESET_TABLE = [
    ("kimi-code", ["api.kimi.com"], "authorization", True),
    ("moonshot", ["api.moonshot.ai", "api.moonshot.cn"], "authorization", True),
    ("openai", ["api.openai.com"], "authorization", True),
    ("anthropic", ["api.anthropic.com"], "x-api-key", False),
    ("openrouter", ["openrouter.ai"], "authorization", True),
    ("groq", ["api.groq.com"], "authorization", True),
    ("deepseek", ["api.deepseek.com"], "authorization", True),
    ("mistral", ["api.mistral.ai"], "authorization", True),
    ("gemini", ["generativelanguage.googleapis.com"], "x-goog-api-key", False),
]


def test_preset_table_covers_every_preset_with_hosts() -> None:
    assert {p[0] for p in PRESET_TABLE} == {n for n, p in PRESETS.items() if p.hosts}


@pytest.mark.parametrize(("provider", "hosts", "header", "bearer"), PRESET_TABLE)
def test_preset_default_hosts_and_header(
    tmp_path: Path, provider: str, hosts: list[str], header: str, bearer: bool
) -> None:
    settings = load(tmp_path, pool_toml("main", provider, ("k1", SECRET_A)))
    for host in hosts:
        for port in (443, 80, 8443):
            pool = settings.pool_for(host, port)
            assert pool is not None
            assert pool.name == "main"
            assert pool.preset.name == provider
            assert pool.preset.header == header
            assert pool.preset.bearer is bearer
    assert settings.pool_for("example.org", 443) is None
    assert [str(h) for h in settings.pools[0].hosts] == hosts
    assert settings.pools[0].strategy == "round-robin"


def test_generic_pool_uses_its_hosts_and_bearer_authorization(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        pool_toml("local", "generic", ("k1", SECRET_A), hosts='hosts = ["llm.internal:8080"]'),
    )
    pool = settings.pool_for("llm.internal", 8080)
    assert pool is not None
    assert (pool.preset.name, pool.preset.header, pool.preset.bearer) == (
        "generic",
        "authorization",
        True,
    )
    assert settings.pool_for("llm.internal", 443) is None


def test_hosts_replace_the_preset_hosts(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        pool_toml(
            "proxy",
            "openai",
            ("k1", SECRET_A),
            hosts='hosts = ["openai.corp.example:8443", "*.azure.example"]',
        ),
    )
    assert settings.pool_for("api.openai.com", 443) is None
    pool = settings.pool_for("openai.corp.example", 8443)
    assert pool is not None
    assert pool.preset.header == "authorization"
    assert settings.pool_for("openai.corp.example", 443) is None
    assert settings.pool_for("eu.azure.example", 443) is pool


HOSTS_CONFIG = (
    pool_toml("exact", "generic", ("k1", SECRET_A), hosts='hosts = ["api.example.com"]')
    + pool_toml("wild", "generic", ("k2", SECRET_B), hosts='hosts = ["*.example.com"]')
    + pool_toml(
        "port", "generic", ("k3", SECRET_C), hosts='hosts = ["localhost:8080", "[::1]:9000"]'
    )
)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("api.example.com", 443, "exact"),
        ("API.EXAMPLE.COM", 443, "exact"),
        ("api.example.com", 8443, "exact"),
        ("eu.example.com", 443, "wild"),
        ("a.b.example.com", 443, "wild"),
        ("example.com", 443, None),
        ("badexample.com", 443, None),
        ("localhost", 8080, "port"),
        ("localhost", 8081, None),
        ("::1", 9000, "port"),
        ("::1", 443, None),
    ],
)
def test_host_matching(tmp_path: Path, host: str, port: int, expected: str | None) -> None:
    pool = load(tmp_path, HOSTS_CONFIG).pool_for(host, port)
    assert (pool.name if pool else None) == expected


@pytest.mark.parametrize("wildcard_first", [True, False])
def test_exact_host_beats_wildcard_in_any_order(tmp_path: Path, wildcard_first: bool) -> None:
    wild = pool_toml("wild", "generic", ("k1", SECRET_A), hosts='hosts = ["*.example.com"]')
    exact = pool_toml("exact", "generic", ("k2", SECRET_B), hosts='hosts = ["api.example.com"]')
    settings = load(tmp_path, wild + exact if wildcard_first else exact + wild)
    assert settings.pool_for("api.example.com", 443).name == "exact"
    assert settings.pool_for("other.example.com", 443).name == "wild"


def test_exact_host_with_port_beats_wildcard(tmp_path: Path) -> None:
    wild = pool_toml("wild", "generic", ("k1", SECRET_A), hosts='hosts = ["*.example.com"]')
    exact = pool_toml(
        "exact", "generic", ("k2", SECRET_B), hosts='hosts = ["api.example.com:8443"]'
    )
    settings = load(tmp_path, wild + exact)
    assert settings.pool_for("api.example.com", 8443).name == "exact"
    assert settings.pool_for("api.example.com", 443).name == "wild"


def test_keys_from_every_source(tmp_path: Path) -> None:
    write(tmp_path / "cfg" / "secrets" / "b.key", f"{SECRET_B}\nignored second line\n")
    settings = load(
        tmp_path,
        f"""
        [[pools]]
        name = "main"
        provider = "openai"

        [[pools.keys]]
        label = "a"
        key = "  {SECRET_A}  "

        [[pools.keys]]
        label = "b"
        key_file = "secrets/b.key"

        [[pools.keys]]
        label = "c"
        key_env = "MY_KEY"
        disabled = true
        """,
        env={"MY_KEY": f"{SECRET_C}\n"},
    )
    keys = settings.keys
    assert [k.label for k in keys] == ["a", "b", "c"]
    assert [k.secret.get_secret_value() for k in keys] == [SECRET_A, SECRET_B, SECRET_C]
    assert [k.fingerprint for k in keys] == [fingerprint(s) for s in SECRETS]
    assert [k.disabled for k in keys] == [False, False, True]
    assert {k.pool for k in keys} == {"main"}


def test_key_file_with_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    write(home / "keys" / "a.key", SECRET_A)
    monkeypatch.setenv("HOME", str(home))
    settings = load(
        tmp_path,
        '[[pools]]\nname = "p"\nprovider = "groq"\n'
        '[[pools.keys]]\nlabel = "a"\nkey_file = "~/keys/a.key"\n',
    )
    assert settings.keys[0].secret.get_secret_value() == SECRET_A


def test_keys_are_listed_pool_by_pool(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        pool_toml("one", "openai", ("a", SECRET_A), ("b", SECRET_B))
        + pool_toml("two", "anthropic", ("c", SECRET_C)),
    )
    assert [(k.pool, k.label) for k in settings.keys] == [("one", "a"), ("one", "b"), ("two", "c")]
    assert [p.name for p in settings.pools] == ["one", "two"]


@pytest.mark.parametrize(
    ("state_dir", "expected"),
    [
        (None, "HOME/.kmi-rotor"),
        ("state", "CFG/state"),
        ("./a/b", "CFG/a/b"),
        ("../shared-state", "CFG/../shared-state"),
        ("~/rotor-state", "HOME/rotor-state"),
        ("ABS/elsewhere", "ABS/elsewhere"),
    ],
)
def test_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_dir: str | None, expected: str
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    line = "" if state_dir is None else f'state_dir = "{state_dir.replace("ABS", str(tmp_path))}"\n'
    settings = load(tmp_path, line + pool_toml("p", "openai", ("a", SECRET_A)))
    want = Path(
        expected.replace("HOME", str(home))
        .replace("CFG", str(tmp_path / "cfg"))
        .replace("ABS", str(tmp_path))
    )
    assert settings.state_dir.is_absolute()
    assert settings.state_dir.resolve() == want.resolve()


def test_state_dir_is_relative_to_the_config_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load(tmp_path, 'state_dir = "st"\n' + pool_toml("p", "openai", ("a", SECRET_A)))
    assert settings.state_dir == (tmp_path / "cfg" / "st").resolve()


def test_secret_is_absent_from_reprs(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        pool_toml("one", "openai", ("a", SECRET_A), ("b", SECRET_B))
        + pool_toml("two", "anthropic", ("c", SECRET_C)),
    )
    shown = [repr(settings), str(settings), *(repr(k) for k in settings.keys)]
    shown += [repr(p) for p in settings.pools]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text
    key = settings.keys[0]
    assert isinstance(key, Key)
    assert repr(key) == f"Key('a', {fingerprint(SECRET_A)})"


# -- rejected configs ------------------------------------------------------------------------

ONE_KEY = f'[[pools.keys]]\nlabel = "a"\nkey = "{SECRET_A}"\n'
OPENAI_POOL = '[[pools]]\nname = "p"\nprovider = "openai"\n'

BAD_CONFIGS = [
    pytest.param(
        'pools = [\n[[pools]]\nname = "x"\n', {}, {}, "", "malformed TOML", id="malformed-toml"
    ),
    pytest.param(
        f'[[pools]]\nname = "p"\nprovider = "openai"\n[[pools.keys]]\nlabel = "a"\nkey = "{SECRET_A}\n',
        {},
        {},
        "",
        "malformed TOML",
        id="malformed-toml-in-the-secret",
    ),
    pytest.param(
        "colour = 'blue'\n" + OPENAI_POOL + ONE_KEY,
        {},
        {},
        "colour",
        "unknown field",
        id="unknown-top-level-field",
    ),
    pytest.param(
        OPENAI_POOL + 'colour = "blue"\n' + ONE_KEY,
        {},
        {},
        "pools[0].colour",
        "unknown field",
        id="unknown-pool-field",
    ),
    pytest.param(
        OPENAI_POOL + ONE_KEY + 'colour = "blue"\n',
        {},
        {},
        "pools[0].keys[0].colour",
        "unknown field",
        id="unknown-key-field",
    ),
    pytest.param(
        "colour = 1\nshade = 2\n" + OPENAI_POOL + ONE_KEY,
        {},
        {},
        "colour",
        "(and 1 more problem)",
        id="two-problems-still-one-line",
    ),
    pytest.param(
        '[[pools]]\nname = "p"\nprovider = "openia"\n' + ONE_KEY,
        {},
        {},
        "pools[0].provider",
        "unknown provider 'openia'",
        id="unknown-provider",
    ),
    pytest.param(
        '[[pools]]\nname = "p"\nprovider = "generic"\n' + ONE_KEY,
        {},
        {},
        "pools[0].hosts",
        "has no default hosts",
        id="generic-without-hosts",
    ),
    pytest.param(
        '[[pools]]\nname = "p"\nprovider = "generic"\nhosts = []\n' + ONE_KEY,
        {},
        {},
        "pools[0].hosts",
        "has no default hosts",
        id="generic-with-empty-hosts",
    ),
    pytest.param(
        OPENAI_POOL + 'strategy = "random"\n' + ONE_KEY,
        {},
        {},
        "pools[0].strategy",
        "round-robin",
        id="unknown-strategy",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A)) + pool_toml("p", "groq", ("b", SECRET_B)),
        {},
        {},
        "pools",
        "duplicate pool name 'p'",
        id="duplicate-pool-name",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A), ("a", SECRET_B)),
        {},
        {},
        "pools",
        "duplicate key label 'a'",
        id="duplicate-label-in-one-pool",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A)) + pool_toml("q", "groq", ("a", SECRET_B)),
        {},
        {},
        "pools",
        "duplicate key label 'a'",
        id="duplicate-label-across-pools",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A), ("b", SECRET_A)),
        {},
        {},
        "pools[0]",
        "duplicate key: the key labelled 'b' is also in pool 'p'",
        id="duplicate-key-in-one-pool",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A)) + pool_toml("q", "groq", ("b", SECRET_A)),
        {},
        {},
        "pools[1]",
        "duplicate key: the key labelled 'b' is also in pool 'p'",
        id="duplicate-key-across-pools",
    ),
    pytest.param(
        OPENAI_POOL
        + '[[pools.keys]]\nlabel = "a"\nkey_env = "ENV_A"\n'
        + '[[pools.keys]]\nlabel = "b"\nkey_env = "ENV_B"\n',
        {"ENV_A": SECRET_A, "ENV_B": SECRET_A},
        {},
        "pools[0]",
        "duplicate key",
        id="duplicate-key-via-env",
    ),
    pytest.param(
        OPENAI_POOL + ONE_KEY + '[[pools.keys]]\nlabel = "b"\nkey_env = "MISSING_KEY"\n',
        {"OTHER": SECRET_B},
        {},
        "pools[0].keys[1].key_env",
        "environment variable MISSING_KEY is not set",
        id="missing-env-var",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey_env = "EMPTY"\n',
        {"EMPTY": "  "},
        {},
        "pools[0].keys[0].key_env",
        "the key is empty",
        id="empty-env-var",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey_file = "nope.key"\n',
        {},
        {},
        "pools[0].keys[0].key_file",
        "nope.key cannot be read",
        id="missing-key-file",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey_file = "empty.key"\n',
        {},
        {"empty.key": ""},
        "pools[0].keys[0].key_file",
        "empty.key is empty",
        id="empty-key-file",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey_file = "blank.key"\n',
        {},
        {"blank.key": "\n" + SECRET_A + "\n"},
        "pools[0].keys[0].key_file",
        "the key is empty",
        id="key-file-with-blank-first-line",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey_file = "dir.key"\n',
        {},
        {"dir.key/inner": "x"},
        "pools[0].keys[0].key_file",
        "is not a regular file",
        id="key-file-is-a-folder",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey = "sk-alpha alphaalphaalpha0001"\n',
        {},
        {},
        "pools[0].keys[0].key",
        "whitespace or control characters",
        id="key-with-space",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey = "sk-alpha\\talphaalphaalpha0001"\n',
        {},
        {},
        "pools[0].keys[0].key",
        "whitespace or control characters",
        id="key-with-tab",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey = "sk-alpha\\u0000alphaalpha0001"\n',
        {},
        {},
        "pools[0].keys[0].key",
        "whitespace or control characters",
        id="key-with-nul",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey_env = "SPACED"\n',
        {"SPACED": "sk-alpha alphaalphaalpha0001"},
        {},
        "pools[0].keys[0].key_env",
        "whitespace or control characters",
        id="env-key-with-space",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey_file = "spaced.key"\n',
        {},
        {"spaced.key": "sk-alpha alphaalphaalpha0001\n"},
        "pools[0].keys[0].key_file",
        "whitespace or control characters",
        id="file-key-with-space",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey = ""\n',
        {},
        {},
        "pools[0].keys[0].key",
        "the key is empty",
        id="empty-key",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\nkey = 12345678901234567890\n',
        {},
        {},
        "pools[0].keys[0].key",
        "valid string",
        id="key-not-a-string",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nlabel = "a"\n',
        {},
        {},
        "pools[0].keys[0].key",
        "give exactly one of key, key_env, key_file (got none)",
        id="no-key-source",
    ),
    pytest.param(
        OPENAI_POOL + f'[[pools.keys]]\nlabel = "a"\nkey = "{SECRET_A}"\nkey_env = "A"\n',
        {"A": SECRET_A},
        {},
        "pools[0].keys[0].key",
        "(got key, key_env)",
        id="two-key-sources",
    ),
    pytest.param(
        OPENAI_POOL
        + f'[[pools.keys]]\nlabel = "a"\nkey = "{SECRET_A}"\nkey_env = "A"\nkey_file = "a"\n',
        {"A": SECRET_A},
        {},
        "pools[0].keys[0].key",
        "(got key, key_env, key_file)",
        id="three-key-sources",
    ),
    pytest.param(
        OPENAI_POOL + '[[pools.keys]]\nkey = "sk-alphaalphaalphaalpha0001"\n',
        {},
        {},
        "pools[0].keys[0].label",
        "required field is missing",
        id="key-without-label",
    ),
    pytest.param(
        OPENAI_POOL, {}, {}, "pools[0].keys", "pool 'p' has no keys", id="pool-without-keys"
    ),
    pytest.param(
        OPENAI_POOL + "keys = []\n",
        {},
        {},
        "pools[0].keys",
        "pool 'p' has no keys",
        id="pool-with-empty-keys",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A)) + pool_toml("q", "groq"),
        {},
        {},
        "pools[1].keys",
        "pool 'q' has no keys",
        id="second-pool-without-keys",
    ),
    pytest.param("", {}, {}, "pools", "required field is missing", id="no-pools-at-all"),
    pytest.param(
        "state_dir = 'x'\npools = []\n", {}, {}, "pools", "at least 1", id="empty-pools-list"
    ),
    pytest.param(
        OPENAI_POOL.replace('provider = "openai"', "") + ONE_KEY,
        {},
        {},
        "pools[0].provider",
        "required field is missing",
        id="pool-without-provider",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A), hosts='hosts = ["https://api.openai.com/v1"]'),
        {},
        {},
        "pools[0].hosts",
        "not a host pattern",
        id="host-is-a-url",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A), hosts='hosts = ["api.*.com"]'),
        {},
        {},
        "pools[0].hosts",
        "'*' may only open a pattern",
        id="host-inner-wildcard",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A), hosts='hosts = ["localhost:99999"]'),
        {},
        {},
        "pools[0].hosts",
        "bad port",
        id="host-bad-port",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A), hosts='hosts = ["[::1:8080"]'),
        {},
        {},
        "pools[0].hosts",
        "unclosed",
        id="host-unclosed-bracket",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a", SECRET_A))
        + pool_toml("q", "generic", ("b", SECRET_B), hosts='hosts = ["API.OpenAI.com"]'),
        {},
        {},
        "pools",
        "host 'api.openai.com' is served by both pool 'p' and pool 'q'",
        id="same-host-in-two-pools",
    ),
    pytest.param(
        pool_toml("p", "moonshot", ("a", SECRET_A))
        + pool_toml("q", "kimi-code", ("b", SECRET_B), hosts='hosts = ["api.moonshot.cn"]'),
        {},
        {},
        "pools",
        "host 'api.moonshot.cn' is served by both pool 'p' and pool 'q'",
        id="preset-host-in-two-pools",
    ),
    pytest.param(
        pool_toml("p", "openai", ("has space", SECRET_A)),
        {},
        {},
        "pools[0].keys[0].label",
        "'has space' is not a usable label",
        id="label-with-space",
    ),
    pytest.param(
        pool_toml("p", "openai", ("-dash-first", SECRET_A)),
        {},
        {},
        "pools[0].keys[0].label",
        "is not a usable label",
        id="label-starting-with-dash",
    ),
    pytest.param(
        pool_toml("p", "openai", ("a/b", SECRET_A)),
        {},
        {},
        "pools[0].keys[0].label",
        "is not a usable label",
        id="label-with-slash",
    ),
    pytest.param(
        pool_toml("p", "openai", ("", SECRET_A)),
        {},
        {},
        "pools[0].keys[0].label",
        "is not a usable label",
        id="empty-label",
    ),
    pytest.param(
        pool_toml("p", "openai", ("x" * 65, SECRET_A)),
        {},
        {},
        "pools[0].keys[0].label",
        "is not a usable label",
        id="label-too-long",
    ),
    pytest.param(
        pool_toml("p", "openai", ("work\\n", SECRET_A)),
        {},
        {},
        "pools[0].keys[0].label",
        "is not a usable label",
        id="label-with-trailing-newline",
    ),
    pytest.param(
        pool_toml("my pool", "openai", ("a", SECRET_A)),
        {},
        {},
        "pools[0].name",
        "is not a usable pool name",
        id="pool-name-with-space",
    ),
    pytest.param(
        pool_toml("pool\\n", "openai", ("a", SECRET_A)),
        {},
        {},
        "pools[0].name",
        "is not a usable pool name",
        id="pool-name-with-trailing-newline",
    ),
]


@pytest.mark.parametrize(("text", "env", "files", "field", "problem"), BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_field(
    tmp_path: Path,
    text: str,
    env: dict[str, str],
    files: dict[str, str],
    field: str,
    problem: str,
) -> None:
    cfg = write(tmp_path / "cfg" / "rotor.toml", text)
    for name, content in files.items():
        write(tmp_path / "cfg" / name, content)
    with pytest.raises(ConfigError) as exc:
        config.load(cfg, env=env)
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg
    assert msg.startswith(f"{cfg}: {field}"), msg
    assert problem in msg
    for secret in SECRETS:
        assert secret not in msg
    assert "alpha alpha" not in msg
    assert "alpha\talpha" not in msg


def test_from_dict_reports_like_load(tmp_path: Path) -> None:
    source = tmp_path / "virtual.toml"
    raw = {"pools": [{"name": "p", "provider": "openai", "keys": [{"label": "a", "key_env": "X"}]}]}
    with pytest.raises(
        ConfigError, match=r"pools\[0\]\.keys\[0\]\.key_env: environment variable X"
    ):
        config.from_dict(raw, source, {})
    settings = config.from_dict(raw, source, {"X": SECRET_A})
    assert settings.source == source
    assert settings.keys[0].secret.get_secret_value() == SECRET_A


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "rotor.toml"
    with pytest.raises(ConfigError) as exc:
        config.load(path, env={})
    assert str(exc.value) == f"config file {path} does not exist"


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "rotor.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as exc:
        config.load(path, env={})
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"config file {path} cannot be read")


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path, env={})
    assert "\n" not in str(exc.value)
    assert str(tmp_path) in str(exc.value)


def test_malformed_toml_names_the_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "rotor.toml", 'state_dir = "x"\n\n[[pools]\n')
    with pytest.raises(ConfigError) as exc:
        config.load(cfg, env={})
    msg = str(exc.value)
    assert msg.startswith(f"{cfg}: malformed TOML: ")
    assert "line 3" in msg
    assert "\n" not in msg


# -- find_config -----------------------------------------------------------------------------


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    home = tmp_path / "home"
    cwd = tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return {
        "explicit": tmp_path / "explicit.toml",
        "env": tmp_path / "from-env.toml",
        "cwd": cwd / "rotor.toml",
        "home": home / ".kmi-rotor" / "rotor.toml",
    }


@pytest.mark.parametrize(
    ("present", "use_explicit", "use_env", "expected"),
    [
        ({"explicit", "env", "cwd", "home"}, True, True, "explicit"),
        ({"env", "cwd", "home"}, False, True, "env"),
        ({"cwd", "home"}, False, False, "cwd"),
        ({"home"}, False, False, "home"),
        ({"cwd"}, False, False, "cwd"),
        (set(), True, True, "explicit"),  # named paths are taken as given; load() reports them
        (set(), False, True, "env"),
        ({"home"}, False, True, "env"),
        ({"explicit", "home"}, True, False, "explicit"),
    ],
)
def test_find_config_precedence(
    places: dict[str, Path],
    present: set[str],
    use_explicit: bool,
    use_env: bool,
    expected: str,
) -> None:
    for name in present:
        write(places[name], "")
    explicit = str(places["explicit"]) if use_explicit else None
    env = {config.CONFIG_ENV: str(places["env"])} if use_env else {}
    assert config.find_config(explicit, env=env).resolve() == places[expected].resolve()


def test_find_config_ignores_an_empty_env_var(places: dict[str, Path]) -> None:
    write(places["home"], "")
    found = config.find_config(None, env={config.CONFIG_ENV: ""})
    assert found.resolve() == places["home"].resolve()


def test_find_config_ignores_a_folder_named_rotor_toml(places: dict[str, Path]) -> None:
    places["cwd"].mkdir()
    write(places["home"], "")
    assert config.find_config(None, env={}).resolve() == places["home"].resolve()


@pytest.mark.parametrize("which", ["explicit", "env"])
def test_find_config_expands_tilde(places: dict[str, Path], which: str) -> None:
    named = "~/custom.toml"
    found = (
        config.find_config(named, env={})
        if which == "explicit"
        else config.find_config(None, env={config.CONFIG_ENV: named})
    )
    assert found == Path.home() / "custom.toml"
    assert found == places["home"].parent.parent / "custom.toml"


@pytest.mark.parametrize("explicit", [None, ""])
def test_find_config_without_any_config(places: dict[str, Path], explicit: str | None) -> None:
    with pytest.raises(ConfigError) as exc:
        config.find_config(explicit, env={"UNRELATED": "1"})
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("no configuration found")
    for hint in (config.CONFIG_ENV, "./rotor.toml", "~/.kmi-rotor/rotor.toml", "--config"):
        assert hint in msg


def test_allowed_hosts_are_host_patterns(tmp_path: Path) -> None:
    text = 'allowed_hosts = ["rotor.lan", "*.rotor.lan", "box:8081"]\n' + pool_toml(
        "p", "openai", ("k1", SECRET_A)
    )
    s = load(tmp_path, text)
    assert [str(h) for h in s.allowed_hosts] == ["rotor.lan", "*.rotor.lan", "box:8081"]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('["https://rotor.lan"]', "without a scheme"),
        ('["rotor.lan/x"]', "not a host pattern"),
        ('"rotor.lan"', "valid list"),
    ],
)
def test_allowed_hosts_rejects(tmp_path: Path, value: str, why: str) -> None:
    text = f"allowed_hosts = {value}\n" + pool_toml("p", "openai", ("k1", SECRET_A))
    with pytest.raises(ConfigError, match="allowed_hosts") as exc:
        load(tmp_path, text)
    assert why in str(exc.value)


def test_http_host_pattern_allows_plain_http_to_that_host_only(tmp_path: Path) -> None:
    text = pool_toml(
        "p", "generic", ("k1", SECRET_A), hosts='hosts = ["http://llm.lan:8000", "api.x"]'
    )
    pool = load(tmp_path, text).pools[0]
    assert pool.plain_http_allowed("llm.lan", 8000)
    assert not pool.plain_http_allowed("api.x", 80)
    assert not pool.plain_http_allowed("llm.lan", 8001)
