"""Reading topics outside the worker's consumer group: bounded ranges, and the results topic.

Every reader here has no consumer group (nothing is committed, no group is joined) and reads
``read_committed``: records of aborted transactions are never seen, and a transaction's
records only once it has committed.

:class:`ResultsReader` is the one reader of the results topic. ``cancel-worker replay``
uses it to learn which commands already have a final result; the worker uses it to rebuild
its duplicate-command window at start and then to follow the topic (``worker.kafka.dedup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from worker.kafka.io import MAX_RECORD_BYTES

log = logging.getLogger(__name__)

STALL_TIMEOUT_S = 60.0
"""A bounded read that makes no progress on any partition this long fails."""


class ReadStalledError(RuntimeError):
    """A bounded read made no progress for its stall timeout."""


class MissingTopicError(LookupError):
    """The topic to read does not exist."""


def reader_consumer(
    bootstrap: str, client_id: str, request_timeout_ms: int, **kafka: Any
) -> AIOKafkaConsumer:
    """A consumer without a group, reading committed records only. ``kafka``: more client
    options (TLS, SASL: ``worker.kafka.io.security_options``)."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        request_timeout_ms=request_timeout_ms,
        max_partition_fetch_bytes=MAX_RECORD_BYTES,
        fetch_max_bytes=4 * MAX_RECORD_BYTES,
        **kafka,
    )


async def cluster_topics(
    bootstrap: str,
    request_timeout_ms: int,
    client_id: str = "cancel-worker-admin",
    **kafka: Any,
) -> dict[str, list[int]]:
    """Every topic of the cluster and its partitions. Asks for all topics on purpose: asking
    for one by name would create it on a broker that auto-creates topics. ``kafka``: more
    client options (TLS, SASL)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        request_timeout_ms=request_timeout_ms,
        **kafka,
    )
    try:
        await admin.start()
        described = await admin.describe_topics(None)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return {
        t["topic"]: sorted(p["partition"] for p in t["partitions"])
        for t in described
        if t["error_code"] == 0
    }


async def read_ranges(
    consumer: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, tuple[int, int]],
    stall_timeout_s: float,
) -> AsyncIterator[list[Any]]:
    """Yield batches of records in ``[start, end)`` per partition, in offset order per
    partition, until every partition's position reaches its end. Raises
    :class:`ReadStalledError` when no partition advances for ``stall_timeout_s``.

    Partitions are paused as they reach their end; a position may then be past ``end``
    (records after it were fetched and dropped): seek before reading on."""
    active = {tp: bounds for tp, bounds in ranges.items() if bounds[0] < bounds[1]}
    if not active:
        return
    consumer.assign(list(active))
    for tp, (start, _) in active.items():
        consumer.seek(tp, start)
    positions = {tp: start for tp, (start, _) in active.items()}
    last_progress = time.monotonic()
    while active:
        batches = await consumer.getmany(*active, timeout_ms=500)
        for tp, records in batches.items():
            end = active.get(tp, (0, 0))[1]
            inside = [r for r in records if r.offset < end]
            if inside:
                yield inside
        moved = False
        for tp in list(active):
            # The position also moves past transaction markers and aborted records.
            position = await consumer.position(tp)
            moved = moved or position != positions[tp]
            positions[tp] = position
            if position >= active[tp][1]:
                del active[tp]
                consumer.pause(tp)
        if moved:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > stall_timeout_s:
            stuck = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in active)
            raise ReadStalledError(f"no progress for {stall_timeout_s:g}s reading {stuck}")


def json_object(value: bytes | None) -> dict[str, Any] | None:
    """The record value as a JSON object, or None when it is not one."""
    if value is None:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """One record of the results topic whose value is a JSON object."""

    partition: int
    offset: int
    timestamp: int
    event: dict[str, Any]


class ResultsReader:
    """Reads the results topic: first a bounded stretch (:meth:`read_since`), then, if
    asked, everything after it as it arrives (:meth:`follow`).

    Only records whose value is a JSON object are yielded; anything else is skipped.
    Partitions added to the topic after :meth:`start` are not read. ``kafka``: more client
    options (TLS, SASL: ``worker.kafka.io.security_options``)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        client_id: str,
        request_timeout_ms: int = 30_000,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        **kafka: Any,
    ) -> None:
        self.topic = topic
        self._bootstrap = bootstrap
        self._request_timeout_ms = request_timeout_ms
        self._stall_timeout_s = stall_timeout_s
        self._kafka = kafka
        self._consumer = reader_consumer(bootstrap, client_id, request_timeout_ms, **kafka)
        self._tps: list[TopicPartition] = []
        self._next: dict[TopicPartition, int] = {}  # where reading goes on, per partition

    async def start(self) -> None:
        """Connect and find the topic's partitions. Raises :class:`MissingTopicError` when the
        topic does not exist and aiokafka's ``KafkaError`` when the cluster cannot be
        reached; :meth:`stop` is needed either way."""
        parts = (
            await cluster_topics(self._bootstrap, self._request_timeout_ms, **self._kafka)
        ).get(self.topic)
        if not parts:
            raise MissingTopicError(f"topic {self.topic!r} does not exist")
        self._tps = [TopicPartition(self.topic, p) for p in parts]
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def read_since(self, since_ms: int | None) -> AsyncIterator[ResultRecord]:
        """Every result from ``since_ms`` (the first record at or after that time, by record
        timestamp) or, with None, from the beginning, up to the end offsets captured when
        the read starts: the read always ends. Raises :class:`ReadStalledError` when it makes
        no progress for the stall timeout. :meth:`follow` goes on from those end offsets."""
        consumer, tps = self._consumer, self._tps
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        if since_ms is None:
            starts: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        else:
            found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
            starts = {tp: ends[tp] if found[tp] is None else found[tp].offset for tp in tps}
        self._next = dict(ends)
        ranges = {tp: (min(starts[tp], ends[tp]), ends[tp]) for tp in tps}
        async for batch in read_ranges(consumer, ranges, self._stall_timeout_s):
            for record in batch:
                result = self._parse(record)
                if result is not None:
                    yield result

    async def follow(self, pace_s: float = 0.0) -> AsyncIterator[ResultRecord]:
        """Every result after what was read so far (after the end offsets of
        :meth:`read_since`, or, without one, from now on), as it arrives; never ends.
        After an error (from aiokafka), calling it again goes on where it stopped.

        ``pace_s``: after records were handed over, wait this long before asking for more.
        The consumer fetches again only once what it holds has been taken, so a follower
        that need not be prompt costs one fetch per ``pace_s`` however fast results come,
        instead of one per transaction (the broker answers a long poll at each commit)."""
        consumer = self._consumer
        if not self._next:
            self._next = await consumer.end_offsets(self._tps)
        consumer.assign(self._tps)
        for tp in self._tps:
            consumer.seek(tp, self._next[tp])
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    self._next[tp] = record.offset + 1
                    result = self._parse(record)
                    if result is not None:
                        yield result
            if batches and pace_s > 0:
                await asyncio.sleep(pace_s)

    @staticmethod
    def _parse(record: Any) -> ResultRecord | None:
        event = json_object(record.value)
        if event is None:
            return None
        return ResultRecord(record.partition, record.offset, record.timestamp, event)
