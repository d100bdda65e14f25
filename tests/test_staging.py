"""Exactly-once results sent into the open transaction as they complete (staged), and
committed by the flush with the positions: on in-memory ports for the pipeline's side,
and on the real broker for the sink's.

What must hold: a staged result is read once, after its flush commits, or never (its
transaction aborted, and it is sent again by the next flush); a flush carries every
partition with staged results; and a transaction with staged results is never left open
(an open transaction holds back every read_committed reader of the results topic until the
transaction timeout, five minutes by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from tests.memory_ports import MemoryLog, MemoryStagingSink
from tests.support import (
    SimControl,
    fresh_topics,
    in_group,
    owning,
    read_to_end,
    until,
    worker_settings,
)
from tests.test_pipeline_memory import (
    P0,
    P1,
    Handler,
    Member,
    assert_exactly_once,
    fill,
    flushed,
    member,
    origins,
)
from tests.test_pipeline_memory import until as soon
from worker.kafka.fencing import group_member, stable_committed
from worker.kafka.io import TransactionalSink
from worker.kafka.pipeline import Flush, FlushError, InRecord, OutRecord, Partition, decode_ahead
from worker.settings import Settings
from worker.tools.devstack import Broker

# -- the pipeline's side, in memory ------------------------------------------------------------


@pytest.fixture(autouse=True)
def staging_members(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Member, "make_sink", staticmethod(MemoryStagingSink))


def staging(m: Member) -> MemoryStagingSink:
    assert isinstance(m.sink, MemoryStagingSink)
    return m.sink


async def test_results_are_staged_as_they_complete_ahead_of_a_running_record() -> None:
    """Key b's result is done before key a's earlier one: it is staged and made durable at
    once, the position staying before a's record with b's offset stored beside it; a's
    result follows when it ends, and the position moves past both."""
    log = MemoryLog()
    log.append(P0, b"a", b"{}")
    handler = Handler()
    handler.hold[b"a"] = asyncio.Event()
    async with member(log, handler, flush_interval_s=30.0) as m:
        sink = staging(m)
        m.assign([P0])
        await soon(lambda: len(handler.started) == 1)
        log.append(P0, b"b", b"{}")
        await soon(lambda: sink.flushes == 1)  # the first flush is not held by the interval
        assert [r.value for r in sink.published] == [b"0:1"]
        assert log.committed[P0] == 0 and decode_ahead(0, log.metadata[P0]) == {1}
        handler.hold[b"a"].set()
        # Later results are staged at once and wait for the interval's flush.
        for _ in range(5):
            log.append(P0, b"b", b"{}")
        await soon(lambda: len(sink.pending.get(P0, [])) == 6)
        assert sink.flushes == 1
        assert sink.pending[P0][0].value == b"0:0"
        assert sorted(r.value for r in sink.pending[P0][1:]) == [b"0:%d" % i for i in range(2, 7)]
    assert sink.flushes == 2  # the stop's flush committed them
    assert log.committed[P0] == 7 and log.metadata[P0] == ""
    assert sink.dropped == 0
    assert_exactly_once(log, sink)


async def test_answers_completing_during_a_flush_wait_for_it_without_being_offered() -> None:
    """While a flush is under way nothing can be staged: the answers completing meanwhile
    are not offered to the sink one by one (each offer gathered every answer not yet
    staged: a burst answered during a long flush cost its square), and the next flush
    carries them all."""
    log = MemoryLog()
    fill(log, P0, 1, [b"a"])
    async with member(log, Handler(), flush_interval_s=0.0, max_buffered=1000) as m:
        sink = staging(m)
        m.assign([P0])
        await soon(flushed(log))
        sink.delay_s = 1.0
        fill(log, P0, 1, [b"a"])
        await soon(lambda: sink.flushing)
        flushes = sink.flushes
        fill(log, P0, 300, [b"a", b"b", b"c"])
        await soon(lambda: m.pipeline.processed == 302)
        assert sink.flushing and sink.flushes == flushes  # all answered during the one flush
        sink.delay_s = 0.0
        await soon(flushed(log))
    assert sink.offered_while_flushing == 0
    assert sink.flush_records[flushes] == 300  # the next flush carried them all
    assert len(origins(sink)) == 302
    assert_exactly_once(log, sink)


async def test_a_failed_flush_drops_what_was_staged_and_sends_it_again_once() -> None:
    log = MemoryLog()
    fill(log, P0, 1, [b"a"])
    async with member(log, Handler(), flush_interval_s=0.2) as m:
        sink = staging(m)
        m.assign([P0])
        await soon(flushed(log))
        sink.fail_flushes = True
        fill(log, P0, 20, [b"a", b"b"])
        await soon(lambda: sink.dropped >= 20)  # staged, then the flush failed
        sink.fail_flushes = False
        await soon(flushed(log))
    assert len(origins(sink)) == 21
    assert_exactly_once(log, sink)


async def test_a_revocations_flush_carries_the_other_partitions_staged_results() -> None:
    """P1's results are staged when P0 alone is revoked: the revocation's flush is the
    transaction's commit, so it must carry P1's results and position too."""
    log = MemoryLog()
    fill(log, P0, 1, [b"a"])
    fill(log, P1, 1, [b"a"])
    async with member(log, Handler(), flush_interval_s=30.0) as m:
        sink = staging(m)
        m.assign([P0, P1])
        await soon(flushed(log))
        fill(log, P0, 3, [b"a"])
        fill(log, P1, 4, [b"a", b"b"])
        await soon(lambda: sum(map(len, sink.pending.values())) == 7)
        await m.revoke([P0])
        assert log.committed == {P0: 4, P1: 5}
        assert sink.pending == {} and not sink.violations
    assert_exactly_once(log, sink)


async def test_records_answered_with_nothing_move_the_staged_run_on() -> None:
    """A record can be answered with nothing (a command already answered): the run it is
    part of still grows, and the results around it are staged and flushed in order."""
    log = MemoryLog()
    fill(log, P0, 1, [b"a"])

    class Quiet(Handler):
        async def __call__(self, record: InRecord) -> Sequence[OutRecord]:
            out = await super().__call__(record)
            return [] if record.offset % 3 == 1 else out

    async with member(log, Quiet(), flush_interval_s=30.0) as m:
        sink = staging(m)
        m.assign([P0])
        await soon(flushed(log))
        fill(log, P0, 9, [b"a", b"b"])
        await soon(lambda: len(sink.pending.get(P0, [])) == 6)  # offsets 1..9 but 1, 4 and 7
        assert sink.flushes == 1
    assert not sink.violations
    assert log.committed[P0] == 10
    assert origins(sink) == [(0, o) for o in range(10) if o % 3 != 1]


# -- the sink's side, on the broker ------------------------------------------------------------


def results(settings: Settings, *values: bytes) -> tuple[OutRecord, ...]:
    return tuple(OutRecord(settings.results_topic, b"k", v) for v in values)


async def unstable(bootstrap: str, topic: str) -> int:
    """How many records of ``topic`` an open transaction holds back from read_committed
    readers: the high watermark less the last stable offset, over its partitions."""
    return await end_of(bootstrap, topic, "read_uncommitted") - await end_of(
        bootstrap, topic, "read_committed"
    )


async def end_of(bootstrap: str, topic: str, isolation: str) -> int:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, isolation_level=isolation)
    await consumer.start()
    try:
        await until(lambda: bool(consumer.assignment()), f"{topic} assigned")  # no group
        return sum((await consumer.end_offsets(consumer.assignment())).values())
    finally:
        await consumer.stop()


async def until_unstable(bootstrap: str, topic: str, wanted: int) -> None:
    """Wait (up to 15 s) until ``wanted`` records are held back. After a commit or an abort
    the broker writes the transaction's markers a moment later, so 0 is awaited too (an
    abandoned transaction would hold them for its timeout, five minutes)."""
    deadline = asyncio.get_running_loop().time() + 15
    while (held := await unstable(bootstrap, topic)) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"{held} held back, not {wanted}"
        await asyncio.sleep(0.05)


async def values(bootstrap: str, topic: str) -> list[bytes]:
    return [r.value for r in await read_to_end(bootstrap, topic)]


@pytest.mark.integration
async def test_staged_results_reach_the_broker_before_the_flush_and_are_read_once_after(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part = (topics.commands, 0)
    async with (
        in_group(settings) as consumer,
        owning(settings, lambda: group_member(consumer), [part]) as sink,
    ):
        before = sink.transaction
        assert sink.stage(part, results(settings, b"1", b"2"))
        assert sink.stage(part, results(settings, b"3"))
        assert not sink.stage((topics.commands, 7), results(settings, b"x"))  # not owned
        await until_unstable(broker.bootstrap, topics.results, 3)  # sent, not committed
        assert sink.transaction == before  # one transaction, still open
        assert await values(broker.bootstrap, topics.results) == []
        await sink.flush({part: Flush(results(settings, b"1", b"2", b"3", b"4", b"5"), 5)})
        assert sink.transaction != before
        assert await stable_committed(consumer, [part]) == {part: 5}
        await until_unstable(broker.bootstrap, topics.results, 0)
    assert await values(broker.bootstrap, topics.results) == [b"1", b"2", b"3", b"4", b"5"]


@pytest.mark.integration
async def test_a_failed_transactions_staged_results_are_never_read_and_go_again_once(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Staged, then the producer breaks (what aiokafka does when its sender task dies):
    the flush fails, the transaction is aborted when the next producer takes the id, and
    the retried flush sends everything once."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part = (topics.commands, 0)
    batch = Flush(results(settings, b"1", b"2", b"3"), 3)
    async with (
        in_group(settings) as consumer,
        owning(settings, lambda: group_member(consumer), [part]) as sink,
    ):
        assert sink.stage(part, batch.records[:2])
        await until_unstable(broker.bootstrap, topics.results, 2)
        broken = sink._producer
        assert broken is not None
        broken._txn_manager.fatal_error(KafkaError("the sender task died"))
        sink.stage(part, batch.records[2:])  # taken or refused: its sending fails either way
        with pytest.raises(FlushError) as failed:
            await sink.flush({part: batch})
        assert not failed.value.lost
        assert sink._producer is None
        await sink.flush({part: batch})  # as the pipeline retries: everything again
        assert await stable_committed(consumer, [part]) == {part: 3}
        await until_unstable(broker.bootstrap, topics.results, 0)
    assert await values(broker.bootstrap, topics.results) == [b"1", b"2", b"3"]


@pytest.mark.integration
@pytest.mark.parametrize("how", ["revoked", "closed", "a lower partition assigned"])
async def test_a_producer_let_go_with_staged_results_aborts_them_at_once(
    broker: Broker, sim: SimControl, accounts_file: Path, how: str
) -> None:
    """Without the abort the transaction would stay open until its timeout (five minutes):
    every read_committed reader of the results topic would wait that long."""
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    p0, p1, p2 = [(topics.commands, p) for p in range(3)]
    async with in_group(settings) as consumer:
        sink = TransactionalSink(settings, lambda: group_member(consumer))
        try:
            await sink.assigned([p1, p2])
            assert sink.stage(p2, results(settings, b"staged"))
            await until_unstable(broker.bootstrap, topics.results, 1)
            if how == "revoked":
                await sink.revoked([p2])
            elif how == "closed":
                await sink.close()
            else:  # the producer moves to p0's id: p1's is left, with its transaction
                await sink.assigned([p0])
            await until_unstable(broker.bootstrap, topics.results, 0)
            if how != "closed":
                owned = [p1] if how == "revoked" else [p0, p1, p2]
                await sink.flush({p: Flush(results(settings, b"%d" % p[1]), 1) for p in owned})
        finally:
            await sink.close()
    expected = {"revoked": [b"1"], "closed": [], "a lower partition assigned": [b"0", b"1", b"2"]}
    assert sorted(await values(broker.bootstrap, topics.results)) == expected[how]


@pytest.mark.integration
async def test_a_fenced_members_staged_results_are_never_read(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The partition's new owner takes its id while the old owner has results staged: the
    old owner's transaction is aborted by the take-over, its flush is refused as fenced,
    and only the new owner's results are read."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part: Partition = (topics.commands, 0)
    async with (
        in_group(settings) as consumer,
        owning(settings, lambda: group_member(consumer), [part]) as old,
    ):
        assert old.stage(part, results(settings, b"old"))
        await until_unstable(broker.bootstrap, topics.results, 1)
        async with owning(settings, lambda: group_member(consumer), [part]) as heir:
            assert await unstable(broker.bootstrap, topics.results) == 0
            with pytest.raises(FlushError) as fenced:
                await old.flush({part: Flush(results(settings, b"old"), 1)})
            assert part in fenced.value.lost
            assert not old.stage(part, results(settings, b"late"))
            await heir.flush({part: Flush(results(settings, b"heir"), 1)})
    assert await values(broker.bootstrap, topics.results) == [b"heir"]
