"""An HTTP/1.1 transport for httpx written directly on asyncio.

:class:`FastTransport` keeps a bounded pool of keep-alive connections per origin (PAPI is
one origin) and does the little HTTP/1.1 the worker needs on asyncio's protocols, with
httptools (llhttp, the parser uvicorn uses) reading the answers:

* **pool**: at most ``max_connections`` per origin; the most recently used idle connection
  is reused first; one idle past ``keepalive_expiry`` is closed instead. A request that finds
  the pool full waits for a connection (``pool`` timeout, then ``httpx.PoolTimeout``).
* **stale connections**: before an idle connection is reused it is checked, without a read,
  for anything the server did meanwhile (closed it, reset it, sent stray bytes); such a
  connection is closed and another taken or opened, so a request never goes out on a
  connection already known to be dead. A request that may have been written is never retried.
* **framing** (RFC 9112): ``Content-Length``, ``Transfer-Encoding: chunked`` and bodies that
  end with the connection; no body for 1xx, 204, 304 and answers to HEAD; ``Connection:
  close`` and HTTP/1.0 end the connection after the answer. llhttp checks the syntax (status
  line, field names and values, ``Content-Length``, chunk sizes and their CRLFs) strictly;
  on top of it an answer is refused for a version other than 1.0 and 1.1, a status below
  100, a control character in the reason, or a ``Transfer-Encoding`` other than ``chunked``.
  ``tests/test_transport_framing.py`` holds its framing equal to h11's.
* **streaming**: the body reaches httpx as an :class:`httpx.AsyncByteStream`, so httpx still
  decodes ``Content-Encoding`` and a caller can stop reading at a size cap. A body already
  complete when its head is parsed (every PAPI answer) is handed over in one piece and the
  connection goes back to the pool at once.
* **limits**: a response head (and a chunk's size line or trailers) over
  :data:`MAX_HEAD_BYTES` is refused; so is anything malformed.
* **timeouts** from ``request.extensions["timeout"]`` as httpx passes them: ``connect``
  (TCP and TLS), ``read`` (each wait for bytes), ``write`` (each wait for the socket to drain),
  ``pool`` (the wait for a connection); and one overall bound, ``request.extensions
  ["attempt_timeout"]`` (seconds, optional), on the whole exchange from the first byte written
  to the last byte of the body: a server that drips a byte within every ``read`` wait cannot
  hold a request past it (``ReadTimeout``, or ``WriteTimeout`` while writing).

Errors are httpx's, in the sense httpx gives them (the PAPI client tells "not sent" from "may
have arrived" by them): ``ConnectError`` / ``ConnectTimeout`` when no connection could be made
(nothing was sent), ``WriteError`` / ``WriteTimeout`` while writing, ``ReadTimeout``,
``ReadError`` (connection reset) and ``RemoteProtocolError`` (closed early, malformed or
oversized answer) after the request was written.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final, cast

import httptools
import httpx

MAX_HEAD_BYTES: Final = 64 * 1024
_PAUSE_READING_AT: Final = 256 * 1024  # bytes received and not yet consumed
_MAX_INFORMATIONAL: Final = 8  # 1xx heads before the answer
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

_NO_BODY_STATUSES: Final = frozenset({204, 304})
_HTTP_VERSIONS: Final = (b"HTTP/1.1", b"HTTP/1.0")  # a tuple: the head is a bytearray
# Not in a reason phrase (RFC 9112: HTAB, SP, VCHAR, obs-text): llhttp lets DEL through.
_NOT_IN_REASON: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip() for token in value.lower().split(b",")]


def _show(raw: bytes) -> str:
    return repr(raw[:80])


_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION = 1, 2, 3
_FRAMING_FIELDS: Final = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
}


class _Head:
    """A response head as httptools (llhttp) parses it, and how its body is framed.

    It is also the parser's callback object: a chunked body is fed to the same parser
    (:meth:`_Connection._chunked`), which hands its data over in :meth:`on_body`. (Class
    attributes are the defaults: a head sets only what its answer says.)
    """

    status = 0
    reason = b""
    http_version = b"HTTP/1.1"
    length: int | None = None  # None: chunked, or until the connection closes
    chunked = False
    keep_alive = False
    close = False  # Connection: close
    transfer_encoding: list[bytes] | None = None
    headers_done = False  # set once the head is parsed: fields after it are trailers
    complete = False  # the parser has seen the whole message
    more = False  # bytes after the message: the connection is not reused
    boundary = False  # a chunk's size line or the trailers ended in the last feed

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []  # body bytes parsed and not yet handed over
        # The parser holds this head's callbacks, and the head holds the parser: a cycle,
        # broken (``parser = None``) as soon as the parser is no longer needed, so that a
        # head goes with its last reference and not at the next garbage collection.
        self.parser: httptools.HttpResponseParser | None = None

    def new_parser(self) -> httptools.HttpResponseParser:
        parser = self.parser = httptools.HttpResponseParser(self)
        # Two leniencies, both as RFC 9112 and h11 read an answer: blanks after a chunk's
        # size, and Content-Length beside Transfer-Encoding: chunked (chunked wins, and the
        # connection is not reused after it: see ``_parse_head``).
        parser.set_dangerous_leniencies(
            lenient_chunked_length=True, lenient_spaces_after_chunk_size=True
        )
        return parser

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.more = True

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # a trailer field: read, bounded, ignored
        value = value.rstrip(b" \t")  # llhttp has skipped the blanks before it
        self.headers.append((name, value))
        kind = _FRAMING_FIELDS.get(name.lower())
        if kind is None:
            return
        if kind == _CONTENT_LENGTH:
            self.length = int(value)  # digits, and only once: llhttp has checked
        elif kind == _TRANSFER_ENCODING:
            self.transfer_encoding = [*(self.transfer_encoding or ()), value]
        elif b"close" in _tokens(value):
            self.close = True

    def on_body(self, data: bytes) -> None:
        self.chunks.append(data)

    def on_chunk_header(self) -> None:
        self.boundary = True

    def on_chunk_complete(self) -> None:
        self.boundary = True

    def on_message_complete(self) -> None:
        self.complete = True


def parse_head(block: bytes, *, head_request: bool = False) -> _Head:
    """The status line and header fields (``block`` without its final blank line)."""
    return _parse_head(block + b"\r\n\r\n", head_request)


def _parse_head(data: bytes | bytearray, head_request: bool) -> _Head:
    """The head in ``data``, which ends with its blank line."""
    head = _Head()
    parser = head.new_parser()
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        head.parser = None
        if parser.get_status_code() == 101:  # llhttp stops at an upgrade
            raise httpx.RemoteProtocolError("unexpected 101 Switching Protocols") from None
        raise httpx.RemoteProtocolError(f"malformed response head: {exc}") from None
    head.headers_done = True  # llhttp ends a head only at its blank line, which data ends with
    head.parser = None  # the parser is needed again only for a chunked body
    status = parser.get_status_code()
    version = data[:8]  # llhttp has read "HTTP/<digit>.<digit>"
    if status < 100 or version not in _HTTP_VERSIONS:
        status_line = bytes(data).split(b"\r", 1)[0]
        raise httpx.RemoteProtocolError(f"malformed status line {_show(status_line)}")
    reason = head.reason
    if reason and reason.translate(None, _NOT_IN_REASON) != reason:
        raise httpx.RemoteProtocolError(f"malformed reason phrase {_show(reason)}")
    head.status = status
    keep_alive = not head.close
    if version != b"HTTP/1.1":
        head.http_version = bytes(version)
        keep_alive = False  # HTTP/1.0 answers end their connection
    encodings = head.transfer_encoding
    if encodings is not None:
        if len(encodings) > 1 or encodings[0].lower() != b"chunked":
            shown = _show(b", ".join(encodings))
            raise httpx.RemoteProtocolError(f"unsupported Transfer-Encoding {shown}")
        head.chunked = True
        head.parser = parser
    if head_request or status < 200 or status in _NO_BODY_STATUSES:
        head.length, head.chunked, head.parser = 0, False, None
    elif head.chunked:
        if head.length is not None:  # both framings: a smuggling risk, never reuse the connection
            keep_alive = False
        head.length = None
    elif head.length is None:
        keep_alive = False  # the body ends when the connection does
    head.keep_alive = keep_alive
    return head


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: bytes in a buffer, one waiting reader at a time."""

    transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buf = bytearray()
        self._eof = False  # nothing more will arrive
        self._error: Exception | None = None  # why the connection was lost, if not a clean EOF
        self._reader: asyncio.Future[bool] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._poll = select.poll()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.keep_alive = False  # whether the current exchange allows reuse
        self.idle_since = 0.0
        # The current exchange's overall bound (loop time) and its length, for messages.
        self.deadline: float | None = None
        self.budget_s: float | None = None

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > _PAUSE_READING_AT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> None:
        self._eof = True
        self._wake_reader()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake_reader()
        self._wake_drainer()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drainer()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(True)

    def _wake_drainer(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)

    # -- state --------------------------------------------------------------------------------

    def reusable(self) -> bool:
        """Whether a finished exchange leaves this connection fit for the next request."""
        return self.keep_alive and not (self._eof or self._buf or self.transport.is_closing())

    def still_open(self) -> bool:
        """For an idle connection: nothing happened to it. A readable socket means the server
        closed or reset it, or sent something unasked; either way it is not reused."""
        return self.reusable() and not self._poll.poll(0)

    def close(self) -> None:
        self.keep_alive = False
        self.transport.close()

    def begin(self, budget_s: float | None) -> None:
        """A new exchange on this connection, to be complete within ``budget_s`` (None: no
        overall bound, only each wait's)."""
        self.budget_s = budget_s
        self.deadline = None if budget_s is None else self._loop.time() + budget_s

    # -- writing ------------------------------------------------------------------------------

    def write_head(self, data: bytes) -> None:
        if self._eof or self.transport.is_closing():
            # Nothing of this request has been written: the connection was closed under us.
            raise httpx.ConnectError("the connection closed before the request was written")
        self.transport.write(data)
        if self.transport.is_closing():
            raise httpx.WriteError(f"writing the request failed: {self._error or 'closed'}")

    async def write_body(
        self, stream: AsyncIterable[bytes], chunked: bool, wait_s: float | None
    ) -> None:
        async for chunk in stream:
            if chunk:
                self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await self._drain(wait_s)
        if chunked:
            self._write(b"0\r\n\r\n")
            await self._drain(wait_s)

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise httpx.WriteError(f"the connection closed while writing: {self._error}")
        self.transport.write(data)

    def _bounded(self, wait_s: float | None) -> tuple[float | None, bool]:
        """The wait allowed now: ``wait_s``, or less when the exchange's overall deadline
        comes first (then True). Raises ``ReadTimeout`` once that deadline has passed."""
        if self.deadline is None:
            return wait_s, False
        left = self.deadline - self._loop.time()
        if left <= 0:
            raise self._overdue(httpx.ReadTimeout)
        if wait_s is None or left < wait_s:
            return left, True
        return wait_s, False

    def _overdue(self, kind: type[httpx.TimeoutException]) -> httpx.TimeoutException:
        return kind(f"the exchange was not complete within {self.budget_s} s (attempt timeout)")

    async def _drain(self, wait_s: float | None) -> None:
        if not self._writing_paused:
            return
        self._drainer = self._loop.create_future()
        try:
            limit, overall = self._bounded(wait_s)
            async with asyncio.timeout(limit):
                await self._drainer
        except TimeoutError:
            if overall:
                raise self._overdue(httpx.WriteTimeout) from None
            raise httpx.WriteTimeout(
                f"the request could not be written within {wait_s} s"
            ) from None
        except httpx.ReadTimeout:
            raise self._overdue(httpx.WriteTimeout) from None
        finally:
            self._drainer = None
        if self.transport.is_closing():
            raise httpx.WriteError(f"the connection closed while writing: {self._error}")

    # -- reading ------------------------------------------------------------------------------

    async def _more(self, wait_s: float | None) -> None:
        """Wait until more bytes arrive or the connection ends (``_eof``)."""
        limit, overall = self._bounded(wait_s)
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        waiter = self._reader = self._loop.create_future()
        timer = None if limit is None else self._loop.call_later(limit, _time_out, waiter)
        try:
            arrived = await waiter
        finally:
            self._reader = None
            if timer is not None:
                timer.cancel()
        if not arrived:
            if overall:
                raise self._overdue(httpx.ReadTimeout)
            raise httpx.ReadTimeout(f"no bytes from the server within {wait_s} s")

    def _ended(self, where: str) -> httpx.TransportError:
        if self._error is not None:
            return httpx.ReadError(f"connection lost {where}: {self._error}")
        return httpx.RemoteProtocolError(f"the server closed the connection {where}")

    async def _read_head_block(self, wait_s: float | None) -> bytearray:
        """The bytes of the next head, its blank line included (consumed), at most
        :data:`MAX_HEAD_BYTES` before that line."""
        buf = self._buf
        start = 0
        what = "the response head"
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(buf) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError(f"{what} over {MAX_HEAD_BYTES} bytes")
            if self._eof:
                raise self._ended(f"in the middle of {what}" if buf else f"before {what}")
            start = max(0, len(buf) - 3)
            await self._more(wait_s)
        if end > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError(f"{what} over {MAX_HEAD_BYTES} bytes")
        block = buf[: end + 4]
        del buf[: end + 4]
        return block

    async def read_head(self, wait_s: float | None, *, head_request: bool = False) -> _Head:
        for _ in range(_MAX_INFORMATIONAL + 1):
            head = _parse_head(await self._read_head_block(wait_s), head_request)
            if head.status >= 200:
                return head
            if head.status == 101:
                raise httpx.RemoteProtocolError("unexpected 101 Switching Protocols")
            # 100 Continue, 103 Early Hints: a head of its own; the answer follows.
        raise httpx.RemoteProtocolError(f"over {_MAX_INFORMATIONAL} informational (1xx) answers")

    def buffered(self) -> int:
        return len(self._buf)

    def take(self, size: int) -> bytes:
        """Up to ``size`` buffered bytes."""
        buf = self._buf
        if len(buf) <= size:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:size])
            del buf[:size]
        return data

    def body(self, head: _Head, wait_s: float | None) -> AsyncIterator[bytes]:
        if head.length is not None:
            return self._fixed(head.length, wait_s)
        if head.chunked:
            return self._chunked(head, wait_s)
        return self._until_closed(wait_s)

    async def _fixed(self, size: int, wait_s: float | None) -> AsyncIterator[bytes]:
        remaining = size
        while remaining:
            if not self._buf:
                if self._eof:
                    raise self._ended(
                        f"after {size - remaining} of {size} body bytes (Content-Length)"
                    )
                await self._more(wait_s)
                continue
            data = self.take(remaining)
            remaining -= len(data)
            yield data

    async def _chunked(self, head: _Head, wait_s: float | None) -> AsyncIterator[bytes]:
        """The body as the head's parser reads it from the bytes fed to it. A chunk's size
        line and the trailer section are bounded like a head (counted per feed: bytes that
        are not chunk data, since the last chunk boundary seen)."""
        parser, chunks = head.parser, head.chunks
        if parser is None:  # read already
            raise httpx.StreamConsumed()
        framing = 0  # bytes that are not chunk data, since the last chunk boundary
        try:
            while True:
                buf = self._buf
                if buf:
                    fed = len(buf)
                    head.boundary = False
                    try:
                        parser.feed_data(buf)
                    except httptools.HttpParserError as exc:
                        if not head.complete:
                            raise httpx.RemoteProtocolError(
                                f"malformed chunked body: {exc}"
                            ) from None
                        head.more = True  # the answer is whole; what came after it is not
                    buf.clear()
                    data = b"".join(chunks)
                    chunks.clear()
                    framing = 0 if head.boundary else framing + fed - len(data)
                    if data:
                        yield data
                    if head.complete:
                        if head.more:
                            self.keep_alive = False
                        return
                    if framing > MAX_HEAD_BYTES:
                        raise httpx.RemoteProtocolError(
                            f"a chunk size line or the trailer section over {MAX_HEAD_BYTES} bytes"
                        )
                elif self._eof:
                    raise self._ended("in the middle of the chunked body")
                else:
                    await self._more(wait_s)
        finally:
            head.parser = None  # see _Head

    async def _until_closed(self, wait_s: float | None) -> AsyncIterator[bytes]:
        while True:
            if self._buf:
                yield self.take(len(self._buf))
            elif self._eof:
                if self._error is not None:
                    raise httpx.ReadError(f"connection lost in the body: {self._error}")
                return
            else:
                await self._more(wait_s)


