"""The rare faults of exactly-once delivery, on the real broker: a flush cut short before its
commit, results that cannot be published, a broker without OffsetFetch v7, a take-over the
cluster refuses for good. (The pipeline's side of each is in tests/test_pipeline_memory.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import TransactionalIdAuthorizationFailed

from tests.acl_broker import PASSWORD, AclBroker, grant, start_acl_broker, worker_security
from tests.memory_ports import MemoryLog, MemorySink, MemorySource
from tests.support import (
    SimControl,
    Topics,
    command,
    consume,
    events_of,
    fresh_topics,
    in_group,
    owning,
    produce,
    read_to_end,
    running_worker,
    signed,
    until,
    worker_env,
    worker_settings,
)
from tests.test_delivery import key_of, scenario, wait_for_results
from tests.test_pipeline_memory import Handler, fill
from tests.test_staging import results, until_unstable
from worker import metrics
from worker.kafka.fencing import NeedsNewerBrokerError, group_member, stable_committed
from worker.kafka.io import COMMITTING, REFUSED, ConsumerSource, refusal
from worker.kafka.pipeline import Flush, Partition, Pipeline, TakeOverRefusedError
from worker.tools.devstack import REPO, Broker, Process, start_worker

# -- a flush cut short before its commit ---------------------------------------------------------


@pytest.mark.integration
async def test_a_flush_cut_short_before_its_commit_aborts_its_transaction(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Cut short (a bounded final flush ran out of time) before EndTxn was sent: the open
    transaction is aborted before the producer stops, so that read_committed readers of the
    results are not held back until some take-over fences the id (or its timeout)."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part: Partition = (topics.commands, 0)
    async with (
        in_group(settings) as consumer,
        owning(settings, lambda: group_member(consumer), [part]) as sink,
    ):
        batch = Flush(results(settings, b"1", b"2", b"3"), 3)
        assert sink.stage(part, batch.records[:2])
        await until_unstable(broker.bootstrap, topics.results, 2)  # in the open transaction
        assert sink.stage(part, batch.records[2:])  # still being sent when the flush starts
        flush = asyncio.create_task(sink.flush({part: batch}))
        await asyncio.sleep(0)
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        assert sink.in_doubt == frozenset()  # the commit was not sent
        await until_unstable(broker.bootstrap, topics.results, 0)  # aborted: not held back
        await sink.assigned([part])  # taken over again, as the next owner would
        await sink.flush({part: batch})
    assert [r.value for r in await read_to_end(broker.bootstrap, topics.results)] == [
        b"1",
        b"2",
        b"3",
    ]


@pytest.mark.integration
async def test_a_flush_cut_short_after_its_commit_is_settled_on_the_same_producer(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Cut short once EndTxn(COMMIT) is sent: the partitions are in doubt, nothing is
    staged meanwhile, and the outcome is learnt on the producer that sent the commit (as
    Java's commitTransaction contract says), never by sending the results again."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part: Partition = (topics.commands, 0)
    async with (
        in_group(settings) as consumer,
        owning(settings, lambda: group_member(consumer), [part]) as sink,
    ):
        producer = sink._producer
        flush = asyncio.create_task(sink.flush({part: Flush(results(settings, b"1", b"2"), 2)}))
        while sink._committing is None and not flush.done():  # noqa: ASYNC110 - EndTxn sent
            await asyncio.sleep(0)
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        assert sink.in_doubt == {part}
        assert not sink.stage(part, results(settings, b"x"))  # no new transaction yet
        assert await sink.settle() is True
        assert sink.in_doubt == frozenset()
        assert sink._producer is producer  # learnt on the producer that sent the commit
        await sink.flush({part: Flush(results(settings, b"3"), 3)})
        assert await stable_committed(consumer, [part]) == {part: 3}
    assert [r.value for r in await read_to_end(broker.bootstrap, topics.results)] == [
        b"1",
        b"2",
        b"3",
    ]


# -- results that cannot be published ------------------------------------------------------------


def produce_quota(broker: Broker, client_id: str, bytes_per_s: int | None) -> None:
    """Set (or remove) a produce quota on a client id, with Kafka's own config tool: the
    broker holds the client's connection back, so its produce requests go unanswered
    while the cluster stays reachable. (A results topic with min.insync.replicas above
    its replication factor does the same on a cluster of several brokers; a single
    broker caps min.insync.replicas at the replication factor and accepts the writes.)"""
    change = (
        ["--add-config", f"producer_byte_rate={bytes_per_s}"]
        if bytes_per_s is not None
        else ["--delete-config", "producer_byte_rate"]
    )
    libs = REPO / "deploy" / "kafka" / "target" / broker.version / "libs"  # as kafka.sh
    for tool in ("kafka.admin.ConfigCommand", "org.apache.kafka.tools.ConfigCommand"):  # 3.x, 4.x
        argv = ["java", "-cp", f"{libs}/*", tool, "--bootstrap-server", broker.bootstrap]
        argv += ["--alter", "--entity-type", "clients", "--entity-name", client_id, *change]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0:
            return
        if "Could not find or load main class" not in done.stderr:
            raise AssertionError(f"{tool} failed: {done.stderr[-2000:]}")
    raise AssertionError("no ConfigCommand in Kafka's libraries")


def keyed(commands: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(c["account"].encode(), orjson.dumps(c)) for c in commands]


@pytest.mark.integration
async def test_results_that_cannot_be_published_are_said_within_seconds_then_answered_once(
    broker: Broker, sim: SimControl, accounts_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka is reachable but takes no results (the broker holds the producer back): a
    WARNING, the metric and /readyz say so within seconds, before the client gives up on
    a request (and long before HEALTH_STALL_S); once it takes them again, every command is
    answered exactly once."""
    caplog.set_level(logging.WARNING, logger="worker.kafka.pipeline")
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    client_id = f"held-{topics.results}"
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        client_id=client_id,
        kafka_request_timeout_ms=15_000,
        health_stall_s=20.0,
    )
    specs = [{"account": f"desk-{i % 3}", "market": "UM", "symbol": "BTCUSDT"} for i in range(12)]
    commands = [command(s["account"], o) for s, o in zip(specs, sim.seed(specs), strict=True)]
    first, second = commands[:6], commands[6:]

    def kafka_check() -> bool:
        return next(c.ok for c in worker.readiness() if c.name == "kafka")

    async with running_worker(settings) as worker:
        await produce(broker.bootstrap, topics.commands, keyed(first))
        await consume(broker.bootstrap, topics.results, len(first), timeout_s=60)
        await until(kafka_check, "ready before the fault", 30)
        failed = metrics.TRANSACTIONS.labels("failed")._value.get()
        await asyncio.to_thread(produce_quota, broker, f"{client_id}-producer", 1)
        try:
            await produce(broker.bootstrap, topics.commands, keyed(second))
            await until(lambda: not kafka_check(), "readiness failing", 14)
            # Said while the flush still waits, not when the client has given up on it.
            assert metrics.TRANSACTIONS.labels("failed")._value.get() == failed
            assert metrics.RESULTS_PUBLISHABLE._value.get() == 0
            said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any("results not published" in m for m in said), said
        finally:
            await asyncio.to_thread(produce_quota, broker, f"{client_id}-producer", None)
        await until(kafka_check, "ready again", 60)
        await until(lambda: worker.pipeline.oldest_in_hand_s() == 0, "all answered", 60)
        assert metrics.RESULTS_PUBLISHABLE._value.get() == 1
    events = events_of(await read_to_end(broker.bootstrap, topics.results))
    ids = sorted(e["command_id"] for e in events)
    assert ids == sorted(c["command_id"] for c in commands)  # each exactly once


