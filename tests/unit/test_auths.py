"""Keys read from an auths folder in the older tool's format (.env, Kimi CLI .toml, .json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kmi_rotor import config
from kmi_rotor.config import ConfigError, Settings

S1 = "sk-onesecretonesecret00001"
S2 = "sk-twosecrettwosecret00002"
S3 = "sk-threesecretthreesecret03"
S4 = "sk-foursecretfoursecret0004"
SECRETS = (S1, S2, S3, S4)


def make_folder(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


def via_from_dict(tmp_path: Path, files: dict[str, str | bytes], **pool: object) -> Settings:
    make_folder(tmp_path / "cfg" / "auths", files)
    raw = {"pools": [{"name": "kimi", "provider": "kimi-code", "auths_dir": "auths", **pool}]}
    return config.from_dict(raw, tmp_path / "cfg" / "rotor.toml", {})


def via_load(tmp_path: Path, files: dict[str, str | bytes], extra: str = "") -> Settings:
    make_folder(tmp_path / "cfg" / "auths", files)
    cfg = tmp_path / "cfg" / "rotor.toml"
    cfg.write_text(
        f'[[pools]]\nname = "kimi"\nprovider = "kimi-code"\nauths_dir = "auths"\n{extra}',
        encoding="utf-8",
    )
    return config.load(cfg, env={})


Loader = Callable[[Path, dict[str, str | bytes]], Settings]

LOADERS = [pytest.param(via_from_dict, id="from_dict"), pytest.param(via_load, id="load")]


def summary(settings: Settings) -> list[tuple[str, str, bool]]:
    return [(k.label, k.secret.get_secret_value(), k.disabled) for k in settings.keys]


# -- good folders ----------------------------------------------------------------------------

GOOD_FOLDERS = [
    pytest.param(
        {"work.env": f"KMI_API_KEY={S1}\n"},
        [("work", S1, False)],
        id="env-label-from-file-name",
    ),
    pytest.param(
        {"work.env": f"KMI_API_KEY={S1}\nKMI_KEY_LABEL=office\n"},
        [("office", S1, False)],
        id="env-label-from-variable",
    ),
    pytest.param({".env": f"KMI_API_KEY={S1}\n"}, [("env", S1, False)], id="dot-env-file"),
    pytest.param(
        {
            "quoted.env": (
                "# the work account\n"
                "\n"
                f'export KMI_API_KEY="{S1}"\n'
                "KMI_KEY_LABEL = 'quoted-label'\n"
                "not a variable line\n"
            )
        },
        [("quoted-label", S1, False)],
        id="env-export-quotes-comments",
    ),
    pytest.param(
        {"UPPER.ENV": f"KMI_API_KEY={S1}\n"}, [("UPPER", S1, False)], id="env-suffix-any-case"
    ),
    pytest.param(
        {
            "a.env": f"KMI_API_KEY={S1}\nKMI_KEY_PRIORITY=1\n",
            "b.env": f"KMI_API_KEY={S2}\nKMI_KEY_PRIORITY=5\n",
            "c.env": f"KMI_API_KEY={S3}\n",
            "d.env": f"KMI_API_KEY={S4}\nKMI_KEY_PRIORITY=-2\n",
        },
        [("b", S2, False), ("a", S1, False), ("c", S3, False), ("d", S4, False)],
        id="priority-highest-first",
    ),
    pytest.param(
        {
            "z.env": f"KMI_API_KEY={S1}\nKMI_KEY_PRIORITY=3\n",
            "m.env": f"KMI_API_KEY={S2}\nKMI_KEY_PRIORITY=3\n",
            "a.env": f"KMI_API_KEY={S3}\nKMI_KEY_PRIORITY=\n",
        },
        [("m", S2, False), ("z", S1, False), ("a", S3, False)],
        id="equal-priority-by-file-name",
    ),
    pytest.param(
        {
            "on1.env": f"KMI_API_KEY={S1}\nKMI_KEY_DISABLED=1\n",
            "on2.env": f"KMI_API_KEY={S2}\nKMI_KEY_DISABLED=TRUE\n",
            "off1.env": f"KMI_API_KEY={S3}\nKMI_KEY_DISABLED=0\n",
            "off2.env": f"KMI_API_KEY={S4}\nKMI_KEY_DISABLED=\n",
        },
        [("off1", S3, False), ("off2", S4, False), ("on1", S1, True), ("on2", S2, True)],
        id="disabled-flag",
    ),
    pytest.param(
        {
            "config.toml": (
                'default_model = "kimi-for-coding"\n'
                '[models.kimi-for-coding]\nprovider = "managed:kimi-code"\n'
                '[providers."managed:kimi-code"]\n'
                f'api_key = "{S1}"\nbase_url = "https://api.kimi.com/coding/v1"\n'
            )
        },
        [("config", S1, False)],
        id="kimi-cli-toml-one-provider",
    ),
    pytest.param(
        {
            "kimi.toml": (
                '[providers."managed:kimi-code"]\n'
                f'api_key = "{S1}"\nbase_url = "https://api.kimi.com/coding/v1"\n'
                "[providers.moonshot-ai]\n"
                f'api_key = "{S2}"\nbase_url = "https://api.moonshot.ai/v1"\n'
                '[providers.no-key]\nbase_url = "https://example.invalid/v1"\n'
                '[providers.blank-key]\napi_key = "  "\n'
            )
        },
        [("kimi-managed-kimi-code", S1, False), ("kimi-moonshot-ai", S2, False)],
        id="kimi-cli-toml-several-providers",
    ),
    pytest.param(
        {
            "acc.json": json.dumps(
                {"providers": {"kimi-for-coding": {"api_key": S1, "base_url": "https://x/v1"}}}
            )
        },
        [("acc", S1, False)],
        id="json-one-provider",
    ),
    pytest.param(
        {
            "acc.json": json.dumps(
                {
                    "providers": {
                        "kimi for coding": {"api_key": S1},
                        "moonshot-ai": {"api_key": S2},
                        "broken": "not a table",
                        "no-key": {"base_url": "https://x.test"},
                    }
                }
            )
        },
        [("acc-kimi-for-coding", S1, False), ("acc-moonshot-ai", S2, False)],
        id="json-several-providers",
    ),
    pytest.param(
        {
            "a.env": f"KMI_API_KEY={S1}\n",
            "b.toml": f'[providers.p]\napi_key = "{S2}"\n',
            "c.json": json.dumps({"providers": {"p": {"api_key": S3}}}),
            "README.md": f"KMI_API_KEY={S4}\n",
            "notes.txt": "hello",
            "backup.env.bak": f"KMI_API_KEY={S4}\n",
            "c.json~": "{",
            "env": f"KMI_API_KEY={S4}\n",
            ".hidden.json": "{ not json",
            ".secret.env": f"KMI_API_KEY={S4}\n",
            "nested.env/inner.env": f"KMI_API_KEY={S4}\n",
            "sub/d.env": f"KMI_API_KEY={S4}\n",
        },
        [("a", S1, False), ("b", S2, False), ("c", S3, False)],
        id="other-files-ignored",
    ),
]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(("files", "expected"), GOOD_FOLDERS)
def test_auths_folder(
    tmp_path: Path,
    loader: Loader,
    files: dict[str, str | bytes],
    expected: list[tuple[str, str, bool]],
) -> None:
    settings = loader(tmp_path, files)
    assert summary(settings) == expected
    assert {k.pool for k in settings.keys} == {"kimi"}
    for key in settings.keys:
        assert key.secret.get_secret_value() not in repr(key)


@pytest.mark.parametrize(
    ("value", "disabled"),
    [
        ("1", True),
        ("true", True),
        ("True", True),
        ("yes", True),
        ("on", True),
        (" ON ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
        ("maybe", False),
    ],
)
def test_disabled_values(tmp_path: Path, value: str, disabled: bool) -> None:
    settings = via_from_dict(tmp_path, {"k.env": f"KMI_API_KEY={S1}\nKMI_KEY_DISABLED={value}\n"})
    assert settings.keys[0].disabled is disabled


def test_auths_keys_follow_the_configured_keys(tmp_path: Path) -> None:
    settings = via_load(
        tmp_path,
        {"a.env": f"KMI_API_KEY={S2}\n"},
        extra=f'[[pools.keys]]\nlabel = "inline"\nkey = "{S1}"\n',
    )
    assert summary(settings) == [("inline", S1, False), ("a", S2, False)]


def test_auths_dir_absolute_and_with_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    make_folder(home / "old-auths", {"acc.env": f"KMI_API_KEY={S1}\n"})
    monkeypatch.setenv("HOME", str(home))
    for where in ("~/old-auths", str(home / "old-auths")):
        raw = {"pools": [{"name": "kimi", "provider": "kimi-code", "auths_dir": where}]}
        settings = config.from_dict(raw, tmp_path / "elsewhere" / "rotor.toml", {})
        assert summary(settings) == [("acc", S1, False)]


# -- bad folders -----------------------------------------------------------------------------

BAD_FOLDERS = [
    pytest.param({"a.env": "KMI_KEY_LABEL=x\n"}, "a.env", "no KMI_API_KEY", id="env-without-key"),
    pytest.param({"a.env": "KMI_API_KEY=\n"}, "a.env", "no KMI_API_KEY", id="env-empty-key"),
    pytest.param({"a.env": ""}, "a.env", "no KMI_API_KEY", id="env-empty-file"),
    pytest.param(
        {"a.env": f"KMI_API_KEY={S1}\nKMI_KEY_PRIORITY=high\n"},
        "a.env",
        "KMI_KEY_PRIORITY is not a whole number",
        id="priority-not-a-number",
    ),
    pytest.param(
        {"a.env": f"KMI_API_KEY={S1}\nKMI_KEY_PRIORITY=1.5\n"},
        "a.env",
        "KMI_KEY_PRIORITY is not a whole number",
        id="priority-fraction",
    ),
    pytest.param(
        {"ok.env": f"KMI_API_KEY={S2}\n", "z.json": '{"providers": {'},
        "z.json",
        "malformed JSON",
        id="json-malformed",
    ),
    pytest.param(
        {"a.json": json.dumps({"providers": {"p": {"api_key": S1}}})[:-3]},
        "a.json",
        "malformed JSON",
        id="json-truncated-after-secret",
    ),
    pytest.param({"a.json": "[1, 2]"}, "a.json", "no providers table", id="json-not-an-object"),
    pytest.param({"a.json": "{}"}, "a.json", "no providers table", id="json-without-providers"),
    pytest.param(
        {"a.json": '{"providers": ["x"]}'}, "a.json", "no providers table", id="json-list"
    ),
    pytest.param(
        {"a.json": '{"providers": {"p": {"base_url": "https://x"}}}'},
        "a.json",
        "no provider with an api_key",
        id="json-without-api-key",
    ),
    pytest.param(
        {"a.toml": f'[providers.p\napi_key = "{S1}"\n'}, "a.toml", "line 1", id="toml-malformed"
    ),
    pytest.param(
        {"a.toml": f'[providers.p]\napi_key = "{S1}\n'},
        "a.toml",
        "line 2",
        id="toml-unterminated-secret",
    ),
    pytest.param(
        {"a.toml": 'default_model = "m"\n'}, "a.toml", "no providers table", id="toml-no-providers"
    ),
    pytest.param(
        {"a.toml": '[providers.p]\nbase_url = "https://x"\n'},
        "a.toml",
        "no provider with an api_key",
        id="toml-without-api-key",
    ),
    pytest.param(
        {"a.json": b'{"providers": {"p": {"api_key": "\xff\xfe"}}}'},
        "a.json",
        "cannot be read (UnicodeDecodeError)",
        id="not-utf8",
    ),
]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(("files", "culprit", "problem"), BAD_FOLDERS)
def test_bad_auths_file(
    tmp_path: Path, loader: Loader, files: dict[str, str | bytes], culprit: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        loader(tmp_path, files)
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg
    cfg = tmp_path / "cfg" / "rotor.toml"
    assert msg.startswith(f"{cfg}: pools[0].auths_dir: "), msg
    assert str((tmp_path / "cfg" / "auths" / culprit).resolve()) in msg
    assert problem in msg
    for secret in SECRETS:
        assert secret not in msg


@pytest.mark.parametrize("loader", LOADERS)
def test_auths_dir_that_does_not_exist(tmp_path: Path, loader: Loader) -> None:
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "rotor.toml"
    raw = {"pools": [{"name": "kimi", "provider": "kimi-code", "auths_dir": "missing"}]}
    cfg.write_text(
        '[[pools]]\nname = "kimi"\nprovider = "kimi-code"\nauths_dir = "missing"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as exc:
        if loader is via_load:
            config.load(cfg, env={})
        else:
            config.from_dict(raw, cfg, {})
    msg = str(exc.value)
    assert "\n" not in msg
    assert (
        msg
        == f"{cfg}: pools[0].auths_dir: {(tmp_path / 'cfg' / 'missing').resolve()} is not a folder"
    )


def test_empty_auths_dir_means_a_pool_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pools\[0\]\.keys: pool 'kimi' has no keys"):
        via_from_dict(tmp_path, {"README.md": "nothing here"})


@pytest.mark.parametrize(
    ("files", "extra_pool", "problem"),
    [
        pytest.param(
            {
                "a.env": f"KMI_API_KEY={S1}\n",
                "b.json": json.dumps({"providers": {"x": {"api_key": S1}}}),
            },
            None,
            "pools[0]: duplicate key: the key labelled 'b' is also in pool 'kimi'",
            id="same-secret-in-two-files",
        ),
        pytest.param(
            {
                "a.env": f"KMI_API_KEY={S1}\n",
                "a.json": json.dumps({"providers": {"x": {"api_key": S2}}}),
            },
            None,
            "pools[0]: duplicate label: the label 'a' is also in pool 'kimi'",
            id="same-label-in-two-files",
        ),
        pytest.param(
            {"a.env": f"KMI_API_KEY={S1}\n"},
            {"name": "other", "provider": "moonshot", "keys": [{"label": "a", "key": S2}]},
            "pools[1]: duplicate label: the label 'a' is also in pool 'kimi'",
            id="auths-label-reused-by-another-pool",
        ),
        pytest.param(
            {"a.env": f"KMI_API_KEY={S1}\n"},
            {"name": "other", "provider": "moonshot", "keys": [{"label": "b", "key": S1}]},
            "pools[1]: duplicate key: the key labelled 'b' is also in pool 'kimi'",
            id="auths-secret-reused-by-another-pool",
        ),
    ],
)
def test_duplicates_from_auths(
    tmp_path: Path, files: dict[str, str], extra_pool: dict[str, object] | None, problem: str
) -> None:
    make_folder(tmp_path / "cfg" / "auths", files)
    pools: list[dict[str, object]] = [
        {"name": "kimi", "provider": "kimi-code", "auths_dir": "auths"}
    ]
    if extra_pool is not None:
        pools.append(extra_pool)
    cfg = tmp_path / "cfg" / "rotor.toml"
    with pytest.raises(ConfigError) as exc:
        config.from_dict({"pools": pools}, cfg, {})
    msg = str(exc.value)
    assert msg == f"{cfg}: {problem}"
    for secret in SECRETS:
        assert secret not in msg


AUTHS_SKIP_KEY_CHECKS = (
    "auths.read_folder returns labels and secrets unchecked and config.from_dict adds them as "
    "keys without the LABEL_RE / whitespace checks that [[pools.keys]] entries get"
)


@pytest.mark.parametrize(
    "files",
    [
        pytest.param({"a.env": 'KMI_API_KEY="sk-one secretonesecret00001"\n'}, id="env-space"),
        pytest.param(
            {"a.toml": '[providers.p]\napi_key = "sk-one\\tsecretonesecret0001"\n'},
            id="toml-tab",
        ),
    ],
)
def test_auths_key_with_whitespace_is_rejected(tmp_path: Path, files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"pools\[0\]\.auths_dir"):
        via_from_dict(tmp_path, files)


@pytest.mark.parametrize(
    "files",
    [
        pytest.param({"a.env": f"KMI_API_KEY={S1}\nKMI_KEY_LABEL=my key\n"}, id="label-space"),
        pytest.param({"my account.env": f"KMI_API_KEY={S1}\n"}, id="file-name-space"),
    ],
)
def test_auths_label_with_bad_characters_is_rejected(tmp_path: Path, files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="label"):
        via_from_dict(tmp_path, files)


def test_auths_key_surrounding_whitespace_is_stripped(tmp_path: Path) -> None:
    files = {"a.json": json.dumps({"providers": {"p": {"api_key": S1 + "\n"}}})}
    make_folder(tmp_path / "cfg" / "auths", files)
    cfg = tmp_path / "cfg" / "rotor.toml"
    settings = config.from_dict(
        {"pools": [{"name": "kimi", "provider": "kimi-code", "auths_dir": "auths"}]}, cfg, {}
    )
    assert [k.secret.get_secret_value() for k in settings.keys] == [S1]