class _Pool:
    """At most ``max_connections`` connections to one origin; idle ones reused newest first."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_expiry: float,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._idle: deque[_Connection] = deque()  # oldest on the left
        self._count = 0  # connections open or being opened, idle or not
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    @property
    def connections(self) -> int:
        return self._count

    async def acquire(
        self, connect_timeout: float | None, pool_timeout: float | None
    ) -> _Connection:
        """A connection fit for a request: reused, handed over, or new."""
        idle = self._idle
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < self._expiry and conn.still_open():
                    return conn
                conn.close()
                self._count -= 1
        if self._count < self._max:
            self._count += 1
        else:
            handed = await self._wait(pool_timeout)
            if handed is not None:
                if handed.still_open():
                    return handed
                handed.close()  # its place in the pool is ours: open another
        try:
            return await self._connect(connect_timeout)
        except BaseException:
            self._free()
            raise

    async def _wait(self, wait_s: float | None) -> _Connection | None:
        """A connection handed over by :meth:`release`, or None: a place to open one."""
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Handed over just as this request gave up: pass it on.
                handed = waiter.result()
                if handed is None:
                    self._free()
                else:
                    self.release(handed)
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(
                    f"no connection to {self._host}:{self._port} free within {wait_s} s"
                ) from None
            raise

    async def _connect(self, wait_s: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        where = f"{self._host}:{self._port}"
        if self._closed:
            raise httpx.ConnectError(f"not connecting to {where}: the transport is closed")
        try:
            async with asyncio.timeout(wait_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {where} took over {wait_s} s") from None
        except OSError as exc:  # refused, unreachable, name not found, TLS handshake or cert
            raise httpx.ConnectError(f"cannot connect to {where}: {exc}") from exc
        return conn

    def release(self, conn: _Connection) -> None:
        """Back to the pool after a complete exchange (or closed, if it is not reusable)."""
        if self._closed or not conn.reusable():
            self.discard(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        now = time.monotonic()
        conn.idle_since = now
        self._idle.append(conn)
        oldest = self._idle[0]
        if now - oldest.idle_since >= self._expiry:
            self._idle.popleft()
            oldest.close()
            self._count -= 1

    def discard(self, conn: _Connection) -> None:
        conn.close()
        self._free()

    def _free(self) -> None:
        """One connection fewer: a waiting request may open one."""
        self._count -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._count += 1
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = list(self._idle), deque()
        for conn in idle:
            conn.close()
            self._count -= 1
        if idle:
            await asyncio.wait([conn.lost for conn in idle], timeout=1.0)


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection as httpx asks for it."""

    def __init__(self, pool: _Pool, conn: _Connection, head: _Head, wait_s: float | None) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._chunks = conn.body(head, wait_s)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._conn is None:
            raise httpx.StreamClosed()
        try:
            async for chunk in self._chunks:
                yield chunk
        except BaseException:
            self._end(complete=False)
            raise
        self._end(complete=True)

    async def aclose(self) -> None:
        self._end(complete=False)

    def _end(self, *, complete: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if complete:
                self._pool.release(conn)
            else:
                self._pool.discard(conn)


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio with keep-alive pools of ``max_connections`` per origin.

    ``ssl_context`` is used for https URLs (default: :func:`ssl.create_default_context`,
    which verifies the certificate and host name; SNI is sent).
    """

    def __init__(
        self,
        *,
        max_connections: int = 64,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._ssl = ssl_context
        self._pools: dict[tuple[str, bytes, int | None], _Pool] = {}

    def connections(self) -> int:
        """Connections open (or being opened) over all origins."""
        return sum(pool.connections for pool in self._pools.values())

    def _pool_for(self, url: httpx.URL) -> _Pool:
        key = (url.scheme, url.raw_host, url.port)
        pool = self._pools.get(key)
        if pool is None:
            scheme, host, port = key
            if scheme not in _DEFAULT_PORTS:
                raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
            if not host:
                raise httpx.UnsupportedProtocol(f"no host in {url}")
            context = None
            if scheme == "https":
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                    self._ssl.set_alpn_protocols(["http/1.1"])
                context = self._ssl
            pool = _Pool(
                host.decode("ascii"),
                port or _DEFAULT_PORTS[scheme],
                context,
                self._max,
                self._expiry,
            )
            self._pools[key] = pool
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        head_bytes, close_after, body = _request_head(request)
        pool = self._pool_for(request.url)
        conn = await pool.acquire(timeouts.get("connect"), timeouts.get("pool"))
        conn.begin(request.extensions.get("attempt_timeout"))
        try:
            conn.write_head(head_bytes)
            if body is not None:
                chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
                await conn.write_body(body, chunked, timeouts.get("write"))
            head = await conn.read_head(read_timeout, head_request=request.method == "HEAD")
        except BaseException:
            pool.discard(conn)
            raise
        conn.keep_alive = head.keep_alive and not close_after
        stream: httpx.AsyncByteStream
        if head.length is not None and conn.buffered() >= head.length:
            # The whole body is here already: no stream to keep the connection for.
            stream = httpx.ByteStream(conn.take(head.length))
            pool.release(conn)
        else:
            stream = _Body(pool, conn, head, read_timeout)
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=stream,
            extensions={"http_version": head.http_version, "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


def _request_head(request: httpx.Request) -> tuple[bytes, bool, AsyncIterable[bytes] | None]:
    """The request line and header fields; whether it asks to close the connection; and the
    body still to stream (None when there is none, or it is sent with the head)."""
    raw = request.headers.raw
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    close_after = False
    for name, value in raw:
        parts += (name, b": ", value, b"\r\n")
        if name.lower() == b"connection" and b"close" in _tokens(value):
            close_after = True
    parts.append(b"\r\n")
    head = b"".join(parts)
    if head.count(b"\n") != len(raw) + 2 or head.count(b"\r") != len(raw) + 2:
        raise httpx.LocalProtocolError("a line break inside the request target or a header")
    try:
        content = request.content  # in memory: sent with the head, in one write
    except httpx.RequestNotRead:
        content = None
    if content is not None:
        return head + content, close_after, None
    stream = request.stream
    if not isinstance(stream, AsyncIterable):
        raise httpx.LocalProtocolError("a synchronous request body on an async transport")
    return head, close_after, stream
