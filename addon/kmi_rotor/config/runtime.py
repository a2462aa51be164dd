"""What the proxy runs on: pools of resolved keys, client tokens, the settings as a whole.

Built by `loading` from the validated models of `schema`; frozen, and never printing a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from ..cluster.settings import Cluster
from ..core.hosts import HostPattern
from ..core.presets import PRESETS, LimitScope, Preset
from ..core.secrets import fingerprint
from .schema import (
    FailoverConfig,
    GlobalLimits,
    HealthConfig,
    LimitsConfig,
    PoolConfig,
    StreamingConfig,
)

KIMI_USAGES_URL = "https://api.kimi.com/coding/v1/usages"


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
    limit_scope: LimitScope = "key"
    """How the provider scopes its rate limits (the pool's setting, else the preset's)."""
    model_limits: tuple[tuple[str, LimitsConfig], ...] = ()
    """Local limits of each key of the pool for one model: (model name, limits)."""

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


def build_pool(pc: PoolConfig, keys: list[Key]) -> Pool:
    """The pool as it runs: the preset's hosts unless the file lists its own, and the usage
    endpoint (with its polling) only where there is one."""
    preset = PRESETS[pc.provider]
    usages = pc.usages_url or (KIMI_USAGES_URL if pc.provider == "kimi-code" else None)
    return Pool(
        name=pc.name,
        preset=preset,
        hosts=tuple(HostPattern.parse(h) for h in (pc.hosts or preset.hosts)),
        strategy=pc.strategy,
        keys=tuple(keys),
        affinity_header=pc.affinity_header,
        usages_url=usages,
        usage_poll_seconds=pc.usage_poll_seconds if usages else 0.0,
        limit_scope=pc.limit_scope or preset.limit_scope,
        model_limits=tuple((pc.model_limits or {}).items()),
    )


def build_key(
    label: str, secret: SecretStr, pool: str, disabled: bool, weight: float, limits: LimitsConfig
) -> Key:
    """A key whose secret was read: its fingerprint computed once, here."""
    fp = fingerprint(secret.get_secret_value())
    return Key(label, secret, fp, pool, disabled, weight, limits)


def key_limits(default: LimitsConfig | None, own: LimitsConfig | None) -> LimitsConfig:
    """A key's limits: its own fields over the pool's `key_limits`."""
    merged = default.model_dump(exclude_none=True) if default else {}
    merged |= own.model_dump(exclude_none=True) if own else {}
    return LimitsConfig(**merged)
