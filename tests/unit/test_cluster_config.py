"""The [cluster] table and a process's share of the limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kmi_rotor.cluster.settings import connect, mask_url
from kmi_rotor.config import ConfigError, from_dict
from kmi_rotor.core.limiter import Limits
from kmi_rotor.core.share import scaled

SOURCE = Path("/tmp/x/rotor.toml")
POOL = {
    "name": "p",
    "provider": "generic",
    "hosts": ["llm.test"],
    "keys": [{"label": "a", "key": "sk-a-000000000000000000000000"}],
}


def load(cluster: dict[str, Any] | None, env: dict[str, str] | None = None):
    raw: dict[str, Any] = {"state_dir": "/tmp/x/state", "pools": [POOL]}
    if cluster is not None:
        raw["cluster"] = cluster
    return from_dict(raw, SOURCE, env=env or {})


def test_without_cluster_the_state_stays_in_process():
    assert load(None).cluster is None


def test_a_url_with_user_and_password_is_used_and_never_shown():
    s = load({"redis_url": "rediss://team:s3cret-pass@redis.internal:6380/2"})
    assert s.cluster is not None
    assert s.cluster.url.get_secret_value() == "rediss://team:s3cret-pass@redis.internal:6380/2"
    assert s.cluster.shown_url == "rediss://team:***@redis.internal:6380/2"
    assert "s3cret" not in repr(s.cluster) and "s3cret" not in repr(s)
    assert (s.cluster.prefix, s.cluster.on_redis_down) == ("kmi-rotor", "local")


def test_the_url_can_come_from_the_environment():
    s = load(
        {"redis_url_env": "TEAM_REDIS", "prefix": "team-a", "on_redis_down": "refuse"},
        {"TEAM_REDIS": "redis://127.0.0.1:6379/0"},
    )
    assert s.cluster is not None and s.cluster.shown_url == "redis://127.0.0.1:6379/0"
    assert (s.cluster.prefix, s.cluster.on_redis_down) == ("team-a", "refuse")


@pytest.mark.parametrize(
    ("cluster", "env", "message"),
    [
        ({}, {}, "exactly one of redis_url and redis_url_env"),
        ({"redis_url": "redis://h", "redis_url_env": "X"}, {}, "exactly one"),
        ({"redis_url_env": "TEAM_REDIS"}, {}, "$TEAM_REDIS is not set"),
        ({"redis_url": "http://u:hunter2@h/0"}, {}, "redis:// or rediss://"),
        ({"redis_url": "redis://u:hunter2@/0"}, {}, "names no host"),
        ({"redis_url": "redis://u:hunter2@h/db"}, {}, "database number"),
        ({"redis_url": "redis://u:hunter2@h:99999/0"}, {}, "not a valid URL"),
        ({"redis_url": "redis://h", "on_redis_down": "ignore"}, {}, "on_redis_down"),
        ({"redis_url": "redis://h", "prefix": "a b"}, {}, "prefix"),
        ({"redis_url": "redis://h", "lease_seconds": 0}, {}, "lease_seconds"),
        ({"redis_url": "redis://h", "url": "x"}, {}, "unknown field"),
    ],
)
def test_a_bad_cluster_table_is_one_clear_line_without_the_password(cluster, env, message):
    with pytest.raises(ConfigError) as e:
        load(cluster, env)
    assert message in str(e.value)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://token@h/0", "redis://***@h/0"),
        ("rediss://u:p@[::1]:6380/0?ssl_cert_reqs=none", "rediss://u:***@[::1]:6380/0"),
        ("redis://u:p@h:notaport/0", "<invalid URL>"),
    ],
)
def test_mask_url(url, shown):
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    ("limits", "n", "share"),
    [
        (Limits(requests_per_second=6), 3, Limits(requests_per_second=2)),
        (
            Limits(requests_per_second=7, tokens_per_minute=1000),
            3,
            Limits(requests_per_second=2, tokens_per_minute=333),
        ),
        (
            Limits(requests_per_second=2, concurrency=2),
            3,
            Limits(requests_per_second=1, concurrency=1),
        ),
        (Limits(requests_per_minute=10), 1, Limits(requests_per_minute=10)),
        (Limits(requests_per_minute=10), 0, Limits(requests_per_minute=10)),
        (Limits(), 5, Limits()),
    ],
)
def test_a_process_share_of_each_limit(limits, n, share):
    assert scaled(limits, n) == share


async def test_a_client_closed_closes_its_connections(server) -> None:
    """A client of `connect` owns its pool: closed (a configuration replaced, the proxy
    stopping), it leaves no connection open to Redis, rather than sockets left to the garbage
    collector."""
    c = connect(server.url)
    await asyncio.gather(*(c.ping() for _ in range(4)))  # a few connections opened at once
    watcher = connect(server.url, 1)
    try:
        assert await _clients(watcher) > 1
        await c.aclose()
        assert await _clients(watcher) == 1  # the watcher's own
    finally:
        await watcher.aclose()


async def _clients(client) -> int:
    return len(await client.client_list())
