"""``worker.exchange.transport.FastTransport`` under httpx, over real loopback sockets.

Servers here are the simulator (in this event loop), the hostile gateway in front of it, and
tiny asyncio servers that answer byte for byte as each test needs and count the connections
they accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import gzip
import ipaddress
import socket
import ssl
import struct
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.hostile_gateway import Gateway, Mangle
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.signing import PapiAuth
from worker.exchange.transport import MAX_HEAD_BYTES, FastTransport, parse_head
from worker.tools.devstack import free_port
from worker.tools.sim.app import SimConfig, SimState, seed_order
from worker.tools.sim.server import running_sim, state_from_accounts

ALGO_CANCEL = "/papi/v1/um/algo/order"


def client(
    url: str, transport: FastTransport | None = None, **timeouts: float
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        transport=transport or FastTransport(max_connections=4),
        timeout=httpx.Timeout(timeouts.pop("timeout", 5.0), **timeouts),
    )


# -- tiny servers -------------------------------------------------------------------------------


@dataclass
class Tiny:
    """What a tiny server saw: connections accepted, most open at once, requests read."""

    url: str = ""
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Tiny], Awaitable[None]]


@contextlib.asynccontextmanager
async def tiny_server(handler: Handler) -> AsyncIterator[Tiny]:
    tiny = Tiny()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tiny.tasks.add(task)  # type: ignore[arg-type]
        tiny.connections += 1
        tiny.open_now += 1
        tiny.most_open = max(tiny.most_open, tiny.open_now)
        try:
            await handler(reader, writer, tiny)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            tiny.open_now -= 1
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    tiny.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield tiny
    finally:
        server.close()
        for task in tiny.tasks:
            task.cancel()
        await asyncio.gather(*tiny.tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader, tiny: Tiny) -> bytes | None:
    """One request (head and body, de-chunked), or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    fields = head.decode("latin-1").lower()
    body = b""
    if "transfer-encoding: chunked" in fields:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
    elif "content-length:" in fields:
        length = int(fields.split("content-length:")[1].split("\r\n")[0])
        body = await reader.readexactly(length)
    tiny.requests.append(head + body)
    return head + body


