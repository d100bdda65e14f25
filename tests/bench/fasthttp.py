"""The fastest HTTP path the bench has: HTTP/1.1 keep-alive over ``asyncio.Protocol``.

A pool of persistent connections, one request at a time on each; requests are bytes built
by the caller (request line and headers prebuilt, only the signed query changes), answers
are read by ``Content-Length`` (or chunked, should a server send it). No redirects, no
retries, no TLS: the floor of what an HTTP client can cost, for the loopback simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

_HEAD_END = b"\r\n\r\n"


class HttpError(Exception):
    """The connection broke or the answer could not be read."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return
        try:
            answer = self._parse()
        except HttpError as exc:
            self._waiter.set_exception(exc)
            return
        if answer is not None:
            self._waiter.set_result(answer)

    def _parse(self) -> tuple[int, bytes] | None:
        end = self._buffer.find(_HEAD_END)
        if end < 0:
            return None
        head = bytes(self._buffer[:end]).split(b"\r\n")
        status = int(head[0].split(b" ", 2)[1])
        length = -1
        chunked = False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                self.broken = True  # answered, then closed: do not reuse
        start = end + len(_HEAD_END)
        if chunked:
            return self._parse_chunked(status, start)
        if length < 0:
            raise HttpError("an answer without Content-Length")
        if len(self._buffer) < start + length:
            return None
        body = bytes(self._buffer[start : start + length])
        del self._buffer[: start + length]
        return status, body

    def _parse_chunked(self, status: int, start: int) -> tuple[int, bytes] | None:
        body = bytearray()
        at = start
        while True:
            line_end = self._buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(self._buffer[at:line_end]).split(b";")[0], 16)
            chunk_start = line_end + 2
            if len(self._buffer) < chunk_start + size + 2:
                return None
            if size == 0:
                del self._buffer[: chunk_start + 2]
                return status, bytes(body)
            body += self._buffer[chunk_start : chunk_start + size]
            at = chunk_start + size + 2

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.transport is None or self.broken:
            raise HttpError("connection not usable")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HttpPool:
    """``size`` persistent connections to one ``http://host:port``; LIFO reuse."""

    def __init__(self, url: str, size: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need http://host:port, got {url!r}")
        self.host, self.port, self.size = parts.hostname, parts.port, size
        self.host_header = f"{self.host}:{self.port}".encode()
        self._idle: asyncio.LifoQueue[_Connection] = asyncio.LifoQueue()
        self._all: list[_Connection] = []

    async def open(self) -> None:
        for _ in range(self.size):
            self._idle.put_nowait(await self._connect())

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self._all.append(conn)
        return conn

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one prebuilt request; the status and body of its answer."""
        conn = await self._idle.get()
        try:
            if conn.broken:
                conn = await self._connect()
            return await conn.request(raw)
        finally:
            if conn.broken:
                conn.close()
                with contextlib.suppress(ValueError):
                    self._all.remove(conn)
                conn = _Connection()
                conn.broken = True  # reconnected on its next use
            self._idle.put_nowait(conn)

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()
