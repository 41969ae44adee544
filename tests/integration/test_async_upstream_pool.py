"""The async upstream client holds as many streams open at once as admission lets in.

A stream holds its upstream connection for as long as the LLM writes (HTTP/1.1): a
cap on the client's pool would be a hidden cap on the calls in flight per worker, and
the calls beyond it would wait, admitted and reserved, for another stream to end.
"""

from __future__ import annotations

import asyncio

import pytest

from llm_quota.gateway.upstream import HttpUpstream

#: More than the 200 connections the async client's pool was once capped at.
STREAMS = 240
FIRST = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'3b\r\ndata: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n\r\n'
)


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream that sends every stream's first chunk, then holds it open."""
    await reader.readuntil(b"\r\n\r\n")  # the body is left unread: it is never needed
    writer.write(FIRST)
    await reader.read()  # until the client closes
    writer.close()


async def _open_all(client: str) -> int:
    server = await asyncio.start_server(_hold, "127.0.0.1", 0, backlog=STREAMS)
    port = server.sockets[0].getsockname()[1]
    upstream = HttpUpstream(f"http://127.0.0.1:{port}/v1", "sk-test",
                            connect_timeout=5, read_timeout=60)  # fmt: skip
    if client == "httpx":
        upstream._async_sender = False  # as where aiohttp is not installed
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    streams, readers = [], []

    async def first() -> None:
        stream = await upstream.astream(body)
        streams.append(stream)
        # Kept: a reader dropped is closed once garbage, and gives its connection back.
        readers.append(stream.__aiter__())
        await readers[-1].__anext__()

    try:
        async with server:
            await asyncio.wait_for(asyncio.gather(*(first() for _ in range(STREAMS))), 20)
            return len(readers)
    finally:
        for reader in readers:
            await reader.aclose()
        for stream in streams:
            await stream.aclose()
        if client == "httpx":
            await (await upstream.aclient()).aclose()


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_the_async_upstream_client_holds_every_admitted_stream_open_at_once(client):
    """Every stream's first chunk arrives while all the others are still open."""
    assert asyncio.run(_open_all(client)) == STREAMS


def test_a_burst_on_a_fresh_loop_builds_one_client(monkeypatch):
    """Calls that arrive while the loop's client is being built wait for that build,
    rather than each build (and leak) one of their own."""
    from llm_quota.gateway import upstream as module

    built = []

    def counted(options):
        built.append(module_build(options))
        return built[-1]

    module_build = module._async_client
    monkeypatch.setattr(module, "_async_client", counted)
    upstream = HttpUpstream("http://127.0.0.1:9/v1", None, connect_timeout=1, read_timeout=1)

    async def burst() -> set[int]:
        clients = await asyncio.gather(*(upstream.aclient() for _ in range(50)))
        for client in built:
            await client.aclose()
        return {id(client) for client in clients}

    assert len(asyncio.run(burst())) == 1
    assert len(built) == 1
