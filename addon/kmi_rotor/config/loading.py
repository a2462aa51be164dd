"""Reading the configuration: the file, the environment, key files and folders, as one step.

`load` returns `runtime.Settings` or raises one `ConfigError` line that names the field
(`pools[0].keys[2].key_env`) and the problem; nothing half-read is ever returned.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from .. import auths
from ..cluster.settings import resolve as resolve_cluster
from ..core.hosts import HostPattern
from ..core.secrets import fingerprint
from .runtime import Client, Key, Pool, Settings, build_key, build_pool, key_limits
from .schema import DEFAULT_STATE_DIR, KeyConfig, PoolConfig, RotorConfig

CONFIG_ENV = "KMI_ROTOR_CONFIG"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_MESSAGE = 400
MIN_TOKEN = 16
"""Shortest client token: it is all that stands between a remote client and the pool."""


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line a user reads."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """Control characters escaped and length capped: a message is one readable line."""
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def find_config(explicit: str | None, env: Mapping[str, str] | None = None) -> Path:
    """The config file to use: explicit path, then $KMI_ROTOR_CONFIG, ./rotor.toml, ~/.kmi-rotor."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit).expanduser()
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    for candidate in (Path("rotor.toml"), Path(DEFAULT_STATE_DIR).expanduser() / "rotor.toml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "no configuration found: pass --set rotor_config=PATH (or --config PATH), "
        f"set ${CONFIG_ENV}, or create ./rotor.toml or ~/.kmi-rotor/rotor.toml"
    )


