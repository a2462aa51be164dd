"""Fixtures the unit tests of the shared (Redis) state have in common: one redis-server per
module, and a client on an emptied database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer
from testkit import need_redis

from kmi_rotor.cluster.settings import connect


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free port (skipped outside CI when none is installed)."""
    need_redis()
    srv = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = connect(server.url)
    await c.flushdb()
    yield c
    await c.aclose()
