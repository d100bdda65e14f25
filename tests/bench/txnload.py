"""The broker load of an exactly-once worker's transactions, beside every bench run:

    python -m tests.bench.txnload BOOTSTRAP

(``make bench BENCH_ARGS=--txn-load``). What the default worker asks of the broker at 100
commands/s over 6 partitions, without the worker, on a scratch topic and group of its own:
one transactional producer configured as the worker's. With group commit (the default,
``TRANSACTION_INTERVAL_MS`` 0) a command paced 10 ms after the one before finds the last
transaction done (a commit takes a few ms here) and gets its own: so one transaction per
command, 100 a second, each holding one result on the command's partition and that
partition's offset (the bench's ``transactions_per_cmd`` of the paced worker says how close
that is). With an interval above 0, a transaction every interval with the results of every
partition meanwhile. Every system then runs on a broker as busy as it is beside an
exactly-once worker: what is left between the worker's latency and the floors' is the
worker's own, not the broker's. Prints ``TXN_LOAD_READY`` once its producer is up; on
SIGTERM (or SIGINT) it ends its transactions and prints how many it committed.
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

from worker.kafka.io import TRANSACTIONAL_RETRY_BACKOFF_MS, make_producer
from worker.settings import Settings

READY = "TXN_LOAD_READY"
PARTITIONS = 6
RATE = 100.0  # commands a second, as the bench's paced100
RECORD = b"r" * 300  # about a result event's size
DEFAULTS = Settings()  # the default worker's
INTERVAL_S = DEFAULTS.transaction_interval_ms / 1000


def transactions(interval_s: float) -> tuple[float, list[int]]:
    """How the default worker's transactions go at :data:`RATE`: the time between their
    starts and the partitions' results in each (one entry per result). Group commit
    (``interval_s`` 0): one transaction per command, on the command's partition (the commands
    spread round-robin here); otherwise one per interval with every command answered in it."""
    if interval_s <= 0:
        return 1 / RATE, [0]
    per_interval = max(1, round(RATE * interval_s))
    return interval_s, [i % PARTITIONS for i in range(per_interval)]


async def committing(producer: AIOKafkaProducer, topic: str, group: str) -> int:
    """Commit transactions as the default worker would at :data:`RATE`, until cancelled."""
    loop = asyncio.get_running_loop()
    spacing_s, shape = transactions(INTERVAL_S)
    committed = 0
    offsets = [0] * PARTITIONS
    try:
        while True:
            started = loop.time()
            # Group commit's one-result transactions go round the partitions.
            parts = [(p + committed) % PARTITIONS for p in shape] if len(shape) == 1 else shape
            async with producer.transaction():
                sent = [await producer.send(topic, RECORD, partition=p) for p in parts]
                for p in parts:
                    offsets[p] += 1
                positions = {TopicPartition(topic, p): offsets[p] for p in set(parts)}
                await producer.send_offsets_to_transaction(positions, group)
                await asyncio.gather(*sent)
            committed += 1
            await asyncio.sleep(max(0.0, spacing_s - (loop.time() - started)))
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
