"""``cancel-worker replay`` against the session's real Kafka broker and PAPI simulator."""

from __future__ import annotations

import collections
import dataclasses
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.support import (
    HMAC_ACCOUNTS,
    SimControl,
    cancel_requests,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    running_worker,
    signed,
    worker_env,
    worker_settings,
)
from worker.cli.replay import (
    ConsoleReport,
    ReplayArgumentError,
    ReplayRequest,
    final_result_ids,
    parse_time,
    replay,
)
from worker.core.timeutil import now_ms
from worker.kafka.io import MAX_RECORD_BYTES
from worker.producers import Producer, load_producers
from worker.tools.devstack import Broker, cli_argv

pytestmark = pytest.mark.integration

FINAL = {"strategy.canceled", "cancel.failed", "strategies.canceled"}


@dataclass
class Rec:
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


async def _send(bootstrap: str, topic: str, records: Sequence[Rec]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic,
                r.value,
                key=r.key,
                partition=r.partition,
                timestamp_ms=r.timestamp_ms,
                headers=[*r.headers, *signed(r.value)],
            )
            for r in records
        ]
        for future in futures:
            await future
    finally:
        await producer.stop()


async def _partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(TopicPartition(topic, p["partition"]) for p in described["partitions"])


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    tps = await _partitions(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {tp.partition: offset for tp, offset in ends.items()}


async def _records(bootstrap: str, topic: str, after: Mapping[int, int] | None = None) -> list[Any]:
    """Every committed record of ``topic`` (from ``after[partition]`` on), read to the end
    offsets of now: no waiting for records that may or may not come."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=MAX_RECORD_BYTES,
    )
    tps = await _partitions(bootstrap, topic)
    await consumer.start()
    out: list[Any] = []
    try:
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, (after or {}).get(tp.partition, 0))
        left = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        while left:
            batches = await consumer.getmany(*left, timeout_ms=500)
            for records in batches.values():
                out.extend(records)
            left = {tp for tp in left if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return out


async def _move_group(bootstrap: str, group: str, topic: str, offsets: Mapping[int, int]) -> None:
    """Commit ``offsets`` for ``group`` (which has no member now), as an operator's
    ``kafka-consumer-groups --reset-offsets --to-latest`` would."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = {TopicPartition(topic, p): o for p, o in offsets.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()


def _headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


def _key(cmd: dict[str, Any]) -> bytes:
    return f"{cmd['account']}:{cmd.get('symbol') or cmd['market']}".encode()


async def test_replay_with_skip_processed_sends_only_the_missing_commands(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The incident: the worker handled 20 commands; then 10 more arrived, and the group was
    moved past them (an operator reset it to the latest offsets to get it going again), so
    the worker will never read them. Nobody knows exactly which commands were handled.

    The recovery: replay the whole commands topic (all 30 records) with skip_processed, then
    let the worker (same group, so it reads only what arrives from now on) handle what was
    replayed. It must send a cancel for exactly the 10 missing orders and none for the 20
    handled ones, and every command must end with exactly one final result. The replay reads
    the topic it writes to, so it also shows that it stops at the end offsets it found."""
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    specs = [{"account": "desk-2", "market": "UM", "symbol": symbols[i % 3]} for i in range(30)]
    orders = sim.seed(specs)
    cmds = [command("desk-2", o, command_id=f"rp-{i:02d}") for i, o in enumerate(orders)]
    handled, missing = cmds[:20], cmds[20:]
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)

    async with running_worker(settings):
        await produce(
            broker.bootstrap, topics.commands, [(_key(c), orjson.dumps(c)) for c in handled]
        )
        assert len(await consume(broker.bootstrap, topics.results, 20)) == 20
    await produce(broker.bootstrap, topics.commands, [(_key(c), orjson.dumps(c)) for c in missing])
    before = await _end_offsets(broker.bootstrap, topics.commands)
    assert sum(before.values()) == 30
    await _move_group(broker.bootstrap, settings.group_id, topics.commands, before)

    summary = await replay(settings, ReplayRequest(skip_processed=True))
    assert summary.read == 30
    assert summary.skipped_processed == 20
    assert summary.published == summary.selected == 10
    assert summary.not_commands == summary.restamped == summary.skipped_repeated == 0
    assert summary.ranges == {p: (0, before[p]) for p in before}  # bounded: its own copies unread

    copies = await _records(broker.bootstrap, topics.commands, before)
    assert len(copies) == 10
    originals = {
        (r.partition, r.offset): r for r in await _records(broker.bootstrap, topics.commands)
    }
    for copy in copies:
        source, partition, offset = _headers(copy)["x-replayed-from"].decode().split(":")
        assert source == topics.commands
        original = originals[(int(partition), int(offset))]
        assert (copy.key, copy.value) == (original.key, original.value)
    assert {orjson.loads(c.value)["command_id"] for c in copies} == {
        c["command_id"] for c in missing
    }

    since = sim.last_seq()
    async with running_worker(settings) as worker:
        assert len(await consume(broker.bootstrap, topics.results, 30)) >= 30
    assert worker.pipeline.processed == 10  # only the replayed copies
    deletes = cancel_requests(sim, since)
    assert sorted(int(r["params"]["strategyId"]) for r in deletes) == sorted(
        o["strategy_id"] for o in orders[20:]
    )

    results = events_of(await _records(broker.bootstrap, topics.results))
    finals = collections.Counter(e["command_id"] for e in results if e["type"] in FINAL)
    assert finals == {c["command_id"]: 1 for c in cmds}
    by_id = {e["command_id"]: e for e in results}
    for cmd in missing:
        event = by_id[cmd["command_id"]]
        assert event["type"] == "strategy.canceled", event
        assert event["origin"]["offset"] >= before[event["origin"]["partition"]]  # a copy's
    assert await final_result_ids(broker.bootstrap, topics.results) == {
        c["command_id"] for c in cmds
    }


async def test_dry_run_sends_nothing_and_plans_each_record(
    broker: Broker, sim: SimControl, accounts_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run reads the range, decides as a replay would, prints one line per record and
    publishes nothing. Only final results make a command "processed": cancel.duplicate does
    not, and neither does a result older than final_result_ids' since_ms."""
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    cmds = [
        command("desk-0", {"kind": "algo", "algo_id": 7_000 + i}, command_id=f"dr-{i}")
        for i in range(4)
    ]
    cmds[3]["expires_at"] = cmds[3]["issued_at"] + 5_000
    await produce(
        broker.bootstrap,
        topics.commands,
        [(b"desk-0:UM", orjson.dumps(c)) for c in cmds] + [(b"desk-0:UM", b"\x00poison")],
    )
    hour_ago = now_ms() - 3_600_000
    await _send(
        broker.bootstrap,
        topics.results,
        [
            Rec(
                b"k",
                orjson.dumps({"type": "cancel.failed", "command_id": "dr-old"}),
                timestamp_ms=hour_ago,
            ),
            Rec(b"k", orjson.dumps({"type": "strategy.canceled", "command_id": "dr-0"})),
            Rec(b"k", orjson.dumps({"type": "cancel.duplicate", "command_id": "dr-1"})),
            Rec(b"k", orjson.dumps({"type": "cancel.failed", "command_id": "dr-2"})),
            Rec(b"k", b"not json"),
        ],
    )
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    assert await final_result_ids(broker.bootstrap, topics.results) == {"dr-0", "dr-2", "dr-old"}
    assert await final_result_ids(broker.bootstrap, topics.results, since_ms=hour_ago + 60_000) == {
        "dr-0",
        "dr-2",
    }

    before = await _end_offsets(broker.bootstrap, topics.commands)
    summary = await replay(
        settings,
        ReplayRequest(dry_run=True, skip_processed=True, restamp=True),
        observer=ConsoleReport(dry_run=True),
    )
    assert await _end_offsets(broker.bootstrap, topics.commands) == before
    assert summary.published == 0
    assert summary.read == 5
    assert summary.selected == 3
    assert summary.skipped_processed == 2
    assert summary.not_commands == 1
    assert summary.restamped == 2
    assert summary.not_restamped == 1
    plans = {p.command_id: p for p in summary.planned}
    assert len(summary.planned) == 5
    assert not plans["dr-0"].publish and "final result" in plans["dr-0"].action
    assert plans["dr-1"].publish and plans["dr-1"].action == "publish restamped"
    assert not plans["dr-2"].publish
    assert plans[None].publish and "not a command" in plans[None].action

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5
    for plan in summary.planned:
        line = f"{topics.commands}[{plan.partition}]@{plan.offset} key=desk-0:UM"
        assert f"{line} command_id={plan.command_id or '-'}: {plan.action}" in printed
    assert summary.line().startswith(f"dry run (nothing sent) {topics.commands} ")
    assert "would publish 3, skipped as processed 2," in summary.line()


async def test_replay_selects_by_time_and_partition_and_restamps(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Six records per partition, ten seconds apart. A time range and a partition's offset
    range select exactly their records; copies keep key, value and headers, and carry
    x-replayed-from; re-stamping moves issued_at/expires_at and leaves poison alone."""
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    base = now_ms() - 600_000
    sent: dict[tuple[int, int], Rec] = {}
    for p in range(3):
        for i in range(6):
            cmd = command(
                "desk-1",
                {"kind": "algo", "algo_id": 9_000 + 10 * p + i},
                command_id=f"ts-{p}-{i}",
                issued_at=base + i * 10_000,
                expires_at=base + i * 10_000 + 3_000,
            )
            value = b"{oops" if (p, i) == (1, 2) else orjson.dumps(cmd)
            sent[(p, i)] = Rec(
                f"key-{p}".encode(),
                value,
                partition=p,
                timestamp_ms=base + i * 10_000,
                headers=(("trace", f"t-{p}-{i}".encode()),),
            )
    await _send(broker.bootstrap, topics.commands, list(sent.values()))
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    assert settings.producers_file is not None
    producers = load_producers(settings.producers_file)

    async def replayed(request: ReplayRequest) -> tuple[Any, list[Any]]:
        before = await _end_offsets(broker.bootstrap, topics.commands)
        summary = await replay(settings, request)
        return summary, await _records(broker.bootstrap, topics.commands, before)

    # One whole partition (before any copy lands there), with a new deadline only.
    started = now_ms()
    summary, copies = await replayed(ReplayRequest(partition=2, expires_in_ms=60_000))
    assert summary.read == summary.published == summary.restamped == 6
    assert sorted(_headers(c)["x-replayed-from"].decode() for c in copies) == [
        f"{topics.commands}:2:{i}" for i in range(6)
    ]
    for copy in copies:
        cmd = orjson.loads(copy.value)
        assert cmd["issued_at"] < started  # untouched
        assert started + 60_000 <= cmd["expires_at"] <= now_ms() + 60_000

    # By time: [base + 20 s, base + 50 s) is i = 2, 3, 4 in every partition.
    started = now_ms()
    summary, copies = await replayed(ReplayRequest(since_ms=base + 20_000, until_ms=base + 50_000))
    assert summary.read == summary.published == len(copies) == 9
    assert summary.not_commands == 1
    assert summary.ranges == {0: (2, 5), 1: (2, 5), 2: (2, 5)}
    origins = set()
    for copy in copies:
        headers = _headers(copy)
        source, partition, offset = headers["x-replayed-from"].decode().split(":")
        assert source == topics.commands
        origin = sent[(int(partition), int(offset))]
        assert (copy.key, copy.value) == (origin.key, origin.value)
        assert headers["trace"] == origin.headers[0][1]
        # The same bytes keep their producer's signature, which still holds.
        assert headers["x-signature"] == dict(signed(origin.value))["x-signature"]
        assert isinstance(producers.verify(copy.headers, copy.value), Producer)
        assert started <= int(headers["x-replayed-at"]) <= now_ms()
        origins.add((int(partition), int(offset)))
    assert origins == {(p, i) for p in range(3) for i in (2, 3, 4)}

    # By partition and offsets, re-stamped: partition 1, offsets 1 and 2 (2 is poison).
    started = now_ms()
    summary, copies = await replayed(
        ReplayRequest(partition=1, start_offset=1, end_offset=3, restamp=True)
    )
    assert summary.read == summary.published == 2
    assert (summary.restamped, summary.not_restamped, summary.not_commands) == (1, 1, 1)
    by_origin = {_headers(c)["x-replayed-from"].decode(): c for c in copies}
    assert set(by_origin) == {f"{topics.commands}:1:1", f"{topics.commands}:1:2"}
    assert by_origin[f"{topics.commands}:1:2"].value == b"{oops"
    stamped = orjson.loads(by_origin[f"{topics.commands}:1:1"].value)
    original = orjson.loads(sent[(1, 1)].value or b"")
    assert started <= stamped["issued_at"] <= now_ms()
    assert stamped["expires_at"] - stamped["issued_at"] == 3_000
    assert {k: v for k, v in stamped.items() if k not in ("issued_at", "expires_at")} == {
        k: v for k, v in original.items() if k not in ("issued_at", "expires_at")
    }
    # New bytes, a new signature: the operator's producer's (PRODUCER_ID), once, and valid;
    # the poison, sent as it was, keeps its own.
    for copy in copies:
        names = [name for name, _ in copy.headers]
        assert names.count("x-producer") == names.count("x-signature") == 1
        verified = producers.verify(copy.headers, copy.value)
        assert isinstance(verified, Producer) and verified.id == settings.producer_id
    # Without an operator's producer key, a run that changes bytes is refused up front.
    unsigned = dataclasses.replace(settings, producer_id="", producer_key_file=None)
    named = "CANCEL_WORKER_PRODUCER_ID and CANCEL_WORKER_PRODUCER_KEY_FILE"
    for request in (
        ReplayRequest(restamp=True),
        ReplayRequest(expires_in_ms=1),
        ReplayRequest(failed=()),
    ):
        with pytest.raises(ReplayArgumentError, match=named):
            await replay(unsigned, request)
    # A dry run needs none.
    dry = ReplayRequest(partition=0, restamp=True, dry_run=True)
    assert (await replay(unsigned, dry)).published == 0

    # Offsets past the end select nothing; a partition that does not exist is refused.
    summary, copies = await replayed(ReplayRequest(partition=0, start_offset=100))
    assert (summary.read, copies) == (0, [])
    assert summary.ranges[0][0] == summary.ranges[0][1]
    with pytest.raises(ReplayArgumentError, match="partition 3 does not exist"):
        await replay(settings, ReplayRequest(partition=3))


async def test_dead_letter_replay_puts_the_same_bytes_back(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """A poison record goes to the dead-letter topic through the worker; replaying the
    dead-letter topic puts the same key, bytes and headers back on the commands topic,
    pointing at the dead-letter offset and still naming the original source."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    poison = b'{"command_id": "dl-1", "account": "desk-0"'
    async with running_worker(settings):
        await _send(
            broker.bootstrap,
            topics.commands,
            [Rec(b"desk-0:BTCUSDT", poison, headers=(("trace", b"abc"),))],
        )
        assert len(await consume(broker.bootstrap, topics.results, 1)) == 1
    dead = await _records(broker.bootstrap, topics.deadletter)
    assert [d.value for d in dead] == [poison]

    summary = await replay(settings, ReplayRequest(from_topic="deadletter", skip_processed=True))
    # Poison has no command_id to look up: it goes back whatever the results say.
    assert (summary.read, summary.published, summary.not_commands) == (1, 1, 1)
    (copy,) = await _records(broker.bootstrap, topics.commands, {0: 1})
    headers = _headers(copy)
    assert copy.key == b"desk-0:BTCUSDT"
    assert copy.value == poison
    assert headers["x-replayed-from"] == f"{topics.deadletter}:0:{dead[0].offset}".encode()
    assert headers["trace"] == b"abc"
    assert headers["x-source-topic"] == topics.commands.encode()
    assert headers["x-source-partition"] == b"0"
    assert headers["x-source-offset"] == b"0"
    assert "x-error" in headers


async def test_cli_dry_run_and_bad_arguments(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    cmds = [command("desk-0", {"kind": "algo", "algo_id": 8_000 + i}) for i in range(3)]
    await produce(broker.bootstrap, topics.commands, [(_key(c), orjson.dumps(c)) for c in cmds])
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    env = worker_env(settings)
    before = await _end_offsets(broker.bootstrap, topics.commands)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli_argv("replay", *args),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = run("--dry-run", "--skip-processed", "--since", "2020-01-01T00:00:00Z")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4
    for cmd in cmds:
        assert any(f"command_id={cmd['command_id']}: publish" in line for line in lines[:3])
    assert lines[-1].startswith(f"dry run (nothing sent) {topics.commands} ")
    assert lines[-1].endswith(
        "read 3, would publish 3, skipped as processed 0, skipped as repeated 0, "
        "not a command (sent as is) 0, restamped 0"
    )
    assert await _end_offsets(broker.bootstrap, topics.commands) == before
    output = done.stdout + done.stderr
    assert not any(secret in output for _, secret in HMAC_ACCOUNTS.values())

    for args, message in (
        (("--partition", "0", "--start-offset", "5", "--end-offset", "2"), "end offset 2 is"),
        (("--partition", "5", "--dry-run"), "partition 5 does not exist"),
        (("--since", "1700000000000", "--partition", "0", "--end-offset", "3"), "not both"),
        (
            (
                "--start-offset",
                "3",
            ),
            "give --partition",
        ),
        (
            (
                "--since",
                "yesterday",
            ),
            "--since",
        ),
        (
            (
                "--from-topic",
                "results",
            ),
            "--from-topic",
        ),
        (("--failed", "already_closed", "--dry-run"), "already_closed cannot be re-driven"),
        (("--failed", "outcome_unknown,not_found"), "not_found cannot be re-driven"),
        (("--failed", "--restamp"), "keeps issued_at"),
        (("--failed", "--from-topic", "deadletter"), "dead letters"),
        (("expired",), "REASON goes with --failed"),
    ):
        done = run(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert await _end_offsets(broker.bootstrap, topics.commands) == before

    # For real, one partition: the progress bar (its label, off a terminal) on stderr.
    busy = max(before, key=before.__getitem__)  # one key: all three are in one partition
    done = run("--partition", str(busy))
    assert done.returncode == 0, done.stderr
    assert "replaying" in done.stderr
    assert "published 3, skipped as processed 0" in done.stdout.splitlines()[-1]
    after = await _end_offsets(broker.bootstrap, topics.commands)
    assert sum(after.values()) == sum(before.values()) + 3


def test_parse_time() -> None:
    assert parse_time("1700000000123") == 1_700_000_000_123
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000  # naive: UTC
    assert parse_time("2023-11-15T00:13:20.5+02:00") == 1_700_000_000_500
    with pytest.raises(ValueError, match="neither"):
        parse_time("last tuesday")
