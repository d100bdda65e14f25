"""The processor's handling of poison and hostile records (no exchange involved: nothing is
sent; the executor only records what reaches it and answers for an account it does not know).

Every record Kafka can carry must end in one result, and every outgoing record must fit in
the dead-letter limit, counted both by the processor and by aiokafka's own size estimate.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_fit import _strategy
from worker import metrics
from worker.core import events, redrive
from worker.core.commands import Command, decode
from worker.core.contracts import result_validator
from worker.core.errors import FailureReason
from worker.core.redrive import RecordAt
from worker.core.routes import Route
from worker.core.sweep import Listed, RouteOutcome, RouteReport, SweepReport, Swept
from worker.core.timeutil import now_ms
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, Outcome, RetryPolicy
from worker.kafka.dedup import FirstResult, SeenCommands
from worker.kafka.pipeline import InRecord, OutRecord
from worker.processor import (
    MAX_HEADER_BYTES,
    MAX_KEY_BYTES,
    CommandProcessor,
    Header,
    key_stand_in,
    record_bytes,
)

MB = 1_000_000
VALID = orjson.dumps(
    {
        "command_id": "c-1",
        "account": "nobody",  # unknown to the executor: answered without any request
        "market": "UM",
        "symbol": "BTCUSDT",
        "strategy_id": 7,
        "issued_at": 1_795_260_000_000,
    }
)


class RecordingExecutor(CancelExecutor):
    """A real executor without accounts that records every command reaching it."""

    def __init__(self, client: PapiClient) -> None:
        super().__init__(client, {}, RetryPolicy(), now_ms)
        self.seen: list[Command] = []

    async def execute(
        self, command: Command, received_at: int, *, redrive: bool = False
    ) -> Outcome:
        self.seen.append(command)
        return await super().execute(command, received_at, redrive=redrive)


@pytest.fixture
async def executor() -> AsyncIterator[RecordingExecutor]:
    async with PapiClient("http://127.0.0.1:9", clock=now_ms) as client:  # never reached
        yield RecordingExecutor(client)


def _processor(
    executor: CancelExecutor,
    dlq_max: int = MB,
    seen: SeenCommands | None = None,
    **bounds: int,
) -> CommandProcessor:
    return CommandProcessor(
        executor,
        results_topic="res",
        deadletter_topic="dlq",
        max_command_bytes=65_536,
        deadletter_max_bytes=dlq_max,
        clock=now_ms,
        seen=seen,
        **bounds,
    )


def _wire_size(record: OutRecord) -> int:
    """aiokafka's upper bound for the record in a batch of its own."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        record.key, record.value, list(record.headers)
    )
    return size


def _check_sizes(out: Sequence[OutRecord], dlq_max: int) -> None:
    for record in out:
        assert record_bytes(record) <= dlq_max, (record.topic, record_bytes(record))
        assert _wire_size(record) <= record_bytes(record)


def _split(out: Sequence[OutRecord]) -> tuple[OutRecord | None, dict[str, Any], OutRecord]:
    """(dead-letter copy or None, result event, result record)."""
    results = [r for r in out if r.topic == "res"]
    dead = [r for r in out if r.topic == "dlq"]
    assert len(results) == 1 and len(dead) <= 1 and len(out) == len(results) + len(dead)
    return (dead[0] if dead else None), orjson.loads(results[0].value), results[0]


async def test_poison_is_copied_whole_to_the_dead_letter_topic(
    executor: RecordingExecutor,
) -> None:
    record = InRecord("cmd", 2, 41, b"key", b"\x00not json", (("trace", b"t-1"),))
    out = await _processor(executor, 10_000)(record)
    dead, event, result = _split(out)
    assert dead is not None and out[0] is dead  # the copy first, then the result
    assert (dead.topic, dead.key, dead.value) == ("dlq", b"key", b"\x00not json")
    headers = dict(dead.headers)
    assert headers["trace"] == b"t-1"  # the producer's headers travel along
    assert headers["x-source-offset"] == b"41" and headers["x-source-partition"] == b"2"
    assert headers["x-source-topic"] == b"cmd"
    assert "x-truncated-from" not in headers and "x-headers-dropped" not in headers
    assert event["reason"] == "invalid_command" and result.key == b"key"
    assert not executor.seen
    _check_sizes(out, 10_000)


