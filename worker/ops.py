"""The operations endpoint on ``CANCEL_WORKER_METRICS_PORT``: ``/metrics`` (Prometheus
text), ``/healthz`` (liveness) and ``/readyz`` (readiness); any other path is 404, any other
method than GET and HEAD 405.

Served by uvicorn (h11) and a Starlette app in the worker's own event loop: a probe answered
at all proves the loop is alive, and a wedged loop fails its probes by timing out. Each
health answer is a small JSON object naming every check and what failed::

    {"status": "fail", "checks": {"kafka": {"ok": false, "detail": "results cannot be ..."}, ...}}

with status 200 when every check passes and 503 otherwise.

Anything that can reach the port must not be able to slow the cancels:

* ``/metrics`` is rendered at most once every :data:`METRICS_MAX_AGE_S` and served from that
  cached body meanwhile (a scrape storm costs one render a second); concurrent scrapes of a
  stale body wait for the same render. A render that took more than
  :data:`RENDER_ON_LOOP_MAX_S` moves the next ones to a thread of their own (the live gauges
  are still set in the loop first);
* at most :data:`MAX_CONNECTIONS` connections; a request beyond :data:`MAX_CONCURRENCY`
  in hand is answered 503 at once;
* every request, from its connection's first byte (or the previous answer) to the last byte
  of its answer written, has :data:`REQUEST_TIMEOUT_S`: a client that sends its head slowly,
  never finishes it, or does not read the answer is disconnected; an idle keep-alive
  connection is closed after :data:`KEEP_ALIVE_S`; a head over :data:`MAX_HEAD_BYTES` is 400.

The server is started with ``uvicorn.Server.startup`` on a socket bound here (an address in
use raises ``OSError``; uvicorn would exit the process) and stopped with ``shutdown``:
``Server.serve`` is not used, because it takes over SIGINT and SIGTERM, which the worker
handles itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker import metrics

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
# The port the container image, the compose file and the Kubernetes manifests use.
DEPLOY_PORT = 9400

MAX_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0  # a request read and its answer written, whole
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection
MAX_CONNECTIONS = 32
MAX_CONCURRENCY = 16  # requests in hand (beyond it: 503 at once)
METRICS_MAX_AGE_S = 1.0
RENDER_ON_LOOP_MAX_S = 0.001
_GRACEFUL_CLOSE_S = 1.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


class Probes(Protocol):
    """What the endpoint asks the running worker."""

    def liveness(self) -> Sequence[Check]: ...

    def readiness(self) -> Sequence[Check]: ...

    def refresh_metrics(self) -> None:
        """Bring the gauges read from live state up to date (before each scrape)."""


def verdict(checks: Sequence[Check]) -> tuple[int, bytes]:
    """The HTTP status and JSON body of a health answer."""
    ok = all(c.ok for c in checks)
    body = {
        "status": "ok" if ok else "fail",
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    return (200 if ok else 503), orjson.dumps(body)


class _Connection(H11Protocol):
    """uvicorn's h11 connection with a connection cap and a whole-request deadline."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.abort()
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own bound

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(REQUEST_TIMEOUT_S, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.abort()  # whatever is unsent goes: the client was too slow


class OpsServer:
    """``async with OpsServer(host, port, probes)``: serves until closed.

    ``metrics_max_age_s``: how old a served ``/metrics`` body may be (0: rendered for every
    scrape). ``clock``: monotonic seconds (tests).
    """

    def __init__(
        self,
        host: str,
        port: int,
        probes: Probes,
        *,
        metrics_max_age_s: float = METRICS_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._port = port
        self._probes = probes
        self._max_age_s = metrics_max_age_s
        self._clock = clock
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._body: bytes = b""
        self._rendered_at: float | None = None
        self._rendering: asyncio.Future[bytes] | None = None
        self._in_thread = False
        self._renderer: concurrent.futures.ThreadPoolExecutor | None = None
        self.renders = 0  # how many times /metrics was rendered (tests, the bench)
        self.app = Starlette(
            routes=[
                Route(path, self._handle, methods=["GET"])
                for path in (METRICS_PATH, LIVENESS_PATH, READINESS_PATH)
            ],
            exception_handlers={HTTPException: self._refuse},
        )
        self.app.router.redirect_slashes = False  # /metrics/ is not /metrics: 404

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one picked for port 0)."""
        if self._socket is None:
            return self._port
        return int(self._socket.getsockname()[1])

    async def start(self) -> None:
        """Bind and listen; raises ``OSError`` when the address cannot be used."""
        self._socket = _bind(self._host, self._port)
        config = uvicorn.Config(
            self.app,
            http=_Connection,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            limit_concurrency=MAX_CONCURRENCY,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            timeout_graceful_shutdown=int(_GRACEFUL_CLOSE_S),
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[self._socket])
        except BaseException:
            self._socket.close()
            self._socket = None
            raise
        self._server = server

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.should_exit = True
            server.force_exit = True  # idle connections closed, no wait for the slow ones
            for task in list(server.server_state.tasks):
                task.cancel()
            await server.shutdown(sockets=[self._socket] if self._socket else None)
        self._socket = None
        if self._renderer is not None:
            self._renderer.shutdown(wait=False, cancel_futures=True)
            self._renderer = None

    async def __aenter__(self) -> OpsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the app -----------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        try:
            if path == METRICS_PATH:
                return Response(
                    await self.metrics_body(),
                    200,
                    media_type=CONTENT_TYPE_LATEST,
                    headers=_NO_STORE,
                )
            checks = self._probe(path)
        except Exception as exc:  # a probe that breaks must answer, not drop the connection
            log.exception("the %s probe failed", path)
            return _json_response(500, f"probe failed: {type(exc).__name__}")
        status, body = verdict(checks)
        return Response(body, status, media_type="application/json", headers=_NO_STORE)

    async def _refuse(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 405:
            return _json_response(405, "only GET and HEAD")
        return _json_response(
            status,
            f"no such path: {request.url.path[:100]}; try {METRICS_PATH}, "
            f"{LIVENESS_PATH} or {READINESS_PATH}",
        )

    def _probe(self, path: str) -> Sequence[Check]:
        """Run the liveness or readiness probe; its gauge says whether it passed."""
        if path == LIVENESS_PATH:
            checks, gauge = self._probes.liveness(), metrics.HEALTHY
        else:
            checks, gauge = self._probes.readiness(), metrics.READY
        gauge.set(1 if all(c.ok for c in checks) else 0)
        return checks

    async def metrics_body(self) -> bytes:
        """The Prometheus text, rendered at most once every ``metrics_max_age_s``."""
        if self._rendered_at is not None and self._clock() - self._rendered_at < self._max_age_s:
            return self._body
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render())
        rendering = self._rendering
        try:
            return await asyncio.shield(rendering)
        finally:
            if rendering.done() and self._rendering is rendering:
                self._rendering = None

    async def _render(self) -> bytes:
        # The live gauges are read here, in the loop that owns the state they read. The
        # health gauges say what the probes would answer now, whether or not anything asks
        # the probes (a compose stack has no kubelet).
        self._probes.refresh_metrics()
        self._probe(LIVENESS_PATH)
        self._probe(READINESS_PATH)
        started = time.perf_counter()
        if self._in_thread:
            if self._renderer is None:
                self._renderer = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="metrics-render"
                )
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self._renderer, generate_latest, REGISTRY)
        else:
            body = generate_latest(REGISTRY)
            self._in_thread = time.perf_counter() - started > RENDER_ON_LOOP_MAX_S
        self.renders += 1
        self._body, self._rendered_at = body, self._clock()
        return body


_NO_STORE = {"Cache-Control": "no-store"}


def _json_response(status: int, message: str) -> Response:
    return Response(
        orjson.dumps({"status": "fail", "error": message}),
        status,
        media_type="application/json",
        headers=_NO_STORE,
    )


def _bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (the first address it names)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
