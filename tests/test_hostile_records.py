"""Legal but odd Kafka records on the real broker: none of them may stop the worker.

A header without a value, a record without a key, a tombstone, a huge key and a huge set of
headers are all legal Kafka. Each must end in a result (the unreadable ones also in a
dead-letter copy that says where they came from), the valid commands around them must be
executed, and the worker must still be running afterwards.

Sizes: the "1 MB" key and headers are 900,000 bytes, so that the record is accepted by a
broker with the default ``max.message.bytes`` (about 1 MB), not just by the test broker
(which takes 4 MiB). One more record, a 900,000-byte key with a 900,000-byte poison value,
is only accepted because the commands topic takes 4 MiB; the results and dead-letter topics
here take no more than the worker's default ``deadletter_max_bytes`` (1,000,000), so a copy
that kept the key and the value as they are would be refused by the broker.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support import (
    SimControl,
    Topics,
    command,
    consume,
    events_of,
    running_worker,
    signed,
    worker_settings,
)
from worker.kafka.io import MAX_RECORD_BYTES
from worker.processor import MAX_HEADER_BYTES, MAX_KEY_BYTES, key_stand_in
from worker.tools.devstack import Broker

pytestmark = pytest.mark.integration

BIG = 900_000
KEY = b"desk-0:BTCUSDT"

Headers = list[tuple[str, bytes | None]]


async def _topics(bootstrap: str) -> Topics:
    """Fresh topics of one partition; results and dead letters take at most 1,000,000 bytes
    (the worker's default dead-letter limit), the commands topic the test broker's 4 MiB."""
    tag = uuid.uuid4().hex[:10]
    topics = Topics(f"cmd-{tag}", f"res-{tag}", f"dlq-{tag}")
    limit = {"max.message.bytes": "1000000"}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(topics.commands, 1, 1),
                NewTopic(topics.results, 1, 1, topic_configs=limit),
                NewTopic(topics.deadletter, 1, 1, topic_configs=limit),
            ]
        )
    finally:
        await admin.close()
    return topics


def _running_worker_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "Worker.run" and not t.done()
    ]


async def test_odd_records_end_in_results_and_the_worker_goes_on(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await _topics(broker.bootstrap)  # one partition: one order
    orders = sim.seed(
        [{"account": "desk-0", "market": "UM", "symbol": "BTCUSDT"} for _ in range(7)]
    )
    cmds = [command("desk-0", order, command_id=f"odd-{i}") for i, order in enumerate(orders)]
    big_key = b"desk-0:" + b"K" * (BIG - 7)
    many_headers: Headers = [("trace", None)]  # a null header value in a dead-letter copy too
    many_headers += [(f"h{i:03d}", b"v" * 995) for i in range(900)]  # 900 x 1000 bytes
    header_bytes = 5 + sum(len(n) + len(v or b"") for n, v in many_headers[1:])
    header_bytes += sum(len(n) + len(v) for n, v in signed(b""))  # the producer's own two
    records: list[tuple[bytes | None, bytes | None, Headers]] = [
        (KEY, orjson.dumps(cmds[0]), [("trace", None), ("b3", b"1")]),  # null header value
        (None, orjson.dumps(cmds[1]), []),  # null key
        (KEY, None, []),  # tombstone (cmds[2] is never sent: its order stays open)
        (big_key, orjson.dumps(cmds[3]), []),  # a valid command under a 900 KB key
        (KEY, orjson.dumps(cmds[4]), many_headers),  # a valid command under 900 KB of headers
        (big_key, b"{" * BIG, []),  # 1.8 MB: cmds[5] is never sent either
        (KEY, orjson.dumps(cmds[6]), []),  # and life goes on
    ]
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings) as worker:
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap, acks="all", max_request_size=MAX_RECORD_BYTES
        )
        await producer.start()
        try:
            for key, value, headers in records:  # one at a time: offsets 0..6 in this order
                signature = signed(value)  # a signed producer's hostile records
                await (
                    await producer.send(
                        topics.commands, value, key=key, headers=[*signature, *headers]
                    )
                )
        finally:
            await producer.stop()
        out = await consume(broker.bootstrap, topics.results, len(records), timeout_s=90)
        dead = await consume(broker.bootstrap, topics.deadletter, 4, validate=False)
        await asyncio.sleep(0.5)  # anything that would stop the worker has had its chance
        assert not worker.pipeline.stopping
        assert len(_running_worker_tasks()) == 1  # the worker's task is still running
    assert worker.pipeline.processed == len(records)

    # Every record ends in exactly one result; per key, in the order they were sent.
    events = events_of(out)
    offsets = [e["origin"]["offset"] for e in events]
    assert sorted(offsets) == list(range(len(records)))
    same_key = [o for o in offsets if records[o][0] == KEY]
    assert same_key == sorted(same_key) == [0, 2, 4, 6]
    by_offset = {e["origin"]["offset"]: e for e in events}
    out = sorted(out, key=lambda r: orjson.loads(r.value)["origin"]["offset"])
    for offset in (0, 1, 6):
        assert by_offset[offset]["type"] == "strategy.canceled", by_offset[offset]
        assert by_offset[offset]["command_id"] == f"odd-{offset}"
    assert by_offset[1]["origin"]["key"] is None and out[1].key is None
    assert [(by_offset[o]["reason"], by_offset[o]["attempts"]) for o in (2, 3, 4, 5)] == [
        ("invalid_command", 0)
    ] * 4
    assert by_offset[2]["detail"] == "empty record (null value)"
    assert by_offset[3]["detail"] == (
        f"record key of {BIG} bytes exceeds the {MAX_KEY_BYTES}-byte limit"
    )
    assert by_offset[4]["detail"] == (
        f"record headers of {header_bytes} bytes exceed the {MAX_HEADER_BYTES}-byte limit"
    )
    assert by_offset[3]["command_id"] == "odd-3" and by_offset[4]["command_id"] == "odd-4"
    stand_in = key_stand_in(big_key)
    assert by_offset[5]["detail"] == by_offset[3]["detail"]  # the key is checked first
    assert [r.key for r in out] == [KEY, None, KEY, stand_in, KEY, stand_in, KEY]
    assert all(len(r.key or b"") + len(r.value) < 10_000 for r in out)

    # The unreadable ones are on the dead-letter topic, with their origin.
    assert len(dead) == 4
    dead = sorted(dead, key=lambda r: int(dict(r.headers)["x-source-offset"]))
    for record, offset in zip(dead, (2, 3, 4, 5), strict=True):
        origin = dict(record.headers)
        assert origin["x-source-topic"] == topics.commands.encode()
        assert origin["x-source-partition"] == b"0"
        assert origin["x-source-offset"] == str(offset).encode()
        assert origin["x-error"] == by_offset[offset]["detail"].encode()
    tombstone, keyed, headed, both = dead
    assert (tombstone.key, tombstone.value) == (KEY, b"")
    assert dict(tombstone.headers)["x-null-value"] == b"1"
    assert (keyed.key, keyed.value) == (stand_in, orjson.dumps(cmds[3]))
    assert dict(keyed.headers)["x-key-truncated-from"] == str(BIG).encode()
    assert (headed.key, headed.value) == (KEY, orjson.dumps(cmds[4]))
    kept = [h for h in headed.headers if not h[0].startswith("x-")]
    assert kept[0] == ("trace", None)  # a null header value survives the copy
    assert kept == many_headers[: len(kept)] and 60 <= len(kept) < 900
    assert dict(headed.headers)["x-headers-dropped"] == str(901 - len(kept)).encode()
    assert (both.key, both.value) == (stand_in, b"{" * BIG)  # the value fits whole
    assert "x-truncated-from" not in dict(both.headers)

    # Ground truth at the exchange: the executed commands canceled their orders; the
    # refused ones (and the order of the tombstone's slot) were left alone.
    book = sim.orders()
    status = {i: book[order["strategy_id"]]["status"] for i, order in enumerate(orders)}
    assert status == {
        0: "CANCELED",
        1: "CANCELED",
        2: "NEW",
        3: "NEW",
        4: "NEW",
        5: "NEW",
        6: "CANCELED",
    }
