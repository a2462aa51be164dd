"""Keys from the older tool's folder: `.env`, `.toml` (Kimi CLI layout) and `.json` files."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr


class AuthsError(Exception):
    """A folder or file that cannot be read as keys; the message names the file."""


@dataclass(frozen=True)
class FoundKey:
    label: str
    secret: SecretStr
    source: Path
    priority: int = 0
    disabled: bool = False


def read_folder(folder: Path) -> list[FoundKey]:
    """Every key in the folder, highest priority first, then by file name."""
    if not folder.is_dir():
        raise AuthsError(f"{folder} is not a folder")
    found: list[FoundKey] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") and path.name != ".env":
            continue
        reader = _READERS.get(path.suffix.lower() or path.name)
        if reader is None or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            found += reader(path, text)
        except (OSError, UnicodeDecodeError) as e:
            raise AuthsError(f"{path} cannot be read ({type(e).__name__})") from None
        except (ValueError, tomllib.TOMLDecodeError, RecursionError) as e:
            raise AuthsError(f"{path}: {e}") from None
    return sorted(found, key=lambda k: -k.priority)


def read_kimi(path: Path) -> list[FoundKey]:
    """The keys of the Kimi CLI's `config.toml` (`[providers.<name>] api_key`), each labelled
    `kimi-<name>`."""
    try:
        if not path.is_file():
            raise AuthsError(f"{path} is not a file")
        providers = tomllib.loads(path.read_text(encoding="utf-8")).get("providers")
        named = _named_keys(providers)
    except (OSError, UnicodeDecodeError) as e:
        raise AuthsError(f"{path} cannot be read ({type(e).__name__})") from None
    except (ValueError, tomllib.TOMLDecodeError, RecursionError) as e:
        raise AuthsError(f"{path}: {e}") from None
    return [FoundKey(f"kimi-{_slug(name)}", SecretStr(key), path) for name, key in named]


def _label_for(path: Path) -> str:
    stem = path.name if path.name == ".env" else path.stem
    return stem.lstrip(".") or "env"


def _truthy(v: str) -> bool:
    return v.strip().lower() in {"1", "true", "yes", "on"}


def _read_env(path: Path, text: str) -> list[FoundKey]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        values[name.strip()] = value.strip().strip("'\"")
    if not values.get("KMI_API_KEY"):
        raise ValueError("no KMI_API_KEY")
    try:
        priority = int(values.get("KMI_KEY_PRIORITY", "0") or 0)
    except ValueError:
        raise ValueError("KMI_KEY_PRIORITY is not a whole number") from None
    return [
        FoundKey(
            label=values.get("KMI_KEY_LABEL") or _label_for(path),
            secret=SecretStr(values["KMI_API_KEY"]),
            source=path,
            priority=priority,
            disabled=_truthy(values.get("KMI_KEY_DISABLED", "")),
        )
    ]


def _named_keys(providers: Any) -> list[tuple[str, str]]:
    """(provider name, api_key) of every provider that has a key."""
    if not isinstance(providers, dict):
        raise ValueError("no providers table")
    keys = []
    for name, p in providers.items():
        key = p.get("api_key") if isinstance(p, dict) else None
        if key is not None and not isinstance(key, str):
            raise ValueError(f"providers.{name}.api_key is not a string")
        if key and key.strip():
            keys.append((str(name), key))
    if not keys:
        raise ValueError("no provider with an api_key")
    return keys


def _providers_keys(path: Path, providers: Any) -> list[FoundKey]:
    keys = _named_keys(providers)
    base = _label_for(path)
    return [
        FoundKey(
            label=base if len(keys) == 1 else f"{base}-{_slug(name)}",
            secret=SecretStr(key),
            source=path,
        )
        for name, key in keys
    ]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-") or "key"


def _read_toml(path: Path, text: str) -> list[FoundKey]:
    return _providers_keys(path, tomllib.loads(text).get("providers"))


def _read_json(path: Path, text: str) -> list[FoundKey]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at line {e.lineno})") from None
    return _providers_keys(path, data.get("providers") if isinstance(data, dict) else None)


_READERS = {".env": _read_env, ".toml": _read_toml, ".json": _read_json}
