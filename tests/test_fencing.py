"""Exactly-once fencing on a real broker: the group generation on transactional offsets,
stable committed positions, and a dead member's open transaction aborted at take-over.

Each test would pass on a client that commits offsets without the member's generation
(``TxnOffsetCommit`` v0) or reads positions without ``require_stable`` only if the broker
did the fencing for it; it does not, so each fails there."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from tests.support import (
    SimControl,
    fresh_topics,
    in_group,
    owning,
    read_to_end,
    until,
    worker_settings,
)
from worker.kafka.fencing import (
    GroupFencedError,
    GroupMember,
    NeedsNewerBrokerError,
    OffsetsUnstableError,
    StableOffsetFetchRequest,
    broker_versions,
    commit_offsets_as_member,
    exactly_once_refusal,
    group_member,
    missing_requests,
    refusal_for,
    stable_committed,
)
from worker.kafka.io import TransactionalSink, make_producer
from worker.kafka.pipeline import Flush, FlushError, OutRecord
from worker.settings import Settings
from worker.tools.devstack import Broker


def one_result(settings: Settings, text: bytes) -> Flush:
    return Flush((OutRecord(settings.results_topic, b"k", text),), 1)


async def committed(consumer: AIOKafkaConsumer, topic: str, partition: int) -> int | None:
    """The position as a new owner reads it: once no transaction is about to move it (a
    plain read right after a commit may still see the one before: the commit markers are
    written after the commit is acknowledged)."""
    return (await stable_committed(consumer, [(topic, partition)]))[(topic, partition)]


async def test_a_member_of_an_older_generation_cannot_commit_and_publishes_nothing(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Member A's view of the group is one generation old (another member joined since):
    its transaction is refused by the group coordinator, aborted, and its result is never
    read; with the current generation the same flush goes through."""
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part = (topics.commands, 0)
    async with in_group(settings) as first:
        stale = group_member(first)
        async with in_group(settings) as second:  # a second member: a new generation
            await until(lambda: group_member(first).generation > stale.generation, "rejoin")
            assert group_member(second).generation == group_member(first).generation
            async with owning(settings, lambda: stale, [part]) as sink:
                with pytest.raises(FlushError) as refused:
                    await sink.flush({part: one_result(settings, b'{"n": "stale"}')})
                assert isinstance(refused.value.__cause__, GroupFencedError)
                assert part in refused.value.lost
                assert await committed(first, *part) is None
                async with owning(settings, lambda: group_member(first), [part]) as current:
                    await current.flush({part: one_result(settings, b'{"n": "current"}')})
                assert await committed(first, *part) == 1
    published = await read_to_end(broker.bootstrap, topics.results)
    assert [r.value for r in published] == [b'{"n": "current"}']