async def test_a_poison_record_too_big_for_the_dead_letter_topic_keeps_its_head(
    executor: RecordingExecutor,
) -> None:
    big = b"x" * 50_000
    out = await _processor(executor, 10_000)(InRecord("cmd", 0, 7, None, big))
    dead, _, _ = _split(out)
    assert dead is not None
    assert 8_000 < len(dead.value) < 10_000 and big.startswith(dead.value)
    headers = dict(dead.headers)
    assert headers["x-truncated-from"] == b"50000"
    assert headers["x-source-offset"] == b"7"  # where the whole record still is
    _check_sizes(out, 10_000)


async def test_a_header_without_a_value_is_fine(executor: RecordingExecutor) -> None:
    headers = (("trace", None), ("b3", b"x"))
    out = await _processor(executor)(InRecord("cmd", 0, 1, b"k", VALID, headers))
    dead, event, result = _split(out)
    assert dead is None and [c.command_id for c in executor.seen] == ["c-1"]
    assert event["reason"] == "unknown_account" and result.key == b"k"
    # An invalid one keeps the null header value in its dead-letter copy.
    out = await _processor(executor)(InRecord("cmd", 0, 2, b"k", b"nope", headers))
    dead, event, _ = _split(out)
    assert dead is not None and dead.headers[:2] == headers
    assert event["reason"] == "invalid_command" and len(executor.seen) == 1
    _check_sizes(out, MB)


async def test_a_command_without_a_key_is_processed(executor: RecordingExecutor) -> None:
    out = await _processor(executor)(InRecord("cmd", 1, 3, None, VALID))
    dead, event, result = _split(out)
    assert dead is None and len(executor.seen) == 1
    assert result.key is None and event["origin"]["key"] is None
    assert event["command_id"] == "c-1" and event["reason"] == "unknown_account"
    # Without a key, a poison record's copy has none either.
    out = await _processor(executor)(InRecord("cmd", 1, 4, None, b"[]"))
    dead, event, result = _split(out)
    assert dead is not None and dead.key is None and result.key is None
    assert event["reason"] == "invalid_command"


async def test_a_tombstone_is_an_invalid_command(executor: RecordingExecutor) -> None:
    out = await _processor(executor)(InRecord("cmd", 0, 9, b"desk-0:BTCUSDT", None))
    dead, event, result = _split(out)
    assert dead is not None and not executor.seen
    assert (dead.key, dead.value) == (b"desk-0:BTCUSDT", b"")
    assert dict(dead.headers)["x-null-value"] == b"1"
    assert event["detail"] == "empty record (null value)"
    assert event["origin"]["key"] == "desk-0:BTCUSDT" and result.key == b"desk-0:BTCUSDT"


async def test_a_one_megabyte_key_is_refused_and_keyed_with_a_stand_in(
    executor: RecordingExecutor,
) -> None:
    key = b"desk-0:" + b"k" * (MB - 7)
    out = await _processor(executor)(InRecord("cmd", 0, 5, key, VALID, (("h", None),)))
    dead, event, result = _split(out)
    assert not executor.seen  # a valid command, but not executed
    assert event["reason"] == "invalid_command"
    assert event["detail"] == f"record key of {MB} bytes exceeds the {MAX_KEY_BYTES}-byte limit"
    assert event["command_id"] == "c-1" and event["account"] == "nobody"  # still identifiable
    assert len(event["origin"]["key"]) == 256
    stand_in = key[:64] + b"...sha256:" + hashlib.sha256(key).hexdigest().encode()
    assert result.key == stand_in == key_stand_in(key) and len(stand_in) == 138
    assert dead is not None and dead.key == stand_in
    headers = dict(dead.headers)
    assert headers["x-key-truncated-from"] == str(MB).encode()
    assert headers["h"] is None and dead.value == VALID
    _check_sizes(out, MB)
    # Another key with the same head gets another stand-in; the same key, the same one.
    other = key[:-1] + b"x"
    assert key_stand_in(other) != stand_in and key_stand_in(bytes(key)) == stand_in


