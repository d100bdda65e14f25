"""The pipeline's ownership, ordering, backpressure and durability rules, on in-memory ports.

Every test checks the delivery invariant at the end: across all members, each consumed
offset has its result published exactly once, in offset order per partition.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from tests.memory_ports import MemoryLog, MemorySink, MemorySource, MemoryStagingSink
from worker import metrics
from worker.kafka.pipeline import InRecord, OutRecord, Partition, Pipeline, RunReport, decode_ahead

SINKS: dict[str, Callable[[MemoryLog], MemorySink]] = {
    "flush": MemorySink,
    # Results staged as they complete (exactly-once's sink), every 5th stage refused.
    "stage": lambda log: MemoryStagingSink(log, refuse=5),
}


@pytest.fixture(autouse=True, params=list(SINKS))
def sink_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with both kinds of sink."""
    monkeypatch.setattr(Member, "make_sink", staticmethod(SINKS[request.param]))
    return str(request.param)


P0: Partition = ("cmd", 0)
P1: Partition = ("cmd", 1)
P2: Partition = ("cmd", 2)


class Handler:
    """Answers each record with one result naming its origin; can be held per key."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.started: list[InRecord] = []
        self.running: collections.Counter[tuple[Partition, bytes | None]] = collections.Counter()
        self.max_running = 0
        self.overlap = False
        self.hold: dict[bytes | None, asyncio.Event] = {}
        self.stuck: set[bytes | None] = set()

    async def __call__(self, record: InRecord) -> Sequence[OutRecord]:
        lane = ((record.topic, record.partition), record.key)
        self.started.append(record)
        self.running[lane] += 1
        self.overlap |= self.running[lane] > 1
        self.max_running = max(self.max_running, sum(self.running.values()))
        try:
            if record.key in self.stuck:
                await asyncio.Event().wait()
            gate = self.hold.get(record.key)
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(self.delay_s)
        finally:
            self.running[lane] -= 1
        value = f"{record.partition}:{record.offset}".encode()
        return [OutRecord("res", record.key, value)]


def origins(sink: MemorySink) -> list[tuple[int, int]]:
    out = []
    for r in sink.published:
        p, o = r.value.decode().split(":")
        out.append((int(p), int(o)))
    return out


def assert_exactly_once(log: MemoryLog, *sinks: MemorySink) -> None:
    for sink in sinks:
        assert not sink.violations, sink.violations
    published = [o for s in sinks for o in origins(s)]
    counts = collections.Counter(published)
    dupes = {k: v for k, v in counts.items() if v > 1}
    assert not dupes, f"published more than once: {sorted(dupes)[:10]}"
    expected = {(p[1], r.offset) for p, recs in log.records.items() for r in recs}
    assert set(counts) == expected, f"missing: {sorted(expected - set(counts))[:10]}"
    for sink in sinks:  # command order per key within each member's output
        per_key: dict[tuple[int, bytes | None], list[int]] = collections.defaultdict(list)
        for r in sink.published:
            p, o = r.value.decode().split(":")
            per_key[(int(p), r.key)].append(int(o))
        for offsets in per_key.values():
            assert offsets == sorted(offsets)
    for part, recs in log.records.items():
        assert log.committed.get(part) == len(recs), part


class Member:
    """One pipeline over the shared log, as one consumer-group member."""

    make_sink: Callable[[MemoryLog], MemorySink] = MemorySink

    def __init__(self, log: MemoryLog, handler: Handler, **options: float) -> None:
        self.source = MemorySource(log)
        self.sink = self.make_sink(log)
        opts: dict[str, float] = {
            "max_in_flight": 8,
            "max_buffered": 100,
            "shutdown_grace_s": 1.0,
            "revoke_grace_s": 0.5,
            "commit_timeout_s": 1.0,
            "retry_initial_s": 0.01,
            "retry_max_s": 0.05,
        }
        opts.update(options)
        self.pipeline = Pipeline(
            self.source,
            self.sink,
            handler,
            max_in_flight=int(opts.pop("max_in_flight")),
            max_buffered=int(opts.pop("max_buffered")),
            **opts,
        )
        self.task: asyncio.Task[RunReport] | None = None
        # The group's answer to a rejoin: these partitions (None: the same ones again).
        self.rejoin_to: list[Partition] | None = None
        self.rejoined: list[asyncio.Task[None]] = []
        self.source.on_rejoin = lambda: self.rejoined.append(asyncio.create_task(self._rejoin()))

    async def _rejoin(self) -> None:
        parts = sorted(self.source.assignment)
        await self.revoke(parts)
        self.assign(parts if self.rejoin_to is None else self.rejoin_to)

    def start(self) -> None:
        self.task = asyncio.create_task(self.pipeline.run())

    def assign(self, parts: Sequence[Partition]) -> None:
        self.source.assign(parts)
        self.pipeline.on_assigned(parts)

    async def revoke(self, parts: Sequence[Partition]) -> None:
        await self.pipeline.on_revoked(parts)
        self.source.assignment -= set(parts)

    async def stop(self) -> RunReport:
        self.pipeline.stop()
        assert self.task is not None
        return await asyncio.wait_for(self.task, 10)


@contextlib.asynccontextmanager
async def member(log: MemoryLog, handler: Handler, **options: float) -> AsyncIterator[Member]:
    m = Member(log, handler, **options)
    m.start()
    try:
        yield m
    finally:
        if m.task is not None and not m.task.done():
            await m.stop()


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def fill(log: MemoryLog, part: Partition, count: int, keys: Sequence[bytes | None]) -> None:
    for i in range(count):
        log.append(part, keys[i % len(keys)], b"{}")


def flushed(log: MemoryLog) -> Callable[[], bool]:
    return lambda: all(log.committed.get(p) == len(r) for p, r in log.records.items())


async def test_every_record_once_in_key_order() -> None:
    log = MemoryLog()
    for part in (P0, P1, P2):
        fill(log, part, 200, [b"a", b"b", b"c", None])
    handler = Handler(delay_s=0.001)
    async with member(log, handler, max_in_flight=16) as m:
        m.assign([P0, P1, P2])
        await until(flushed(log))
        report = await m.stop()
    assert report == RunReport(600, 0, 0)
    assert not handler.overlap  # one record per key at a time
    assert handler.max_running > 4  # but keys run concurrently
    for part in (P0, P1, P2):
        for key in (b"a", b"b", b"c", None):
            seq = [r.offset for r in handler.started if r.partition == part[1] and r.key == key]
            assert seq == sorted(seq)
    assert_exactly_once(log, m.sink)


async def test_hot_key_holds_one_slot_and_pauses_only_its_partition() -> None:
    log = MemoryLog()
    fill(log, P0, 1000, [b"hot"])
    handler = Handler()
    handler.hold[b"hot"] = asyncio.Event()
    async with member(log, handler, max_in_flight=4, max_buffered=100) as m:
        m.assign([P0, P1])
        await until(lambda: P0 in m.source.paused)
        fill(log, P1, 30, [b"x", b"y", b"z"])
        log.append(P0, b"hot", b"{}")
        await until(lambda: log.committed.get(P1) == 30, timeout_s=2)
        in_hand = len([r for r in handler.started if r.partition == 0])
        assert in_hand == 1  # the hot key runs one record at a time, holding one slot
        assert m.source.positions[P0] <= 100 + m.source.batch  # bounded: the rest stays in Kafka
        handler.hold[b"hot"].set()
        await until(flushed(log), timeout_s=20)
    assert_exactly_once(log, m.sink)


async def test_busy_key_does_not_starve_other_keys_of_its_partition() -> None:
    log = MemoryLog()
    for i in range(300):
        log.append(P0, b"hot" if i < 290 else f"k{i}".encode(), b"{}")
    handler = Handler()
    handler.hold[b"hot"] = asyncio.Event()
    async with member(log, handler, max_in_flight=2, max_buffered=1000) as m:
        m.assign([P0])
        await until(
            lambda: {r.key for r in handler.started} >= {f"k{i}".encode() for i in range(290, 300)}
        )
        handler.hold[b"hot"].set()
        await until(flushed(log))
    assert_exactly_once(log, m.sink)


async def test_partition_moved_away_mid_batch_is_answered_once_by_its_new_owner() -> None:
    log = MemoryLog()
    for part in (P0, P1):
        fill(log, part, 300, [b"a", b"b", b"c"])
    slow = Handler(delay_s=0.002)
    async with member(log, slow, max_in_flight=4) as first:
        first.assign([P0, P1])
        await until(lambda: log.committed.get(P1, 0) > 20)
        await first.revoke([P1])
        started_at_revoke = len([r for r in slow.started if r.partition == 1])
        committed_at_revoke = log.committed.get(P1, 0)
        published_p1 = [o for p, o in origins(first.sink) if p == 1]
        assert published_p1 == list(range(committed_at_revoke))  # flushed prefix only
        assert P1 not in first.sink.owned
        async with member(log, Handler()) as second:
            second.assign([P1])
            await until(flushed(log))
            await asyncio.sleep(0.05)  # nothing more of P1 may start on the first member
            assert len([r for r in slow.started if r.partition == 1]) == started_at_revoke
    assert_exactly_once(log, first.sink, second.sink)


async def test_same_partition_back_is_processed_from_its_committed_position() -> None:
    log = MemoryLog()
    fill(log, P0, 400, [b"a", b"b"])
    handler = Handler(delay_s=0.001)
    async with member(log, handler, max_in_flight=4) as m:
        m.assign([P0])
        await until(lambda: log.committed.get(P0, 0) > 30)
        await m.revoke([P0])
        m.assign([P0])  # a rebalance that gives the same partition back
        await until(flushed(log))
    assert_exactly_once(log, m.sink)


async def test_records_fetched_before_the_assignment_callback_are_not_run_twice() -> None:
    log = MemoryLog()
    fill(log, P0, 50, [b"a"])
    handler = Handler()
    async with member(log, handler) as m:
        m.source.assign([P0])  # the consumer has the partition; the callback is late
        await until(lambda: m.source.positions[P0] == 50)
        await asyncio.sleep(0.02)
        assert handler.started == []  # nothing runs before the sink owns the partition
        m.pipeline.on_assigned([P0])
        await until(flushed(log))
    assert_exactly_once(log, m.sink)


async def test_revocation_cancels_what_cannot_finish_within_its_bound() -> None:
    log = MemoryLog()
    fill(log, P0, 10, [b"a", b"stuck"])
    handler = Handler()
    handler.stuck.add(b"stuck")
    before = metrics.ABANDONED._value.get()
    async with member(log, handler, revoke_grace_s=0.2, commit_timeout_s=0.2) as first:
        first.assign([P0])
        await until(lambda: any(r.key == b"stuck" for r in handler.started))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await first.revoke([P0])
        assert time.monotonic() - t0 < 1.0  # well inside any session timeout
    assert metrics.ABANDONED._value.get() == before + 1
    assert log.committed[P0] == 1  # offset 0 (key a) done; offset 1 (stuck) was cancelled
    handler.stuck.clear()
    async with member(log, handler) as second:
        second.assign([P0])
        await until(flushed(log))
    assert_exactly_once(log, first.sink, second.sink)


async def test_shutdown_cancels_stuck_work_and_reports_it() -> None:
    log = MemoryLog()
    fill(log, P0, 6, [b"a", b"stuck"])
    handler = Handler()
    handler.stuck.add(b"stuck")
    m = Member(log, handler, shutdown_grace_s=0.2)
    m.start()
    m.assign([P0])
    await until(lambda: any(r.key == b"stuck" for r in handler.started))
    await until(lambda: log.committed.get(P0) == 1)
    t0 = time.monotonic()
    report = await m.stop()
    assert time.monotonic() - t0 < 1.5
    assert report.abandoned == 1
    assert log.committed[P0] == 1  # nothing past the abandoned record


async def test_stop_during_a_flush_lets_it_finish_and_publishes_nothing_twice() -> None:
    """A stop that arrives after a flush published its records but before it stored their
    positions must not cut the flush short: the shutdown flush would publish them again."""
    log = MemoryLog()
    fill(log, P0, 5, [b"a", b"b"])
    m = Member(log, Handler())
    m.sink.commit_delay_s = 0.3
    m.start()
    m.assign([P0])
    await until(lambda: len(m.sink.published) == 5)  # published; the positions not yet stored
    report = await m.stop()
    assert report == RunReport(5, 0, 0)
    assert_exactly_once(log, m.sink)


async def test_broker_outage_is_ridden_out_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    log = MemoryLog()
    fill(log, P0, 50, [b"a", b"b"])
    handler = Handler()
    caplog.set_level(logging.WARNING, logger="worker.kafka.pipeline")
    async with member(log, handler) as m:
        m.sink.fail = True
        m.assign([P0])
        await asyncio.sleep(0.05)
        assert handler.started == []  # not taken over: nothing may run
        # The broker answers the take-over, then fails every flush: armed before the
        # take-over can succeed, so no flush slips through between the two.
        m.sink.fail_flushes = True
        m.sink.fail = False
        await until(lambda: P0 in m.sink.owned)
        await until(lambda: len(handler.started) == 50)
        await until(lambda: m.sink.flushes > 5)
        assert metrics.KAFKA_REACHABLE._value.get() == 0
        assert log.committed.get(P0) is None
        m.sink.fail_flushes = False
        await until(flushed(log))
        assert metrics.KAFKA_REACHABLE._value.get() == 1
    unreachable = [r for r in caplog.records if "Kafka unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    takeover = [r for r in caplog.records if "taking over" in r.getMessage()]
    assert len(takeover) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert_exactly_once(log, m.sink)


async def test_outage_backpressure_stops_fetching_a_full_partition() -> None:
    log = MemoryLog()
    fill(log, P0, 500, [b"a", b"b", b"c"])
    async with member(log, Handler(), max_buffered=60) as m:
        m.assign([P0])
        await until(lambda: log.committed.get(P0, 0) > 0)
        m.sink.fail = True
        await until(lambda: P0 in m.source.paused)
        position = m.source.positions[P0]
        await asyncio.sleep(0.1)
        assert m.source.positions[P0] == position  # nothing more is read while it is full
        m.sink.fail = False
        await until(flushed(log))
    assert_exactly_once(log, m.sink)


async def test_fenced_partition_publishes_nothing_more() -> None:
    log = MemoryLog()
    fill(log, P0, 100, [b"a"])
    fill(log, P1, 100, [b"a"])
    handler = Handler(delay_s=0.001)
    async with member(log, handler) as zombie:
        zombie.rejoin_to = [P1]  # the group has given P0 to another member
        zombie.assign([P0, P1])
        await until(lambda: log.committed.get(P0, 0) > 10)
        zombie.sink.fenced.add(P0)  # another member took P0 over
        committed = log.committed[P0]
        await until(lambda: log.committed.get(P1) == 100)
        log.append(P0, b"a", b"{}")
        await asyncio.sleep(0.05)
        assert log.committed[P0] == committed
        assert all(p != 0 or o < committed for p, o in origins(zombie.sink))
    async with member(log, Handler()) as owner:
        owner.assign([P0])
        await until(flushed(log))
    assert_exactly_once(log, zombie.sink, owner.sink)


async def test_rebalance_storm_with_three_members_keeps_exactly_once() -> None:
    log = MemoryLog()
    parts = [("cmd", i) for i in range(6)]
    for part in parts:
        fill(log, part, 150, [b"a", b"b", b"c", b"d"])
    members = [Member(log, Handler(delay_s=0.001), max_in_flight=4) for _ in range(3)]
    for m in members:
        m.start()
    plans = [
        [parts[:3], parts[3:], []],
        [parts[:2], parts[2:4], parts[4:]],
        [parts[::2], parts[1::2], []],
        [parts, [], []],
    ]
    for plan in plans:
        await asyncio.sleep(0.03)
        await asyncio.gather(*(m.revoke(list(m.source.assignment)) for m in members))
        for m, owned in zip(members, plan, strict=True):
            m.assign(owned)
    await until(flushed(log), timeout_s=20)
    for m in members:
        await m.stop()
    assert_exactly_once(log, *(m.sink for m in members))


async def test_revocation_never_commits_past_a_record_that_did_not_run() -> None:
    """Key b's second record is still queued when the partition is revoked, while key a's
    later record and b's running one finish within the grace: the position must stop
    before the record that never ran, and the later record answered ahead of it is stored
    with the position, so that the next owner skips it."""
    log = MemoryLog()
    for key in (b"a", b"b", b"b", b"a"):
        log.append(P0, key, b"{}")
    handler = Handler()
    handler.hold[b"b"] = asyncio.Event()
    async with member(log, handler, max_in_flight=4, revoke_grace_s=1.0) as first:
        first.assign([P0])
        await until(lambda: len(handler.started) == 3)  # 0:a, 1:b (held), 3:a
        revoking = asyncio.create_task(first.revoke([P0]))
        await asyncio.sleep(0.05)
        handler.hold[b"b"].set()  # 1:b finishes inside the grace; 2:b never starts
        await revoking
    assert log.committed[P0] == 2
    assert decode_ahead(2, log.metadata[P0]) == {3}
    assert sorted(origins(first.sink)) == [(0, 0), (0, 1), (0, 3)]
    again = Handler()
    async with member(log, again) as second:
        second.assign([P0])
        await until(flushed(log))
    assert [r.offset for r in again.started] == [2]
    assert_exactly_once(log, first.sink, second.sink)


async def test_group_commit_idle_at_once_in_flight_the_next_takes_all_answered_meanwhile() -> None:
    """Without an interval (the default): a result answered while no flush is in flight is
    flushed at once; while one is in flight (a slow commit), the results answered
    meanwhile wait and all go in the next flush, which starts as soon as it ends."""
    log = MemoryLog()
    handler = Handler()
    async with member(log, handler) as m:
        m.assign([P0])
        sink = m.sink
        loop = asyncio.get_running_loop()
        log.append(P0, b"a", b"{}")
        await until(lambda: sink.flushes == 1)
        await until(flushed(log))
        # Idle: the next result is flushed at once, alone.
        sink.delay_s = 0.3
        answered_at = loop.time()
        log.append(P0, b"a", b"{}")
        await until(lambda: sink.flushes == 2)
        assert sink.flush_started[-1] - answered_at < 0.1
        assert sink.flush_records[-1] == 1
        # In flight: five results answered meanwhile wait, then go together.
        for i in range(5):
            log.append(P0, b"k%d" % i, b"{}")
        await until(lambda: len(handler.started) == 7)
        assert sink.flushes == 2
        await until(flushed(log))
        assert sink.flushes == 3 and sink.flush_records[-1] == 5
        first_ended = sink.flush_started[1] + sink.delay_s
        assert sink.flush_started[2] - first_ended < 0.1  # not a tick later: at once
    assert_exactly_once(log, m.sink)


async def test_a_busy_member_flushes_back_to_back_each_taking_what_was_answered() -> None:
    """Results all the time and commits of 50 ms: each flush starts as the one before it
    ends and carries everything answered meanwhile, so there are about as many flushes as
    commit times fit in the run, far fewer than results."""
    log = MemoryLog()
    async with member(log, Handler()) as m:
        m.assign([P0])
        m.sink.delay_s = 0.05
        started = asyncio.get_running_loop().time()
        for i in range(200):
            log.append(P0, b"k%d" % (i % 4), b"{}")
            await asyncio.sleep(0.005)
        await until(flushed(log))
        elapsed = asyncio.get_running_loop().time() - started
    starts = m.sink.flush_started
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.05 * 0.95, gaps  # one in flight at a time
    assert len(starts) <= elapsed / 0.05 + 2, (len(starts), elapsed)
    assert max(m.sink.flush_records) > 1, m.sink.flush_records
    assert_exactly_once(log, m.sink)


async def test_flushes_start_at_most_once_per_flush_interval_and_lose_nothing() -> None:
    """Results that complete one by one, every 10 ms, are flushed together: no two flushes of
    the partition start closer than the interval, and every record is flushed once, in
    order."""
    log = MemoryLog()
    interval_s = 0.2
    async with member(log, Handler(), flush_interval_s=interval_s) as m:
        m.assign([P0])
        started = asyncio.get_running_loop().time()
        for i in range(60):
            log.append(P0, b"k%d" % (i % 3), b"{}")
            await asyncio.sleep(0.01)
        await until(flushed(log))
        elapsed = asyncio.get_running_loop().time() - started
    starts = m.sink.flush_started
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps and min(gaps) >= interval_s * 0.95, gaps
    # One flush per result would be 60; one per interval is what is allowed.
    assert len(starts) <= elapsed / interval_s + 2, (len(starts), elapsed)
    assert_exactly_once(log, m.sink)


async def test_partitions_flush_together_once_per_interval() -> None:
    """Three partitions with results all the time: the member flushes at most once per
    interval, every partition with results in the same flush (exactly-once: one
    transaction for the member, not one per partition)."""
    log = MemoryLog()
    interval_s = 0.3
    parts = [P0, P1, P2]
    async with member(log, Handler(), flush_interval_s=interval_s) as m:
        m.assign(parts)
        started = asyncio.get_running_loop().time()
        for i in range(150):
            for part in parts:
                log.append(part, b"k%d" % (i % 2), b"{}")
            await asyncio.sleep(0.01)
        await until(flushed(log))
        elapsed = asyncio.get_running_loop().time() - started
    flushes = list(zip(m.sink.flush_started, m.sink.flush_parts, strict=True))
    gaps = [b - a for a, b in itertools.pairwise(m.sink.flush_started)]
    assert gaps and min(gaps) >= interval_s * 0.95, gaps
    assert len(flushes) <= elapsed / interval_s + 2, (len(flushes), elapsed)
    # Results of every partition all the time: apart from the first flush after the
    # take-over (a partition may have no result yet), each flush carries all three.
    alone = [p for _, p in flushes[1:-1] if set(p) != set(parts)]
    assert len(flushes) >= 4 and not alone, flushes
    assert_exactly_once(log, m.sink)


@pytest.mark.parametrize("ending", ["stop", "revoke"])
async def test_stop_and_revocation_flush_at_once_whatever_the_interval(ending: str) -> None:
    """With a 30 s interval, a result completed after a flush waits for the next one; stopping
    (or losing the partition) flushes it at once instead of waiting out the interval."""
    log = MemoryLog()
    handler = Handler()
    async with member(log, handler, flush_interval_s=30.0) as m:
        m.assign([P0])
        log.append(P0, b"a", b"{}")
        await until(flushed(log))  # the first flush does not wait
        log.append(P0, b"a", b"{}")
        await until(lambda: len(handler.started) == 2)
        await asyncio.sleep(0.2)
        assert log.committed[P0] == 1  # held back by the interval
        if ending == "stop":
            await m.stop()  # bounded by wait_for(10): far less than the interval
        else:
            await asyncio.wait_for(m.revoke([P0]), 10)
        assert log.committed[P0] == 2
        assert_exactly_once(log, m.sink)


def hold_take_overs(sink: MemorySink) -> None:
    """Take-overs hang (a slow coordinator) and, cancelled, take 200 ms to end."""
    sink.assign_gate = asyncio.Event()
    sink.assign_cleanup_s = 0.2


def take_overs() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "prepare-partitions" and not t.done()]


@pytest.mark.parametrize("when", ["during the drain", "after the run ended"])
async def test_an_assignment_once_stopping_is_not_taken_over(when: str) -> None:
    """Seen on a loaded machine: the consumer lost its session and re-joined while the
    worker stopped; the re-join's assignment arrived after the pipeline stopped, and its
    take-over started producers and read committed offsets on clients being closed,
    leaking their connections. Once stopping, an assignment is not taken over."""
    log = MemoryLog()
    handler = Handler()
    handler.stuck.add(b"stuck")
    async with member(log, handler, shutdown_grace_s=0.5) as m:
        m.assign([P0])
        log.append(P0, b"stuck", b"{}")
        await until(lambda: len(handler.started) == 1)
        m.pipeline.stop()
        if when == "during the drain":
            await asyncio.sleep(0.1)  # the run is waiting out its grace for the stuck record
            assert m.task is not None and not m.task.done()
        else:
            await m.stop()
        m.assign([P1])  # the consumer's re-join, before it leaves the group
        await asyncio.sleep(0.05)
        assert not take_overs()
        report = await m.stop()
        assert report.abandoned == 1
        assert P1 not in m.sink.owned
        assert not take_overs()


async def test_a_take_over_under_way_is_ended_before_the_run_returns() -> None:
    """A take-over still starting when the worker stops is cancelled and waited for: once
    ``run`` returns nothing of the pipeline's uses the Kafka clients, which close next."""
    async with member(MemoryLog(), Handler()) as m:
        hold_take_overs(m.sink)
        m.assign([P0])
        await until(lambda: m.sink.at_gate == 1)
        await m.stop()
        assert not take_overs()
        assert m.sink.at_gate == 0
        assert P0 not in m.sink.owned