# -- take-overs ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("require_stable", [False, True])
async def test_at_least_once_rewinds_where_the_broker_lacks_offset_fetch_v7(
    broker: Broker, sim: SimControl, accounts_file: Path, require_stable: bool
) -> None:
    """A broker older than Kafka 2.5 has no OffsetFetch v7 (require_stable): at-least-once
    reads the committed positions without it; exactly-once never does."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part: Partition = (topics.commands, 0)
    await produce(broker.bootstrap, topics.commands, [(b"k", b"{}")] * 5)
    async with in_group(settings) as consumer:
        tp = TopicPartition(*part)
        await consumer.commit({tp: 3})
        for conn in consumer._client._conns.values():  # as an old broker answers ApiVersions
            conn._versions[9] = (0, 6)
        source = ConsumerSource(consumer, require_stable=require_stable)
        if require_stable:
            with pytest.raises(NeedsNewerBrokerError):
                await source.rewind([part])
            return
        await source.rewind([part])
        assert await consumer.position(tp) == 3


class RefusingSink(MemorySink):
    async def assigned(self, parts: list[Partition]) -> None:  # type: ignore[override]
        raise refusal(TransactionalIdAuthorizationFailed(), f"taking the ids of {parts}")


async def test_a_take_over_the_cluster_refuses_stops_the_worker_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Authorization on the transactional id, the group or a topic is never retried
    forever: the run ends with the refusal (the worker exits 1 with its one line)."""
    log = MemoryLog()
    fill(log, ("cmd", 0), 3, [b"a"])
    source = MemorySource(log)
    pipeline = Pipeline(source, RefusingSink(log), Handler(), retry_initial_s=0.01)
    run = asyncio.create_task(pipeline.run())
    source.assign([("cmd", 0)])
    pipeline.on_assigned([("cmd", 0)])
    with pytest.raises(TakeOverRefusedError, match="TransactionalIdAuthorizationFailed"):
        await asyncio.wait_for(run, 10)
    assert all(isinstance(e(), Exception) for e in REFUSED)


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    """A broker of its own with an authorizer (tests/acl_broker.py), for this module."""
    b = start_acl_broker(tmp_path_factory.mktemp("kafka-acl"))
    try:
        yield b
    finally:
        b.stop()