async def test_the_key_bound_is_inclusive(executor: RecordingExecutor) -> None:
    processor = _processor(executor)
    key = b"k" * MAX_KEY_BYTES
    dead, _, result = _split(await processor(InRecord("cmd", 0, 0, key, VALID)))
    assert dead is None and result.key == key and len(executor.seen) == 1
    dead, event, result = _split(await processor(InRecord("cmd", 0, 1, key + b"k", VALID)))
    assert dead is not None and event["reason"] == "invalid_command"
    assert result.key == key_stand_in(key + b"k") and len(executor.seen) == 1


async def test_a_megabyte_of_small_headers_is_refused(executor: RecordingExecutor) -> None:
    headers = tuple((f"h{i:04d}", b"v" * 995) for i in range(1000))  # 1000 x 1000 bytes
    out = await _processor(executor)(InRecord("cmd", 0, 6, b"k", VALID, headers))
    dead, event, result = _split(out)
    assert not executor.seen and result.key == b"k"
    assert event["detail"] == (
        f"record headers of {MB} bytes exceed the {MAX_HEADER_BYTES}-byte limit"
    )
    assert dead is not None and dead.value == VALID
    kept = [h for h in dead.headers if h[0].startswith("h")]
    assert kept == list(headers[: MAX_HEADER_BYTES // 1000])  # a prefix, within the bound
    assert dict(dead.headers)["x-headers-dropped"] == str(1000 - len(kept)).encode()
    _check_sizes(out, MB)


async def test_one_huge_header_is_dropped_and_the_small_ones_kept(
    executor: RecordingExecutor,
) -> None:
    headers = (("before", b"1"), ("huge", b"h" * MB), ("none", None), ("after", b"2"))
    out = await _processor(executor)(InRecord("cmd", 0, 8, b"k", VALID, headers))
    dead, event, _ = _split(out)
    assert not executor.seen and event["detail"].startswith(f"record headers of {MB + 21} bytes")
    assert dead is not None
    assert [h for h in dead.headers if not h[0].startswith("x-")] == [
        ("before", b"1"),
        ("none", None),
        ("after", b"2"),
    ]
    assert dict(dead.headers)["x-headers-dropped"] == b"1"
    _check_sizes(out, MB)


async def test_headers_at_the_bound_are_fine(executor: RecordingExecutor) -> None:
    headers = (("h", b"v" * (MAX_HEADER_BYTES - 1)),)
    dead, _, _ = _split(await _processor(executor)(InRecord("cmd", 0, 0, b"k", VALID, headers)))
    assert dead is None and len(executor.seen) == 1


HOSTILE = [
    InRecord("cmd", 0, 1, b"k", VALID, (("trace", None),)),
    InRecord("cmd", 0, 2, None, VALID),
    InRecord("cmd", 0, 3, b"k", None),
    InRecord("cmd", 0, 4, b"K" * MB, VALID),
    InRecord("cmd", 0, 5, b"k", VALID, tuple((f"h{i}", b"v" * 1000) for i in range(1000))),
    InRecord("cmd", 0, 6, b"k", VALID, (("a", None), ("huge", b"h" * MB), ("b", b""))),
    InRecord("cmd", 0, 7, b"k", b"{" * (3 * MB)),
    # Everything at once: a huge key, huge headers, a huge poison value.
    InRecord(
        "c" * 249,
        2**31 - 1,
        2**63 - 1,
        b"\xff" * MB,
        b"\x00" * (3 * MB),
        (("n" * 100_000, None), *((str(i), b"x" * 2000) for i in range(600))),
    ),
    # Many headers with nothing in them: each still costs framing in the copy.
    InRecord("cmd", 0, 8, b"k", b"bad", tuple(("", None) for _ in range(200_000))),
]


@pytest.mark.parametrize("dlq_max", [MAX_KEY_BYTES + 4096, 20_000, 1_000_000])
async def test_every_outgoing_record_fits_the_dead_letter_limit(
    executor: RecordingExecutor, dlq_max: int
) -> None:
    processor = _processor(executor, dlq_max)
    for record in HOSTILE:
        out = await processor(record)
        dead, event, _ = _split(out)
        assert event["origin"]["offset"] == record.offset
        assert (dead is None) == (event["reason"] == "unknown_account")
        if dead is not None:
            headers = dict(dead.headers)
            assert headers["x-source-offset"] == str(record.offset).encode()
            assert headers["x-source-partition"] == str(record.partition).encode()
            assert headers["x-source-topic"] == record.topic.encode()
            assert dead.value == (record.value or b"")[: len(dead.value)]
        _check_sizes(out, dlq_max)
    assert [c.command_id for c in executor.seen] == ["c-1", "c-1"]  # the first two only


async def test_a_dead_letter_limit_too_small_for_a_key_is_refused(
    executor: RecordingExecutor,
) -> None:
    with pytest.raises(ValueError, match="deadletter_max_bytes must be at least 8192"):
        _processor(executor, 8191)
    _processor(executor, 8192)
    # A smaller key bound still leaves room for a stand-in (138 bytes) and the headers.
    with pytest.raises(ValueError, match="at least 4234"):
        _processor(executor, 4233, max_key_bytes=16)
    _processor(executor, 4234, max_key_bytes=16)


hostile_records = st.builds(
    InRecord,
    st.just("cmd"),
    st.integers(0, 5),
    st.integers(0, 10**6),
    st.one_of(st.none(), st.binary(max_size=100)),
    st.one_of(st.none(), st.just(VALID), st.binary(max_size=6000)),
    st.lists(
        st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=300))),
        max_size=30,
    ).map(tuple),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(hostile_records, min_size=1, max_size=5),
    slack=st.integers(0, 3000),
)
def test_small_bounds_hold_for_any_record(records: list[InRecord], slack: int) -> None:
    """With small bounds, the edges are crossed often: every record still ends in one
    result, and what is published fits."""

    async def run() -> None:
        async with PapiClient("http://127.0.0.1:9", clock=now_ms) as client:
            executor = RecordingExecutor(client)
            dlq_max = 138 + 4096 + slack  # the smallest allowed, and up
            processor = _processor(executor, dlq_max, max_key_bytes=50, max_header_bytes=500)
            for record in records:
                out = await processor(record)
                dead, event, result = _split(out)
                refused = event["reason"] == "invalid_command"
                assert (dead is not None) == refused
                key = record.key
                assert result.key == (key if key is None or len(key) <= 50 else key_stand_in(key))
                if dead is not None:
                    assert dead.key == result.key
                    assert dead.value == (record.value or b"")[: len(dead.value)]
                    own = [h for h in dead.headers if h in record.headers]
                    assert sum(len(n.encode()) + len(v or b"") for n, v in own) <= 500
                _check_sizes(out, dlq_max)
            assert len(executor.seen) == sum(
                1
                for r in records
                if r.value == VALID
                and (r.key is None or len(r.key) <= 50)
                and sum(len(n.encode()) + len(v or b"") for n, v in r.headers) <= 500
            )

    asyncio.run(run())


