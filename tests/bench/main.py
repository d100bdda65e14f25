"""``make bench`` / ``make bench-quick``: the worker against the floors of its pipeline.

Starts its own Kafka broker and PAPI simulator, then, per scenario, runs every system in its
own OS process, on fresh topics and a fresh consumer group, round-robin over the systems
(each round starts with the next system), so that machine noise spreads over all of them:

* ``kafka_floor``, ``pipeline_floor``, ``naive`` — :mod:`tests.bench.systems`;
* ``worker``, ``worker_at_least_once`` — ``cancel-worker run`` in each delivery mode, its
  ``/metrics`` scraped once a second during the measured run (as Prometheus would), its INFO
  logging on;
* ``worker_unscraped`` (paced scenarios only) — the exactly-once worker, not scraped: beside
  ``worker``, what the scrape costs;
* ``worker_client`` (``paced10`` only) — the exactly-once worker, each command sent by the
  client library's ``CancelClient.cancel()``: its round trip, publish → typed result in hand;
* ``worker_scrape_storm`` (not in the default systems) — the exactly-once worker while its
  ``/metrics`` is scraped 20 times a second, each scrape on a new connection.

Rate limits (the worker's and the simulator's) are raised out of the way: only speed is
measured. Scenarios: a burst with an exchange answering at once (``0ms``), a burst with a
fixed 20 ms exchange latency (``20ms``), and a steady 100 and 10 commands/s with the 20 ms
latency (``paced100``, ``paced10``: a risk engine's normal day); commands go over 50 keys and
5 accounts, each cancelling a UM algo order seeded in the simulator.

What is measured is the steady state. Before anything counts, every system runs once through
the 0 ms scenario unmeasured (the warm-up round: a fresh broker's JVM compiles its fetch,
produce and transaction paths during the first tens of thousands of requests, which would
otherwise slow whichever system runs first); and every run starts with a few unmeasured
commands, answered before its clock starts (connections opened, producers' first
transactions done); a paced run's are sent at its pace for 3 s, because the first seconds
after a system starts are not steady (the broker stalls for tens of ms a few times). Before
each run the simulator is settled (``POST /_sim/settle``): what it holds grows with every
run, and its own full garbage collections would otherwise pause it for up to a few hundred
ms, counted as the system's request latency.

Figures per system and scenario (pooled over its rounds):

* throughput — commands / (first produce → last result visible), summed over rounds;
* produced → request at the exchange (p50/p99/max) — the command's produce time against the
  simulator's arrival time (``arrived_us``: its first bytes read from the socket, before the
  simulator parses or routes it) of the first DELETE for its order; for the Kafka floor,
  which sends no request, produced → consumed (the ``at_us`` its handler stamps on the result);
  both ends are read in microseconds, so a p99 of a few ms is not rounded by whole ms;
* produced → result visible (p50/p99/max) — until the bench's own ``read_committed``
  consumer receives the result, i.e. a durable, acknowledged result;
* CPU µs per command and peak RSS of the system's own process (``/proc``), and the CPU the
  simulator, the broker and the bench itself spent meanwhile (``cpu_us_per_cmd_elsewhere``);
* the 1-minute load average sampled during its runs (top-level ``load_average``);
* the machine's jitter: how late :mod:`tests.bench.jitter`, a process beside the run that
  sleeps 10 ms at a time, woke up (``machine_jitter_ms``, p50/p99/max);
* the worker's transactions and flushes during the run, read off its ``/metrics``
  (``cancel_worker_transactions_total``, ``cancel_worker_offset_commits_total``) before and
  after it;
* ``worker_client``: ``cancel()``'s round trip (``client_round_trip_ms``).

The targets (:func:`tests.bench.report.targets`) are ratios between systems measured side by
side in the same run, not absolute figures: those do not travel between machines.

Output: a progress line, then a table, and the same as JSON in ``.bench/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import http.client
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.bench import measure, stages
from tests.bench.jitter import READY as JITTER_READY
from tests.bench.report import render_table, results_json
from tests.bench.scrape_storm import READY as STORM_READY
from tests.bench.systems import CONFIG_ENV, READY
from tests.bench.txnload import READY as TXN_LOAD_READY
from tests.support import (
    HMAC_ACCOUNTS,
    TEST_PRODUCER_ID,
    TEST_PRODUCER_KEY,
    SimControl,
    Topics,
    command,
    fresh_topics,
    signed,
    worker_env,
    worker_settings,
    write_accounts,
)
from worker.client import CancelClient, Result
from worker.settings import ENV_PREFIX, Settings
from worker.tools.devstack import (
    REPO,
    Broker,
    Process,
    cli_argv,
    free_port,
    start_broker,
    start_sim,
)
from worker.tools.sim.app import UM_SYMBOLS

SYSTEMS = (
    "kafka_floor",
    "pipeline_floor",
    "naive",
    "worker",
    "worker_at_least_once",
    "worker_unscraped",
    "worker_client",
    "worker_scrape_storm",
)
# Every worker serves /metrics; tests.bench.scrape_storm scrapes it this many times a second
# during the measured run (each scrape on a new connection): once a second, as Prometheus
# would, but for worker_unscraped (the same worker, to set the scrape's cost beside it) and
# worker_scrape_storm (20 a second: `--systems worker,worker_scrape_storm`).
SCRAPE_RATES = {
    "worker": 1.0,
    "worker_at_least_once": 1.0,
    "worker_client": 1.0,
    "worker_scrape_storm": 20.0,
}
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s != "worker_scrape_storm")
# Systems that run in some scenarios only: the client's round trip is a normal day's figure
# (10/s); the unscraped worker is set beside the scraped one where tails are measured; the
# naive loop is left out at 10/s, where no target reads it (it keeps up there).
ONLY_IN = {"worker_client": {"paced10"}, "worker_unscraped": {"paced10", "paced100"}}
NOT_IN = {"naive": {"paced10"}}
METRICS_PORTS: dict[int, int] = {}  # a worker process's pid -> its metrics port
CLIENT_TIMEOUT_S = 60.0
UNLIMITED = 1_000_000_000  # rate limits out of the way: only speed is measured
KEYS = 50
ACCOUNTS = tuple(f"desk-{i}" for i in range(5))
PARTITIONS = 6
READER_FETCH_WAIT_MS = 20
RESULTS_FILE = REPO / ".bench" / "results.json"


@dataclass(frozen=True)
class Scenario:
    name: str
    latency_ms: int
    rate: float | None  # commands per second; None: all at once


SCENARIOS = {
    "0ms": Scenario("0ms", 0, None),
    "20ms": Scenario("20ms", 20, None),
    "paced100": Scenario("paced100", 20, 100.0),
    "paced10": Scenario("paced10", 20, 10.0),  # a risk engine's normal day
}


def runs_in(system: str, scenario: str) -> bool:
    return scenario in ONLY_IN.get(system, {scenario}) and scenario not in NOT_IN.get(system, ())


@dataclass(frozen=True)
class Plan:
    """Commands per system and scenario (over all rounds) and the rounds."""

    name: str
    commands: dict[str, int]
    naive_commands: dict[str, int]  # the naive system is slow: fewer where it would drag on
    rounds: int
    paced_rounds: int  # paced runs: more, shorter rounds, so that a tail is not one moment's
    paced10_rounds: int  # ... at 10/s, where a round is ten times longer per command
    # Unmeasured work, so that what is measured is the steady state, not start-up:
    warmup_round: int  # commands per system through the 0 ms scenario before anything counts
    warmup: int  # commands at the start of every run, answered before its clock starts
    # ... of a paced run: this many seconds of commands at its pace. The first seconds after
    # a system starts are not steady: the broker stalls for tens of ms a few times while it
    # settles to the new system's traffic (measured: every run's first 3 s had 50-110 ms
    # stalls, then none).
    paced_warmup_s: float

    def warmup_for(self, scenario: Scenario) -> int:
        if scenario.rate:
            return round(self.paced_warmup_s * scenario.rate)
        return self.warmup


FULL = Plan(
    "full",
    {"0ms": 5000, "20ms": 5000, "paced100": 5000, "paced10": 450},
    {"0ms": 5000, "20ms": 1500, "paced100": 1000, "paced10": 450},
    rounds=2,
    paced_rounds=5,
    paced10_rounds=3,
    warmup_round=2000,
    warmup=100,
    paced_warmup_s=3.0,
)
QUICK = Plan(
    "quick",
    {"0ms": 1000, "20ms": 1000, "paced100": 400, "paced10": 60},
    {"0ms": 300, "20ms": 150, "paced100": 150, "paced10": 60},
    rounds=2,
    paced_rounds=2,
    paced10_rounds=2,
    warmup_round=500,
    warmup=50,
    paced_warmup_s=2.0,
)


def rounds_of(plan: Plan, scenario: str) -> int:
    if scenario == "paced10":
        return plan.paced10_rounds
    return plan.paced_rounds if SCENARIOS[scenario].rate else plan.rounds


@dataclass
class Run:
    """One system's run of one scenario (one round)."""

    scenario: str
    system: str
    round: int
    commands: int
    duration_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    request_latencies_ms: list[float] = field(default_factory=list)
    jitter_ms: list[float] = field(default_factory=list)  # tests.bench.jitter, during the run
    failed: int = 0
    load_samples: list[float] = field(default_factory=list)
    busy_cores: float = 0.0
    cpu_elsewhere_s: dict[str, float] = field(default_factory=dict)  # simulator, broker, bench
    exit_code: int | None = None
    error: str | None = None
    started_ms: float = 0.0  # wall clock when the measured commands began
    scrapes: dict[str, Any] = field(default_factory=dict)  # the scraper's counts, if scraped
    # A worker's counters during the run, off its /metrics: transactions, flushes.
    counters: dict[str, float] = field(default_factory=dict)
    client_latencies_ms: list[float] = field(default_factory=list)  # worker_client: cancel()

    def summary(self, *, samples: bool = False) -> dict[str, Any]:
        out = {
            "scenario": self.scenario,
            "system": self.system,
            "round": self.round,
            "commands": self.commands,
            "duration_s": round(self.duration_s, 3),
            "throughput_cmd_s": round(self.commands / self.duration_s, 1)
            if self.duration_s
            else None,
            "cpu_s": round(self.cpu_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "failed": self.failed,
            "load_average_1m": round(sum(self.load_samples) / len(self.load_samples), 2)
            if self.load_samples
            else None,
            "machine_busy_cores": self.busy_cores,
            "cpu_elsewhere_s": {k: round(v, 3) for k, v in self.cpu_elsewhere_s.items()},
            "exit_code": self.exit_code,
            "error": self.error,
        }
        if self.scrapes:
            out["scrapes"] = self.scrapes
        if self.counters:
            out["counters"] = self.counters
        if samples:
            out["started_ms"] = self.started_ms
            kept = {
                "result": self.latencies_ms,
                "request": self.request_latencies_ms,
                "jitter": self.jitter_ms,
            }
            if self.client_latencies_ms:
                kept["client"] = self.client_latencies_ms
            out["samples_ms"] = kept
        return out


class Progress:
    """One line, rewritten in place (a plain line per update when not on a terminal)."""

    def __init__(self, total_runs: int) -> None:
        self.total_runs = total_runs
        self.done_runs = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.25 if self.tty else 5.0):
            return
        self._last = now
        width = 24
        filled = int(width * self.done_runs / max(1, self.total_runs))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done_runs}/{self.total_runs} {text}"
        if self.tty:
            sys.stderr.write(f"\r\x1b[2K{line[:160]}")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish_run(self, text: str) -> None:
        self.done_runs += 1
        if self.tty:
            sys.stderr.write("\r\x1b[2K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


@dataclass
class Bench:
    broker: Broker
    sim: SimControl
    accounts_file: Path
    producer: AIOKafkaProducer
    progress: Progress
    live: set[Process]
    connections: int
    others: dict[str, int]  # the other processes whose CPU is counted: simulator, broker, bench


def order_specs(count: int) -> list[dict[str, Any]]:
    symbols = sorted(UM_SYMBOLS)
    return [
        {
            "account": ACCOUNTS[(i % KEYS) % len(ACCOUNTS)],
            "kind": "algo",
            "symbol": symbols[(i % KEYS) % len(symbols)],
        }
        for i in range(count)
    ]


async def wait_for_line(proc: Process, text: str, timeout_s: float) -> None:
    """Like ``Process.wait_for_line``, without blocking the event loop (Ctrl-C stays prompt)."""
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in proc.lines):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(proc.lines[-30:])
            raise RuntimeError(f"{proc.name} did not print {text!r}; output:\n{tail}")
        await asyncio.sleep(0.05)