def load(path: Path, env: Mapping[str, str] | None = None, *, lenient: bool = False) -> Settings:
    """Read, validate and resolve a config file; raise ConfigError (one line) on any problem.

    `lenient` (the CLI, which needs no secret): a key whose secret cannot be read is kept with
    an empty secret and fingerprint and its `problem`; a key folder that cannot be read adds to
    `problems`; client tokens are not read at all."""
    env = os.environ if env is None else env
    try:
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise ConfigError(f"config file {path} is not a regular file")
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {_why(e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed TOML: nested too deeply") from None
    return from_dict(raw, path, env, lenient=lenient)


def from_dict(
    raw: dict[str, Any], source: Path, env: Mapping[str, str], *, lenient: bool = False
) -> Settings:
    """Validate and resolve a parsed config; any problem is one ConfigError line."""
    try:
        return _from_dict(raw, source, env, lenient)
    except ConfigError:
        raise
    except (ValueError, OSError, RuntimeError, RecursionError, TypeError) as e:
        # A last net under the precise checks: odd paths, odd nesting, odd files.
        raise ConfigError(f"{source}: {type(e).__name__}: {e}") from None


def _from_dict(
    raw: dict[str, Any], source: Path, env: Mapping[str, str], lenient: bool = False
) -> Settings:
    try:
        cfg = RotorConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None
    base_dir = source.parent.resolve()
    problems: list[str] = []
    pools = _pools(cfg, base_dir, env, source, problems if lenient else None)
    clients = () if lenient else _clients(cfg, pools, base_dir, env, source)
    try:
        state_dir = _path(cfg.state_dir, base_dir, "state_dir")
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    cluster = None
    if cfg.cluster and any(p.model_limits for p in pools):
        why = "model_limits are enforced per process: they cannot be shared through [cluster] yet"
        raise ConfigError(f"{source}: pools: {why}")
    try:
        cluster = resolve_cluster(cfg.cluster, env) if cfg.cluster else None
    except ValueError as e:
        if not lenient:
            raise ConfigError(f"{source}: {e}") from None
        problems.append(str(e))
    return Settings(
        source=source,
        state_dir=state_dir,
        pools=tuple(pools),
        limits=cfg.limits,
        health=cfg.health,
        failover=cfg.failover,
        streaming=cfg.streaming,
        clients=clients,
        allowed_hosts=tuple(HostPattern.parse(h) for h in cfg.allowed_hosts),
        problems=tuple(problems),
        watched=_watched(cfg, base_dir, source),
        cluster=cluster,
    )


def _pools(
    cfg: RotorConfig,
    base_dir: Path,
    env: Mapping[str, str],
    source: Path,
    problems: list[str] | None,
) -> list[Pool]:
    """Every pool with its keys read; with `problems` (a lenient load), what cannot be read is
    noted there instead of raised, and a pool may be left without keys."""
    lenient = problems is not None
    pools: list[Pool] = []
    seen: dict[str, str] = {}
    for i, pc in enumerate(cfg.pools):
        keys = _listed_keys(i, pc, base_dir, env, source, lenient) + _imported_keys(
            i, pc, base_dir, env, source, problems
        )
        if problems is not None:
            problems += [f"key {k.label}: {k.problem}" for k in keys if k.problem]
        if not keys and not lenient:
            raise ConfigError(f"{source}: pools[{i}].keys: pool {pc.name!r} has no keys")
        _no_duplicate_keys(keys, f"pools[{i}]", f"pool {pc.name!r}", seen, source)
        pools.append(build_pool(pc, keys))
    _no_duplicate_hosts(pools, source)
    return pools


def _no_duplicate_keys(
    keys: list[Key], where: str, pool: str, seen: dict[str, str], source: Path
) -> None:
    """Raise on a label or a secret already met (`seen`: "label:x" / "key:fp" -> its pool)."""
    for k in keys:
        for what, value in (("label", k.label), ("key", k.fingerprint)):
            if not value:  # a key whose secret a lenient load could not read
                continue
            other = seen.get(f"{what}:{value}")
            if other is not None:
                name = f"key labelled {k.label!r}" if what == "key" else f"label {k.label!r}"
                raise ConfigError(
                    f"{source}: {where}: duplicate {what}: the {name} is also in {other}"
                )
            seen[f"{what}:{value}"] = pool


def _watched(cfg: RotorConfig, base_dir: Path, source: Path) -> tuple[Path, ...]:
    """The config file and every file or folder a key is read from."""
    found = [source]
    for pc in cfg.pools:
        names = [kc.key_file for kc in pc.keys] + [pc.auths_dir, pc.kimi_config]
        for name in names:
            if name is not None:
                with contextlib.suppress(ValueError):
                    found.append(_path(name, base_dir, "path"))
    for cc in cfg.clients:
        if cc.token_file is not None:
            with contextlib.suppress(ValueError):
                found.append(_path(cc.token_file, base_dir, "path"))
    return tuple(dict.fromkeys(found))


def _clients(
    cfg: RotorConfig, pools: list[Pool], base_dir: Path, env: Mapping[str, str], source: Path
) -> tuple[Client, ...]:
    names = {p.name for p in pools}
    keys = {k.fingerprint for p in pools for k in p.keys}
    out: list[Client] = []
    for i, cc in enumerate(cfg.clients):
        where = f"clients[{i}]"
        try:
            token = resolve_secret(cc.as_key(), base_dir, env)
        except (ValidationError, ValueError) as e:
            why = _describe(e) if isinstance(e, ValidationError) else str(e)
            why = why.replace("key_env", "token_env").replace("key_file", "token_file")
            raise ConfigError(
                f"{source}: {_join_loc(where, why.replace('key:', 'token:'))}"
            ) from None
        if len(token.get_secret_value()) < MIN_TOKEN:
            raise ConfigError(
                f"{source}: {where}: a client token must be at least {MIN_TOKEN} characters"
            )
        unknown = [p for p in cc.pools or [] if p not in names]
        if unknown:
            raise ConfigError(f"{source}: {where}.pools: no pool named {unknown[0]!r}")
        if fingerprint(token.get_secret_value()) in keys:
            raise ConfigError(f"{source}: {where}: a client token must not be a pool key")
        if any(c.label == cc.label for c in out):
            raise ConfigError(f"{source}: {where}.label: duplicate client label {cc.label!r}")
        out.append(Client(cc.label, token, tuple(cc.pools) if cc.pools is not None else None))
    return tuple(out)


def _listed_keys(
    i: int,
    pc: PoolConfig,
    base_dir: Path,
    env: Mapping[str, str],
    source: Path,
    lenient: bool = False,
) -> list[Key]:
    """The pool's `[[pools.keys]]`, resolved (leniently: a missing secret noted, not fatal)."""
    keys: list[Key] = []
    for j, kc in enumerate(pc.keys):
        limits = key_limits(pc.key_limits, kc.limits)
        try:
            secret = resolve_secret(kc, base_dir, env)
        except ValueError as e:
            if not lenient or kc.key is not None:  # only a secret kept elsewhere may be absent
                where = _join_loc(f"pools[{i}].keys[{j}]", str(e))
                raise ConfigError(f"{source}: {where}") from None
            keys.append(
                Key(kc.label, SecretStr(""), "", pc.name, kc.disabled, kc.weight, limits, str(e))
            )
            continue
        keys.append(build_key(kc.label, secret, pc.name, kc.disabled, kc.weight, limits))
    return keys


def _imported_keys(
    i: int,
    pc: PoolConfig,
    base_dir: Path,
    env: Mapping[str, str],
    source: Path,
    problems: list[str] | None = None,
) -> list[Key]:
    """Keys from `auths_dir` and `kimi_config`, held to the same checks as listed ones; with
    `problems` (a lenient load), a source that cannot be read is noted there and skipped."""
    keys: list[Key] = []
    for field_name in ("auths_dir", "kimi_config"):
        where = getattr(pc, field_name)
        if where is None:
            continue
        try:
            path = _path(where, base_dir, field_name)
            found = auths.read_folder(path) if field_name == "auths_dir" else auths.read_kimi(path)
        except (auths.AuthsError, ValueError) as e:
            message = str(e).removeprefix(f"{field_name}: ")
            if problems is not None:
                problems.append(f"pool {pc.name}: {field_name}: {message}")
                continue
            raise ConfigError(f"{source}: pools[{i}].{field_name}: {message}") from None
        for a in found:
            try:
                secret = resolve_secret(KeyConfig(label=a.label, key=a.secret), base_dir, env)
            except (ValidationError, ValueError) as e:
                why = _describe(e) if isinstance(e, ValidationError) else str(e)
                raise ConfigError(f"{source}: pools[{i}].{field_name}: {a.source}: {why}") from None
            limits = key_limits(pc.key_limits, None)
            keys.append(build_key(a.label, secret, pc.name, a.disabled, 1.0, limits))
    return keys


def resolve_secret(kc: KeyConfig, base_dir: Path, env: Mapping[str, str]) -> SecretStr:
    """The key's value from its one source; raises ValueError naming the field on a missing
    or unusable one (never echoing what it read)."""
    if kc.key is not None:
        value = kc.key.get_secret_value()
        field = "key"
    elif kc.key_env is not None:
        field = "key_env"
        if not ENV_NAME_RE.fullmatch(kc.key_env):
            # Never echo it: it may be the key itself, pasted in the wrong field.
            raise ValueError("key_env: not a variable name (to give the key itself, use key)")
        if kc.key_env not in env:
            raise ValueError(f"key_env: environment variable {kc.key_env} is not set")
        value = env[kc.key_env]
    else:
        assert kc.key_file is not None
        field = "key_file"
        value = _read_first_line(_path(kc.key_file, base_dir, "key_file"), "key_file")
    value = value.removeprefix("\ufeff").strip()
    if not value:
        raise ValueError(f"{field}: the key is empty")
    if any(c.isspace() or not c.isascii() or not c.isprintable() for c in value):
        raise ValueError(
            f"{field}: the key contains whitespace or control characters, or non-ASCII ones"
        )
    return SecretStr(value)


def _no_duplicate_hosts(pools: list[Pool], source: Path) -> None:
    owner: dict[str, str] = {}
    for p in pools:
        for h in p.hosts:
            if h.place in owner and owner[h.place] != p.name:
                raise ConfigError(
                    f"{source}: pools: host {h.place!r} is served by both pool "
                    f"{owner[h.place]!r} and pool {p.name!r}"
                )
            owner[h.place] = p.name


def _describe(e: ValidationError) -> str:
    errors = e.errors(include_url=False, include_input=False)
    first = errors[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    text = _join_loc(loc, msg) if loc else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


def _join_loc(loc: str, msg: str) -> str:
    """`pools[0].keys[1]` + `key_env: not set` -> `pools[0].keys[1].key_env: not set`."""
    m = re.match(r"^([a-z_]+): (.*)$", msg, re.S)
    if m:
        return f"{loc}.{m.group(1)}: {m.group(2)}" if loc else f"{m.group(1)}: {m.group(2)}"
    return f"{loc}: {msg}"


def _path(text: str, base_dir: Path, field: str) -> Path:
    """A path from the config: `~` expanded, relative to the config's folder."""
    if "\x00" in text:
        raise ValueError(f"{field}: the path contains a NUL character")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user of an unknown user
        raise ValueError(f"{field}: cannot expand {text.split('/', 1)[0]!r}") from None
    return path if path.is_absolute() else (base_dir / path).resolve()


def _read_first_line(path: Path, field: str) -> str:
    try:
        if path.exists() and not path.is_file():
            raise ValueError(f"{field}: {path} is not a regular file")
        return path.read_text(encoding="utf-8").splitlines()[0]
    except IndexError:
        raise ValueError(f"{field}: {path} is empty") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{field}: {path} cannot be read ({_why(e)})") from None


def _why(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