async def authorized_run(
    acl_broker: AclBroker, sim: SimControl, accounts_file: Path, withheld: str | None
) -> tuple[Topics, dict[str, Any], Process]:
    """Fresh topics, the worker principal's ACLs on them, its group and its transactional
    ids (but the ``withheld`` resource's), one signed command, and a worker process."""
    topics = await fresh_topics(acl_broker.admin_bootstrap, partitions=1)
    settings = worker_settings(
        acl_broker.bootstrap, topics, sim.url, accounts_file, **worker_security()
    )
    acls: list[tuple[list[str], list[str]]] = [
        (
            ["--topic", topics.commands, "--topic", topics.results, "--topic", topics.deadletter],
            ["Read", "Write", "Describe"],
        ),
        (["--group", settings.group_id], ["Read", "Describe"]),
        (
            ["--resource-pattern-type", "prefixed", "--transactional-id", settings.group_id],
            ["Write", "Describe"],
        ),
    ]
    for resource, operations in acls:
        if f"--{withheld}" not in resource:
            await asyncio.to_thread(grant, acl_broker, resource, operations)
    [order] = sim.seed([{"account": "desk-0", "kind": "algo", "symbol": "BTCUSDT"}])
    await produce(acl_broker.admin_bootstrap, topics.commands, keyed([command("desk-0", order)]))
    return topics, order, start_worker(worker_env(settings))