# -- the duplicate-command window -------------------------------------------------------------

ACCOUNT = "nobody"
VALID_COMMAND = decode(VALID)
assert isinstance(VALID_COMMAND, Command)
FINGERPRINT = events.fingerprint(VALID_COMMAND)


class AnsweringExecutor(RecordingExecutor):
    """Records every command reaching it and answers each with a final failure that the
    window remembers (``not_found``), without any request."""

    async def execute(
        self, command: Command, received_at: int, *, redrive: bool = False
    ) -> Outcome:
        self.seen.append(command)
        return Outcome(False, 1, reason=FailureReason.NOT_FOUND, detail="no such order")


@pytest.fixture
async def answering() -> AsyncIterator[AnsweringExecutor]:
    async with PapiClient("http://127.0.0.1:9", clock=now_ms) as client:  # never reached
        yield AnsweringExecutor(client)


def _window() -> SeenCommands:
    return SeenCommands(3_600_000, 1000)


def _valid(**changes: object) -> bytes:
    return orjson.dumps(orjson.loads(VALID) | changes)


def _canceled_on_topic(seen: SeenCommands, at: RecordAt) -> FirstResult:
    """c-1 canceled, its result read back from the results topic (as the loader does)."""
    first = FirstResult(
        "strategy.canceled", None, "um_conditional", "CANCELED", at, now_ms(), FINGERPRINT
    )
    seen.put(ACCOUNT, "c-1", first, on_topic=True)
    return first