async def test_a_take_over_under_way_is_ended_before_the_revocation_returns() -> None:
    """Once ``on_revoked`` returns the parts are another member's: a take-over of them still
    starting is cancelled and waited for, so nothing of it (a producer started, a position
    read) happens after that."""
    async with member(MemoryLog(), Handler()) as m:
        hold_take_overs(m.sink)
        m.assign([P0])
        await until(lambda: m.sink.at_gate == 1)
        await asyncio.wait_for(m.revoke([P0]), 5)
        assert not take_overs()
        assert m.sink.at_gate == 0
        assert P0 not in m.sink.owned


async def test_records_just_fetched_start_before_the_next_fetch_is_asked_for() -> None:
    """A paced command's request should leave as soon as its record is in hand: the
    records a fetch handed over begin running before the pipeline sets up its next
    fetch, not after."""
    log = MemoryLog()
    journal: list[str] = []

    class Journaled(Handler):
        async def __call__(self, record: InRecord) -> Sequence[OutRecord]:
            journal.append(f"start {record.offset}")
            return await super().__call__(record)

    async with member(log, Journaled()) as m:
        fetch = m.source.fetch

        async def journaled_fetch(timeout_ms: int) -> Sequence[InRecord]:
            journal.append("fetch")
            records = await fetch(timeout_ms)
            journal.extend(f"fetched {r.offset}" for r in records)
            return records

        m.source.fetch = journaled_fetch  # type: ignore[method-assign]
        m.assign([P0])
        await until(lambda: "fetch" in journal)
        for _ in range(3):  # one record per fetch, as when paced
            fill(log, P0, 1, [b"a"])
            await until(flushed(log))
    fetched = [i for i, line in enumerate(journal) if line.startswith("fetched")]
    assert len(fetched) == 3
    for i in fetched:
        offset = journal[i].split()[1]
        assert journal[i + 1] == f"start {offset}", journal[i : i + 3]


