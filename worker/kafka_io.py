"""Kafka adapters: aiokafka consumer and producer, the at-least-once sink, topic admin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from worker.pipeline import InRecord, OutRecord, Partition, Pipeline
from worker.settings import Settings

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 4 * 1024 * 1024  # the dead-letter copy of a large poison record must fit


def make_producer(settings: Settings, **extra: object) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-producer",
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        max_request_size=MAX_RECORD_BYTES,
        request_timeout_ms=30_000,
        **extra,
    )


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-consumer",
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=settings.max_poll_records,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_partition_fetch_bytes=MAX_RECORD_BYTES,
        fetch_max_bytes=4 * MAX_RECORD_BYTES,
    )


class ConsumerSource:
    """Adapts ``getmany`` to the pipeline's :class:`~worker.pipeline.RecordSource`."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    async def fetch(self, timeout_ms: int) -> Sequence[InRecord]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        out: list[InRecord] = []
        for records in batches.values():
            out.extend(
                InRecord(
                    r.topic,
                    r.partition,
                    r.offset,
                    r.key,
                    r.value,
                    tuple((k, None if v is None else bytes(v)) for k, v in (r.headers or ())),
                )
                for r in records
            )
        return out


class AtLeastOnceSink:
    """Publish with acks=all and wait for every ack; then commit consumer offsets."""

    def __init__(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer) -> None:
        self._producer = producer
        self._consumer = consumer

    async def publish(self, records: Sequence[OutRecord]) -> None:
        # send() enqueues in call order (so per-partition order is kept); then wait for acks.
        futures = [
            await self._producer.send(r.topic, r.value, key=r.key, headers=list(r.headers))
            for r in records
        ]
        await asyncio.gather(*futures)

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        await self._consumer.commit(
            {TopicPartition(t, p): off for (t, p), off in positions.items()}
        )


class PipelineRebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        parts = [(tp.topic, tp.partition) for tp in revoked]
        if parts:
            log.info("partitions revoked: %s", parts)
            await self._pipeline.on_revoked(parts)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        parts = [(tp.topic, tp.partition) for tp in assigned]
        log.info("partitions assigned: %s", parts)
        self._pipeline.on_assigned(parts)


async def ensure_topics(bootstrap: str, topics: Mapping[str, int]) -> None:
    """Create the topics (name → partitions) that do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, partitions, 1)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile: fine
                await admin.create_topics(wanted)
    finally:
        await admin.close()


async def missing_topics(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[str]:
    present = await consumer.topics()
    return [t for t in topics if t not in present]