async def test_a_duplicate_from_another_record_gets_the_first_outcome_and_no_request(
    executor: RecordingExecutor,
) -> None:
    seen = _window()
    first = _canceled_on_topic(seen, RecordAt("cmd", 0, 3))
    out = await _processor(executor, seen=seen)(InRecord("cmd", 1, 9, b"k", VALID, (("h", b"1"),)))
    assert not executor.seen  # no request
    (result,) = out
    event = orjson.loads(result.value)
    result_validator().validate(event)
    assert (result.topic, result.key) == ("res", b"k")
    assert dict(result.headers) == {"type": b"cancel.duplicate"}
    assert event["type"] == "cancel.duplicate" and event["attempts"] == 0
    assert (event["command_id"], event["account"], event["market"]) == ("c-1", "nobody", "UM")
    assert event["symbol"] == "BTCUSDT" and event["fingerprint"] == FINGERPRINT.hex()
    assert event["origin"] == {"topic": "cmd", "partition": 1, "offset": 9, "key": "k"}
    assert event["first_result"] == first.as_dict()
    assert event["first_result"]["origin"] == {"topic": "cmd", "partition": 0, "offset": 3}
    assert event["received_at"] <= event["completed_at"]
    # The duplicate is not recorded: the first result stays the one to report.
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.first == first


async def test_a_retry_with_new_stamps_and_annotations_is_a_duplicate(
    executor: RecordingExecutor,
) -> None:
    """issued_at, expires_at, reason and source are not the command's content: a producer
    that rebuilds a command to retry it, or a re-drive, has the same fingerprint."""
    seen = _window()
    _canceled_on_topic(seen, RecordAt("cmd", 0, 3))
    retry = _valid(issued_at=1_795_260_009_999, expires_at=1_795_260_099_999, reason="again")
    (result,) = await _processor(executor, seen=seen)(InRecord("cmd", 0, 9, b"k", retry))
    assert orjson.loads(result.value)["type"] == "cancel.duplicate" and not executor.seen


@pytest.mark.parametrize(
    "changes",
    [
        {"strategy_id": 8},
        {"strategy_id": None, "client_strategy_id": "x-7"},
        {"symbol": "ETHUSDT"},
        {"market": "CM"},
        {"strategy_id": None, "scope": "symbol"},
    ],
    ids=["other-order", "by-client-id", "other-symbol", "other-market", "kill-switch"],
)
async def test_the_same_id_with_other_content_is_an_id_conflict(
    executor: RecordingExecutor, changes: dict[str, object]
) -> None:
    seen = _window()
    first = _canceled_on_topic(seen, RecordAt("cmd", 0, 3))
    body = {k: v for k, v in (orjson.loads(VALID) | changes).items() if v is not None}
    other = orjson.dumps(body)
    dead, event, record = _split(
        await _processor(executor, seen=seen)(InRecord("cmd", 0, 9, b"k", other))
    )
    assert not executor.seen and dead is None  # no request; the record is not poison
    result_validator().validate(event)
    assert dict(record.headers) == {"type": b"cancel.failed"}
    assert (event["type"], event["reason"], event["attempts"]) == (
        "cancel.failed",
        "id_conflict",
        0,
    )
    assert event["command_id"] == "c-1" and event["fingerprint"] != FINGERPRINT.hex()
    assert "cmd[0]@3" in event["detail"] and FINGERPRINT.hex() in event["detail"]
    # Not remembered: the id's entry is still the first result, and the same conflicting
    # command again is a conflict again (never a duplicate of the conflict).
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.first == first and len(seen) == 1
    (again,) = await _processor(executor, seen=seen)(InRecord("cmd", 0, 10, b"k", other))
    assert orjson.loads(again.value)["reason"] == "id_conflict" and not executor.seen
    # The command as first sent is still a duplicate.
    (dup,) = await _processor(executor, seen=seen)(InRecord("cmd", 0, 11, b"k", VALID))
    assert orjson.loads(dup.value)["type"] == "cancel.duplicate" and not executor.seen


