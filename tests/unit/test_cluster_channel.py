"""The scripts' own connection to Redis, against a real redis-server: replies go to their own
calls (pipelined, given up, after a restart), errors are the ones the callers map, and what
a URL holds (credentials, database) is used and never shown."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis_server import RedisServer, free_port

from kmi_rotor.cluster import channel as channel_module
from kmi_rotor.cluster.channel import ScriptChannel, pack
from kmi_rotor.cluster.limits import SharedDown, SharedLimits

ECHO = "return {ARGV[1], #KEYS}"
SHA = hashlib.sha1(ECHO.encode()).hexdigest().encode()


@pytest.fixture
async def channel(client: aioredis.Redis, server: RedisServer) -> AsyncIterator[ScriptChannel]:
    ch = ScriptChannel.for_url(server.url)
    assert ch is not None
    yield ch
    await ch.aclose()


async def echo(ch: ScriptChannel, arg: bytes, keys: tuple[bytes, ...] = ()) -> list[object]:
    return await ch.evalsha(ECHO, SHA, keys, (arg,))  # type: ignore[no-any-return]


def test_a_command_is_packed_as_redis_reads_it() -> None:
    assert pack(b"EVALSHA", b"ab", b"0") == b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n"
    assert pack(b"") == b"*1\r\n$0\r\n\r\n"


async def test_a_script_redis_does_not_know_is_loaded_and_answers(channel, client) -> None:
    await client.script_flush()
    assert await echo(channel, b"one", (b"k",)) == [b"one", 1]
    assert await client.script_exists(SHA.decode()) == [True]  # known from now on
    assert await echo(channel, b"two") == [b"two", 0]


async def test_pipelined_calls_each_get_their_own_reply(channel) -> None:
    args = [b"%d" % i for i in range(300)]
    replies = await asyncio.gather(*(echo(channel, a) for a in args))
    assert [r[0] for r in replies] == args


async def test_the_calls_of_one_turn_of_the_loop_go_in_one_write(channel, monkeypatch) -> None:
    await echo(channel, b"warm")  # connected: the next calls are sent at once
    conn = channel._conn
    assert conn is not None and conn.transport is not None
    writes = []
    write = conn.transport.write
    monkeypatch.setattr(conn.transport, "write", lambda data: writes.append(data) or write(data))
    replies = await asyncio.gather(*(echo(channel, b"%d" % i) for i in range(5)))
    assert [r[0] for r in replies] == [b"0", b"1", b"2", b"3", b"4"]
    assert len(writes) == 1 and writes[0].count(b"EVALSHA") == 5


async def test_a_call_given_up_leaves_the_next_reply_to_the_next_call(channel) -> None:
    await echo(channel, b"warm")  # connected: the next call is sent at once
    given_up = asyncio.ensure_future(echo(channel, b"first"))
    await asyncio.sleep(0)  # sent, not answered
    given_up.cancel()
    assert await echo(channel, b"second") == [b"second", 0]
    assert given_up.cancelled()


SLOW = """
local t = redis.call('TIME')
local start = t[1] * 1000 + t[2] / 1000
repeat t = redis.call('TIME') until t[1] * 1000 + t[2] / 1000 - start >= tonumber(ARGV[1])
return ARGV[2]
"""


async def test_a_call_bounded_in_time_fails_and_the_next_reply_goes_to_the_next_call(
    channel,
) -> None:
    sha = hashlib.sha1(SLOW.encode()).hexdigest().encode()
    await channel.evalsha(SLOW, sha, (), (b"0", b"loaded"))  # known: EVALSHA runs it at once
    slow = asyncio.ensure_future(channel.evalsha(SLOW, sha, (), (b"1000", b"slow"), within=0.05))
    after = asyncio.ensure_future(echo(channel, b"after"))  # sent behind it, answered after it
    with pytest.raises(TimeoutError):
        await slow  # Redis is still running it
    assert not after.done()  # its reply comes after the late one, which goes to nobody
    assert await after == [b"after", 0]
    bounded = await channel.evalsha(ECHO, SHA, (), (b"in time",), within=5.0)
    assert bounded == [b"in time", 0]


async def test_an_error_reply_is_a_response_error(channel) -> None:
    bad = "return redis.call('NOSUCHCOMMAND')"
    sha = hashlib.sha1(bad.encode()).hexdigest().encode()
    with pytest.raises(ResponseError):
        await channel.evalsha(bad, sha, (), ())
    assert await echo(channel, b"after") == [b"after", 0]  # the connection goes on


async def test_a_restarted_redis_is_connected_again(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    ch = ScriptChannel.for_url(srv.url)
    assert ch is not None
    try:
        assert await echo(ch, b"before") == [b"before", 0]
        srv.kill()
        with pytest.raises((ConnectionError, OSError)):
            await echo(ch, b"down")
        srv.start()  # same port, empty script cache
        assert await echo(ch, b"back") == [b"back", 0]
    finally:
        await ch.aclose()
        srv.stop()


async def test_an_unreachable_redis_is_shared_down_at_once() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    client = aioredis.from_url(url)
    limits = SharedLimits(client, "t", "p1", 15.0, ScriptChannel.for_url(url))
    with pytest.raises(SharedDown) as e:
        await limits.call(echo(limits.channel, b"x"))  # type: ignore[arg-type]
    assert not e.value.slow
    await client.aclose()


async def test_credentials_and_database_of_the_url_are_used(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    admin = aioredis.from_url(srv.url)
    try:
        await admin.config_set("requirepass", "s3cret-pass")
        ch = ScriptChannel.for_url(f"redis://:s3cret-pass@127.0.0.1:{srv.port}/3")
        assert ch is not None
        store = "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])"
        sha = hashlib.sha1(store.encode()).hexdigest().encode()
        assert await ch.evalsha(store, sha, (b"k",), (b"v",)) == b"v"
        await ch.aclose()
        db3 = aioredis.from_url(f"redis://:s3cret-pass@127.0.0.1:{srv.port}/3")
        assert await db3.get("k") == b"v"
        await db3.aclose()
        wrong = ScriptChannel.for_url(f"redis://:not-it@127.0.0.1:{srv.port}/0")
        assert wrong is not None
        with pytest.raises(AuthenticationError) as e:
            await echo(wrong, b"x")
        assert "not-it" not in str(e.value)
        await wrong.aclose()
    finally:
        await admin.aclose()
        srv.stop()


async def test_what_is_not_redis_protocol_closes_the_connection() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"?not redis\r\n")
        await writer.drain()
        await reader.read(100)
        writer.close()
        await writer.wait_closed()  # closed before the server is: no transport outlives it

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ch = ScriptChannel.for_url(f"redis://127.0.0.1:{port}/0")
    assert ch is not None
    with pytest.raises(ConnectionError, match="not its protocol"):
        await asyncio.wait_for(echo(ch, b"x"), 5.0)
    await ch.aclose()
    server.close()
    await server.wait_closed()


async def test_a_connection_that_stops_answering_is_given_up(monkeypatch) -> None:
    """A peer gone without closing the connection (half-open): calls time out, and once the
    oldest has waited STALLED, the next call opens another connection."""
    monkeypatch.setattr(channel_module, "STALLED", 0.2)
    accepted = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # reads every command, answers none

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ch = ScriptChannel.for_url(f"redis://127.0.0.1:{port}/0")
    assert ch is not None

    async def connections(n: int) -> int:
        for _ in range(500):  # however slow the machine
            if len(accepted) >= n:
                break
            await asyncio.sleep(0.01)
        return len(accepted)

    first = asyncio.ensure_future(echo(ch, b"one"))
    assert await connections(1) == 1
    await asyncio.sleep(0.25)  # the call sent on it has waited longer than STALLED
    assert not first.done()
    later = asyncio.ensure_future(echo(ch, b"two"))
    assert await connections(2) == 2
    with pytest.raises(ConnectionError, match="no reply"):
        await first  # failed with the connection given up
    later.cancel()
    await ch.aclose()
    for writer in accepted:
        writer.close()
        await writer.wait_closed()  # closed before the server is: no transport outlives it
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6390/2", ("127.0.0.1", 6390, 2, 0)),
        ("redis://localhost", ("localhost", 6379, 0, 0)),
        ("redis://:p%40ss@h:1/0", ("h", 1, 0, 1)),
        ("redis://user:pw@h:1", ("h", 1, 0, 1)),
    ],
)
def test_a_redis_url_gives_its_host_port_database_and_credentials(
    url: str, expected: tuple[str, int, int, int]
) -> None:
    ch = ScriptChannel.for_url(url)
    assert ch is not None
    host, port, db, hellos = expected
    assert (ch.host, ch.port) == (host, port)
    assert len(ch._hello) == hellos + (1 if db else 0)


def test_a_password_is_sent_unquoted_and_with_its_user() -> None:
    ch = ScriptChannel.for_url("redis://me:p%40ss@h:1")
    assert ch is not None
    assert ch._hello[0][0] == pack(b"AUTH", b"me", b"p@ss")


def test_a_tls_url_has_no_channel() -> None:
    assert ScriptChannel.for_url("rediss://h:6380/0") is None