@pytest.mark.integration
async def test_a_worker_process_with_its_acls_answers_on_a_broker_that_authorizes(
    acl_broker: AclBroker, sim: SimControl, accounts_file: Path
) -> None:
    """The ACLs the worker's principal needs (the topics, the group, the transactional
    ids) are enough: on the broker with an authorizer, the command is answered once."""
    topics, order, proc = await authorized_run(acl_broker, sim, accounts_file, None)
    try:
        [result] = events_of(await consume(acl_broker.admin_bootstrap, topics.results, 1))
    finally:
        code = proc.stop()
    assert code == 0, proc.output()[-3000:]
    assert result["type"] == "strategy.canceled", result
    assert sim.orders()[order["algo_id"]]["status"] == "CANCELED"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("withheld", "refused"),
    [
        ("transactional-id", "TransactionalIdAuthorizationFailed"),
        ("group", "GroupAuthorizationFailedError"),
    ],
)
async def test_a_worker_process_the_cluster_refuses_exits_1_with_one_line(
    acl_broker: AclBroker, sim: SimControl, accounts_file: Path, withheld: str, refused: str
) -> None:
    """A broker with an authorizer lets the worker's principal read and write its topics but
    withholds one ACL a take-over needs (WRITE on its transactional ids, or READ on its
    group): the worker process stops within a bound, exit 1, with one line naming the
    refusal, having published nothing and cancelled nothing (a take-over retried forever
    would keep it running, ready to nobody, with no trace)."""
    topics, order, proc = await authorized_run(acl_broker, sim, accounts_file, withheld)
    try:
        code = await asyncio.to_thread(proc.proc.wait, 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            f"the worker still runs 60 s into a refusal:\n{proc.output()[-3000:]}"
        ) from None
    proc.stop()  # exited: its output closed
    output = proc.output()
    assert code == 1, output[-3000:]
    said = [line for line in proc.lines if "refused by the cluster" in line]
    assert len(said) == 1, output[-3000:]
    assert refused in said[0], said
    assert "Traceback" not in output, output[-3000:]
    assert PASSWORD not in output
    assert await read_to_end(acl_broker.admin_bootstrap, topics.results) == []
    assert sim.orders()[order["algo_id"]]["status"] != "CANCELED"


# -- a fence under a live member -----------------------------------------------------------------


@pytest.mark.integration
async def test_a_fence_under_a_live_member_rejoins_and_answers_everything_once(
    broker: Broker, sim: SimControl, accounts_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stray InitProducerId on the member's transactional id (a stalled ex-member
    resuming) fences its producer while the member is still in the group with the same
    assignment: it rejoins, takes its partition over again, and every command is
    answered exactly once (before, its records were dropped until some rebalance)."""
    caplog.set_level(logging.INFO, logger="worker.kafka.pipeline")
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    # Long transactions: the stray producer comes while one is open, as a transaction
    # aborted by its timeout does (both bump the producer's epoch).
    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, transaction_interval_ms=4000
    )
    specs = [{"account": f"desk-{i % 3}", "market": "UM", "symbol": "BTCUSDT"} for i in range(10)]
    commands = [command(s["account"], o) for s, o in zip(specs, sim.seed(specs), strict=True)]
    first, second = commands[:5], commands[5:]
    async with running_worker(settings) as worker:
        await produce(broker.bootstrap, topics.commands, keyed(first))
        await consume(broker.bootstrap, topics.results, len(first), timeout_s=60)
        sink = worker._transactions
        assert sink is not None
        await produce(broker.bootstrap, topics.commands, keyed(second))
        await until_unstable(broker.bootstrap, topics.results, len(second))  # staged, open
        stray = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap,
            transactional_id=sink.transactional_id((topics.commands, 0)),
        )
        await stray.start()  # InitProducerId: the member's producer is fenced
        await stray.stop()
        await until(
            lambda: any("asking the group" in r.getMessage() for r in caplog.records),
            "a rejoin",
            30,
        )
        answered = await consume(broker.bootstrap, topics.results, len(commands), timeout_s=60)
        assert len(answered) == len(commands)  # before: the second half dropped for good
        assert worker.pipeline.fenced == frozenset()
        assert next(c for c in worker.readiness() if c.name == "partitions").ok
    events = events_of(await read_to_end(broker.bootstrap, topics.results))
    ids = sorted(e["command_id"] for e in events)
    assert ids == sorted(c["command_id"] for c in commands)  # each exactly once


# -- a stop cut short mid-commit, with real processes --------------------------------------------

CUT_SHORT = re.compile(r"a commit cut short|([1-9]\d*) result\(s\) whose commit was cut short")


async def steady_feed(
    bootstrap: str, topic: str, commands: list[dict[str, Any]], per_s: int, flowing: asyncio.Event
) -> None:
    """The commands one by one, ``per_s`` a second while ``flowing`` is set: results then
    come continuously, and the worker's transactions follow one another."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        for c in commands:
            await flowing.wait()
            value = orjson.dumps(c)
            await producer.send(topic, value, key=key_of(c), headers=signed(value))
            await asyncio.sleep(1 / per_s)
        await producer.flush()
    finally:
        await producer.stop()