async def start_system(bench: Bench, system: str, topics: Topics, scenario: str) -> Process:
    bootstrap = bench.broker.bootstrap
    if system.startswith("worker"):
        settings = worker_settings(
            bootstrap,
            topics,
            bench.sim.url,
            bench.accounts_file,
            delivery="at_least_once" if system == "worker_at_least_once" else "exactly_once",
            rate_weight_limit=UNLIMITED,
            rate_order_limit=UNLIMITED,
            metrics_port=free_port(),  # counters read off it, and scraped (SCRAPE_RATES)
        )
        if PROFILE_DIR is not None:  # the same worker under cProfile, written when it stops
            out = PROFILE_DIR / f"{system}-{uuid.uuid4().hex[:6]}.prof"
            argv = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "worker", "run"]
        elif STAGES_DIR is not None:  # the same worker with marks on its request path
            out = STAGES_DIR / f"{scenario}.{system}.{uuid.uuid4().hex[:6]}.json"
            argv = [sys.executable, "-m", "tests.bench.stages", str(out), "run"]
        else:
            argv = cli_argv("run")
        proc = Process("worker", argv, env={**worker_env(settings), **WORKER_ENV})
        METRICS_PORTS[proc.proc.pid] = settings.metrics_port
        ready = "taken over, processing"  # partitions assigned and their producers ready
    else:
        config = {
            "system": system,
            "bootstrap": bootstrap,
            "commands_topic": topics.commands,
            "results_topic": topics.results,
            "group_id": f"bench-{uuid.uuid4().hex[:8]}",
            "papi_url": bench.sim.url,
            "connections": bench.connections,
            "accounts": {a: list(HMAC_ACCOUNTS[a]) for a in ACCOUNTS},
        }
        argv = [sys.executable, "-m", "tests.bench.systems"]
        proc = Process(system, argv, env={CONFIG_ENV: orjson.dumps(config).decode()})
        ready = READY
    bench.live.add(proc)
    try:
        await wait_for_line(proc, ready, 90)
    except BaseException:
        proc.stop(timeout_s=10)
        bench.live.discard(proc)
        raise
    return proc


