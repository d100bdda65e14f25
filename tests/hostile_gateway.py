"""A hostile HTTP/1.1 gateway for tests: forwards to the simulator, then misbehaves on cue.

It sits on loopback between the worker's PAPI client and the simulator, as a load balancer
or proxy does in production. Each request is forwarded (or not) and answered according to the
next :class:`Mangle` queued for its method; requests with nothing queued pass through as they
are. What reaches the client is real bytes on a real socket: a bare 503 with no body, a body
whose ``Content-Encoding`` lies, a truncated or oversized body, a non-JSON 200.

``after`` hooks run once the upstream has answered a request (before the client gets its
answer), so a test can change the exchange's state at an exact point in a sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


@dataclass(frozen=True)
class Mangle:
    """How to answer one request.

    ``kind``: ``bare_503`` (status line and no body), ``html_503`` (a proxy's HTML page),
    ``bad_encoding`` (the upstream body labelled ``Content-Encoding: gzip``), ``truncated``
    (``Content-Length`` promises more than is sent, then the connection closes), ``huge``
    (a 200 whose body is ``size`` bytes of JSON-looking text), ``not_json`` (200 "OK"),
    ``status`` (the upstream body with ``status`` instead of its own), ``pass`` (as it is, after
    ``delay_s``), ``chunked`` (the upstream answer with ``Transfer-Encoding: chunked``, its body
    in three chunks, the first with a chunk extension, then a trailer field), ``headers``
    (the upstream answer, its status replaced by ``status`` when that is not 503, with
    ``headers`` in place of any of the same names), ``drip`` (the upstream answer whole and
    correct, its body sent one byte every ``interval_s``: each wait for bytes is short, the
    whole answer is not; ``size`` spaces are put after its JSON body's opening brace, to make
    it longer and still the same JSON).
    ``forward``: whether the request reaches the simulator first (the exchange did the work).
    """

    kind: str
    forward: bool = True
    status: int = 503
    size: int = 0
    delay_s: float = 0.0  # held this long after the upstream answered
    headers: tuple[tuple[str, str], ...] = ()
    interval_s: float = 0.03


@dataclass
class Drip:
    """One dripped answer: its length, and the bytes sent before it ended (all of them, or
    fewer when the client closed the connection first)."""

    total: int
    sent: int = 0
    client_closed: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Gateway:
    upstream: str
    queued: dict[str, deque[Mangle]] = field(default_factory=dict)
    after: deque[tuple[str, Callable[[], None]]] = field(default_factory=deque)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, what)
    drips: list[Drip] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _http: httpx.AsyncClient | None = None

    def queue(self, method: str, *mangles: Mangle) -> None:
        self.queued.setdefault(method, deque()).extend(mangles)

    def then(self, method: str, hook: Callable[[], None]) -> None:
        """Run ``hook`` after the next forwarded ``method`` request has been answered upstream."""
        self.after.append((method, hook))

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, http: httpx.AsyncClient
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if line]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        body = await reader.readexactly(length) if length else b""
        queue = self.queued.get(method)
        mangle = queue.popleft() if queue else None
        path = target.split("?", 1)[0]
        self.seen.append((method, path, mangle.kind if mangle else "pass"))
        upstream: httpx.Response | None = None
        if mangle is None or mangle.forward:
            upstream = await http.request(
                method,
                target,
                content=body,
                headers=[(k, v) for k, v in headers if k.lower() not in _HOP | {"host"}],
            )
            if self.after and self.after[0][0] == method:
                self.after.popleft()[1]()
        if mangle is not None and mangle.delay_s:
            await asyncio.sleep(mangle.delay_s)
        if mangle is not None and mangle.kind == "drip":
            await self._drip(writer, _answer(None, upstream, pad=mangle.size), mangle.interval_s)
            return
        writer.write(_answer(mangle, upstream))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _drip(self, writer: asyncio.StreamWriter, answer: bytes, interval_s: float) -> None:
        head_end = answer.index(b"\r\n\r\n") + 4
        drip = Drip(total=len(answer))
        self.drips.append(drip)
        try:
            writer.write(answer[:head_end])
            drip.sent = head_end
            for i in range(head_end, len(answer)):
                await asyncio.sleep(interval_s)
                if writer.is_closing():
                    break
                writer.write(answer[i : i + 1])
                await writer.drain()
                drip.sent = i + 1
        except ConnectionError:
            pass
        drip.client_closed = drip.sent < drip.total
        drip.ended.set()
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        async with httpx.AsyncClient(base_url=self.upstream) as http:
            self._http = http
            await self.start()
            try:
                yield f"http://127.0.0.1:{self.port}"
            finally:
                await self.stop()

    async def start(self) -> None:
        """Listen (again) on the same port: connections are accepted from now on."""
        http = self._http
        if http is None:
            raise RuntimeError("start() is for a gateway inside running()")
        server = await asyncio.start_server(
            lambda r, w: self._handle(r, w, http), "127.0.0.1", self.port
        )
        self.port = server.sockets[0].getsockname()[1]
        self._server = server

    async def stop(self) -> None:
        """Stop listening: new connections are refused, as by a load balancer that is gone."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def _head(status: int, headers: list[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [f"Content-Length: {length}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


_REASONS = {200: "OK", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _answer(mangle: Mangle | None, upstream: httpx.Response | None, pad: int = 0) -> bytes:
    passed = (
        [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
        if upstream is not None
        else []
    )
    body = upstream.content if upstream is not None else b'{"code":0,"msg":"ok"}'
    if pad and body.startswith(b"{"):
        body = b"{" + b" " * pad + body[1:]
    status = upstream.status_code if upstream is not None else 200
    kind = mangle.kind if mangle is not None else "pass"
    if kind == "pass":
        return _head(status, passed, len(body)) + body
    if kind == "bare_503":
        return _head(503, [], 0)
    if kind == "html_503":
        page = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
        return _head(503, [("Content-Type", "text/html")], len(page)) + page
    if kind == "bad_encoding":
        return _head(status, [*passed, ("Content-Encoding", "gzip")], len(body)) + body
    if kind == "truncated":
        return _head(status, passed, len(body) + 100) + body[: len(body) // 2]
    if kind == "huge":
        size = mangle.size if mangle is not None else 0
        filler = b'{"filler":"' + b"x" * max(0, size - 14) + b'"}'
        return _head(200, [("Content-Type", "application/json")], len(filler)) + filler
    if kind == "not_json":
        return _head(200, [("Content-Type", "text/plain")], 2) + b"OK"
    if kind == "status":
        return _head(mangle.status if mangle else 503, passed, len(body)) + body
    if kind == "chunked":
        return _chunked(status, passed, body)
    if kind == "headers" and mangle is not None:
        answered = status if mangle.status == 503 else mangle.status
        replaced = {name.lower() for name, _ in mangle.headers}
        kept = [(k, v) for k, v in passed if k.lower() not in replaced]
        return _head(answered, [*kept, *mangle.headers], len(body)) + body
    raise ValueError(f"unknown mangle {kind!r}")


def _chunked(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += ["Transfer-Encoding: chunked", "Connection: close", "", ""]
    third = max(1, len(body) // 3)
    pieces = [body[:third], body[third : 2 * third], body[2 * third :]]
    framed = [b"%x;piece=%d\r\n%b\r\n" % (len(p), i, p) for i, p in enumerate(pieces) if p]
    trailer = b"0\r\nX-Trailer: end\r\n\r\n"
    return "\r\n".join(lines).encode("latin-1") + b"".join(framed) + trailer
