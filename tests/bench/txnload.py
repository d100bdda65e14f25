"""The broker load of an exactly-once worker's transactions, beside every bench run:

    python -m tests.bench.txnload BOOTSTRAP

(``make bench BENCH_ARGS=--txn-load``). What the default worker asks of the broker at 100
commands/s over 6 partitions, without the worker: one transactional producer committing a
transaction every ``TRANSACTION_INTERVAL_MS`` that holds two results on each partition and
the six partitions' consumer offsets, on a scratch topic and group of its own. Every system
then runs on a broker that is as busy as it is beside an exactly-once worker: what is left
between the worker's latency and the floors' is the worker's own, not the broker's. Prints
``TXN_LOAD_READY`` once its producer is up; on SIGTERM (or SIGINT) it ends its transactions
and prints how many it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import uuid

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.kafka_io import TRANSACTIONAL_RETRY_BACKOFF_MS, make_producer
from worker.settings import Settings

READY = "TXN_LOAD_READY"
PARTITIONS = 6
RECORDS_PER_TRANSACTION = 2
RECORD = b"r" * 300  # about a result event's size
DEFAULTS = Settings()  # the default worker's
INTERVAL_S = DEFAULTS.transaction_interval_ms / 1000


async def committing(producer: AIOKafkaProducer, topic: str, group: str) -> int:
    """Commit a transaction every INTERVAL_S until cancelled."""
    loop = asyncio.get_running_loop()
    committed = offset = 0
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    try:
        while True:
            started = loop.time()
            async with producer.transaction():
                sent = [
                    await producer.send(topic, RECORD, partition=tp.partition)
                    for tp in parts
                    for _ in range(RECORDS_PER_TRANSACTION)
                ]
                offset += RECORDS_PER_TRANSACTION
                await producer.send_offsets_to_transaction(dict.fromkeys(parts, offset), group)
                await asyncio.gather(*sent)
            committed += 1
            await asyncio.sleep(max(0.0, INTERVAL_S - (loop.time() - started)))
    except asyncio.CancelledError:
        return committed


async def main(bootstrap: str) -> None:
    topic = f"bench-txn-load-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    settings = dataclasses.replace(DEFAULTS, bootstrap_servers=bootstrap)
    # Configured as the worker's transactional sink configures its producer.
    producer = make_producer(
        settings,
        transactional_id=f"{topic}-0",
        transaction_timeout_ms=settings.transaction_timeout_ms,
        retry_backoff_ms=TRANSACTIONAL_RETRY_BACKOFF_MS,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await producer.start()
        print(READY, flush=True)
        task = asyncio.create_task(committing(producer, topic, f"{topic}-group"))
        await stop.wait()
        task.cancel()
        print(f"committed {await task} transactions", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