async def results_consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(  # no group: every partition, from the beginning
        topic,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        # aiokafka keeps one fetch in flight per broker: a partition whose records were just
        # handed over is fetched again only when the long poll for the others returns. With
        # one broker that adds up to fetch_max_wait_ms to "visible"; 20 ms bounds the error
        # (and costs the idle broker about 0.15 of a core, counted in its CPU per command).
        fetch_max_wait_ms=READER_FETCH_WAIT_MS,
    )
    await consumer.start()
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        if time.monotonic() > deadline:
            await consumer.stop()
            raise RuntimeError(f"no partitions of {topic} assigned in time")
        await asyncio.sleep(0.02)
    await consumer.seek_to_beginning(*consumer.assignment())
    return consumer


async def wait_for_leaders(producer: AIOKafkaProducer, topics: list[str]) -> None:
    """Every partition of fresh topics has a leader (and the producer knows it) before the
    clock starts: no metadata wait is measured, no reader trips over a leaderless partition."""
    deadline = time.monotonic() + 30
    while True:
        cluster = producer.client.cluster
        missing = [
            (topic, p)
            for topic in topics
            for p in await producer.partitions_for(topic)
            if cluster.leader_for_partition(TopicPartition(topic, p)) in (None, -1)
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"partitions without a leader: {missing}")
        await asyncio.sleep(0.05)
        await producer.client.force_metadata_update()


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a Kafka client, in bounded time even when the broker is gone (an interrupt)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.stop(), 10)