async def test_a_fence_under_an_unchanged_assignment_rejoins_and_flushes_on() -> None:
    """A producer fenced while its member is still in the group (a transaction aborted by
    its timeout, a stray producer on its id): the member asks the group for a new
    assignment and takes its partitions over again; nothing is dropped for good."""
    log = MemoryLog()
    fill(log, P0, 20, [b"a", b"b"])
    async with member(log, Handler()) as m:
        m.assign([P0])
        await until(flushed(log))
        m.sink.fenced.add(P0)  # the next flush is fenced; the assignment stays {P0}
        fill(log, P0, 5, [b"a"])
        await until(lambda: m.source.rejoins == 1)
        assert m.pipeline.fenced == {P0} or P0 in m.sink.owned
        assert metrics.FENCED_PARTITIONS._value.get() in (0, 1)
        fill(log, P0, 5, [b"b"])
        await until(flushed(log))
        assert m.pipeline.fenced == frozenset()
        assert metrics.FENCED_PARTITIONS._value.get() == 0
    assert_exactly_once(log, m.sink)


@pytest.mark.parametrize("outcome", ["learnt", "unknown"])
async def test_a_commit_cut_short_by_the_stop_is_never_published_twice(outcome: str) -> None:
    """The commit was sent and its answer is slow (a paused broker, a moving coordinator);
    the stop cuts the flush short at commit_timeout_s. Its outcome is learnt from the sink
    that sent it (then nothing is re-sent), or, if it cannot be in time, its partitions are
    handed over unpublished and the report says so; never re-sent in a new transaction."""
    log = MemoryLog()
    fill(log, P0, 2, [b"a", b"b"])
    m = Member(log, Handler(), commit_timeout_s=0.5)
    # learnt: the answer comes within the final flush's bound; unknown: long after it.
    m.sink.answer_late_s = 0.7 if outcome == "learnt" else 2.0
    m.start()
    m.assign([P0])
    await until(lambda: m.sink.late is not None)  # committed; the answer not back yet
    report = await m.stop()
    assert collections.Counter(origins(m.sink)) == {(0, 0): 1, (0, 1): 1}
    assert log.committed[P0] == 2
    if outcome == "learnt":
        assert report == RunReport(2, 0, 0, 0)
    else:
        assert report == RunReport(2, 0, 0, 2)  # exit code: abandoned
    assert_exactly_once(log, m.sink)


