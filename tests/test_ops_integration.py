"""The operations endpoint of a real worker process, scraped while it works: the session's
real broker, the simulator process banning the IP midway, and the worker's own
``/metrics``, ``/healthz`` and ``/readyz`` read over HTTP as Prometheus and a kubelet would."""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    SimControl,
    Topics,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    worker_env,
    worker_settings,
)
from tests.support import (
    until as wait_until,
)
from worker.ops import LIVENESS_PATH, METRICS_PATH, READINESS_PATH
from worker.tools.devstack import Broker, Process, free_port, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
BAN_MS = 6_000


def scrape(http: httpx.Client) -> Samples:
    r = http.get(METRICS_PATH)
    assert r.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def series(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    want = set(labels.items())
    return {ls: v for (n, ls), v in samples.items() if n == name and want <= ls}


def probe(http: httpx.Client, path: str) -> tuple[int, dict[str, Any]]:
    r = http.get(path)
    body: dict[str, Any] = r.json()
    return r.status_code, body


async def until(
    condition: Callable[[], bool], what: str, worker: Process, timeout_s: float = 30.0
) -> None:
    await wait_until(condition, what, timeout_s, context=lambda: worker.output()[-3000:])


async def test_scraped_during_a_run_with_a_ban_the_endpoint_tells_the_truth(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    orders = sim.seed(
        [{"account": f"desk-{i % 5}", "kind": "algo", "symbol": "BTCUSDT"} for i in range(24)]
    )
    port = free_port()
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file, metrics_port=port)
    worker = start_worker(worker_env(settings))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            def answers(path: str) -> int | None:
                try:
                    return probe(http, path)[0]
                except httpx.TransportError:
                    return None

            # Alive as soon as the endpoint is up; ready once in the group with a clock.
            await until(lambda: answers(LIVENESS_PATH) == 200, "/healthz", worker)
            await until(lambda: answers(READINESS_PATH) == 200, "/readyz", worker)

            def assigned() -> bool:
                code, body = probe(http, READINESS_PATH)
                return code == 200 and body["checks"]["group"]["detail"] == (
                    "3 partition(s) assigned"
                )

            await until(assigned, "the partitions to be assigned", worker)
            _, ready = probe(http, READINESS_PATH)
            assert set(ready["checks"]) == {
                "running",
                "group",
                "kafka",
                "partitions",
                "exchange",
                "clock",
            }
            assert probe(http, "/nope")[0] == 404

            # The exchange bans the IP at the first cancel; the rest wait behind the ban.
            sim.script({"kind": "ban", "status": 418, "delay_ms": BAN_MS})
            valid = [
                (f"k{i}".encode(), orjson.dumps(command(f"desk-{i % 5}", o)))
                for i, o in enumerate(orders[:20])
            ]
            await produce(broker.bootstrap, topics.commands, valid)

            def exchange_detail() -> str:
                detail: str = probe(http, READINESS_PATH)[1]["checks"]["exchange"]["detail"]
                return detail

            await until(lambda: "banned" in exchange_detail(), "the ban in /readyz", worker, 15)
            # The ban is on the IP, shared by every pod: it is reported, and the worker stays
            # ready (unready pods would stall a rollout, and no restart lifts a ban).
            code, during = probe(http, READINESS_PATH)
            assert code == 200, during
            assert during["status"] == "ok"
            assert during["checks"]["exchange"]["ok"] is True
            assert "banned" in during["checks"]["exchange"]["detail"]
            assert probe(http, LIVENESS_PATH)[0] == 200  # banned is not dead
            held = scrape(http)
            assert total(held, "cancel_worker_exchange_banned_until_timestamp_seconds") > 0
            assert total(held, "cancel_worker_governor_stops_total", kind="ban") == 1
            assert total(held, "cancel_worker_ready") == 1
            assert total(held, "cancel_worker_consumer_lag_records", position="committed") > 0
            assert total(held, "cancel_worker_oldest_in_flight_seconds") > 0

            # After the ban: no longer reported, still ready, and everything answered.
            await until(
                lambda: "banned" not in exchange_detail(), "the ban's end in /readyz", worker, 30
            )
            assert answers(READINESS_PATH) == 200
            bad: list[tuple[bytes | None, bytes | None]] = [
                (b"bad", b"{not json"),
                (None, orjson.dumps({"command_id": "x"})),
            ]
            extra: list[tuple[bytes | None, bytes | None]] = [
                (b"late", orjson.dumps(command(f"desk-{i % 5}", orders[i])))
                for i in range(20, len(orders))
            ]
            await produce(broker.bootstrap, topics.commands, bad + extra)
            published = events_of(await consume(broker.bootstrap, topics.results, 26))

            def drained() -> bool:
                lag = series(scrape(http), "cancel_worker_consumer_lag_records")
                return len(lag) == 6 and all(v == 0 for v in lag.values())

            await until(drained, "the lag to fall to zero on every partition", worker)
            after = scrape(http)
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]

    by_outcome = collections.Counter((e["type"], e.get("reason", "")) for e in published)
    assert by_outcome[("strategy.canceled", "")] == 24
    assert by_outcome[("cancel.failed", "invalid_command")] == 2
    counted = {
        (dict(ls)["type"], dict(ls)["reason"]): v
        for ls, v in series(after, "cancel_worker_results_total").items()
    }
    assert counted == {k: float(v) for k, v in by_outcome.items()}
    assert total(after, "cancel_worker_deadletters_total") == 2
    assert total(after, "cancel_worker_in_flight") == 0
    assert total(after, "cancel_worker_oldest_in_flight_seconds") == 0
    assert total(after, "cancel_worker_assigned_partitions") == 3
    assert total(after, "cancel_worker_exchange_banned_until_timestamp_seconds") == 0
    assert total(after, "cancel_worker_governor_stops_total", kind="ban") == 1
    # The requests already on their way met the ban (418) and went again after it; 24
    # cancels answered 200.
    latency = "cancel_worker_exchange_request_seconds_count"
    met_the_ban = total(after, latency, route="um_algo", status="418")
    assert met_the_ban >= 1
    assert total(after, latency, route="um_algo", status="200") == 24
    assert total(after, latency) == met_the_ban + 24
    assert total(after, "cancel_worker_retries_total") == met_the_ban
    assert total(after, "cancel_worker_governor_weight_limit") == settings.rate_weight_limit
    assert total(after, "cancel_worker_governor_weight_used") >= 1
    assert total(after, "cancel_worker_clock_last_sync_timestamp_seconds") > time.time() - 120
    assert total(after, "cancel_worker_ready") == 1
    assert total(after, "cancel_worker_healthy") == 1
    assert total(after, "cancel_worker_transactions_total", outcome="committed") >= 1
    info = series(after, "cancel_worker_build_info")
    assert len(info) == 1
    assert dict(next(iter(info)))["version"] != ""