def is_failure(event: dict[str, Any]) -> bool:
    if "ok" in event:  # the reference systems
        return not event["ok"]
    return bool(event.get("type") != "strategy.canceled")


def raise_if_exited(proc: Process) -> None:
    """A system that ended while results were awaited: say so, with its last output."""
    if proc.proc.poll() is not None:
        tail = "\n".join(proc.lines[-20:])
        raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{tail}")


def start_storm(bench: Bench, worker: Process, rate: float) -> Process:
    """Scrape ``worker``'s /metrics ``rate`` times a second (tests.bench.scrape_storm)."""
    port = METRICS_PORTS[worker.proc.pid]
    argv = [sys.executable, "-m", "tests.bench.scrape_storm"]
    storm = Process("scrape_storm", [*argv, f"http://127.0.0.1:{port}/metrics", str(rate)])
    bench.live.add(storm)
    return storm


# The worker's counters the bench reads before and after a run (name -> metric line prefix).
COUNTERS = {
    "transactions": 'cancel_worker_transactions_total{outcome="committed"}',
    "failed_transactions": 'cancel_worker_transactions_total{outcome="failed"}',
    "flushes": "cancel_worker_offset_commits_total",
}


def parse_counters(text: str) -> dict[str, float]:
    """The :data:`COUNTERS` in a /metrics answer (Prometheus text format); absent ones 0."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for name, prefix in COUNTERS.items():
            if line.startswith(prefix + " "):
                out[name] = float(line[len(prefix) :].split()[0])
    return out


def read_counters(port: int) -> dict[str, float]:
    """One scrape of a worker's /metrics, for its :data:`COUNTERS`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"/metrics answered {response.status}")
        return parse_counters(body)
    finally:
        conn.close()


def stop_storm(bench: Bench) -> dict[str, Any]:
    """Stop the scrape storm; what it counted (ok, failed, latency)."""
    summary: dict[str, Any] = {}
    for storm in [p for p in bench.live if p.name == "scrape_storm"]:
        storm.stop(timeout_s=10)
        bench.live.discard(storm)
        with contextlib.suppress(orjson.JSONDecodeError, IndexError):
            summary = orjson.loads(storm.lines[-1])
    return summary


def stop_jitter(bench: Bench, jitter: Process) -> list[float]:
    """Stop the jitter probe; what it measured (empty if it said nothing readable)."""
    jitter.stop(timeout_s=5)
    bench.live.discard(jitter)
    try:
        values = orjson.loads(jitter.lines[-1]) if jitter.lines else []
    except orjson.JSONDecodeError:
        return []
    return [float(v) for v in values] if isinstance(values, list) else []