async def test_a_result_without_a_fingerprint_matches_any_content(
    executor: RecordingExecutor,
) -> None:
    """A result written before results carried fingerprints (rebuilt into the window at an
    upgrade) is taken as the command's: a duplicate, as before, never a conflict."""
    seen = _window()
    at = RecordAt("cmd", 0, 3)
    seen.put(
        ACCOUNT,
        "c-1",
        FirstResult("cancel.failed", "rejected", None, None, at, now_ms()),
        on_topic=True,
    )
    other = _valid(strategy_id=99)
    (result,) = await _processor(executor, seen=seen)(InRecord("cmd", 0, 9, b"k", other))
    assert orjson.loads(result.value)["type"] == "cancel.duplicate" and not executor.seen


async def test_the_same_id_for_another_account_is_another_command(
    answering: AnsweringExecutor,
) -> None:
    seen = _window()
    _canceled_on_topic(seen, RecordAt("cmd", 0, 3))
    other = _valid(account="desk-b")
    (result,) = await _processor(answering, seen=seen)(InRecord("cmd", 0, 9, b"k", other))
    event = orjson.loads(result.value)
    assert (event["type"], event["reason"], event["account"]) == (
        "cancel.failed",
        "not_found",
        "desk-b",
    )
    assert len(answering.seen) == 1 and len(seen) == 2
    b = seen.get("desk-b", "c-1")
    assert b is not None and b.first.origin == RecordAt("cmd", 0, 9)


async def test_a_result_produced_here_catches_the_duplicate_right_behind_it(
    answering: AnsweringExecutor,
) -> None:
    seen = _window()
    processor = _processor(answering, seen=seen)
    (first,) = await processor(InRecord("cmd", 0, 1, b"k", VALID))
    assert orjson.loads(first.value)["reason"] == "not_found"
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and not entry.on_topic
    assert entry.first.origin == RecordAt("cmd", 0, 1) and entry.first.fingerprint == FINGERPRINT
    (second,) = await processor(InRecord("cmd", 0, 2, b"k", VALID))
    event = orjson.loads(second.value)
    result_validator().validate(event)
    assert event["type"] == "cancel.duplicate"
    assert event["first_result"]["type"] == "cancel.failed"
    assert event["first_result"]["reason"] == "not_found"
    assert event["first_result"]["origin"]["offset"] == 1
    assert len(answering.seen) == 1  # one request path for the two records


async def test_a_record_answered_here_but_not_read_back_is_answered_again(
    answering: AnsweringExecutor,
) -> None:
    """Its first answer may not have been made durable (a failed flush, an aborted
    transaction): answering it again is the only way it gets a result."""
    seen = _window()
    processor = _processor(answering, seen=seen)
    await processor(InRecord("cmd", 0, 1, b"k", VALID))
    (again,) = await processor(InRecord("cmd", 0, 1, b"k", VALID))
    assert orjson.loads(again.value)["type"] == "cancel.failed" and len(answering.seen) == 2


async def test_the_record_a_result_on_the_topic_answers_gets_nothing_and_no_request(
    executor: RecordingExecutor,
) -> None:
    seen = _window()
    _canceled_on_topic(seen, RecordAt("cmd", 1, 9))
    assert await _processor(executor, seen=seen)(InRecord("cmd", 1, 9, b"k", VALID)) == []
    assert not executor.seen


async def test_refused_commands_are_answered_every_time_and_never_remembered(
    executor: RecordingExecutor,
) -> None:
    """An unknown account costs no request: its result is not remembered, so a repeat is
    answered again (no duplicate), and it claims nothing for the account once configured."""
    seen = _window()
    processor = _processor(executor, seen=seen)
    for offset in (1, 2):
        (result,) = await processor(InRecord("cmd", 0, offset, b"k", VALID))
        event = orjson.loads(result.value)
        assert (event["type"], event["reason"]) == ("cancel.failed", "unknown_account")
        assert event["fingerprint"] == FINGERPRINT.hex()
    assert len(seen) == 0 and len(executor.seen) == 2


