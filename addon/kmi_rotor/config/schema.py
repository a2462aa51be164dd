"""The configuration file as validated models: every field, its default, its bounds.

Nothing here reads a file or the environment; `loading` does, and turns these models into
the runtime objects of `runtime`. Every model forbids unknown fields and is strict: a bool is
no number (`concurrency = true`), nor a string a number.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    create_model,
    field_validator,
    model_validator,
)

from ..cluster.settings import ClusterConfig
from ..core.hosts import HostPattern
from ..core.limiter import Limits
from ..core.presets import PRESETS, LimitScope
from ..core.scope import MAX_MODEL

DEFAULT_STATE_DIR = "~/.kmi-rotor"
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
MAX_SECONDS = 366 * 86400.0
"""Longest duration a health setting may name: beyond it, times stop being representable."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


def _limit_fields() -> dict[str, Any]:
    """One optional positive integer per field of `core.limiter.Limits`: the limiter's dataclass
    is the one list of limits, so a limit added there is at once a field of the file."""
    return {f.name: (int | None, Field(None, gt=0)) for f in fields(Limits)}


LimitsConfig = create_model(
    "LimitsConfig",
    __base__=_Model,
    __module__=__name__,
    __doc__="Limits of one scope (the whole proxy, a pool's keys, or one key). Absent = unlimited.",
    **_limit_fields(),
)


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


Strategy = Literal["round-robin", "headroom", "sticky", "weighted"]


# A new pool field: a line here, one in `runtime.Pool` and one in `runtime.build_pool`; a check
# that involves several fields is one more validator.
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
    limit_scope: LimitScope | None = Field(
        None,
        description='How the provider scopes rate limits: "key", "model" or "model_class" '
        "(default: the preset's).",
    )
    model_limits: dict[str, LimitsConfig] | None = Field(
        None,
        description="Local limits of each key for requests of one model, by model name "
        "(as the request names it); over the key's own limits.",
    )

    @field_validator("model_limits")
    @classmethod
    def _model_names(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in v or {}:
            if not name.strip() or len(name) > MAX_MODEL or not name.isprintable():
                raise ValueError(f"{name!r} is not a model name")
        return v

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


def _no_duplicates(values: dict[str, str], what: str) -> None:
    """Raise naming both places of the first value given twice (keys are field paths)."""
    seen: dict[str, str] = {}
    for path, v in values.items():
        if v in seen:
            raise ValueError(f"{path}: duplicate {what} {v!r} (also at {seen[v]})")
        seen[v] = path