def settle_collector() -> None:
    """The bench's own collector, settled before every measured run as the simulator's is:
    what the bench holds (every run's commands, orders, samples and the simulator's request
    log) is collected once and then left out of the collections during the run
    (``gc.freeze``). The bench stamps a command's produce time and then sends it; a full
    collection in between (16-22 ms over what earlier runs left) was counted as the
    system's latency, in whichever system happened to run. The previous run's frozen
    objects are thawed first, so that what it left behind is freed here."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def keep_pace(started: float, i: int, rate: float | None) -> None:
    """Wait until the ``i``-th command of a run paced at ``rate`` (per second, from the
    monotonic ``started``) is due; at once without a rate."""
    if rate is not None:
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def client_call(client: CancelClient, cmd: dict[str, Any], symbol: str) -> Awaitable[Result]:
    """``cmd`` (an algo order's cancel) as the client library sends it: ``cancel()``."""
    return client.cancel(
        cmd["account"],
        "UM",
        timeout=CLIENT_TIMEOUT_S,
        symbol=symbol,
        algo_id=cmd["algo_id"],
        command_id=cmd["command_id"],
    )


async def start_client(bench: Bench, topics: Topics) -> CancelClient:
    """worker_client's CancelClient on the run's topics, signing as the tests' producer."""
    client = CancelClient(
        bench.broker.bootstrap,
        commands_topic=topics.commands,
        results_topic=topics.results,
        producer_id=TEST_PRODUCER_ID,
        private_key=TEST_PRODUCER_KEY,
    )
    await client.start()
    return client


async def warm_up(
    bench: Bench,
    proc: Process,
    consumer: AIOKafkaConsumer,
    topic: str,
    commands: list[dict[str, Any]],
    label: str,
    rate: float | None = None,
    client: tuple[CancelClient, list[str]] | None = None,
) -> None:
    """Send ``commands`` (at once, or at a paced scenario's ``rate``; through ``client``'s
    ``cancel()``, with the orders' symbols, if given) and wait for all their results: the
    system's connections are open and its code paths taken before its clock starts."""
    waiting = {c["command_id"] for c in commands}
    started = time.monotonic()
    calls: list[asyncio.Future[Result]] = []
    for i, cmd in enumerate(commands):
        await keep_pace(started, i, rate)
        if client is not None:
            calls.append(asyncio.ensure_future(client_call(client[0], cmd, client[1][i])))
            continue
        cmd["issued_at"] = time.time_ns() // 1_000_000
        value = orjson.dumps(cmd)
        await bench.producer.send(
            topic, value, key=f"key-{i % KEYS}".encode(), headers=signed(value)
        )
    await bench.producer.flush()
    await asyncio.gather(*calls)
    deadline = time.monotonic() + 120 + len(commands) / 20
    while waiting:
        for records in (await consumer.getmany(timeout_ms=100)).values():
            for record in records:
                waiting.discard(orjson.loads(record.value).get("command_id"))
        raise_if_exited(proc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up timed out with {len(waiting)} results missing")
        done = len(commands) - len(waiting)
        bench.progress.show(f"{label}: warming up, {done}/{len(commands)}")


async def run_once(
    bench: Bench, scenario: Scenario, system: str, count: int, rnd: int, warmup: int = 0
) -> Run:
    """One measured run; the first ``warmup`` commands are answered before the clock starts
    and are not counted."""
    run = Run(scenario.name, system, rnd, count)
    label = f"{scenario.name} {system} round {rnd + 1}"
    bench.progress.show(f"{label}: preparing", force=True)
    topics = await fresh_topics(bench.broker.bootstrap, partitions=PARTITIONS)
    specs = order_specs(warmup + count)
    # Each order with the account it was seeded in, which its command names.
    seeded = list(zip(bench.sim.seed(specs), (spec["account"] for spec in specs), strict=True))
    bench.sim.settle()  # the exchange's own collector pauses are not the system's latency
    warm_orders, orders = seeded[:warmup], seeded[warmup:]
    tag = uuid.uuid4().hex[:8]

    def commands_for(seeded: list[tuple[dict[str, Any], str]], kind: str) -> list[dict[str, Any]]:
        return [
            command(account, order, command_id=f"bench-{tag}-{kind}{i:06d}")
            for i, (order, account) in enumerate(seeded)
        ]

    warm_commands = commands_for(warm_orders, "w")
    commands = commands_for(orders, "")
    symbols = [spec["symbol"] for spec in specs]
    keys = [f"key-{i % KEYS}".encode() for i in range(count)]
    index_of_order = {order["algo_id"]: i for i, (order, _) in enumerate(orders)}
    index_of_command = {c["command_id"]: i for i, c in enumerate(commands)}
    await wait_for_leaders(bench.producer, [topics.commands, topics.results])
    consumer = await results_consumer(bench.broker.bootstrap, topics.results)
    proc: Process | None = None
    client: CancelClient | None = None
    try:
        proc = await start_system(bench, system, topics, scenario.name)
        pid = proc.proc.pid
        port = METRICS_PORTS.get(pid) if system.startswith("worker") else None
        if system == "worker_client":
            client = await start_client(bench, topics)
        if warm_commands:
            await warm_up(
                bench,
                proc,
                consumer,
                topics.commands,
                warm_commands,
                label,
                scenario.rate,
                None if client is None else (client, symbols[:warmup]),
            )
        jitter = Process("jitter", [sys.executable, "-m", "tests.bench.jitter"])
        bench.live.add(jitter)
        await wait_for_line(jitter, JITTER_READY, 30)
        counters0 = await asyncio.to_thread(read_counters, port) if port else {}
        if system in SCRAPE_RATES:
            storm = start_storm(bench, proc, SCRAPE_RATES[system])
            await wait_for_line(storm, STORM_READY, 30)
        settle_collector()
        produced_ms = [0.0] * count  # sub-millisecond, as the arrival times
        seen_ms: dict[int, float] = {}
        consumed_ms: dict[int, float] = {}  # the Kafka floor's consume time, from its results
        client_ms = [0.0] * count  # worker_client: cancel()'s round trip
        sent = 0

        async def call(i: int) -> None:
            assert client is not None
            t0 = time.perf_counter()
            await client_call(client, commands[i], symbols[warmup + i])
            client_ms[i] = (time.perf_counter() - t0) * 1000

        async def produce() -> None:
            nonlocal sent
            futures = []
            started = time.monotonic()
            if client is not None:  # publish -> typed result, each call on its own
                calls = []
                for i in range(count):
                    await keep_pace(started, i, scenario.rate)
                    produced_ms[i] = time.time_ns() / 1e6
                    calls.append(asyncio.create_task(call(i)))
                    sent = i + 1
                await asyncio.gather(*calls)
                return
            for i in range(count):
                await keep_pace(started, i, scenario.rate)
                now_ns = time.time_ns()
                now = now_ns // 1_000_000
                commands[i]["issued_at"] = now
                produced_ms[i] = now_ns / 1e6
                value = orjson.dumps(commands[i])
                # Signed as every command is (the worker refuses unsigned ones): about 40 µs
                # here, before the record leaves, for every system alike.
                futures.append(
                    await bench.producer.send(
                        topics.commands, value, key=keys[i], timestamp_ms=now, headers=signed(value)
                    )
                )
                sent = i + 1
            await asyncio.gather(*futures)

        seq0 = bench.sim.last_seq()
        cpu0, machine0 = measure.CpuTime.read(pid), measure.MachineCpu.read()
        others0 = {name: measure.CpuTime.read(p) for name, p in bench.others.items()}
        run.load_samples.append(os.getloadavg()[0])
        next_load = time.monotonic() + 1
        first_ms = run.started_ms = time.time() * 1000
        producing = asyncio.create_task(produce())
        paced_s = count / scenario.rate if scenario.rate else 0.0
        deadline = time.monotonic() + 120 + paced_s + count / 20
        try:
            while len(seen_ms) < count:
                batches = await consumer.getmany(timeout_ms=100)
                now_ms = time.time() * 1000
                for records in batches.values():
                    for record in records:
                        event = orjson.loads(record.value)
                        i = index_of_command.get(event.get("command_id"), -1)
                        if i >= 0 and i not in seen_ms:
                            seen_ms[i] = now_ms
                            run.failed += is_failure(event)
                            if isinstance(event.get("at_us"), int):
                                consumed_ms[i] = event["at_us"] / 1000
                if producing.done() and producing.exception() is not None:
                    raise RuntimeError(f"producing failed: {producing.exception()!r}")
                raise_if_exited(proc)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out with {len(seen_ms)}/{count} results")
                if time.monotonic() >= next_load:
                    run.load_samples.append(os.getloadavg()[0])
                    next_load += 1
                bench.progress.show(f"{label}: sent {sent}/{count}, results {len(seen_ms)}/{count}")
            last_ms = max(seen_ms.values())
            # Every send acknowledged; worker_client's calls hold their results (they come a
            # moment after the bench's reader saw them). Awaited before anything below blocks
            # the loop (stopping the probes), which would lengthen the last calls' round trip.
            await asyncio.wait_for(producing, max(1.0, deadline - time.monotonic()))
            run.cpu_s = measure.CpuTime.read(pid).seconds_since(cpu0)
            run.busy_cores = measure.MachineCpu.read().busy_cores_since(machine0)
            run.cpu_elsewhere_s = {
                name: measure.CpuTime.read(p).seconds_since(others0[name])
                for name, p in bench.others.items()
            }
            run.peak_rss_mb = measure.peak_rss_mb(pid)
            run.load_samples.append(os.getloadavg()[0])
            run.jitter_ms = stop_jitter(bench, jitter)
            if system in SCRAPE_RATES:
                run.scrapes = stop_storm(bench)
                if not run.scrapes or run.scrapes.get("failed"):
                    run.error = f"scrapes: {run.scrapes or 'no summary'}"
            if port:
                counters1 = await asyncio.to_thread(read_counters, port)
                run.counters = {k: v - counters0[k] for k, v in counters1.items()}
            if client is not None:
                run.client_latencies_ms = client_ms
        finally:
            if not producing.done():
                producing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producing
        run.duration_s = (last_ms - first_ms) / 1000
        run.latencies_ms = [seen_ms[i] - produced_ms[i] for i in range(count)]
        if system == "kafka_floor":
            # No request: its counterpart is the moment the floor consumed the command.
            run.request_latencies_ms = [
                consumed_ms[i] - produced_ms[i] for i in sorted(consumed_ms)
            ]
        else:
            arrived: dict[int, float] = {}
            for request in bench.sim.requests(seq0):
                params = request.get("params") or {}
                if request["method"] == "DELETE" and "algoId" in params:
                    i = index_of_order.get(int(params["algoId"]), -1)
                    if i >= 0 and i not in arrived:
                        arrived[i] = request["arrived_us"] / 1000
            run.request_latencies_ms = [arrived[i] - produced_ms[i] for i in sorted(arrived)]
            if len(arrived) < count:
                run.error = f"{count - len(arrived)} commands without a request at the exchange"
    finally:
        await stop_client(consumer)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 10)
        for leftover in [p for p in bench.live if p.name == "jitter"]:
            stop_jitter(bench, leftover)
        if any(p.name == "scrape_storm" for p in bench.live):
            stop_storm(bench)
        if proc is not None:
            run.exit_code = proc.stop(timeout_s=30)
            bench.live.discard(proc)
    return run


def plan_runs(
    plan: Plan, systems: list[str], scenarios: list[str], commands: int | None
) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """Per scenario and round: the systems in the round's order, with their commands."""
    out = []
    for name in scenarios:
        base = commands if commands is not None else plan.commands[name]
        per_system = {
            s: min(base, plan.naive_commands[name]) if s == "naive" and commands is None else base
            for s in systems
            if runs_in(s, name)
        }
        rounds = rounds_of(plan, name)
        for rnd in range(rounds):
            here = [s for s in systems if s in per_system]
            order = here[rnd % len(here) :] + here[: rnd % len(here)] if here else []
            runs = []
            for s in order:
                share = per_system[s] // rounds + (rnd < per_system[s] % rounds)
                if share:
                    runs.append((s, share))
            out.append((name, rnd, runs))
    return out


async def bench_all(
    plan: Plan,
    schedule: list[tuple[str, int, list[tuple[str, int]]]],
    broker: Broker,
    sim_url: str,
    accounts_file: Path,
    live: set[Process],
    connections: int,
    others: dict[str, int],
    txn_load: bool = False,
) -> list[Run]:
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM unwinds like Ctrl-C does: the run in hand stops its system, then everything else.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    sim = SimControl(sim_url)
    sim.configure(weight_limit=UNLIMITED, order_limit=UNLIMITED)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0)
    await producer.start()
    total = sum(len(runs) for _, _, runs in schedule)
    bench = Bench(broker, sim, accounts_file, producer, Progress(total), live, connections, others)
    runs: list[Run] = []
    try:
        if txn_load:
            await start_txn_load(bench)
        await warm_up_round(bench, plan, schedule)
        for name, rnd, order in schedule:
            scenario = SCENARIOS[name]
            sim.configure(fixed_latency_ms=scenario.latency_ms)
            for system, count in order:
                try:
                    warmup = plan.warmup_for(scenario)
                    run = await run_once(bench, scenario, system, count, rnd, warmup)
                except Exception as exc:  # noqa: BLE001 - a failed run is reported, the bench goes on
                    run = Run(name, system, rnd, count, error=f"{type(exc).__name__}: {exc}")
                runs.append(run)
                bench.progress.finish_run(describe(run, rounds_of(plan, name)))
    except asyncio.CancelledError:
        # Interrupted: a Ctrl-C on a terminal reaches the broker too; its going away is no news.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        raise
    finally:
        await stop_client(producer)
        sim.close()
    return runs


