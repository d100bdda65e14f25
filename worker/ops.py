"""The operations endpoint on ``CANCEL_WORKER_METRICS_PORT``: ``/metrics`` (Prometheus
text), ``/healthz`` (liveness) and ``/readyz`` (readiness); any other path is 404.

One small HTTP/1.0-style server in the worker's own event loop: a probe answered at all
proves the loop is alive, and a wedged loop fails its probes by timing out. Each health
answer is a small JSON object naming every check and what failed::

    {"status": "fail", "checks": {"kafka": {"ok": false, "detail": "results cannot be ..."}, ...}}

with status 200 when every check passes and 503 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from worker import metrics

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
# The port the container image, the compose file and the Kubernetes manifests use.
DEPLOY_PORT = 9400

MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0


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


def _response(status: int, content_type: str, body: bytes, *, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


def _json(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "application/json", orjson.dumps({"status": "fail", "error": message})


class OpsServer:
    """``async with OpsServer(host, port, probes)``: serves until closed."""

    def __init__(self, host: str, port: int, probes: Probes) -> None:
        self._host = host
        self._port = port
        self._probes = probes
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one picked for port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and listen; raises ``OSError`` when the address cannot be used."""
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, limit=MAX_HEAD_BYTES
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            for task in list(self._clients):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> OpsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            status, ctype, body = _json(400, "request head too large")
            writer.write(_response(status, ctype, body))
            await writer.drain()
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            status, ctype, body = _json(400, "malformed request line")
            writer.write(_response(status, ctype, body))
            await writer.drain()
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        status, ctype, body = self.answer(method, path)
        writer.write(_response(status, ctype, body, head=method == "HEAD"))
        await writer.drain()

    def _probe(self, path: str) -> Sequence[Check]:
        """Run the liveness or readiness probe; its gauge says whether it passed."""
        if path == LIVENESS_PATH:
            checks, gauge = self._probes.liveness(), metrics.HEALTHY
        else:
            checks, gauge = self._probes.readiness(), metrics.READY
        gauge.set(1 if all(c.ok for c in checks) else 0)
        return checks

    def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request (no I/O)."""
        if path not in (METRICS_PATH, LIVENESS_PATH, READINESS_PATH):
            return _json(
                404,
                f"no such path: {path[:100]}; try {METRICS_PATH}, "
                f"{LIVENESS_PATH} or {READINESS_PATH}",
            )
        if method not in ("GET", "HEAD"):
            return _json(405, "only GET and HEAD")
        try:
            if path == METRICS_PATH:
                # The health gauges say what the probes would answer now, whether or not
                # anything asks the probes (a compose stack has no kubelet).
                self._probes.refresh_metrics()
                self._probe(LIVENESS_PATH)
                self._probe(READINESS_PATH)
                return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            checks = self._probe(path)
        except Exception as exc:  # a probe that breaks must answer, not drop the connection
            log.exception("the %s probe failed", path)
            return _json(500, f"probe failed: {type(exc).__name__}")
        status, body = verdict(checks)
        return status, "application/json", body