def answer(body: bytes = b'{"ok":true}', status: str = "200 OK", *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(head).encode("latin-1") + body


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
    """A well-behaved server: one answer per request, the connection kept."""
    while await read_request(reader, t) is not None:
        writer.write(answer(b'{"n":%d}' % len(t.requests)))
        await writer.drain()


def scripted(*replies: bytes, close: bool = True) -> Handler:
    """Answers the first request with ``replies`` written one by one (a short pause between),
    then closes the connection (or leaves it open, not reading)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        await read_request(reader, t)
        for part in replies:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)
        if not close:
            await asyncio.sleep(3600)

    return handle


# -- against the simulator ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sim(accounts: dict[str, Credentials]) -> AsyncIterator[tuple[SimState, str]]:
    state = state_from_accounts(accounts, SimConfig())
    async with running_sim(state) as url:
        yield state, url


def algo(state: SimState, account: str = "desk-0") -> int:
    return int(seed_order(state, {"account": account, "kind": "algo"})["algo_id"])


async def signed_cancel(
    http: httpx.AsyncClient, creds: Credentials, algo_id: int
) -> tuple[httpx.Response, bytes]:
    """As the PAPI client does it: signed per send, streamed, read, closed."""
    auth = PapiAuth(creds.api_key, creds.signer, now_ms, recv_window_ms=5000)
    request = http.build_request("DELETE", f"{ALGO_CANCEL}?algoId={algo_id}")
    response = await http.send(request, auth=auth, stream=True)
    try:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    finally:
        await response.aclose()
    return response, body


async def test_signed_cancels_reach_the_simulator_over_few_connections(
    accounts: dict[str, Credentials],
) -> None:
    transport = FastTransport(max_connections=4)
    async with sim(accounts) as (state, url), client(url, transport) as http:
        aliases = ["desk-0", "desk-1", "desk-ed", "desk-rsa"]
        ids = [(alias, algo(state, alias)) for alias in aliases for _ in range(10)]
        answers = await asyncio.gather(
            *[signed_cancel(http, accounts[alias], algo_id) for alias, algo_id in ids]
        )
        assert [r.status_code for r, _ in answers] == [200] * len(ids)
        assert all(orjson.loads(body) == {"complete": True} for _, body in answers)
        assert transport.connections() <= 4
        # The same order again: the exchange's error answer comes back as it is.
        again, body = await signed_cancel(http, accounts["desk-0"], ids[0][1])
        assert again.status_code == 400
        assert orjson.loads(body)["code"] == -2011
        assert len([r for r in state.requests if r["method"] == "DELETE"]) == len(ids) + 1


async def test_chunked_answer_through_the_gateway_is_read_whole(
    accounts: dict[str, Credentials],
) -> None:
    async with sim(accounts) as (state, url):
        gateway = Gateway(url)
        async with gateway.running() as gateway_url, client(gateway_url) as http:
            gateway.queue("DELETE", Mangle("chunked"))
            response, body = await signed_cancel(http, accounts["desk-0"], algo(state))
            assert response.status_code == 200
            assert "content-length" not in response.headers
            assert orjson.loads(body) == {"complete": True}


async def test_a_lying_content_encoding_is_a_decoding_error(
    accounts: dict[str, Credentials],
) -> None:
    async with sim(accounts) as (state, url):
        gateway = Gateway(url)
        async with gateway.running() as gateway_url, client(gateway_url) as http:
            gateway.queue("DELETE", Mangle("bad_encoding"))
            with pytest.raises(httpx.DecodingError):
                await signed_cancel(http, accounts["desk-0"], algo(state))
            # The connection was the gateway's to close; the next request is fine.
            response, _ = await signed_cancel(http, accounts["desk-0"], algo(state))
            assert response.status_code == 200


async def test_a_truncated_body_is_a_remote_protocol_error(
    accounts: dict[str, Credentials],
) -> None:
    async with sim(accounts) as (state, url):
        gateway = Gateway(url)
        async with gateway.running() as gateway_url, client(gateway_url) as http:
            gateway.queue("DELETE", Mangle("truncated"))
            with pytest.raises(httpx.RemoteProtocolError, match="Content-Length"):
                await signed_cancel(http, accounts["desk-0"], algo(state))


async def test_a_bare_503_and_an_oversized_body_stream_as_they_come(
    accounts: dict[str, Credentials],
) -> None:
    async with sim(accounts) as (state, url):
        gateway = Gateway(url)
        async with gateway.running() as gateway_url, client(gateway_url) as http:
            gateway.queue("DELETE", Mangle("bare_503"), Mangle("huge", size=6 * 1024 * 1024))
            response, body = await signed_cancel(http, accounts["desk-0"], algo(state))
            assert (response.status_code, body) == (503, b"")
            # A caller's size cap stops reading part-way; the connection is dropped.
            auth = PapiAuth(accounts["desk-0"].api_key, accounts["desk-0"].signer, now_ms)
            request = http.build_request("DELETE", f"{ALGO_CANCEL}?algoId={algo(state)}")
            response = await http.send(request, auth=auth, stream=True)
            seen = 0
            async for chunk in response.aiter_bytes():
                seen += len(chunk)
                if seen > 1024 * 1024:
                    break
            await response.aclose()
            assert 1024 * 1024 < seen < 6 * 1024 * 1024
            response, _ = await signed_cancel(http, accounts["desk-0"], algo(state))
            assert response.status_code == 200


# -- connections --------------------------------------------------------------------------------


async def test_keep_alive_connection_is_reused() -> None:
    async with tiny_server(keep_alive) as tiny, client(tiny.url) as http:
        for n in range(1, 21):
            response = await http.get(f"/q?n={n}")
            assert response.json() == {"n": n}
        assert tiny.connections == 1
        assert tiny.requests[0].startswith(b"GET /q?n=1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_connection_close_from_the_server_ends_the_connection() -> None:
    async def close_each(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny
    ) -> None:
        await read_request(reader, t)
        writer.write(answer(b"{}", "200 OK", "Connection: close"))
        await writer.drain()
        await asyncio.sleep(3600)  # the client must not wait for the server's close

    async with tiny_server(close_each) as tiny, client(tiny.url) as http:
        for _ in range(3):
            assert (await http.get("/")).json() == {}
        assert tiny.connections == 3


async def test_connection_close_from_the_client_ends_the_connection() -> None:
    async with tiny_server(keep_alive) as tiny, client(tiny.url) as http:
        await http.get("/", headers={"Connection": "close"})
        await http.get("/")
        await http.get("/")
        assert tiny.connections == 2


async def test_an_http_1_0_answer_ends_the_connection() -> None:
    async with (
        tiny_server(
            scripted(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", close=False)
        ) as tiny,
        client(tiny.url) as http,
    ):
        await http.get("/")
        await http.get("/")
        assert tiny.connections == 2


async def test_a_server_closing_idle_connections_costs_a_new_connection_not_an_error() -> None:
    async def close_when_idle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny
    ) -> None:
        await read_request(reader, t)
        writer.write(answer())  # keep-alive as far as the client can tell
        await writer.drain()
        # ... and closed at once, as a server whose idle timeout is shorter than the client's

    async with tiny_server(close_when_idle) as tiny, client(tiny.url) as http:
        await http.get("/")
        await asyncio.sleep(0.1)  # the close has been seen by the event loop
        assert (await http.get("/")).status_code == 200
        # The close has reached this host but the event loop has not run since: the idle
        # connection is found closed before the request is written, not after.
        time.sleep(0.1)  # noqa: ASYNC251 - keeps the event loop from seeing the close
        assert (await http.get("/")).status_code == 200
        assert tiny.connections == 3
        assert len(tiny.requests) == 3


async def test_idle_connections_past_keepalive_expiry_are_not_reused() -> None:
    transport = FastTransport(max_connections=4, keepalive_expiry=0.05)
    async with tiny_server(keep_alive) as tiny, client(tiny.url, transport) as http:
        await http.get("/")
        await http.get("/")
        await asyncio.sleep(0.1)
        await http.get("/")
        assert tiny.connections == 2


async def test_the_pool_bound_holds_under_concurrency() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        while await read_request(reader, t) is not None:
            await asyncio.sleep(0.01)
            writer.write(answer())
            await writer.drain()

    transport = FastTransport(max_connections=3)
    async with tiny_server(slow) as tiny, client(tiny.url, transport) as http:
        responses = await asyncio.gather(*[http.get(f"/{i}") for i in range(60)])
        assert [r.status_code for r in responses] == [200] * 60
        assert tiny.connections == 3
        assert tiny.most_open == 3
        assert transport.connections() == 3


async def test_a_full_pool_times_out_with_pool_timeout() -> None:
    async with (
        tiny_server(scripted(close=False)) as tiny,
        client(tiny.url, FastTransport(max_connections=1), pool=0.1, read=5) as http,
    ):
        hung = asyncio.create_task(http.get("/hangs"))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await http.get("/waits")
        hung.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hung


async def test_a_cancelled_request_frees_its_connection_slot() -> None:
    async def first_hangs(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny
    ) -> None:
        while await read_request(reader, t) is not None:
            if len(t.requests) == 1:
                await asyncio.sleep(3600)
            writer.write(answer())
            await writer.drain()

    transport = FastTransport(max_connections=1)
    async with tiny_server(first_hangs) as tiny, client(tiny.url, transport) as http:
        hung = asyncio.create_task(http.get("/hangs"))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(http.get("/waits"))
        await asyncio.sleep(0.05)
        hung.cancel()
        assert (await asyncio.wait_for(waiting, 5)).status_code == 200
        assert tiny.connections == 2  # the hung one was closed, not reused
        assert transport.connections() == 1


async def test_connect_refused_is_a_connect_error() -> None:
    async with client(f"http://127.0.0.1:{free_port()}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_a_connect_that_hangs_is_a_connect_timeout() -> None:
    # A listener that never accepts, its backlog full: the next SYN goes unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        async with client(f"http://127.0.0.1:{port}", connect=0.2) as http:
            with pytest.raises(httpx.ConnectTimeout):
                await http.get("/")
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_silent_server_is_a_read_timeout() -> None:
    async with tiny_server(scripted(close=False)) as tiny, client(tiny.url, read=0.2) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")
        assert time.monotonic() - started < 2


async def test_a_body_that_stalls_is_a_read_timeout() -> None:
    handler = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", close=False)
    async with tiny_server(handler) as tiny, client(tiny.url, read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")


async def test_a_reset_while_the_body_is_written_is_a_write_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        await reader.readexactly(1)  # the request has started to arrive
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # an RST, not a FIN

    async def big() -> AsyncIterator[bytes]:
        for _ in range(400):
            yield b"x" * 65536

    async with tiny_server(reset) as tiny, client(tiny.url) as http:
        with pytest.raises(httpx.WriteError):
            await http.post("/", content=big())


async def test_a_server_closing_before_answering_is_a_remote_protocol_error() -> None:
    async with tiny_server(scripted()) as tiny, client(tiny.url) as http:
        with pytest.raises(
            httpx.RemoteProtocolError, match="closed the connection before the response head"
        ):
            await http.get("/")


# -- framing ------------------------------------------------------------------------------------


async def test_content_length_body_in_pieces() -> None:
    handler = scripted(b"HTTP/1.1 200 OK\r\nContent-Len", b'gth: 11\r\n\r\n{"a":', b"[1,2]}")
    async with tiny_server(handler) as tiny, client(tiny.url) as http:
        assert (await http.get("/")).json() == {"a": [1, 2]}


async def test_chunked_body_in_pieces_with_extensions_and_trailers() -> None:
    handler = scripted(
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{"a"',
        b"\r\n",
        b"5\r\n:[1,2\r\n3\r\n]}\n\r\n0\r\nX-Trailer: 1\r\n",
        b"\r\n",
        close=False,
    )
    async with tiny_server(handler) as tiny, client(tiny.url) as http:
        response = await http.get("/")
        assert response.content == b'{"a":[1,2]}\n'


async def test_chunked_keep_alive_connection_is_reused() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        while await read_request(reader, t) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"2\r\n{}\r\n0\r\n\r\n")
            await writer.drain()

    async with tiny_server(chunked) as tiny, client(tiny.url) as http:
        for _ in range(5):
            assert (await http.get("/")).json() == {}
        assert tiny.connections == 1


async def test_bytes_after_a_chunked_answer_end_its_connection() -> None:
    async def trailing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        while await read_request(reader, t) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"2\r\n{}\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n")  # an answer unasked
            await writer.drain()

    async with tiny_server(trailing) as tiny, client(tiny.url) as http:
        for _ in range(3):
            assert (await http.get("/")).json() == {}
        assert tiny.connections == 3


async def test_a_body_that_ends_with_the_connection() -> None:
    handler = scripted(b"HTTP/1.1 200 OK\r\n\r\n", b"part one, ", b"part two")
    async with tiny_server(handler) as tiny, client(tiny.url) as http:
        assert (await http.get("/")).content == b"part one, part two"


async def test_answers_without_a_body_keep_the_connection() -> None:
    replies = iter(
        [
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",  # to a HEAD
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ]
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        while await read_request(reader, t) is not None:
            writer.write(next(replies))
            await writer.drain()

    async with tiny_server(handle) as tiny, client(tiny.url) as http:
        assert (await http.get("/")).status_code == 204
        assert (await http.get("/")).status_code == 304
        head = await http.head("/")
        assert (head.status_code, head.content) == (200, b"")
        assert (await http.get("/")).content == b"ok"
        assert tiny.connections == 1


async def test_gzip_content_encoding_is_decoded_by_httpx() -> None:
    packed = gzip.compress(orjson.dumps({"code": 200, "msg": "done"}))
    handler = scripted(answer(packed, "200 OK", "Content-Encoding: gzip"))
    async with tiny_server(handler) as tiny, client(tiny.url) as http:
        assert (await http.get("/")).json() == {"code": 200, "msg": "done"}


async def test_request_bodies_with_length_and_chunked() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one,", b"", b"two"):
            yield part

    async with tiny_server(keep_alive) as tiny, client(tiny.url) as http:
        await http.post("/a", content=b"x" * 100_000)
        await http.post("/b", content=chunks())
        assert tiny.requests[0].endswith(b"\r\n\r\n" + b"x" * 100_000)
        assert b"transfer-encoding: chunked" in tiny.requests[1].lower()
        assert tiny.requests[1].endswith(b"one,two")
        assert tiny.connections == 1


# -- malformed answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: a\r\n" * (MAX_HEAD_BYTES // 10) + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * (2 * MAX_HEAD_BYTES),
    ],
    ids=["one-long-header", "many-headers", "no-end-of-head"],
)
async def test_oversized_heads_are_refused(reply: bytes) -> None:
    async with tiny_server(scripted(reply, close=False)) as tiny, client(tiny.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="over 65536 bytes"):
            await http.get("/")


async def test_an_oversized_chunk_size_line_is_refused() -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * MAX_HEAD_BYTES
    async with tiny_server(scripted(reply, close=False)) as tiny, client(tiny.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="over 65536 bytes"):
            await http.get("/")


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Space : a\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bare: a\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\n\r\n" * 9,
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
)
async def test_malformed_answers_are_remote_protocol_errors(reply: bytes) -> None:
    async with tiny_server(scripted(reply)) as tiny, client(tiny.url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")


def test_parse_head_reads_framing() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nX-A:  b c \r\nConnection: Close")
    assert (head.status, head.reason, head.length, head.keep_alive) == (200, b"OK", 5, False)
    assert head.headers[1] == (b"X-A", b"b c")
    chunked = parse_head(b"HTTP/1.1 500 \r\nTransfer-Encoding: Chunked\r\nContent-Length: 3")
    assert (chunked.chunked, chunked.length, chunked.keep_alive) == (True, None, False)
    assert parse_head(b"HTTP/1.1 200").reason == b""
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7", head_request=True).length == 0
    # Whitespace is stripped, not backtracked over: a head of blanks parses in linear time.
    started = time.perf_counter()
    blank = parse_head(b"HTTP/1.1 200 OK\r\nX-Blank: " + b" \t" * 30_000 + b"!")
    assert blank.headers == [(b"X-Blank", b"!")]
    with pytest.raises(httpx.RemoteProtocolError):
        parse_head(b"HTTP/1.1 200 OK\r\nX-Blank: " + b" " * 60_000 + b"\x01")
    assert time.perf_counter() - started < 0.5


def test_a_parsed_head_goes_with_its_last_reference() -> None:
    """The head is the parser's callback object; the cycle between them is broken once the
    head is parsed, so heads do not pile up for the garbage collector, one per request."""
    gc.disable()
    try:
        for block in (b"HTTP/1.1 200 OK\r\nContent-Length: 2", b"HTTP/1.1 204 No Content"):
            head = parse_head(block)
            gone = weakref.ref(head)
            del head
            assert gone() is None
    finally:
        gc.enable()


async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    async with tiny_server(keep_alive) as tiny, client(tiny.url) as http:
        request = http.build_request("GET", "/")
        request.headers["X-Injected"] = "a\r\nX-Evil: 1"
        with pytest.raises(httpx.LocalProtocolError):
            await http.send(request)
        assert tiny.connections == 0


async def test_unsupported_scheme() -> None:
    async with httpx.AsyncClient(transport=FastTransport()) as http:
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get("ftp://127.0.0.1/")


# -- TLS ----------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_with_sni_and_certificate_checks(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while await read_request(reader, Tiny()) is not None:
                writer.write(answer(b'{"tls":true}'))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        trusting = ssl.create_default_context(cafile=str(cert))
        transport = FastTransport(ssl_context=trusting)
        async with client(f"https://localhost:{port}", transport) as http:
            for _ in range(3):
                assert (await http.get("/")).json() == {"tls": True}
        assert names == ["localhost"]
        assert connections == 1
        # The default context does not trust a self-signed certificate: nothing is sent.
        async with client(f"https://localhost:{port}", FastTransport()) as http:
            with pytest.raises(httpx.ConnectError, match="certificate"):
                await http.get("/")


async def test_a_body_dripped_within_every_read_wait_ends_at_the_attempt_timeout() -> None:
    """One byte every 30 ms: each wait for bytes is far shorter than the read timeout; the
    whole answer would take 6 s. With ``attempt_timeout`` the exchange ends at that bound
    (``ReadTimeout`` saying so), and the server sees the connection closed mid-answer."""
    body = b"x" * 200
    sent: list[int] = []

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        await read_request(reader, t)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(len(body)):
            await asyncio.sleep(0.03)
            if writer.is_closing():
                break
            writer.write(body[i : i + 1])
            await writer.drain()
            sent.append(i)

    async with tiny_server(drip) as tiny, client(tiny.url, read=5) as http:
        request = http.build_request("GET", "/")
        request.extensions["attempt_timeout"] = 0.5
        response = await http.send(request, stream=True)
        with pytest.raises(httpx.ReadTimeout, match="attempt timeout"):
            await response.aread()
        await response.aclose()
        await asyncio.gather(*tiny.tasks)  # the server's next write finds the connection gone
    assert len(sent) < len(body)


async def test_a_head_dripped_within_every_read_wait_ends_at_the_attempt_timeout() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Filler: " + b"y" * 200 + b"\r\nContent-Length: 0\r\n\r\n"

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: Tiny) -> None:
        await read_request(reader, t)
        for i in range(len(head)):
            await asyncio.sleep(0.03)
            writer.write(head[i : i + 1])
            await writer.drain()

    async with tiny_server(drip) as tiny, client(tiny.url, read=5) as http:
        request = http.build_request("GET", "/")
        request.extensions["attempt_timeout"] = 0.5
        with pytest.raises(httpx.ReadTimeout, match="attempt timeout"):
            await http.send(request)