async def start_txn_load(bench: Bench) -> None:
    """``--txn-load``: an exactly-once worker's transactions beside every run, until the end
    (:mod:`tests.bench.txnload`); the broker's CPU per command then counts them too."""
    argv = [sys.executable, "-m", "tests.bench.txnload", bench.broker.bootstrap]
    load = Process("txn-load", argv)
    bench.live.add(load)
    await wait_for_line(load, TXN_LOAD_READY, 60)
    bench.progress.show("transaction load started", force=True)


async def warm_up_round(
    bench: Bench, plan: Plan, schedule: list[tuple[str, int, list[tuple[str, int]]]]
) -> None:
    """Every system once through the 0 ms scenario, unmeasured, before anything counts: the
    broker's JIT-compiled paths (fetch, produce, transactions) are warm for the first
    measured run as for the last, whatever the order."""
    # Not the systems that run only in some scenarios: the same worker as another one.
    systems = list(
        dict.fromkeys(
            system for _, _, runs in schedule for system, _ in runs if system not in ONLY_IN
        )
    )
    if not plan.warmup_round or not systems:
        return
    bench.sim.configure(fixed_latency_ms=SCENARIOS["0ms"].latency_ms)
    for system in systems:
        run = await run_once(bench, SCENARIOS["0ms"], system, plan.warmup_round, 0)
        if run.error:
            raise RuntimeError(f"warm-up run of {system} failed: {run.error}")
        bench.progress.show(f"warm-up: {system} done", force=True)


