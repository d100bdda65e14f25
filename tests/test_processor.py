"""The processor's handling of poison records (no exchange involved: nothing is sent)."""

from __future__ import annotations

import orjson

from worker.accounts import Credentials
from worker.executor import CancelExecutor, RetryPolicy
from worker.papi import PapiClient
from worker.pipeline import InRecord
from worker.processor import CommandProcessor
from worker.signing import HmacSigner
from worker.timeutil import now_ms


async def _process(record: InRecord, dlq_max: int) -> list[tuple[str, bytes, dict[str, bytes]]]:
    accounts = {"a": Credentials("a", "k", HmacSigner("s"), hmac_secret="s")}
    async with PapiClient("http://127.0.0.1:9", clock=now_ms) as client:  # never reached
        processor = CommandProcessor(
            CancelExecutor(client, accounts, RetryPolicy(), now_ms),
            results_topic="res",
            deadletter_topic="dlq",
            max_command_bytes=65_536,
            deadletter_max_bytes=dlq_max,
            clock=now_ms,
        )
        out = await processor(record)
    return [(r.topic, r.value, dict(r.headers)) for r in out]


async def test_poison_is_copied_whole_to_the_dead_letter_topic() -> None:
    record = InRecord("cmd", 2, 41, b"key", b"\x00not json", (("trace", b"t-1"),))
    (dlq_topic, dlq_value, dlq_headers), (res_topic, res_value, _) = await _process(record, 1000)
    assert (dlq_topic, dlq_value) == ("dlq", b"\x00not json")
    assert dlq_headers["trace"] == b"t-1"  # the producer's headers travel along
    assert dlq_headers["x-source-offset"] == b"41" and dlq_headers["x-source-partition"] == b"2"
    assert "x-truncated-from" not in dlq_headers
    assert res_topic == "res" and orjson.loads(res_value)["reason"] == "invalid_command"


async def test_a_poison_record_too_big_for_the_dead_letter_topic_keeps_its_head() -> None:
    big = b"x" * 5_000
    record = InRecord("cmd", 0, 7, None, big)
    (_, dlq_value, dlq_headers), _ = await _process(record, 1_000)
    assert dlq_value == big[:1_000]
    assert dlq_headers["x-truncated-from"] == b"5000"
    assert dlq_headers["x-source-offset"] == b"7"  # where the whole record still is