@pytest.mark.parametrize("outcome", ["learnt", "unknown"])
async def test_a_revocation_flush_cut_short_in_its_commit_hands_the_partition_over(
    outcome: str,
) -> None:
    """The revocation's flush is cut short after its commit was sent: the partition goes
    to its next owner unpublished (it starts from whatever the commit stored), and this
    member learns the commit's outcome before its next flush, on the producer that sent
    it (or cannot, and goes on): nothing is published twice."""
    log = MemoryLog()
    fill(log, P0, 3, [b"a"])
    fill(log, P1, 3, [b"a"])
    first = Member(log, Handler(), commit_timeout_s=0.3, flush_interval_s=30.0)
    first.start()
    first.assign([P0, P1])
    await until(lambda: first.pipeline.processed == 6)
    first.sink.answer_late_s = 1.0
    await first.revoke([P1])  # its flush stores, then is cut short waiting for the answer
    assert P1 in first.sink.in_doubt  # staged, P0 was in the transaction too
    first.sink.answer_late_s = 0.0
    first.sink.settle_fails = outcome == "unknown"
    async with member(log, Handler()) as second:
        second.assign([P1])
        fill(log, P1, 2, [b"a"])
        fill(log, P0, 2, [b"a"])
        await until(lambda: log.committed.get(P1) == 5 and first.pipeline.processed >= 8)
        late = first.sink.late
        await until(lambda: late is None or late.done())  # the answer is back (or lost)
        report = await first.stop()
    assert (report.abandoned, report.unflushed, report.in_doubt) == (0, 0, 0)
    async with member(log, Handler()) as last:  # whatever was handed over
        last.assign([P0, P1])
        await until(flushed(log))
    assert_exactly_once(log, first.sink, second.sink, last.sink)