async def test_no_transaction_is_sent_by_a_consumer_outside_the_group(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Generation -1 would let the broker take the offsets unchecked: refused before
    sending."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part = (topics.commands, 0)
    async with owning(settings, lambda: GroupMember(-1, ""), [part]) as sink:
        with pytest.raises(FlushError) as refused:
            await sink.flush({part: one_result(settings, b"{}")})
        assert isinstance(refused.value.__cause__, GroupFencedError)
    assert await read_to_end(broker.bootstrap, topics.results) == []


async def test_positions_are_read_only_once_no_transaction_moves_them(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """While a transaction that commits a partition's offset is open, the new owner waits
    instead of reading the position being replaced; once it commits, it reads the new one."""
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part, other = (topics.commands, 0), (topics.commands, 1)
    async with in_group(settings) as consumer:
        producer = make_producer(settings, transactional_id=f"{settings.group_id}-open")
        commit_offsets_as_member(producer, lambda: group_member(consumer))
        await producer.start()
        try:
            await producer.begin_transaction()
            await producer.send_offsets_to_transaction(
                {TopicPartition(*part): 7}, settings.group_id
            )
            with pytest.raises(OffsetsUnstableError):
                await stable_committed(consumer, [part], patience_s=0.5)
            # A partition the open transaction does not touch is read at once.
            assert await stable_committed(consumer, [other], patience_s=0.5) == {other: None}
            waiting = asyncio.create_task(stable_committed(consumer, [part], patience_s=10))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await producer.commit_transaction()
            assert await waiting == {part: 7}
        finally:
            await producer.stop()


async def test_a_dead_members_open_transaction_is_aborted_when_its_partitions_are_taken(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """A member dies mid-transaction (results sent, offsets of both its partitions added,
    no commit). The transaction timeout is 5 minutes, but the member that takes the
    partitions over aborts it at once: its producer takes the dead member's
    ``transactional.id`` (named after the lowest partition), so the positions are stable
    again and the dead member's results are never read."""
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    assert settings.transaction_timeout_ms >= 60_000
    parts = [(topics.commands, 0), (topics.commands, 1)]
    async with in_group(settings) as consumer:
        dead = TransactionalSink(settings, lambda: group_member(consumer))
        await dead.assigned(parts)
        producer = dead._producer
        assert producer is not None and dead._producer_for == parts[0]
        await producer.begin_transaction()
        await producer.send(settings.results_topic, b'{"n": "dead"}', key=b"k")
        await producer.send_offsets_to_transaction(
            {TopicPartition(*p): 5 for p in parts}, settings.group_id
        )
        with pytest.raises(OffsetsUnstableError):
            await stable_committed(consumer, [parts[1]], patience_s=0.3)
        # The dead member's producer is simply abandoned (never committed, never stopped).
        heir = TransactionalSink(settings, lambda: group_member(consumer))
        started = time.monotonic()
        try:
            await heir.assigned(list(reversed(parts)))
            assert await stable_committed(consumer, parts) == dict.fromkeys(parts)
            assert time.monotonic() - started < 10
            await heir.flush({parts[1]: one_result(settings, b'{"n": "heir"}')})
        finally:
            await heir.close()
            with contextlib.suppress(Exception):  # fenced: only now, not to abort by itself
                await producer.stop()
    published = await read_to_end(broker.bootstrap, topics.results)
    assert [r.value for r in published] == [b'{"n": "heir"}']


async def test_each_new_partitions_id_is_taken_so_any_previous_owner_is_fenced(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The producer takes the lowest owned partition's id; every other newly assigned
    partition's id is taken once too: a previous owner that worked under any of them
    (here: each partition's own, as members of the producer-per-partition design did) is
    fenced."""
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    parts = [(topics.commands, p) for p in range(3)]
    sink = TransactionalSink(settings, lambda: GroupMember(-1, ""))
    previous: list[AIOKafkaProducer] = []
    for part in parts:
        producer = make_producer(settings, transactional_id=sink.transactional_id(part))
        await producer.start()
        previous.append(producer)
    try:
        await sink.assigned(parts)
        assert sink._producer_for == parts[0]
        for producer in previous:
            await producer.begin_transaction()
            await producer.send(settings.results_topic, b"zombie", key=b"k")
            with pytest.raises(KafkaError):  # fenced: refused, whichever request comes first
                await producer.commit_transaction()
    finally:
        await sink.close()
        for producer in previous:
            with contextlib.suppress(Exception):
                await producer.stop()
    assert await read_to_end(broker.bootstrap, topics.results) == []


def test_the_requests_exactly_once_needs_are_named_when_the_broker_lacks_them() -> None:
    kafka_3_9 = {28: (0, 4), 9: (0, 9)}
    kafka_2_4 = {28: (0, 2), 9: (0, 6)}
    assert missing_requests(kafka_3_9) == []
    assert missing_requests(kafka_2_4) == ["TxnOffsetCommit v3", "OffsetFetch v7"]
    assert missing_requests({}) == ["TxnOffsetCommit v3", "OffsetFetch v7"]
    assert missing_requests({28: (3, 3), 9: (8, 9)}) == ["OffsetFetch v7"]


def test_the_refusal_says_what_to_do() -> None:
    class Conn:
        def __init__(self, versions: dict[int, tuple[int, int]], connected: bool) -> None:
            self._versions, self._connected = versions, connected

        def connected(self) -> bool:
            return self._connected

    class Client:
        def __init__(self, *conns: Conn) -> None:
            self._conns = dict(enumerate(conns))

    old = Conn({28: (0, 2), 9: (0, 6)}, connected=True)
    refusal = exactly_once_refusal(Client(Conn({}, connected=False), old))
    assert refusal is not None
    assert "TxnOffsetCommit v3, OffsetFetch v7" in refusal
    assert "Kafka 2.5" in refusal and "DELIVERY=at_least_once" in refusal
    assert exactly_once_refusal(Client(Conn({28: (0, 4), 9: (0, 9)}, connected=True))) is None


async def test_the_local_broker_offers_what_exactly_once_needs(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with in_group(settings) as consumer:
        assert missing_requests(broker_versions(consumer._client)) == []
        assert exactly_once_refusal(consumer._client) is None


def test_a_request_the_broker_does_not_offer_is_refused_with_the_same_reason() -> None:
    """No fallback to an older version: it would commit without the generation."""
    fetch = StableOffsetFetchRequest("g", {"t": [0]})
    with pytest.raises(NeedsNewerBrokerError) as refused:
        fetch.prepare({9: (0, 6)})
    assert str(refused.value).endswith(refusal_for(["OffsetFetch v7"]))
    assert fetch.prepare({9: (0, 9)}).require_stable is True