async def test_a_worker_waiting_for_kafka_is_alive_and_not_ready(
    sim: SimControl, accounts_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    with socket.socket() as nobody:  # a port nothing listens on
        nobody.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{nobody.getsockname()[1]}"
    topics = Topics("cmd-x", "res-x", "dlq-x")
    settings = worker_settings(dead, topics, sim.url, accounts_file, metrics_port=port)
    worker = start_worker(worker_env(settings))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            def up() -> bool:
                try:
                    return probe(http, LIVENESS_PATH)[0] == 200
                except httpx.TransportError:
                    return False

            await until(up, "/healthz while Kafka is unreachable", worker)
            code, body = probe(http, READINESS_PATH)
            assert code == 503
            assert body["checks"]["running"] == {"ok": False, "detail": "starting"}
            assert body["checks"]["group"]["ok"] is False
            await asyncio.sleep(1.0)
            assert probe(http, LIVENESS_PATH)[0] == 200  # waiting is not wedged
            assert probe(http, READINESS_PATH)[0] == 503
        # SIGTERM while it waits for Kafka: it stops starting, at once and cleanly.
        t0 = time.monotonic()
        code = worker.stop(timeout_s=15)
        assert code == 0, worker.output()[-3000:]
        assert time.monotonic() - t0 < 10
        assert "stopped before it started" in worker.output()
    finally:
        worker.stop()


async def test_readiness_at_start_goes_from_not_ready_to_ready_once(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """A worker joining a new group on a fresh topic: /readyz, polled every 50 ms from the
    moment it answers, says 503 until the worker is ready and then 200, and stays there (a
    kubelet that saw it ready must not see it flap back while it settles into the group);
    and the start logs no ERROR (finding the group's coordinator is part of joining)."""
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    port = free_port()
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file, metrics_port=port)
    worker = start_worker(worker_env(settings))
    seen: list[tuple[int, tuple[str, ...]]] = []  # (status, failing checks) per answer
    stable_s = 4.0
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            ready_since: float | None = None
            deadline = time.monotonic() + 90
            while ready_since is None or time.monotonic() - ready_since < stable_s:
                assert time.monotonic() < deadline, (seen[-5:], worker.output()[-3000:])
                try:
                    r = await http.get(READINESS_PATH)
                except httpx.TransportError:  # not listening yet
                    await asyncio.sleep(0.05)
                    continue
                checks = r.json()["checks"]
                seen.append((r.status_code, tuple(n for n, c in checks.items() if not c["ok"])))
                if r.status_code != 200:
                    ready_since = None
                elif ready_since is None:
                    ready_since = time.monotonic()
                await asyncio.sleep(0.05)
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    statuses = [s for s, _ in seen]
    changes = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    flaps = [seen[i] for i in range(1, len(seen)) if seen[i][0] != seen[i - 1][0]]
    assert changes == [503, 200], (changes, flaps)
    assert statuses.count(503) >= 1 and seen[0][1], seen[0]
    errors = [line for line in worker.output().splitlines() if " ERROR " in line]
    assert errors == [], (errors, seen, worker.output())
