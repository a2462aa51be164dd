"""The configuration: `schema` (the file as validated models), `runtime` (the pools, keys and
settings the proxy runs on) and `loading` (reading the file and the environment into them,
every problem one `ConfigError` line). The names other modules use are re-exported here."""

from .loading import (
    CONFIG_ENV,
    MIN_TOKEN,
    ConfigError,
    find_config,
    from_dict,
    load,
    one_line,
)
from .runtime import Client, Key, Pool, Settings
from .schema import (
    DEFAULT_STATE_DIR,
    LABEL_RE,
    ClientConfig,
    FailoverConfig,
    GlobalLimits,
    HealthConfig,
    KeyConfig,
    LimitsConfig,
    PoolConfig,
    RotorConfig,
    StreamingConfig,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_STATE_DIR",
    "LABEL_RE",
    "MIN_TOKEN",
    "Client",
    "ClientConfig",
    "ConfigError",
    "FailoverConfig",
    "GlobalLimits",
    "HealthConfig",
    "Key",
    "KeyConfig",
    "LimitsConfig",
    "Pool",
    "PoolConfig",
    "RotorConfig",
    "Settings",
    "StreamingConfig",
    "find_config",
    "from_dict",
    "load",
    "one_line",
]