async def test_an_id_claimed_in_advance_by_an_invalid_record_claims_nothing(
    answering: AnsweringExecutor,
) -> None:
    seen = _window()
    processor = _processor(answering, seen=seen)
    for offset, bad in enumerate(
        (
            orjson.dumps({"command_id": "c-1"}),
            orjson.dumps({"command_id": "c-1", "account": ACCOUNT}),  # no market, no id
            orjson.dumps({"command_id": "c-1", "account": ACCOUNT, "market": "UM"}),
        )
    ):
        dead, event, _ = _split(await processor(InRecord("cmd", 0, offset, b"k", bad)))
        assert dead is not None and event["reason"] == "invalid_command"
        assert event["fingerprint"] is None
    await processor(InRecord("cmd", 0, 5, b"k", b"\x00"))  # no command id at all
    assert len(seen) == 0 and not answering.seen
    # The real c-1 is processed.
    (result,) = await processor(InRecord("cmd", 0, 6, b"k", VALID))
    assert orjson.loads(result.value)["reason"] == "not_found" and len(answering.seen) == 1
    assert len(seen) == 1


async def test_invalid_commands_are_not_checked_against_the_window(
    executor: RecordingExecutor,
) -> None:
    seen = _window()
    first = _canceled_on_topic(seen, RecordAt("cmd", 0, 3))
    processor = _processor(executor, seen=seen)
    bad = orjson.dumps({"command_id": "c-1", "account": "nobody"})  # no market, no id
    dead, event, _ = _split(await processor(InRecord("cmd", 0, 4, b"k", bad)))
    assert dead is not None and event["reason"] == "invalid_command"
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.first == first and len(seen) == 1


# -- re-driving a failure (replay --failed) ---------------------------------------------------


def _failed_on_topic(seen: SeenCommands, at: RecordAt, reason: str) -> FirstResult:
    """c-1 failed with ``reason``, its result read back from the results topic."""
    first = FirstResult("cancel.failed", reason, "um_conditional", None, at, now_ms(), FINGERPRINT)
    seen.put(ACCOUNT, "c-1", first, on_topic=True)
    return first


def _redrive_of(at: RecordAt, reason: str = "exchange_unavailable") -> tuple[Header, ...]:
    return (
        ("x-replayed-from", f"{at.topic}:{at.partition}:{at.offset}".encode()),
        (redrive.REDRIVE_OF, f"{at.topic}:{at.partition}:{at.offset}".encode()),
        (redrive.REDRIVE_REASON, reason.encode()),
    )


async def test_a_redrive_of_a_redrivable_failure_passes_the_window_once(
    answering: AnsweringExecutor,
) -> None:
    executor = answering
    seen = _window()
    failure = _failed_on_topic(seen, RecordAt("cmd", 0, 3), "exchange_unavailable")
    processor = _processor(executor, seen=seen)
    copy = InRecord("cmd", 0, 10, b"k", VALID, _redrive_of(RecordAt("cmd", 0, 3)))
    (result,) = await processor(copy)
    event = orjson.loads(result.value)
    result_validator().validate(event)
    assert len(executor.seen) == 1  # processed: the executor was asked
    assert event["type"] == "cancel.failed" and event["reason"] == "not_found"
    assert event["retry_of"] == {
        "type": "cancel.failed",
        "reason": "exchange_unavailable",
        "origin": {"topic": "cmd", "partition": 0, "offset": 3},
        "completed_at": failure.completed_at,
    }
    entry = seen.get(ACCOUNT, "c-1")  # the re-drive's result took the failure's place
    assert entry is not None and entry.first.origin == RecordAt("cmd", 0, 10)

    # The same claim again (the replay run twice, a producer retry of the copy): a duplicate.
    again = InRecord("cmd", 0, 11, b"k", VALID, _redrive_of(RecordAt("cmd", 0, 3)))
    (dup,) = await processor(again)
    dup_event = orjson.loads(dup.value)
    result_validator().validate(dup_event)
    assert dup_event["type"] == "cancel.duplicate"
    assert dup_event["first_result"]["origin"]["offset"] == 10
    assert len(executor.seen) == 1