def pause_on_line(proc: Process, text: str, pid: int, timeout_s: float) -> None:
    """SIGSTOP ``pid`` as soon as ``proc`` writes a line containing ``text`` after now (or
    after ``timeout_s`` without one)."""
    seen = len(proc.lines)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = proc.lines
        if any(text in line for line in lines[seen:]):
            break
        seen = len(lines)
        time.sleep(0.0001)
    os.kill(pid, signal.SIGSTOP)


@pytest.mark.integration
async def test_a_stop_cut_short_mid_commit_by_a_paused_broker_publishes_nothing_twice(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The broker is paused (SIGSTOP) while the worker is stopped (SIGTERM) under a steady
    stream: whatever request was under way waits, the flush is cut short at
    COMMIT_TIMEOUT_S, and when that request was the commit (EndTxn sent, its answer held
    back), the worker learns its outcome or hands its partitions over unpublished (exit 4),
    never sending its results in a new transaction. Repeated until the window is hit;
    across all the stops, every command has exactly one result."""
    pid = broker.pid
    assert pid is not None
    run = await scenario(
        broker,
        sim,
        accounts_file,
        total=6000,
        keys=30,
        prefix="paused",
        partitions=3,
        commit_timeout_s=0.5,
    )
    flowing = asyncio.Event()
    feeder = asyncio.create_task(
        steady_feed(broker.bootstrap, run.topics.commands, run.commands, 300, flowing)
    )
    procs: list[Process] = []
    rng = random.Random(27)
    hits = attempts = 0
    # At DEBUG the worker says when a flush sends its commit: the broker is paused on that
    # line, inside the window the test is after, instead of at a random moment (one stop in
    # ten or twenty landed there, and a busy machine could miss it in all of them).
    env = {**run.env, "CANCEL_WORKER_LOG_LEVEL": "DEBUG"}
    try:
        # Usually hit at the first stop; a busy machine moves the timings, so up to 30
        # stops or three minutes.
        trying_until = asyncio.get_running_loop().time() + 180
        while (
            not hits
            and attempts < 30
            and asyncio.get_running_loop().time() < trying_until
            and not feeder.done()
        ):
            attempts += 1
            proc = start_worker(env)
            procs.append(proc)
            await asyncio.to_thread(proc.wait_for_line, "taken over", 60)
            flowing.set()
            await asyncio.sleep(0.5 + rng.random() * 0.5)  # transactions back to back
            await asyncio.to_thread(pause_on_line, proc, COMMITTING, pid, 5.0)
            try:
                proc.signal(signal.SIGTERM)
                await asyncio.sleep(1.2)  # past the stop's bounds: the flush is cut short
            finally:
                os.kill(pid, signal.SIGCONT)
            flowing.clear()
            await asyncio.to_thread(proc.proc.wait, 60)
            code = proc.stop()  # exited: no second signal, its output closed
            assert code in (0, 4), proc.output()[-3000:]
            hits += any(CUT_SHORT.search(line) for line in proc.lines)
        assert hits, f"the window (the commit under way at the stop) not hit in {attempts}"
        last = start_worker(run.env)
        procs.append(last)
        flowing.set()
        await feeder
        await wait_for_results(broker.bootstrap, run.topics.results, len(run.commands), 240, procs)
        assert last.stop() == 0, last.output()[-3000:]
    finally:
        os.kill(pid, signal.SIGCONT)
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder  # its producer is stopped, not left to the garbage collector
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
    await run.check(broker.bootstrap, sim)
