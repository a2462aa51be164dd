"""One way to write a rotor.toml for tests, benchmarks and scripts: plain Python data, `tomli-w`.

Nobody formats TOML by hand: a value with a quote, a backslash or a non-ASCII character is
written correctly, and a table is whatever dict the caller built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w


def write_toml(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write `doc` as TOML to `path` (its folder created); `None` values are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(_without_none(doc)), encoding="utf-8")
    return path


def pool(
    name: str,
    hosts: Sequence[str] | None,
    keys: Mapping[str, str],
    *,
    provider: str = "generic",
    **fields: Any,
) -> dict[str, Any]:
    """A `[[pools]]` table: `keys` maps labels to key values; `fields` are further settings."""
    table: dict[str, Any] = {"name": name, "provider": provider}
    if hosts is not None:
        table["hosts"] = list(hosts)
    table |= fields
    table["keys"] = [{"label": label, "key": key} for label, key in keys.items()]
    return table


def rotor_config(
    path: Path, state_dir: Path, pools: Sequence[Mapping[str, Any]], **tables: Any
) -> Path:
    """A rotor.toml with its state in `state_dir`, top-level settings or tables such as
    `limits={...}` or `health={...}`, and the given pools."""
    return write_toml(path, {"state_dir": str(state_dir), **tables, "pools": list(pools)})


def _without_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    return value