@pytest.mark.parametrize(
    ("first_type", "reason"),
    [
        ("cancel.failed", "already_closed"),
        ("cancel.failed", "not_found"),
        ("cancel.failed", "rejected"),
        ("cancel.failed", "route_retired"),
        ("strategy.canceled", None),
        ("strategies.canceled", None),
    ],
)
async def test_a_final_answer_is_never_redriven(
    executor: RecordingExecutor, first_type: str, reason: str | None
) -> None:
    seen = _window()
    route = "um_conditional" if first_type == "strategy.canceled" else None
    status = "CANCELED" if first_type == "strategy.canceled" else None
    first = FirstResult(
        first_type, reason, route, status, RecordAt("cmd", 0, 3), now_ms(), FINGERPRINT
    )
    seen.put(ACCOUNT, "c-1", first, on_topic=True)
    copy = InRecord("cmd", 0, 10, b"k", VALID, _redrive_of(RecordAt("cmd", 0, 3)))
    (dup,) = await _processor(executor, seen=seen)(copy)
    event = orjson.loads(dup.value)
    result_validator().validate(event)
    assert event["type"] == "cancel.duplicate" and not executor.seen
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.first == first


async def test_a_redrive_with_other_content_is_an_id_conflict(
    executor: RecordingExecutor,
) -> None:
    """A copy claiming to re-drive the failure, for other orders: refused like any command
    reusing the id, and the failure stays re-drivable."""
    seen = _window()
    failure = _failed_on_topic(seen, RecordAt("cmd", 0, 3), "outcome_unknown")
    copy = InRecord("cmd", 0, 10, b"k", _valid(strategy_id=8), _redrive_of(RecordAt("cmd", 0, 3)))
    (result,) = await _processor(executor, seen=seen)(copy)
    event = orjson.loads(result.value)
    assert event["reason"] == "id_conflict" and "retry_of" not in event and not executor.seen
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.first == failure


async def test_a_redrive_naming_another_record_is_a_duplicate(
    executor: RecordingExecutor,
) -> None:
    seen = _window()
    _failed_on_topic(seen, RecordAt("cmd", 0, 3), "outcome_unknown")
    for claim in (b"cmd:0:4", b"other:0:3", b"cmd:0", b"\xff", b""):
        headers: tuple[Header, ...] = ((redrive.REDRIVE_OF, claim),)
        (dup,) = await _processor(executor, seen=seen)(InRecord("cmd", 0, 9, b"k", VALID, headers))
        assert orjson.loads(dup.value)["type"] == "cancel.duplicate", claim
    assert not executor.seen


async def test_a_redrive_the_window_no_longer_holds_is_processed_and_says_what_it_claims(
    executor: RecordingExecutor,
) -> None:
    copy = InRecord("cmd", 0, 10, b"k", VALID, _redrive_of(RecordAt("cmd", 0, 3), "expired"))
    (result,) = await _processor(executor, seen=_window())(copy)
    event = orjson.loads(result.value)
    result_validator().validate(event)
    assert len(executor.seen) == 1
    assert event["retry_of"] == {
        "type": "cancel.failed",
        "reason": "expired",
        "origin": {"topic": "cmd", "partition": 0, "offset": 3},
        "completed_at": None,
    }


async def test_a_kill_switch_listing_thousands_of_orders_fits_one_record(
    executor: RecordingExecutor,
) -> None:
    """The exchange decides how many orders a kill switch lists; the result still fits the
    bound of every record the processor publishes, and what was left out is counted."""
    listed = [Listed(Route.UM_ALGO, i, _strategy(i)) for i in range(5_000)]
    report = SweepReport(
        (RouteReport(Route.UM_ALGO, RouteOutcome.DONE, len(listed)),), Swept(canceled=listed)
    )

    class Sweeping(RecordingExecutor):
        async def execute(
            self, command: Command, received_at: int, *, redrive: bool = False
        ) -> Outcome:
            return Outcome(True, 2, sweep=report)

    before = metrics.SWEEP_OMITTED.labels("strategies")._value.get()
    kill = orjson.dumps(
        {
            "command_id": "kill-1",
            "account": "desk-0",
            "market": "UM",
            "symbol": "BTCUSDT",
            "scope": "symbol",
            "issued_at": now_ms(),
        }
    )
    dlq_max = 200_000
    (out,) = await _processor(Sweeping(executor._client), dlq_max)(
        InRecord("cmd", 0, 1, b"k", kill)
    )
    _check_sizes([out], dlq_max)
    event = orjson.loads(out.value)
    result_validator().validate(event)
    kept, omitted = len(event["strategies"]), event["omitted"]["strategies"]
    assert kept > 0 and kept + omitted == 5_000
    assert metrics.SWEEP_OMITTED.labels("strategies")._value.get() - before == omitted
