"""The operations endpoint over loopback: paths, methods, bodies, and what a broken or
hostile client gets (the probes here are plain objects: the worker's own are proved by
tests/test_ops_integration.py against a real run)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker import metrics
from worker.app import Worker, load_worker_accounts
from worker.kafka.fencing import GroupMember
from worker.kafka.io import TRANSACTIONAL_RETRY_BACKOFF_MS, TransactionalSink
from worker.ops import (
    LIVENESS_PATH,
    MAX_CONNECTIONS,
    MAX_HEAD_BYTES,
    METRICS_PATH,
    READINESS_PATH,
    REQUEST_TIMEOUT_S,
    Check,
    OpsServer,
    verdict,
)
from worker.settings import Settings


@dataclass
class Probes:
    live: list[Check] = field(default_factory=lambda: [Check("event_loop", True, "answering")])
    ready: list[Check] = field(default_factory=lambda: [Check("kafka", True, "reachable")])
    refreshed: int = 0
    broken: bool = False

    def liveness(self) -> Sequence[Check]:
        return self.live

    def readiness(self) -> Sequence[Check]:
        if self.broken:
            raise RuntimeError("probe broke")
        return self.ready

    def refresh_metrics(self) -> None:
        self.refreshed += 1
        metrics.OLDEST_IN_FLIGHT.set(7.5)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Probes, OpsServer, httpx.AsyncClient]]:
    probes = Probes()
    server = OpsServer("127.0.0.1", 0, probes, metrics_max_age_s=0)  # rendered every scrape
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        yield probes, server, http


async def test_health_answers_name_every_check_and_fail_with_503(
    served: tuple[Probes, OpsServer, httpx.AsyncClient],
) -> None:
    probes, _, http = served
    r = await http.get(LIVENESS_PATH)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "status": "ok",
        "checks": {"event_loop": {"ok": True, "detail": "answering"}},
    }
    probes.ready = [
        Check("kafka", True, "reachable"),
        Check("exchange", False, "IP banned for 41.0s more"),
    ]
    r = await http.get(READINESS_PATH)
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "fail"
    assert body["checks"]["exchange"] == {"ok": False, "detail": "IP banned for 41.0s more"}
    assert body["checks"]["kafka"]["ok"] is True
    assert metrics.READY._value.get() == 0
    probes.ready = [Check("kafka", True, "reachable")]
    assert (await http.get(READINESS_PATH, params={"verbose": "1"})).status_code == 200
    assert metrics.READY._value.get() == 1


async def test_metrics_are_refreshed_then_served_as_prometheus_text(
    served: tuple[Probes, OpsServer, httpx.AsyncClient],
) -> None:
    probes, _, http = served
    r = await http.get(METRICS_PATH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert probes.refreshed == 1
    probes.ready = [Check("clock", False, "never read")]
    families = {
        f.name: f for f in text_string_to_metric_families((await http.get(METRICS_PATH)).text)
    }
    assert [s.value for s in families["cancel_worker_ready"].samples] == [0]
    assert [s.value for s in families["cancel_worker_healthy"].samples] == [1]
    probes.ready = [Check("clock", True, "read")]
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    oldest = families["cancel_worker_oldest_in_flight_seconds"]
    assert [s.value for s in oldest.samples] == [7.5]
    assert "cancel_worker_results" in families


async def test_unknown_paths_are_404_and_other_methods_405(
    served: tuple[Probes, OpsServer, httpx.AsyncClient],
) -> None:
    _, _, http = served
    for path in ("/", "/metrics/", "/health", "/readyz/x", "/favicon.ico"):
        r = await http.get(path)
        assert r.status_code == 404, path
        assert "no such path" in r.json()["error"]
    assert (await http.post(READINESS_PATH, content=b"")).status_code == 405
    head = await http.head(LIVENESS_PATH)
    assert head.status_code == 200
    assert head.content == b""


async def test_a_broken_probe_answers_500_and_the_server_keeps_serving(
    served: tuple[Probes, OpsServer, httpx.AsyncClient],
) -> None:
    probes, _, http = served
    probes.broken = True
    r = await http.get(READINESS_PATH)
    assert r.status_code == 500
    assert r.json()["error"] == "probe failed: RuntimeError"
    assert (await http.get(LIVENESS_PATH)).status_code == 200


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_garbage_and_oversized_requests_get_400_not_a_dropped_server(
    served: tuple[Probes, OpsServer, httpx.AsyncClient],
) -> None:
    _, server, http = served
    assert (await _raw(server.port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    huge = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES * 2) + b"\r\n\r\n"
    assert (await _raw(server.port, huge)).startswith(b"HTTP/1.1 400 ")
    # A client that connects and says nothing does not hold the server up for others.
    _, idle = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert (await http.get(LIVENESS_PATH)).status_code == 200
    finally:
        idle.close()
        await idle.wait_closed()


async def test_closing_drops_idle_connections_and_frees_the_port() -> None:
    server = OpsServer("127.0.0.1", 0, Probes())
    await server.start()
    port = server.port
    _, idle = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(server.close(), 5)
    idle.close()
    again = OpsServer("127.0.0.1", port, Probes())
    await again.start()  # the port is free again
    await again.close()


async def test_a_port_in_use_is_an_os_error_at_start() -> None:
    first = OpsServer("127.0.0.1", 0, Probes())
    await first.start()
    try:
        with pytest.raises(OSError):  # noqa: PT011 - the address-in-use error, any errno text
            await OpsServer("127.0.0.1", first.port, Probes()).start()
    finally:
        await first.close()


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_metrics_are_rendered_at_most_once_per_max_age_and_served_from_the_cache() -> None:
    """Fifty scrapes within the max age cost one render (and one refresh of the live gauges);
    the body they get is that render's; once it is older than the max age, the next scrape
    renders again. Concurrent scrapes of a stale body share one render."""
    probes, clock = Probes(), FakeClock()
    async with (
        OpsServer("127.0.0.1", 0, probes, clock=clock) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
    ):
        first = await http.get(METRICS_PATH)
        metrics.OLDEST_IN_FLIGHT.set(99)  # changed after the render: not in the cached body
        bodies = await asyncio.gather(*(http.get(METRICS_PATH) for _ in range(50)))
        assert {b.content for b in bodies} == {first.content}
        assert (server.renders, probes.refreshed) == (1, 1)
        clock.now += 1.0  # the max age (1 s) has passed
        again = await asyncio.gather(*(http.get(METRICS_PATH) for _ in range(10)))
        assert (server.renders, probes.refreshed) == (2, 2)
        assert len({b.content for b in again}) == 1
        families = {f.name: f for f in text_string_to_metric_families(again[0].text)}
        assert [s.value for s in families["cancel_worker_oldest_in_flight_seconds"].samples] == [
            7.5  # refresh_metrics sets it again before the render
        ]


async def test_a_client_that_never_finishes_its_head_or_never_reads_is_cut_off() -> None:
    """A head sent a byte at a time, never finished, and a client that asks for /metrics and
    reads nothing: both connections are closed by the server at the request bound, and
    other clients are answered meanwhile."""
    server = OpsServer("127.0.0.1", 0, Probes(), metrics_max_age_s=0)
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
        slow_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        await slow_writer.drain()
        assert (await http.get(LIVENESS_PATH)).status_code == 200
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(slow_reader.read(), REQUEST_TIMEOUT_S * 3) == b""
        assert loop.time() - started >= REQUEST_TIMEOUT_S * 0.9  # not before its bound
        slow_writer.close()


async def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    server = OpsServer("127.0.0.1", 0, Probes())
    async with server:
        held = [
            await asyncio.open_connection("127.0.0.1", server.port) for _ in range(MAX_CONNECTIONS)
        ]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT_S)
        except ConnectionError:
            answer = b""
        assert answer == b""  # closed without an answer
        writer.close()
        for _, w in held:
            w.close()
        # Once they are gone, the next client is served.
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            assert (await http.get(LIVENESS_PATH)).status_code == 200


def test_verdict_is_ok_only_when_every_check_is() -> None:
    assert verdict([])[0] == 200
    status, body = verdict([Check("a", True), Check("b", False, "why")])
    assert status == 503
    assert orjson.loads(body)["checks"]["b"] == {"ok": False, "detail": "why"}


# -- the worker's own probes, on a worker that is built but not started ------------------------


@pytest.fixture
async def idle_worker(accounts_file: Path) -> AsyncIterator[Worker]:
    settings = Settings(
        bootstrap_servers="127.0.0.1:9",
        accounts_file=accounts_file,
        health_stall_s=45,
        require_signed_commands=False,  # built, never started: no command is read
    ).check()
    worker = Worker(settings, load_worker_accounts(settings))
    try:
        yield worker
    finally:
        await worker.discard()


@pytest.mark.parametrize(
    ("delivery", "interval_ms", "expected_s"),
    [("exactly_once", 100, 0.1), ("exactly_once", 0, 0.0), ("at_least_once", 100, 0.0)],
)
async def test_the_transaction_interval_paces_exactly_once_flushes_only(
    accounts_file: Path, delivery: str, interval_ms: int, expected_s: float
) -> None:
    """Where TRANSACTION_INTERVAL_MS and the transactional retry backoff take effect: the
    pipeline's flush interval in exactly-once mode (at-least-once flushes at once), and the
    retry backoff of the per-partition transactional producers (the shared producer keeps
    the client's default)."""
    settings = Settings(
        bootstrap_servers="127.0.0.1:9",
        accounts_file=accounts_file,
        delivery=delivery,
        transaction_interval_ms=interval_ms,
        require_signed_commands=False,
    ).check()
    worker = Worker(settings, load_worker_accounts(settings))
    transactional = TransactionalSink(settings, lambda: GroupMember(-1, ""))._factory("t-0")
    try:
        assert worker.pipeline._flush_interval_s == expected_s
        assert transactional._sender._retry_backoff == TRANSACTIONAL_RETRY_BACKOFF_MS / 1000
        assert worker._producer._sender._retry_backoff == 0.1  # aiokafka's default
    finally:
        await transactional.stop()
        await worker.discard()


def _by_name(checks: Sequence[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


async def test_liveness_fails_when_the_fetch_loop_or_a_flush_stalls(idle_worker: Worker) -> None:
    pipeline = idle_worker.pipeline
    live = _by_name(idle_worker.liveness())
    assert live["fetch_loop"] == Check("fetch_loop", True, "not started yet")
    pipeline.loop_at = time.monotonic() - 2
    assert all(c.ok for c in idle_worker.liveness())
    pipeline.loop_at = time.monotonic() - 46
    stalled = _by_name(idle_worker.liveness())["fetch_loop"]
    assert not stalled.ok
    assert "more than HEALTH_STALL_S (45s): wedged" in stalled.detail
    pipeline.stop()  # stopping is not a stall
    assert _by_name(idle_worker.liveness())["fetch_loop"].detail == "stopping"
    pipeline.flush_since = time.monotonic() - 50
    flush = _by_name(idle_worker.liveness())["flush"]
    assert not flush.ok
    assert flush.detail.startswith("under way for 50.")
    pipeline.flush_since = time.monotonic() - 30
    assert all(c.ok for c in idle_worker.liveness())


async def test_readiness_names_what_is_missing(idle_worker: Worker) -> None:
    ready = _by_name(idle_worker.readiness())
    assert ready["running"] == Check("running", False, "starting")
    assert ready["group"] == Check("group", False, "joining the group")
    assert not ready["clock"].ok
    assert ready["clock"].detail.startswith("never read from ")
    assert ready["exchange"].ok
    idle_worker.pipeline.loop_at = time.monotonic()
    idle_worker.clock.synced_at_ms = int(time.time() * 1000) - 1000
    assert _by_name(idle_worker.readiness())["clock"].ok
    idle_worker.clock.synced_at_ms = int(time.time() * 1000) - 181_000  # 3 refreshes of 60 s
    assert not _by_name(idle_worker.readiness())["clock"].ok
    # A 418 from the exchange: reported, and still ready (the ban is on the IP: every pod
    # shares it and no restart lifts it, so it must not stall a rollout).
    ticket = await idle_worker.governor.acquire("desk-0", is_order=True, deadline_ms=None)
    until = idle_worker.clock.now() + 30_000
    idle_worker.governor.observe(
        ticket, 418, {}, -1003, f"Way too many requests; IP(1.2.3.4) banned until {until}."
    )
    exchange = _by_name(idle_worker.readiness())["exchange"]
    assert exchange.ok
    assert exchange.detail.startswith("IP banned for ")
    idle_worker.refresh_metrics()
    assert metrics.BANNED_UNTIL._value.get() == until / 1000


@dataclass
class _Coordinator:
    """What the group check reads of aiokafka's group coordinator."""

    coordinator_id: int | None
    generation: int = -1
    member_id: str = ""
    _group_instance_id: str | None = None


def test_a_known_coordinator_is_not_yet_the_group(idle_worker: Worker) -> None:
    """At start, aiokafka finds the coordinator, then the first join can be refused (the
    coordinator is being loaded) and the coordinator looked up again: not ready until the
    first join completed, so /readyz does not go 200, 503, 200."""
    consumer = idle_worker._consumer
    saved = consumer._coordinator
    try:
        consumer._coordinator = _Coordinator(coordinator_id=1)  # found, join not answered
        group = _by_name(idle_worker.readiness())["group"]
        assert group == Check("group", False, "joining the group")
        consumer._coordinator = _Coordinator(None)  # the join refused: looked up again
        assert not _by_name(idle_worker.readiness())["group"].ok
        # Joined, no partition (more members than partitions, or a rebalance): ready.
        consumer._coordinator = _Coordinator(1, generation=3, member_id="m-1")
        group = _by_name(idle_worker.readiness())["group"]
        assert group == Check("group", True, "in the group (generation 3), no partition")
        consumer._coordinator = _Coordinator(None, generation=3, member_id="m-1")
        assert _by_name(idle_worker.readiness())["group"] == Check(
            "group", False, "no group coordinator"
        )
    finally:
        consumer._coordinator = saved
