"""The `[cluster]` table: where the shared state lives (Redis) and what to do without it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

PREFIX_RE = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
SCHEMES = ("redis", "rediss")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class ClusterConfig(BaseModel):
    """As written in the file. Exactly one of `redis_url` and `redis_url_env`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    redis_url: SecretStr | None = Field(None, description="redis:// or rediss:// URL.")
    redis_url_env: str | None = Field(None, description="Environment variable holding the URL.")
    prefix: str = Field("kmi-rotor", pattern=PREFIX_RE, description="Namespace of every key.")
    on_redis_down: Literal["local", "refuse"] = "local"
    lease_seconds: float = Field(
        15.0, ge=1.0, le=600.0, description="A dead process's concurrency slots free after this."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ClusterConfig:
        if (self.redis_url is None) == (self.redis_url_env is None):
            raise ValueError("give exactly one of redis_url and redis_url_env")
        if self.redis_url_env is not None and not ENV_NAME_RE.fullmatch(self.redis_url_env):
            raise ValueError("redis_url_env: not an environment variable name")
        return self


@dataclass(frozen=True)
class Cluster:
    """The resolved `[cluster]`: a checked URL (its password never shown) and the policy."""

    url: SecretStr
    prefix: str
    on_redis_down: str
    lease_seconds: float

    @property
    def shown_url(self) -> str:
        return mask_url(self.url.get_secret_value())

    def __repr__(self) -> str:
        return f"Cluster({self.shown_url!r}, prefix={self.prefix!r})"


def resolve(cfg: ClusterConfig, env: Mapping[str, str]) -> Cluster:
    """The URL from the file or the environment, checked; ValueError names the field."""
    if cfg.redis_url is not None:
        field, url = "redis_url", cfg.redis_url.get_secret_value()
    else:
        field = "redis_url_env"
        url = env.get(cfg.redis_url_env or "", "")
        if not url:
            raise ValueError(f"cluster.redis_url_env: ${cfg.redis_url_env} is not set")
    check_url(url, f"cluster.{field}")
    return Cluster(SecretStr(url), cfg.prefix, cfg.on_redis_down, cfg.lease_seconds)


def check_url(url: str, field: str) -> None:
    """A usable Redis URL or ValueError (which never quotes the URL: it may hold a password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{field}: not a valid URL") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{field}: the scheme must be redis:// or rediss://")
    if not parts.hostname:
        raise ValueError(f"{field}: the URL names no host")
    if port == 0:
        raise ValueError(f"{field}: port 0 is not a port")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"{field}: the path must be a database number, like /0")


def mask_url(url: str) -> str:
    """The URL with its password (and a lone user name, which may be a token) as ***."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc}"
    elif parts.username:
        netloc = f"***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def connect(url: str, connections: int = 16) -> Any:
    """An asyncio Redis client on a bounded pool: a burst of requests queues for a connection
    (a few microseconds each) instead of opening dozens at once, each slower than the bound."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=1.0,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        # A pooled connection to a Redis that restarted fails once: connect again at once
        # (within the caller's bound) rather than report the restarted Redis as down.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )
    # The client owns its pool: closing it (a configuration replaced, the proxy stopping)
    # closes the pool's connections too, rather than leaving them to the garbage collector.
    return aioredis.Redis.from_pool(pool)
