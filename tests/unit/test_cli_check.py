"""The check's HTTP client against odd servers on loopback: it reports, it never follows, it
never hangs, and a key never appears in what it says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import h11
import pytest

from kmi_rotor.cli_check import MAX_BODY, fetch
from kmi_rotor.core.check import Probe

SECRET = "sk-client-test-000000000000000000ff"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/coding/v1/usages"


@pytest.fixture
async def seen() -> AsyncIterator[list[bytes]]:
    yield []


def answering(raw: bytes, seen: list[bytes]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(raw)
        await writer.drain()
        writer.close()

    return handle


def probe(url: str) -> Probe:
    return Probe(url, "authorization", True, (("x-extra", "1"),), usages=True)


async def test_the_key_goes_in_its_header_and_the_answer_comes_back(seen: list[bytes]) -> None:
    server, url = await serve(
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}", seen)
    )
    async with server:
        status, headers, body = await fetch(probe(url), SECRET, 5.0)
    assert (status, body) == (200, b"{}") and ("x-a", "b") in headers
    request = seen[0].decode()
    assert request.startswith("GET /coding/v1/usages HTTP/1.1\r\n")
    assert f"authorization: Bearer {SECRET}\r\n" in request and "x-extra: 1\r\n" in request


async def test_a_redirect_is_returned_not_followed(seen: list[bytes]) -> None:
    raw = b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/steal\r\nContent-Length: 0\r\n\r\n"
    server, url = await serve(answering(raw, seen))
    async with server:
        status, _, _ = await fetch(probe(url), SECRET, 5.0)
    assert status == 302 and len(seen) == 1


@pytest.mark.parametrize(
    "raw", [b"garbage\r\n\r\n", b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"]
)
async def test_a_broken_answer_is_a_protocol_error(seen: list[bytes], raw: bytes) -> None:
    server, url = await serve(answering(raw, seen))
    async with server:
        with pytest.raises(h11.ProtocolError) as e:
            await fetch(probe(url), SECRET, 5.0)
    assert SECRET not in str(e.value)


async def test_a_huge_body_is_cut(seen: list[bytes]) -> None:
    size = MAX_BODY * 4
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    server, url = await serve(answering(raw, seen))
    async with server:
        status, _, body = await fetch(probe(url), SECRET, 5.0)
    assert status == 200 and len(body) == MAX_BODY


async def test_a_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server, url = await serve(silent)
    async with server:
        with pytest.raises(TimeoutError):
            await fetch(probe(url), SECRET, 0.3)


async def test_plain_http_goes_to_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        await fetch(probe("http://192.0.2.1/usages"), SECRET, 0.3)