async def test_a_fence_during_a_revocation_flush_is_said_as_a_fence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = MemoryLog()
    fill(log, P0, 5, [b"a"])
    caplog.set_level(logging.WARNING, logger="worker.kafka.pipeline")
    handler = Handler()
    async with member(log, handler) as m:
        m.assign([P0])
        await until(flushed(log))
        hold = handler.hold[b"z"] = asyncio.Event()
        fill(log, P0, 1, [b"z"])
        await until(lambda: len(handler.started) == 6)  # running: the revocation flushes it
        m.sink.fenced.add(P0)
        hold.set()
        await m.revoke([P0])
    messages = [r.getMessage() for r in caplog.records]
    assert any("was fenced" in msg for msg in messages), messages
    assert not any("Kafka unreachable" in msg for msg in messages), messages


async def test_revocation_waits_for_a_stuck_flush_only_within_its_bound() -> None:
    """A flush that does not end (Kafka down) must not hold the revocation past its
    bound: the member would lose its session."""
    log = MemoryLog()
    fill(log, P0, 3, [b"a"])
    async with member(log, Handler(), commit_timeout_s=0.2) as m:
        m.assign([P0])
        await until(flushed(log))
        m.sink.delay_s = 30.0  # the next flush hangs
        fill(log, P0, 1, [b"a"])
        await until(lambda: m.pipeline.flush_since is not None)
        await asyncio.wait_for(m.revoke([P0]), 5)  # today: waits the 30 s
        m.sink.delay_s = 0.0
    assert log.committed[P0] in (3, 4)
