"""Delivery guarantees with real processes, real signals and real faults.

Each test runs worker processes (``cancel-worker run``) against the session's broker and
simulator, breaks something for real (SIGKILL, a member joining and dying, the broker
stopped, a burst on one key) and then reads the results topic ``read_committed`` to its
end: exactly one final result per command, per-key order, and the simulator's book agrees
with every result.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from tests.support import (
    SimControl,
    Topics,
    command,
    events_of,
    fresh_topics,
    in_group,
    owning,
    produce,
    read_to_end,
    signed,
    until,
    worker_env,
    worker_settings,
)
from worker.kafka.fencing import GroupMember, group_member
from worker.kafka.io import SinkClosedError, TransactionalSink
from worker.kafka.pipeline import Flush, FlushError, OutRecord
from worker.settings import Settings
from worker.tools.devstack import Broker, Process, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

FINAL = {"strategy.canceled", "cancel.failed"}


SYMBOLS = [
    *(("UM", s) for s in ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT")),
    *(("CM", s) for s in ("BTCUSD_PERP", "ETHUSD_PERP", "BNBUSD_PERP", "SOLUSD_PERP")),
    *(("UM", s) for s in ("ADAUSDT", "LTCUSDT")),
]


def seed_commands(
    sim: SimControl, total: int, keys: int, prefix: str, first_key: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``total`` conditional orders over ``keys`` account:symbol keys (at most 60), one
    command each, key ``first_key + i % keys``."""
    assert first_key + keys <= 5 * len(SYMBOLS)
    specs = []
    for i in range(total):
        k = first_key + i % keys
        market, symbol = SYMBOLS[k // 5]
        specs.append({"account": f"desk-{k % 5}", "market": market, "symbol": symbol})
    orders: list[dict[str, Any]] = []
    for start in range(0, total, 1000):
        orders += sim.seed(specs[start : start + 1000])
    commands = [
        command(s["account"], o, command_id=f"{prefix}-{i:05d}")
        for i, (s, o) in enumerate(zip(specs, orders, strict=True))
    ]
    return orders, commands


def key_of(cmd: dict[str, Any]) -> bytes:
    return f"{cmd['account']}:{cmd['symbol']}".encode()


@dataclass
class FeedLimit:
    """How many commands may be fed so far; raising it wakes the feeder."""

    value: int
    raised: asyncio.Event = field(default_factory=asyncio.Event)

    def raise_to(self, value: int) -> None:
        self.value = value
        self.raised.set()


async def feed(
    bootstrap: str,
    topic: str,
    commands: list[dict[str, Any]],
    per_s: int,
    limit: FeedLimit | None = None,
) -> None:
    """Produce the commands as a steady stream of ``per_s`` a second (in chunks of 50);
    with ``limit``, never more of them than it allows (waiting for it to be raised)."""
    for start in range(0, len(commands), 50):
        chunk = commands[start : start + 50]
        while limit is not None and start + len(chunk) > limit.value:
            limit.raised.clear()
            await limit.raised.wait()
        await produce(bootstrap, topic, [(key_of(c), orjson.dumps(c)) for c in chunk])
        await asyncio.sleep(50 / per_s)


async def produce_commands(bootstrap: str, topic: str, commands: list[dict[str, Any]]) -> None:
    for start in range(0, len(commands), 500):
        chunk = commands[start : start + 500]
        await produce(bootstrap, topic, [(key_of(c), orjson.dumps(c)) for c in chunk])


async def results_so_far(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return events_of(await read_to_end(bootstrap, topic))


async def wait_for_results(
    bootstrap: str, topic: str, wanted: int, timeout_s: float, procs: list[Process]
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = await results_so_far(bootstrap, topic)
        if len({e["command_id"] for e in events}) >= wanted:
            return events
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {p.name} {p.proc.pid}\n"
                + "\n".join([line for line in p.lines if "INFO worker.processor" not in line][-40:])
                for p in procs
            )
            raise AssertionError(
                f"{len(events)} results, {len({e['command_id'] for e in events})} commands "
                f"answered of {wanted}\n{tails}"
            )
        await asyncio.sleep(0.5)


def check_exactly_once_in_order(
    events: list[dict[str, Any]],
    commands: list[dict[str, Any]],
    orders: list[dict[str, Any]],
    sim: SimControl,
) -> None:
    per_command = collections.Counter(e["command_id"] for e in events)
    extra = {c: n for c, n in per_command.items() if n > 1}
    assert not extra, f"{len(extra)} command(s) with more than one result: {list(extra)[:5]}"
    assert set(per_command) == {c["command_id"] for c in commands}, "results lost"
    assert all(e["type"] in FINAL for e in events)
    # Per-key order: the results of a key appear in the order its commands were produced.
    index = {c["command_id"]: i for i, c in enumerate(commands)}
    per_key: dict[str, list[int]] = collections.defaultdict(list)
    for e in events:
        per_key[e["origin"]["key"]].append(index[e["command_id"]])
    for key, seq in per_key.items():
        assert seq == sorted(seq), f"key {key} out of order"
    # Ground truth: each order canceled exactly once, and every result says canceled.
    ids = {o["strategy_id"] for o in orders}
    cancels = collections.Counter(c["order_id"] for c in sim.cancels() if c["order_id"] in ids)
    types = collections.Counter((e["type"], e.get("reason")) for e in events)
    assert set(cancels) == ids, f"{len(ids - set(cancels))} order(s) not canceled; {types}"
    assert set(cancels.values()) == {1}
    book = sim.orders()
    for e in events:
        assert e["type"] == "strategy.canceled", e
        assert book[e["strategy"]["strategy_id"]]["status"] == "CANCELED"


def fast_limits(sim: SimControl) -> dict[str, Any]:
    """The exchange's limits raised: these tests measure delivery, not the governor."""
    sim.configure(order_limit=1_000_000, weight_limit=1_000_000)
    return {"rate_order_limit": 1_000_000, "rate_weight_limit": 1_000_000}


@dataclass
class Scenario:
    """Fresh topics, seeded orders with one command each, and the workers' environment."""

    topics: Topics
    orders: list[dict[str, Any]]
    commands: list[dict[str, Any]]
    settings: Settings

    @property
    def env(self) -> dict[str, str]:
        return worker_env(self.settings)

    async def check(self, bootstrap: str, sim: SimControl) -> None:
        """Read the results topic to its end and check the delivery invariants."""
        events = await results_so_far(bootstrap, self.topics.results)
        check_exactly_once_in_order(events, self.commands, self.orders, sim)


async def scenario(
    broker: Broker,
    sim: SimControl,
    accounts_file: Path,
    *,
    total: int,
    keys: int,
    prefix: str,
    partitions: int = 6,
    **overrides: Any,
) -> Scenario:
    topics = await fresh_topics(broker.bootstrap, partitions=partitions)
    orders, commands = seed_commands(sim, total, keys=keys, prefix=prefix)
    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, **{**fast_limits(sim), **overrides}
    )
    return Scenario(topics, orders, commands, settings)


async def test_sigkill_at_five_random_moments_gives_exactly_one_result_each(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    total = 5000
    run = await scenario(broker, sim, accounts_file, total=total, keys=50, prefix="crash")
    topics, commands, env = run.topics, run.commands, run.env
    rng = random.Random(20261121)
    kill_points = sorted(rng.sample(range(300, total - 500), 5))
    # The stream is held 500 commands past the next kill point until that kill: a worker
    # that catches up fast (after a slow restart, the stream fed meanwhile) cannot answer
    # everything before the last kill, and every kill lands mid-stream.
    limit = FeedLimit(kill_points[0] + 500)
    feeder = asyncio.create_task(feed(broker.bootstrap, topics.commands, commands, 250, limit))
    procs: list[Process] = []
    answered_at_kill: list[int] = []
    for i, point in enumerate(kill_points):
        proc = start_worker(env)
        procs.append(proc)
        await wait_for_results(broker.bootstrap, topics.results, point, 180, procs)
        await asyncio.sleep(rng.random() * 0.3)  # land anywhere in the flow
        proc.kill()
        assert proc.proc.returncode == -signal.SIGKILL
        answered_at_kill.append(len(await results_so_far(broker.bootstrap, topics.results)))
        limit.raise_to(kill_points[i + 1] + 500 if i + 1 < len(kill_points) else total)
    assert answered_at_kill[-1] < total, "every kill must land mid-stream"
    last = start_worker(env)
    procs.append(last)
    try:
        last.wait_for_line("partitions assigned", 60)
        await feeder
        await wait_for_results(broker.bootstrap, topics.results, total, 240, procs)
    finally:
        code = last.stop()
    assert code == 0, last.output()[-3000:]
    await run.check(broker.bootstrap, sim)


async def test_scale_out_and_a_member_killed_keep_exactly_one_result(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    total = 3000
    run = await scenario(
        broker, sim, accounts_file, total=total, keys=60, prefix="scale", max_in_flight=16
    )
    topics, commands, env = run.topics, run.commands, run.env
    members = [start_worker(env) for _ in range(3)]
    for m in members:
        m.wait_for_line("partitions assigned", 60)

    # A steady stream, so the group changes under load.
    feeder = asyncio.create_task(feed(broker.bootstrap, topics.commands, commands, per_s=200))
    try:
        await wait_for_results(broker.bootstrap, topics.results, total // 4, 120, members)
        members[0].kill()  # SIGKILL one member mid-run ...
        joiner = start_worker(env)  # ... and add another
        members.append(joiner)
        await feeder
        await wait_for_results(broker.bootstrap, topics.results, total, 240, members)
    finally:
        codes = [m.stop() for m in members[1:]]
    assert codes == [0, 0, 0], [m.output()[-2000:] for m in members[1:]]
    assert "partitions assigned" in joiner.output()
    await run.check(broker.bootstrap, sim)


async def test_broker_stopped_for_20s_the_same_process_finishes_the_run(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    total = 1500
    run = await scenario(
        broker,
        sim,
        accounts_file,
        total=total,
        keys=20,
        prefix="outage",
        partitions=3,
        max_in_flight=16,
    )
    topics, commands = run.topics, run.commands
    worker = start_worker(run.env)
    try:
        worker.wait_for_line("partitions assigned", 60)
        await produce_commands(broker.bootstrap, topics.commands, commands[: total // 2])
        await wait_for_results(broker.bootstrap, topics.results, 200, 120, [worker])
        broker.stop()
        down_at = time.monotonic()
        await asyncio.sleep(20)
        assert worker.proc.poll() is None, worker.output()[-3000:]  # it rides the outage out
        broker.restart()
        outage_s = time.monotonic() - down_at
        await produce_commands(broker.bootstrap, topics.commands, commands[total // 2 :])
        await wait_for_results(broker.bootstrap, topics.results, total, 240, [worker])
        assert worker.proc.poll() is None
    finally:
        code = worker.stop()
    assert outage_s >= 20
    assert code == 0, worker.output()[-3000:]
    out = worker.output()
    assert out.count("Kafka unreachable") <= 2, "the outage is said once (publish, and start-up)"
    assert "reachable again" in out
    await run.check(broker.bootstrap, sim)


async def test_hot_key_does_not_delay_other_partitions(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    sim.configure(profile="latency")  # every cancel takes 20-150 ms at the exchange
    _, hot = seed_commands(sim, 1000, keys=1, prefix="hot")
    _, cold = seed_commands(sim, 6, keys=6, prefix="cold", first_key=10)
    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, max_in_flight=4, **fast_limits(sim)
    )
    worker = start_worker(worker_env(settings))
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        worker.wait_for_line("partitions assigned", 60)
        for c in hot:
            value = orjson.dumps(c)
            await producer.send(
                topics.commands, value, key=key_of(c), partition=0, headers=signed(value)
            )
        await producer.flush()
        await wait_for_results(broker.bootstrap, topics.results, 20, 60, [worker])
        sent_at = time.monotonic()
        for i, c in enumerate(cold):  # other keys, on the other partitions
            value = orjson.dumps(c)
            await producer.send(
                topics.commands, value, key=key_of(c), partition=1 + i % 2, headers=signed(value)
            )
        await producer.flush()
        cold_ids = {c["command_id"] for c in cold}
        while True:
            events = await results_so_far(broker.bootstrap, topics.results)
            done = {e["command_id"] for e in events}
            if cold_ids <= done:
                break
            assert time.monotonic() - sent_at < 10, "cold keys waited for the hot key"
            await asyncio.sleep(0.1)
        waited = time.monotonic() - sent_at
        hot_done = len(done - cold_ids)
    finally:
        await producer.stop()
        worker.stop()
    assert hot_done < 500, "the hot key was still draining when the others were answered"
    assert waited < 5, waited


async def test_a_paused_member_that_lost_its_partitions_is_fenced(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """SIGSTOP one member past its session timeout, let the other take its partitions over,
    then SIGCONT it: whatever it had in hand is fenced, nothing is answered twice."""
    total = 2000
    run = await scenario(
        broker, sim, accounts_file, total=total, keys=40, prefix="zombie", max_in_flight=16
    )
    topics, commands, env = run.topics, run.commands, run.env
    zombie, owner = start_worker(env), start_worker(env)
    try:
        for m in (zombie, owner):
            m.wait_for_line("partitions assigned", 60)
        feeder = asyncio.create_task(feed(broker.bootstrap, topics.commands, commands, per_s=150))
        await wait_for_results(broker.bootstrap, topics.results, 300, 120, [zombie, owner])
        zombie.signal(signal.SIGSTOP)
        assigned_before = owner.output().count("partitions assigned")
        deadline = time.monotonic() + 60
        while owner.output().count("partitions assigned") == assigned_before:
            assert time.monotonic() < deadline, owner.output()[-2000:]
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        zombie.signal(signal.SIGCONT)
        await feeder
        await wait_for_results(broker.bootstrap, topics.results, total, 240, [zombie, owner])
    finally:
        zombie.signal(signal.SIGCONT)
        codes = [zombie.stop(), owner.stop()]
    assert codes[1] == 0, owner.output()[-2000:]
    assert codes[0] in (0, 4), zombie.output()[-2000:]  # it may have had work cancelled
    await run.check(broker.bootstrap, sim)


async def test_shutdown_bound_and_second_signal(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """A cancel hung at the exchange: one SIGTERM waits SHUTDOWN_GRACE_S, cancels it, says
    so in one line and exits 4; a second SIGTERM during the drain exits 3 at once."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    _, commands = seed_commands(sim, 2, keys=1, prefix="hang")
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        http_timeout_s=60.0,
        shutdown_grace_s=1.0,
    )
    for cmd, expected in ((commands[0], 4), (commands[1], 3)):
        sim.script({"kind": "timeout", "delay_ms": 50_000})
        worker = start_worker(worker_env(settings))
        try:
            worker.wait_for_line("partitions assigned", 60)
            await produce(broker.bootstrap, topics.commands, [(key_of(cmd), orjson.dumps(cmd))])
            # The simulator lists a request once answered; this one hangs, so wait until
            # the command is surely in hand, and check that it has no answer yet.
            await asyncio.sleep(3)
            assert not await results_so_far(broker.bootstrap, topics.results)
            t0 = time.monotonic()
            worker.signal(signal.SIGTERM)
            if expected == 3:
                await asyncio.sleep(0.3)
                worker.signal(signal.SIGTERM)
            code = await asyncio.to_thread(worker.proc.wait, 30)
            took = time.monotonic() - t0
        finally:
            worker.stop()
        out = worker.output()
        assert code == expected, out[-2000:]
        if expected == 4:
            assert out.count("were cancelled") == 1 and "work abandoned" in out
            assert 1.0 <= took < 10
        else:
            assert "exiting at once" in out and took < 5
        assert "Traceback" not in out, out[-3000:]


async def test_two_processes_on_one_host_share_the_partitions_and_the_ip_budget(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """N worker processes in one group on one host: the partitions spread over them, and
    with the IP budget split between them (RATE_WEIGHT_LIMIT = the IP's limit / N) the
    exchange never answers 429, though the run needs three windows' worth of weight."""
    total, window_ms, ip_limit = 1200, 2_000, 400
    run = await scenario(
        broker,
        sim,
        accounts_file,
        total=total,
        keys=40,
        prefix="cores",
        partitions=4,
        rate_weight_limit=ip_limit // 2,
        rate_weight_window_ms=window_ms,
    )
    sim.configure(weight_limit=ip_limit, weight_window_ms=window_ms)
    before = sim.stats()
    members = [start_worker(run.env) for _ in range(2)]
    try:
        for m in members:
            m.wait_for_line("partitions assigned", 60)
        await produce_commands(broker.bootstrap, run.topics.commands, run.commands)
        await wait_for_results(broker.bootstrap, run.topics.results, total, 180, members)
        # Read before stopping: the first to leave hands its partitions to the other.
        final = [
            set(ast.literal_eval(re.findall(r"partitions assigned: (\[.*\])", m.output())[-1]))
            for m in members
        ]
    finally:
        codes = [m.stop() for m in members]
    assert codes == [0, 0], [m.output()[-2000:] for m in members]
    await run.check(broker.bootstrap, sim)
    # The partitions spread over the two: each held a share at the end, none held twice.
    assert all(final) and not final[0] & final[1], final
    assert {p for _, p in final[0] | final[1]} == {0, 1, 2, 3}
    after = sim.stats()
    assert after.get("weight_429", 0) == before.get("weight_429", 0), after


async def test_a_transactional_producer_left_broken_is_replaced_and_the_results_get_out(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Seen once during a broker outage: aiokafka's sender task died, the partition's
    producer was left in FATAL_ERROR, every later transaction was refused, and the results
    waited forever. The sink replaces a producer whose transaction failed: the next flush
    goes through a new producer with the same transactional id, exactly once."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part = (topics.commands, 0)
    batch = Flush((OutRecord(topics.results, b"k", b'{"n": 1}'),), 1)
    async with (
        in_group(settings) as consumer,
        owning(settings, lambda: group_member(consumer), [part]) as sink,
    ):
        broken = sink._producer
        assert broken is not None
        # What aiokafka does when the sender task dies inside a transaction:
        await broken.begin_transaction()
        broken._txn_manager.fatal_error(KafkaError("the sender task died"))
        with pytest.raises(FlushError) as failed:
            await sink.flush({part: batch})
        assert not failed.value.lost  # not fenced: the partition stays ours
        await sink.flush({part: batch})  # the same batch again, as the pipeline retries
        assert sink._producer is not broken
    published = await read_to_end(broker.bootstrap, topics.results)
    assert [r.value for r in published] == [b'{"n": 1}']


async def test_a_producer_still_starting_when_the_sink_closes_is_stopped(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The sink closes while a take-over is starting its producers (the worker stopping
    during a re-join): each producer is stopped as its start ends, none is kept, and no
    new one starts. Before, such a producer was kept after the close, and nothing ever
    closed it or its connections."""
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    made: list[AIOKafkaProducer] = []
    started = asyncio.Event()

    class HeldProducer(AIOKafkaProducer):  # type: ignore[misc]
        async def start(self) -> None:  # the take-over is slow: the close comes first
            await started.wait()
            await super().start()

    def factory(transactional_id: str) -> AIOKafkaProducer:
        producer = HeldProducer(
            bootstrap_servers=broker.bootstrap, transactional_id=transactional_id
        )
        made.append(producer)
        return producer

    sink = TransactionalSink(settings, lambda: GroupMember(-1, ""), producer_factory=factory)
    parts = [(topics.commands, 0), (topics.commands, 1)]
    starting = asyncio.create_task(sink.assigned(parts))
    await until(lambda: len(made) == 2, "both producers starting")
    await sink.close()
    started.set()
    with pytest.raises(SinkClosedError):
        await starting
    assert all(p._closed for p in made)  # aiokafka's own flag, set by stop()
    with pytest.raises(SinkClosedError):
        await sink.assigned(parts)
    assert len(made) == 2  # none started after the close
