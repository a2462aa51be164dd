"""The configuration file: a pydantic model, loaded into pools of resolved keys.

Every problem surfaces as one `ConfigError` line that names the field (`pools[0].keys[2].key_env`)
and the problem; nothing half-read is ever returned.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import auths
from .cluster.settings import Cluster, ClusterConfig
from .cluster.settings import resolve as resolve_cluster
from .core.hosts import HostPattern
from .core.presets import PRESETS, Preset
from .core.secrets import fingerprint

CONFIG_ENV = "KMI_ROTOR_CONFIG"
DEFAULT_STATE_DIR = "~/.kmi-rotor"
KIMI_USAGES_URL = "https://api.kimi.com/coding/v1/usages"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


MAX_MESSAGE = 400
MIN_TOKEN = 16
"""Shortest client token: it is all that stands between a remote client and the pool."""
MAX_SECONDS = 366 * 86400.0
"""Longest duration a health setting may name: beyond it, times stop being representable."""


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line a user reads."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """Control characters escaped and length capped: a message is one readable line."""
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


class _Model(BaseModel):
    # strict: a bool is no number (`concurrency = true`), nor a string a number.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class LimitsConfig(_Model):
    """Limits of one scope (the whole proxy, a pool's keys, or one key). Absent = unlimited."""

    requests_per_second: int | None = Field(None, gt=0)
    requests_per_minute: int | None = Field(None, gt=0)
    requests_per_hour: int | None = Field(None, gt=0)
    requests_per_day: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    tokens_per_day: int | None = Field(None, gt=0)
    concurrency: int | None = Field(None, gt=0)


class GlobalLimits(LimitsConfig):
    max_wait_seconds: float = Field(
        30.0, ge=0, le=3600, description="Longest a request may wait for capacity; 0 = never."
    )
    guard: float = Field(
        0.015,
        ge=0,
        le=0.5,
        description="Each window is enforced this fraction longer (at most 0.25 s), so that the "
        "jitter between admission and the provider's count never adds a request; 0 = exact.",
    )


class HealthConfig(_Model):
    """How failures steer keys: cooldowns, blocks, and how fast old errors fade."""

    max_cooldown_seconds: float = Field(
        3600.0, gt=0, le=MAX_SECONDS, description="Cap of any cooldown."
    )
    quota_block_seconds: float = Field(
        3600.0, gt=0, le=MAX_SECONDS, description="Block when no reset is known."
    )
    rate_limit_backoff: float = Field(
        2.0, gt=0, le=MAX_SECONDS, description="First hint-less 429 backoff."
    )
    overload_backoff: float = Field(1.0, gt=0, le=MAX_SECONDS, description="First 5xx backoff.")
    overload_backoff_max: float = Field(
        30.0, gt=0, le=MAX_SECONDS, description="Cap of the 5xx backoff."
    )
    half_life_seconds: float = Field(
        300.0, gt=0, le=MAX_SECONDS, description="Half-life of the error score."
    )
    auth_recheck_seconds: float | None = Field(
        None,
        gt=0,
        le=MAX_SECONDS,
        description="Retry a key disabled for a bad credential after this long.",
    )


class FailoverConfig(_Model):
    max_attempts: int = Field(3, ge=1, le=10, description="Tries per request, first included.")


class StreamingConfig(_Model):
    include_usage: bool = Field(
        True, description="Ask OpenAI-style streams for their usage chunk when the client did not."
    )
    content_types: list[str] = Field(
        ["text/event-stream"], description="Successful answers of these types are streamed."
    )


class KeyConfig(_Model):
    label: str = Field(description="Name shown in logs, flows and status; unique across pools.")
    key: SecretStr | None = Field(None, description="The key itself (prefer key_env or key_file).")
    key_env: str | None = Field(None, description="Environment variable holding the key.")
    key_file: str | None = Field(None, description="File holding the key (first line).")
    disabled: bool = Field(False, description="Keep the key configured but never use it.")
    weight: float = Field(1.0, gt=0, description="Share of traffic under strategy 'weighted'.")
    limits: LimitsConfig | None = Field(None, description="This key's limits (over key_limits).")

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if not LABEL_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a usable label (letters, digits and . _ @ + -)")
        return v

    @model_validator(mode="after")
    def _exactly_one_source(self) -> KeyConfig:
        given = [n for n in ("key", "key_env", "key_file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"key: give exactly one of key, key_env, key_file (got {', '.join(given) or 'none'})"
            )
        return self

    def resolve(self, base_dir: Path, env: Mapping[str, str]) -> SecretStr:
        """The key's value; raises ValueError naming the field on a missing source."""
        if self.key is not None:
            value = self.key.get_secret_value()
            field = "key"
        elif self.key_env is not None:
            field = "key_env"
            if not ENV_NAME_RE.fullmatch(self.key_env):
                # Never echo it: it may be the key itself, pasted in the wrong field.
                raise ValueError("key_env: not a variable name (to give the key itself, use key)")
            if self.key_env not in env:
                raise ValueError(f"key_env: environment variable {self.key_env} is not set")
            value = env[self.key_env]
        else:
            assert self.key_file is not None
            field = "key_file"
            value = _read_first_line(_path(self.key_file, base_dir, "key_file"), "key_file")
        value = value.removeprefix("\ufeff").strip()
        if not value:
            raise ValueError(f"{field}: the key is empty")
        if any(c.isspace() or not c.isascii() or not c.isprintable() for c in value):
            raise ValueError(
                f"{field}: the key contains whitespace or control characters, or non-ASCII ones"
            )
        return SecretStr(value)


Strategy = Literal["round-robin", "headroom", "sticky", "weighted"]


class PoolConfig(_Model):
    name: str = Field(description="Pool name, unique.")
    provider: str = Field(description=f"Preset: {', '.join(PRESETS)}.")
    hosts: list[str] | None = Field(None, description="Replaces the preset's hosts.")
    strategy: Strategy = Field("round-robin", description="How the next key is chosen.")
    keys: list[KeyConfig] = Field(default_factory=list, description="The pool's keys.")
    auths_dir: str | None = Field(None, description="Folder of key files in the older format.")
    kimi_config: str | None = Field(
        None, description="The Kimi CLI's config.toml to take keys from."
    )
    key_limits: LimitsConfig | None = Field(None, description="Default limits of every key.")
    affinity_header: str | None = Field(
        None, description="Requests with the same value of this header stay on one key."
    )
    usages_url: str | None = Field(
        None, description="kimi-code only: the quota endpoint (default: the preset's)."
    )
    usage_poll_seconds: float = Field(
        300.0, ge=0, description="kimi-code only: how often each key's quota is read; 0 = never."
    )

    @model_validator(mode="after")
    def _usages_only_for_kimi_code(self) -> PoolConfig:
        if self.usages_url is not None and self.provider != "kimi-code":
            raise ValueError("usages_url: only provider 'kimi-code' has a usage endpoint")
        if self.usages_url is not None and not self.usages_url.startswith(("https://", "http://")):
            raise ValueError("usages_url: must be an http(s) URL")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not LABEL_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a usable pool name (letters, digits and . _ @ + -)")
        return v

    @field_validator("provider")
    @classmethod
    def _provider(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown provider {v!r} (known: {', '.join(PRESETS)})")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str] | None) -> list[str] | None:
        for h in v or []:
            HostPattern.parse(h)
        return v

    @model_validator(mode="after")
    def _generic_needs_hosts(self) -> PoolConfig:
        if not self.hosts and not PRESETS[self.provider].hosts:
            raise ValueError(f"hosts: provider {self.provider!r} has no default hosts: list them")
        return self


class ClientConfig(_Model):
    """A client token: a remote client presenting it gets pool keys (with rotor_allow_remote)."""

    label: str = Field(description="Name of the client, for logs and the trace.")
    token: SecretStr | None = Field(None, description="The token itself.")
    token_env: str | None = Field(None, description="Environment variable holding the token.")
    token_file: str | None = Field(None, description="File holding the token (first line).")
    pools: list[str] | None = Field(None, description="Only these pools (default: all).")

    def as_key(self) -> KeyConfig:
        """The same source rules as a key's: exactly one of token, token_env, token_file."""
        return KeyConfig(
            label=self.label, key=self.token, key_env=self.token_env, key_file=self.token_file
        )


class RotorConfig(_Model):
    state_dir: str = Field(DEFAULT_STATE_DIR, description="Where state.json lives.")
    limits: GlobalLimits = Field(default_factory=GlobalLimits, description="The whole proxy.")
    health: HealthConfig = Field(default_factory=HealthConfig)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    clients: list[ClientConfig] = Field(default_factory=list, description="Client tokens.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Reverse mode: Host names clients may use besides localhost and the proxy's "
        "own addresses (anything else is refused, against DNS rebinding).",
    )
    pools: list[PoolConfig] = Field(description="At least one pool of keys.", min_length=1)
    cluster: ClusterConfig | None = Field(None, description="Share the pool through Redis.")

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            if HostPattern.parse(h).scheme is not None:
                raise ValueError(f"a Host name, without a scheme: {h!r}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> RotorConfig:
        _no_duplicates({f"pools[{i}].name": p.name for i, p in enumerate(self.pools)}, "pool name")
        _no_duplicates(
            {
                f"pools[{i}].keys[{j}].label": k.label
                for i, p in enumerate(self.pools)
                for j, k in enumerate(p.keys)
            },
            "key label",
        )
        return self


# Runtime view --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    label: str
    secret: SecretStr
    fingerprint: str
    pool: str
    disabled: bool = False
    weight: float = 1.0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    problem: str | None = None
    """Why the secret could not be read (only in a lenient load: the CLI's); then the secret is
    empty and the fingerprint is the state's, or empty when the state has no record yet."""

    def __repr__(self) -> str:  # never the secret, even in a traceback's locals
        return f"Key({self.label!r}, {self.fingerprint})"


@dataclass(frozen=True)
class Pool:
    name: str
    preset: Preset
    hosts: tuple[HostPattern, ...]
    strategy: str
    keys: tuple[Key, ...]
    affinity_header: str | None = None
    usages_url: str | None = None
    usage_poll_seconds: float = 0.0

    def matches(self, host: str, port: int) -> bool:
        return any(p.matches(host, port) for p in self.hosts)

    def plain_http_allowed(self, host: str, port: int) -> bool:
        """Whether a pattern of host:port was written with `http://` (keys in clear allowed)."""
        return any(p.scheme == "http" and p.matches(host, port) for p in self.hosts)


@dataclass(frozen=True)
class Client:
    label: str
    token: SecretStr
    pools: tuple[str, ...] | None

    def __repr__(self) -> str:
        return f"Client({self.label!r})"


@dataclass(frozen=True)
class Settings:
    source: Path
    state_dir: Path
    pools: tuple[Pool, ...]
    limits: GlobalLimits = field(default_factory=GlobalLimits)
    health: HealthConfig = field(default_factory=HealthConfig)
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    clients: tuple[Client, ...] = ()
    allowed_hosts: tuple[HostPattern, ...] = ()
    problems: tuple[str, ...] = ()
    """What a lenient load could not read (secrets, key folders), one line each."""
    watched: tuple[Path, ...] = ()
    """The files it was read from (the config, key files, auths folders): a running proxy
    reloads when one of them changes."""
    cluster: Cluster | None = None

    def pool_for(self, host: str, port: int) -> Pool | None:
        """The pool serving host:port: an exact host pattern wins over a wildcard."""
        exact = [
            p for p in self.pools if any(h.matches(host, port) and not h.wildcard for h in p.hosts)
        ]
        if exact:
            return exact[0]
        return next((p for p in self.pools if p.matches(host, port)), None)

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple(k for p in self.pools for k in p.keys)


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
    pools: list[Pool] = []
    seen: dict[str, str] = {}
    problems: list[str] = []
    for i, pc in enumerate(cfg.pools):
        keys = _listed_keys(i, pc, base_dir, env, source, lenient) + _imported_keys(
            i, pc, base_dir, env, source, problems if lenient else None
        )
        problems += [f"key {k.label}: {k.problem}" for k in keys if k.problem]
        if not keys and not lenient:
            raise ConfigError(f"{source}: pools[{i}].keys: pool {pc.name!r} has no keys")
        for k in keys:
            for what, value in (("label", k.label), ("key", k.fingerprint)):
                if not value:  # a key whose secret a lenient load could not read
                    continue
                other = seen.get(f"{what}:{value}")
                if other is not None:
                    name = f"key labelled {k.label!r}" if what == "key" else f"label {k.label!r}"
                    raise ConfigError(
                        f"{source}: pools[{i}]: duplicate {what}: the {name} is also in {other}"
                    )
                seen[f"{what}:{value}"] = f"pool {pc.name!r}"
        preset = PRESETS[pc.provider]
        patterns = tuple(HostPattern.parse(h) for h in (pc.hosts or preset.hosts))
        usages = pc.usages_url or (KIMI_USAGES_URL if pc.provider == "kimi-code" else None)
        poll = pc.usage_poll_seconds if usages else 0.0
        pools.append(
            Pool(
                pc.name,
                preset,
                patterns,
                pc.strategy,
                tuple(keys),
                pc.affinity_header,
                usages,
                poll,
            )
        )
    _no_duplicate_hosts(pools, source)
    clients = () if lenient else _clients(cfg, pools, base_dir, env, source)
    try:
        state_dir = _path(cfg.state_dir, base_dir, "state_dir")
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    cluster = None
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
            token = cc.as_key().resolve(base_dir, env)
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
        limits = _merge_limits(pc.key_limits, kc.limits)
        try:
            secret = kc.resolve(base_dir, env)
        except ValueError as e:
            if not lenient or kc.key is not None:  # only a secret kept elsewhere may be absent
                where = _join_loc(f"pools[{i}].keys[{j}]", str(e))
                raise ConfigError(f"{source}: {where}") from None
            keys.append(
                Key(kc.label, SecretStr(""), "", pc.name, kc.disabled, kc.weight, limits, str(e))
            )
            continue
        keys.append(_key(kc.label, secret, pc.name, kc.disabled, kc.weight, limits))
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
                secret = KeyConfig(label=a.label, key=a.secret).resolve(base_dir, env)
            except (ValidationError, ValueError) as e:
                why = _describe(e) if isinstance(e, ValidationError) else str(e)
                raise ConfigError(f"{source}: pools[{i}].{field_name}: {a.source}: {why}") from None
            limits = _merge_limits(pc.key_limits, None)
            keys.append(_key(a.label, secret, pc.name, a.disabled, 1.0, limits))
    return keys


def _key(
    label: str, secret: SecretStr, pool: str, disabled: bool, weight: float, limits: LimitsConfig
) -> Key:
    fp = fingerprint(secret.get_secret_value())
    return Key(label, secret, fp, pool, disabled, weight, limits)


def _merge_limits(default: LimitsConfig | None, own: LimitsConfig | None) -> LimitsConfig:
    """A key's limits: its own fields over the pool's `key_limits`."""
    merged = default.model_dump(exclude_none=True) if default else {}
    merged |= own.model_dump(exclude_none=True) if own else {}
    return LimitsConfig(**merged)


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


def _no_duplicates(values: dict[str, str], what: str) -> None:
    """Raise naming both places of the first value given twice (keys are field paths)."""
    seen: dict[str, str] = {}
    for path, v in values.items():
        if v in seen:
            raise ValueError(f"{path}: duplicate {what} {v!r} (also at {seen[v]})")
        seen[v] = path


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