def describe(run: Run, rounds: int) -> str:
    where = f"{run.scenario:<8} {run.system:<20} round {run.round + 1}/{rounds}"
    if run.error and not run.duration_s:
        return f"{where}: FAILED: {run.error.splitlines()[0]}"
    lat = measure.percentiles(run.latencies_ms) or {}
    text = (
        f"{where}: {run.commands} cmds in {run.duration_s:.2f} s = "
        f"{run.commands / run.duration_s:,.0f} cmd/s, result p50 {lat.get('p50')} ms, "
        f"{run.cpu_s * 1e6 / run.commands:,.0f} µs CPU/cmd"
    )
    if run.failed:
        text += f", {run.failed} results not successful"
    if run.error:
        text += f" ({run.error})"
    return text


PROFILE_DIR: Path | None = None  # --profile: where the worker's profiles go
WORKER_ENV: dict[str, str] = {}  # --worker-setting: CANCEL_WORKER_* for every worker system
# Settings the bench gives each worker itself: its broker, topics, simulator, keys, delivery
# mode, metrics port (its counters are read there) and limits (out of the way).
BENCH_OWNED = frozenset(
    {
        "BOOTSTRAP_SERVERS",
        "GROUP_ID",
        "COMMANDS_TOPIC",
        "RESULTS_TOPIC",
        "DEADLETTER_TOPIC",
        "PAPI_URL",
        "TIME_URL",
        "ACCOUNTS_FILE",
        "PRODUCERS_FILE",
        "PRODUCER_ID",
        "PRODUCER_KEY_FILE",
        "DELIVERY",
        "METRICS_PORT",
        "RATE_WEIGHT_LIMIT",
        "RATE_ORDER_LIMIT",
        "LOG_LEVEL",
    }
)
STAGES_DIR: Path | None = None  # --stages: where the worker's request-path marks go


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer commands (bench-quick)")
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated, of: {', '.join(SYSTEMS)}",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--commands",
        type=int,
        default=None,
        help="commands per system and scenario, over all rounds (the naive system too)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="runs per system and scenario (full: 2, paced100 5, paced10 3; quick: 2)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unmeasured commands at the start of every run (full 100, quick 50)",
    )
    parser.add_argument(
        "--paced-warmup-s",
        type=float,
        default=None,
        help="seconds of unmeasured commands at the start of every paced run, at its pace\n"
        "(full 3, quick 2)",
    )
    parser.add_argument(
        "--warmup-round",
        type=int,
        default=None,
        help="commands per system in the unmeasured first round (full 2000, quick 500; 0: none)",
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="pipeline_floor's keep-alive connections"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="the JSON results file")
    parser.add_argument(
        "--samples",
        action="store_true",
        help="keep every run's latencies in the JSON (runs[].samples_ms, in command order):\n"
        "where in a run the tail sits",
    )
    parser.add_argument(
        "--txn-load",
        action="store_true",
        help="run an exactly-once worker's transactions (6 partitions, 100 commands/s) beside\n"
        "every system, on a scratch topic: every system meets a broker as busy as the\n"
        "default worker makes it (tests.bench.txnload)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the worker under cProfile, one .prof file per run in DIR (figures are then\n"
        "slower: use it to see where the time goes, not to measure)",
    )
    parser.add_argument(
        "--stages",
        type=Path,
        default=None,
        metavar="DIR",
        help="mark the worker's path from fetch to request (tests.bench.stages), one file per\n"
        "run in DIR; the time between the marks is printed and kept in the JSON (stages)",
    )
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every worker system, as the variable CANCEL_WORKER_<NAME> (e.g.\n"
        "TRANSACTION_INTERVAL_MS=20: what a longer interval trades); repeatable",
    )
    args = parser.parse_args(argv)
    setting_names = {f.name.upper() for f in dataclasses.fields(Settings)}
    for item in args.worker_setting:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            parser.error(f"--worker-setting: {item!r} is not NAME=VALUE (NAME as in the settings)")
        if name not in setting_names:
            parser.error(f"--worker-setting: {name} is not a setting (docs/settings.md)")
        if name in BENCH_OWNED:
            parser.error(f"--worker-setting: {name} is the bench's own (what it measures needs it)")
        WORKER_ENV[f"{ENV_PREFIX}{name}"] = value
    if args.profile is not None and args.stages is not None:
        parser.error("--profile and --stages: one at a time (each slows what the other measures)")
    for option, known in (("systems", SYSTEMS), ("scenarios", tuple(SCENARIOS))):
        chosen = [s.strip() for s in getattr(args, option).split(",") if s.strip()]
        unknown = [s for s in chosen if s not in known]
        if unknown or not chosen:
            parser.error(
                f"--{option}: unknown {unknown or 'none given'}; known: {', '.join(known)}"
            )
        setattr(args, option, [s for s in known if s in chosen])
    if args.commands is not None and args.commands < 1:
        parser.error("--commands must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for option in ("warmup", "paced_warmup_s", "warmup_round"):
        if (getattr(args, option) or 0) < 0:
            parser.error(f"--{option.replace('_', '-')} must not be negative")
    if args.profile is not None:
        global PROFILE_DIR  # noqa: PLW0603 - one option, read by start_system
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE_DIR = args.profile
    if args.stages is not None:
        global STAGES_DIR  # noqa: PLW0603 - one option, read by start_system
        args.stages.mkdir(parents=True, exist_ok=True)
        STAGES_DIR = args.stages
    return args


class _QuietLeaderMoves(logging.Filter):
    """A fresh topic's leader can move once just after creation; the client retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NotLeaderForPartitionError" not in record.getMessage()


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = dataclasses.replace(
            plan, rounds=args.rounds, paced_rounds=args.rounds, paced10_rounds=args.rounds
        )
    if args.warmup is not None:
        plan = dataclasses.replace(plan, warmup=args.warmup)
    if args.paced_warmup_s is not None:
        plan = dataclasses.replace(plan, paced_warmup_s=args.paced_warmup_s)
    if args.warmup_round is not None:
        plan = dataclasses.replace(plan, warmup_round=args.warmup_round)
    schedule = plan_runs(plan, args.systems, args.scenarios, args.commands)
    signal.signal(signal.SIGTERM, _terminate)
    logging.getLogger("aiokafka.consumer.fetcher").addFilter(_QuietLeaderMoves())
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="cancel-worker-bench-"))
    live: set[Process] = set()
    broker: Broker | None = None
    sim_proc: Process | None = None
    runs: list[Run] = []
    load_before = os.getloadavg()
    try:
        print(
            f"bench ({plan.name}): starting broker and simulator ...", file=sys.stderr, flush=True
        )
        broker = start_broker(work / "kafka")
        accounts_file = write_accounts(work / "secrets")
        sim_proc, sim_url = start_sim(accounts_file)
        others = {
            "simulator": sim_proc.proc.pid,
            "broker": int((broker.data_dir / "broker.pid").read_text()),
            "bench": os.getpid(),
        }
        runs = asyncio.run(
            bench_all(
                plan,
                schedule,
                broker,
                sim_url,
                accounts_file,
                live,
                args.connections,
                others,
                txn_load=args.txn_load,
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: stopping every process ...", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        for proc in list(live):
            proc.stop(timeout_s=10)
        if sim_proc is not None:
            sim_proc.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    wall_s = time.monotonic() - started
    report = results_json(
        runs,
        plan_name=plan.name,
        rounds={n: rounds_of(plan, n) for n in args.scenarios},
        scenarios={n: dataclasses.asdict(SCENARIOS[n]) for n in args.scenarios},
        started_at=started_at,
        wall_s=wall_s,
        machine=measure.machine(),
        load_before=load_before,
        extra={
            "connections_pipeline_floor": args.connections,
            "partitions": PARTITIONS,
            "txn_load": args.txn_load,
            "worker_settings": {k.removeprefix(ENV_PREFIX): v for k, v in WORKER_ENV.items()},
        },
        samples=args.samples,
    )
    if args.stages is not None:
        report["stages"] = stage_figures(args.stages)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(render_table(report))
    for scenario, by_system in report.get("stages", {}).items():
        for system, figures in by_system.items():
            print(f"\n{scenario} {system}: fetch → request, one record per fetch")
            print(stages.render(figures))
    print(f"\nwall time {wall_s:.0f} s; results in {args.out}")
    if any(r.error for r in runs):
        raise SystemExit(1)


def stage_figures(directory: Path) -> dict[str, dict[str, Any]]:
    """The marks of every run, per scenario and system (file names: scenario.system.id)."""
    runs: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(directory.glob("*.json")):
        scenario, system, _ = path.name.split(".", 2)
        runs.setdefault((scenario, system), []).append(path)
    out: dict[str, dict[str, Any]] = {}
    for (scenario, system), paths in runs.items():
        figures = stages.summarize(paths)
        if figures:  # bursts rarely fetch one record at a time
            out.setdefault(scenario, {})[system] = figures
    return out


if __name__ == "__main__":
    main()
