"""The consume → process → publish → commit loop.

Ownership: every partition in hand has a :class:`_PartState`, created when the consumer
assigns the partition and dropped when it is revoked. Work is tagged with the state it was
read under; a record fetched before a rebalance is never dispatched after it, and a task
still running for a dropped state publishes nothing. Positions are committed only for
partitions this worker owns. A newly assigned partition is not processed until the sink
has taken ownership of it (in exactly-once mode: fenced the previous owner's producer) and
the consumer has been rewound to the committed position read after that.

Ordering: records are chained per *lane* (partition, record key); a lane's next record
starts when the previous one has its result in hand. Results are made durable as their
records are answered, not in offset order: one account's slow commands do not hold back
another account's results on the same partition (results per key still appear in command
order). A partition's stored position is its first record not answered durably, and the
offsets after it that are answered durably are stored with it (the commit's metadata,
:func:`encode_ahead`), in the same transaction as the results: whoever takes the partition
over reads them with the position (:meth:`RecordSource.rewind`) and skips those records, so
a crash or rebalance repeats only work whose results were not durable.

Concurrency without head-of-line blocking: a record takes one of ``max_in_flight`` slots
only when it can run (its lane is free). Lanes wait their turn round-robin, so a burst on
one key holds one slot while other keys run. Records buffered per partition are bounded
(``max_buffered``): a partition with a deep queue is paused at the consumer and resumed
when it has drained to half, so memory stays bounded and other partitions keep flowing.

Durability: a flush hands the sink each partition's answers since its last flush (their
outgoing records, the position and the offsets answered ahead of it: :class:`Flush`); the
sink makes them durable and stores the position (:class:`ResultSink`). Group commit: a
flush starts as soon as results wait and no flush is under way, each with every partition
that has results (exactly-once: one transaction per flush); while one is under way, the
results answered meanwhile wait for the next, which takes them all. ``flush_interval_s``
above 0 also spaces the flushes' starts by at least that much (fewer, larger transactions,
results later); the final flush on shutdown or revocation does not wait. A sink that stages
(:class:`StagingSink`, exactly-once's) is handed each partition's results as they are
answered, and sends them into its open transaction then; the flush commits them, and every
flush carries each partition with staged results. When the sink's transaction ends any
other way, what was staged is dropped with it, and the next flush carries those results
again. A flush that fails (the broker is down) is retried with backoff, for as long as it
takes; the outage is reported once, in a log line and in a metric, and the pipeline
resumes by itself.

Revocation: a revoked partition's queued records are dropped, its running records get
``revoke_grace_s`` to finish and are then cancelled (they are read again by the next
owner), its answers are flushed within ``commit_timeout_s``, then the sink lets go
of it. The bounds keep revocation well inside the group's session timeout.

Shutdown (``stop``): stop fetching → drop queued records → let running records finish
within ``shutdown_grace_s`` → cancel the rest and count them as abandoned → flush within
``commit_timeout_s`` → return a :class:`RunReport`. The caller closes the clients.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from worker import metrics

log = logging.getLogger(__name__)

Partition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class InRecord:
    """The parts of a consumed record the pipeline needs (adapters convert to this)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # Kafka allows a header without a value: it stays None here.
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes | None], ...] = field(default=())


Handler = Callable[[InRecord], Awaitable[Sequence[OutRecord]]]


@dataclass(frozen=True, slots=True)
class Flush:
    """One partition's results to make durable, and the position to store with them.

    ``records``: the outgoing records of the partition's records answered since its last
    flush, in the order they were answered (per key, that is command order: a key's next
    record starts when the one before it is answered). ``position``: the offset of its
    first record not answered durably once this flush is (one past the last record, when
    all are). ``metadata``: the offsets after ``position`` that are answered durably once
    this flush is (:func:`encode_ahead`), stored with the position, so that whoever takes
    the partition over skips them (:meth:`RecordSource.rewind`)."""

    records: tuple[OutRecord, ...]
    position: int
    metadata: str = ""


AHEAD_SPAN = 16_384
"""How far past a partition's position a record's result may be made durable: the offsets
answered ahead of the position are stored with it as a bitmap of this many bits
(:func:`encode_ahead`: 2,739 characters at most, within the 4,096 that brokers accept by
default as a committed offset's metadata, ``offset.metadata.max.bytes``). With
``max_buffered`` records in hand per partition (1,000 by default), the span is never the
limit unless the partition's offsets have gaps."""

_AHEAD_TAG = "ahead1:"


def encode_ahead(position: int, offsets: Iterable[int]) -> str:
    """The commit metadata saying which offsets after ``position`` are answered: a tag and
    a bitmap in base64 (bit ``i`` is ``position + 1 + i``); empty when none are."""
    bits = bytearray()
    for offset in offsets:
        i = offset - position - 1
        if not 0 <= i < AHEAD_SPAN:
            raise ValueError(f"offset {offset} is not within the span after {position}")
        if len(bits) <= i // 8:
            bits.extend(bytes(i // 8 + 1 - len(bits)))
        bits[i // 8] |= 1 << (i % 8)
    if not bits:
        return ""
    return _AHEAD_TAG + base64.b64encode(bytes(bits)).decode("ascii")


def decode_ahead(position: int, metadata: str | None) -> frozenset[int]:
    """The offsets after ``position`` that ``metadata`` (of :func:`encode_ahead`) says are
    answered. Metadata this worker did not write (another tool's commit, none) says none
    are; metadata with this worker's tag that does not decode is an error."""
    if not metadata or not metadata.startswith(_AHEAD_TAG):
        return frozenset()
    try:
        bits = base64.b64decode(metadata[len(_AHEAD_TAG) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"unreadable commit metadata at position {position}: {exc}") from exc
    if len(bits) > AHEAD_SPAN // 8:
        raise ValueError(f"commit metadata at position {position} spans too far")
    return frozenset(
        position + 1 + byte_i * 8 + bit
        for byte_i, byte in enumerate(bits)
        if byte
        for bit in range(8)
        if byte >> bit & 1
    )


class FlushError(Exception):
    """A flush that partly happened: ``done`` partitions were flushed, ``lost`` ones belong
    to another member now (nothing more of them may be published); the rest are retried.
    Any other exception from :meth:`ResultSink.flush` means nothing is known to be stored."""

    def __init__(
        self, cause: str, done: Sequence[Partition] = (), lost: Sequence[Partition] = ()
    ) -> None:
        super().__init__(cause)
        self.done = frozenset(done)
        self.lost = frozenset(lost)


class TakeOverRefusedError(Exception):
    """A take-over the cluster refuses for good (authorization on the group, the topics or
    the transactional id): retrying cannot help, so the worker stops with this reason."""


class ResultSink(Protocol):
    async def flush(self, batches: Mapping[Partition, Flush]) -> None:
        """Make each batch's records durable and store its position; raise on failure.

        After a failure any part of it may or may not be stored; the pipeline retries the
        same batches (at-least-once), or the sink guarantees all-or-nothing per partition
        (exactly-once)."""

    async def assigned(self, parts: Sequence[Partition]) -> None:
        """Take ownership of newly assigned partitions (fence their previous owner)."""

    async def revoked(self, parts: Sequence[Partition]) -> None:
        """Let go of partitions after their last flush."""


@runtime_checkable
class StagingSink(ResultSink, Protocol):
    """A sink that takes results ahead of their flush (exactly-once: into the open
    transaction, committed by the flush with the positions)."""

    @property
    def transaction(self) -> int:
        """Changes whenever what was staged is no longer pending (flushed or dropped)."""

    @property
    def accepting(self) -> bool:
        """Whether :meth:`stage` can take anything now (not while a flush is under way):
        the pipeline asks before gathering what to stage, so the answers that complete
        during a long flush cost nothing each (the flush sends them)."""

    def stage(self, part: Partition, records: Sequence[OutRecord]) -> bool:
        """Take a partition's next completed results, following those staged before;
        whether it did. A flush's batches then hold every partition with staged results,
        each from its first staged record."""


@runtime_checkable
class SettlingSink(ResultSink, Protocol):
    """A sink whose flush can be cut short after its commit was sent (exactly-once's
    EndTxn): the commit may still complete, so the flush's content must never be sent again
    in another transaction. Its outcome is learnt on the producer that sent it."""

    @property
    def in_doubt(self) -> frozenset[Partition]:
        """The partitions of a flush cut short after its commit was sent, until
        :meth:`settle` has learnt whether it stored them."""

    async def settle(self) -> bool:
        """Wait for the outcome of the commit cut short: True if it stored the partitions,
        False if it did not (nothing of them is stored). Raises if it cannot be learnt
        (then they must be handed over unpublished: the next owner starts from whatever was
        committed)."""


class RecordSource(Protocol):
    async def fetch(self, timeout_ms: int) -> Sequence[InRecord]: ...

    def owns(self, part: Partition) -> bool:
        """Whether the partition is in the consumer's current assignment."""

    def pause(self, parts: Sequence[Partition]) -> None: ...

    def resume(self, parts: Sequence[Partition]) -> None: ...

    async def rewind(self, parts: Sequence[Partition]) -> Mapping[Partition, frozenset[int]]:
        """Seek the partitions to their committed positions; return, per partition, the
        offsets after its position already answered durably (the committed metadata, read
        with :func:`decode_ahead`): they are not processed again."""

    def rejoin(self) -> None:
        """Ask the group for a new assignment: every partition is revoked and assigned
        again (taken over afresh), as after any rebalance."""


@dataclass(frozen=True, slots=True)
class RunReport:
    """How the pipeline stopped."""

    processed: int
    abandoned: int  # running records cancelled at the shutdown bound
    unflushed: int  # completed records whose results could not be made durable in time
    # completed records whose commit was cut short and whose outcome could not be learnt:
    # not sent again (the next owner starts from whatever the commit stored)
    in_doubt: int = 0


class _Entry:
    __slots__ = ("done", "outgoing", "published", "read_at", "record", "task")

    def __init__(self, record: InRecord) -> None:
        self.record = record
        self.read_at = time.monotonic()
        self.done = False  # answered: its outgoing records are in hand
        self.published = False  # and made durable
        self.outgoing: tuple[OutRecord, ...] = ()
        self.task: asyncio.Task[None] | None = None


class _PartState:
    """A partition in hand, for one assignment of it."""

    __slots__ = (
        "answered",
        "closing",
        "entries",
        "flush_at",
        "in_doubt",
        "lanes",
        "part",
        "paused",
        "ready",
        "revoked",
        "running",
        "skip",
        "staged",
    )

    def __init__(self, part: Partition) -> None:
        self.part = part
        self.entries: deque[_Entry] = deque()  # every record in hand, in offset order
        self.lanes: dict[bytes | None, deque[_Entry]] = {}  # records waiting, per key
        self.running: dict[bytes | None, _Entry] = {}
        self.ready = False  # the sink owns the partition and the position is rewound
        self.closing = False  # revoked or stopping: nothing more starts
        self.revoked = False  # let go of: nothing of it is published any more
        self.paused = False
        self.flush_at = -math.inf  # (monotonic) its next flush does not start before this
        # Answered and not yet durable, in the order they were answered; the sink has
        # staged the first ``staged`` of them.
        self.answered: list[_Entry] = []
        self.staged = 0
        self.skip: frozenset[int] = frozenset()  # offsets answered durably before the rewind
        # The first answers, of a flush cut short after its commit was sent: neither
        # flushed again nor dropped until the sink has learnt the commit's outcome.
        self.in_doubt = 0

    @property
    def flushable(self) -> bool:
        """Owned, with answers to make durable (none of them in doubt)."""
        return self.ready and not self.in_doubt and bool(self.answered)

    def publishable(self, entry: _Entry) -> bool:
        """Whether the entry's answer can be made durable now: within :data:`AHEAD_SPAN`
        of the oldest record in hand (the position is never behind it)."""
        return entry.record.offset - self.entries[0].record.offset <= AHEAD_SPAN

    def drop_published(self) -> None:
        """Let go of the leading records answered durably: the position is past them."""
        entries = self.entries
        while entries and entries[0].published:
            entries.popleft()


class Pipeline:
    def __init__(
        self,
        source: RecordSource,
        sink: ResultSink,
        handler: Handler,
        *,
        max_in_flight: int = 256,
        max_buffered: int = 1000,
        shutdown_grace_s: float = 10.0,
        revoke_grace_s: float = 2.0,
        commit_timeout_s: float = 2.0,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        flush_interval_s: float = 0.0,
        publish_stall_s: float = 5.0,
    ) -> None:
        self._source = source
        self._sink = sink
        self._handler = handler
        self._max_in_flight = max_in_flight
        self._max_buffered = max_buffered
        self._shutdown_grace_s = shutdown_grace_s
        self._revoke_grace_s = revoke_grace_s
        self._commit_timeout_s = commit_timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        # The shortest time from one flush's start to the next one's (the final flush on
        # shutdown or revocation does not wait for it): fewer, larger transactions.
        self._flush_interval_s = flush_interval_s
        # A flush waiting this long on the sink is reported (log, metric, readiness).
        self._publish_stall_s = publish_stall_s
        self._stalled_since: float | None = None
        metrics.RESULTS_PUBLISHABLE.set(1)
        # Since when a take-over has been failing (None: none is), for readiness.
        self._take_over_failing_since: float | None = None
        self._parts: dict[Partition, _PartState] = {}
        self._ready_lanes: deque[tuple[_PartState, bytes | None]] = deque()
        self._running = 0
        self._stopping = asyncio.Event()
        self._flush_wanted = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._preparing: dict[Partition, asyncio.Task[None]] = {}
        self._lost: set[Partition] = set()  # fenced: ignored until assigned again
        self._revoking: set[Partition] = set()
        self._fatal: BaseException | None = None
        # States with results staged in the sink's pending transaction, and its number.
        self._stager = sink if isinstance(sink, StagingSink) else None
        self._settler = sink if isinstance(sink, SettlingSink) else None
        self._in_doubt: dict[Partition, _PartState] = {}  # see _PartState.in_doubt
        self._staged: dict[Partition, _PartState] = {}
        self._staged_in: int | None = None
        self._unreachable_since: float | None = None
        self.processed = 0
        # For the liveness probe (monotonic seconds): when the fetch loop last came round
        # (None before it started), and since when the flush under way has been running.
        self.loop_at: float | None = None
        self.flush_since: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop fetching and drain (idempotent)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- what the operations endpoint reads ------------------------------------------------------

    @property
    def fenced(self) -> frozenset[Partition]:
        """Partitions fenced while still assigned: their records are dropped until the
        group assigns them again (a rejoin has been asked for)."""
        return frozenset(self._lost)

    @property
    def kafka_reachable_now(self) -> bool:
        """False from a failed publish or commit until one succeeds again."""
        return self._unreachable_since is None

    def oldest_in_hand_s(self) -> float:
        """Age of the oldest record read and not yet answered durably (0 when none)."""
        oldest = min(
            (s.entries[0].read_at for s in self._parts.values() if s.entries), default=None
        )
        return 0.0 if oldest is None else time.monotonic() - oldest

    def in_hand_from(self) -> dict[Partition, int]:
        """Per partition with records in hand: the offset of the oldest (everything before
        it has been answered durably)."""
        return {p: s.entries[0].record.offset for p, s in self._parts.items() if s.entries}

    async def run(self) -> RunReport:
        """Fetch and dispatch until :meth:`stop`; then drain, flush and report."""
        flusher = asyncio.create_task(self._flush_loop(), name="flusher")
        try:
            while not self._stopping.is_set():
                self.loop_at = time.monotonic()
                records = await self._source.fetch(timeout_ms=100)
                for record in records:  # no await in here: ownership cannot change under us
                    self._enqueue(record)
                if self._pump():
                    # Let the records just started reach their requests before this task
                    # sets up the next fetch: a paced command's request leaves sooner.
                    await asyncio.sleep(0)
        finally:
            abandoned = await self._shutdown(flusher)
        if self._fatal is not None:
            raise self._fatal
        unflushed = sum(len(s.answered) - s.in_doubt for s in self._parts.values())
        in_doubt = sum(s.in_doubt for s in self._parts.values())
        return RunReport(self.processed, abandoned, unflushed, in_doubt)

    async def _shutdown(self, flusher: asyncio.Task[None]) -> int:
        for state in self._parts.values():
            self._drop_waiting(state)
        await self._end_take_overs()
        abandoned = await self._finish_running(list(self._parts.values()), self._shutdown_grace_s)
        await self._stop_flusher(flusher)
        if self._fatal is None:
            async with self._flush_lock:
                await self._flush_bounded(list(self._parts.values()))
        return abandoned

    async def _end_take_overs(self, parts: Sequence[Partition] | None = None) -> None:
        """Cancel the take-overs under way (of ``parts``, or all) and wait for them, bounded.
        Once ``run`` returns the Kafka clients close, and once a revocation returns the
        parts are another member's: a take-over left running would start producers and
        read offsets after that (on closed clients, or for parts no longer ours)."""
        if parts is None:
            parts = list(self._preparing)
        tasks = {t for p in parts if (t := self._preparing.pop(p, None)) is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._commit_timeout_s)
            if pending:
                log.warning(
                    "%d take-over(s) did not end within %.1fs", len(pending), self._commit_timeout_s
                )

    async def _stop_flusher(self, flusher: asyncio.Task[None]) -> None:
        """Stop the flush loop between two flushes, not inside one: a flush cut short after
        the sink published its records but before it stored their positions leaves them in
        hand, and the final flush would publish them again. A flush in progress gets
        ``commit_timeout_s`` to finish (Kafka may be down); after that it is cut short."""
        try:
            await asyncio.wait_for(self._flush_lock.acquire(), self._commit_timeout_s)
        except TimeoutError:
            held = False
        else:
            held = True
        try:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        finally:
            if held:
                self._flush_lock.release()

    # -- dispatch ----------------------------------------------------------------------------

    def _enqueue(self, record: InRecord) -> None:
        part = (record.topic, record.partition)
        state = self._parts.get(part)
        if state is None:
            if part in self._lost or part in self._revoking or not self._source.owns(part):
                return  # fetched for an assignment that has ended: not ours to process
            # Assigned, and the assignment callback has not run yet: hold the record; the
            # callback rewinds the partition before anything of it runs.
            state = self._parts[part] = _PartState(part)
        elif state.entries and record.offset <= state.entries[-1].record.offset:
            return  # read again after a rewind: the copy in hand stands
        entry = _Entry(record)
        if record.offset in state.skip:
            # Answered durably before the partition was last taken over (ahead of the
            # position then stored): nothing to do but let the position move past it.
            entry.done = entry.published = True
            state.entries.append(entry)
            state.drop_published()
            return
        state.entries.append(entry)
        lane = state.lanes.setdefault(record.key, deque())
        lane.append(entry)
        if len(lane) == 1 and record.key not in state.running and state.ready:
            self._ready_lanes.append((state, record.key))
        self._check_pause(state)

    def _pump(self) -> bool:
        """Start waiting records while slots are free, one lane at a time, round-robin;
        whether any started."""
        started = False
        while self._running < self._max_in_flight and self._ready_lanes:
            state, key = self._ready_lanes.popleft()
            lane = state.lanes.get(key)
            if state.closing or not lane or key in state.running:
                continue
            entry = lane.popleft()
            if not lane:
                del state.lanes[key]
            self._start(state, key, entry)
            started = True
        return started

    def _start(self, state: _PartState, key: bytes | None, entry: _Entry) -> None:
        self._running += 1
        state.running[key] = entry
        metrics.IN_FLIGHT.inc()
        task = asyncio.create_task(
            self._process(state, entry), name=f"record-{entry.record.offset}"
        )
        entry.task = task

        def finished(_: asyncio.Task[None]) -> None:
            self._running -= 1
            metrics.IN_FLIGHT.dec()
            if state.running.get(key) is entry:
                del state.running[key]
            if not state.closing and state.lanes.get(key):
                self._ready_lanes.append((state, key))
            self._pump()

        task.add_done_callback(finished)

    async def _process(self, state: _PartState, entry: _Entry) -> None:
        record = entry.record
        started = time.monotonic()
        try:
            outgoing = await self._handler(record)
        except Exception as exc:  # noqa: BLE001 - handlers turn failures into results
            # Reaching here is a defect; nothing is published for the record, so it is
            # read again after the restart this forces.
            self._fail(
                RuntimeError(
                    f"handler failed for {record.topic}[{record.partition}]@{record.offset}: "
                    f"{exc!r}"
                )
            )
            return
        if state.revoked:
            return  # the partition moved on: its next owner answers this record
        entry.outgoing = tuple(outgoing)
        entry.done = True
        state.answered.append(entry)
        self.processed += 1
        metrics.COMMAND_SECONDS.observe(time.monotonic() - started)
        if self._stager is not None:
            self._stage(self._stager, state)
        self._flush_wanted.set()

    def _stage(self, stager: StagingSink, state: _PartState) -> None:
        """Hand the sink the results answered since it was last handed the partition's."""
        if not state.ready or state.revoked or state.in_doubt:
            return  # in doubt: staged once the commit's outcome is known
        if not stager.accepting:
            return  # left for the next flush, or the next answer's staging after this flush
        staged = self._staged_now(stager)
        answered = state.answered
        start = end = state.staged
        while end < len(answered) and state.publishable(answered[end]):
            end += 1
        if end == start:
            return
        records = [r for i in range(start, end) for r in answered[i].outgoing]
        # Records answered with nothing (already answered) need nothing of the sink.
        if not records or stager.stage(state.part, records):
            state.staged = end
            staged[state.part] = state

    def _staged_now(self, stager: StagingSink) -> dict[Partition, _PartState]:
        """The states with results in the sink's pending transaction (none once it ended)."""
        if stager.transaction != self._staged_in:
            for state in self._staged.values():
                state.staged = 0
            self._staged.clear()
            self._staged_in = stager.transaction
        return self._staged

    def _fail(self, exc: BaseException, *, say: bool = True) -> None:
        """Stop, and end the run raising ``exc``; ``say=False``: its message is the whole
        story and the run's caller says it (once, not twice)."""
        if self._fatal is None:
            if say:
                log.error("fatal: %s; stopping without committing past it", exc)
            self._fatal = exc
        self._stopping.set()

    # -- backpressure --------------------------------------------------------------------------

    def _check_pause(self, state: _PartState) -> None:
        depth = len(state.entries)
        if not state.paused and depth >= self._max_buffered:
            state.paused = True
            self._source.pause([state.part])
            metrics.PAUSED_PARTITIONS.inc()
            log.info("%s[%d]: %d records in hand, pausing its fetch", *state.part, depth)
        elif state.paused and depth <= self._max_buffered // 2:
            state.paused = False
            self._source.resume([state.part])
            metrics.PAUSED_PARTITIONS.dec()

    def _drop_waiting(self, state: _PartState) -> None:
        """Start nothing more: records that have not started are read again from the
        committed position. They stay in ``entries``, where they end the flushable prefix:
        a record done after one that never ran must not carry the position past it."""
        state.closing = True
        state.lanes.clear()

    # -- durability ----------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        delay = self._retry_initial_s
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            due, wait_s = self._due(time.monotonic())
            if not due:
                if wait_s is not None:  # results in hand, their partitions not due yet
                    # ... until the first is due, or a result comes (its partition may be)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            await self._flush_wanted.wait()
                    self._flush_wanted.set()
                continue
            async with self._flush_lock:
                ok = await self._flush_ready(due)
            if ok:
                delay = self._retry_initial_s
                self._flush_wanted.set()  # other partitions may have results, due later
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)
            self._flush_wanted.set()

    def _due(self, now: float) -> tuple[list[_PartState], float | None]:
        """The partitions with results to flush whose interval has passed; else how long
        until the first of the others is due (None: no results in hand)."""
        due: list[_PartState] = []
        soonest: float | None = None
        for state in self._parts.values():
            if not state.flushable:
                continue
            if state.flush_at <= now:
                due.append(state)
            elif soonest is None or state.flush_at < soonest:
                soonest = state.flush_at
        return due, None if soonest is None else soonest - now

    def _space_out(self, started: float) -> None:
        """The next flush of every partition in hand: one interval after ``started`` (the
        start of a flush), so that the partitions' results go together, one transaction
        per interval for the whole member."""
        if not self._flush_interval_s:
            return
        for state in self._parts.values():
            state.flush_at = started + self._flush_interval_s

    async def _flush_ready(self, states: Sequence[_PartState]) -> bool:
        """Flush every state's completed prefix, and every one with staged results with them
        (the sink's transaction commits all it holds); False if the sink failed (kept for
        later)."""
        if self._in_doubt or (self._settler is not None and self._settler.in_doubt):
            await self._settle()
        if self._stager is not None:
            wanted = {s.part: s for s in states}
            for part, state in self._staged_now(self._stager).items():
                wanted.setdefault(part, state)
            states = list(wanted.values())
        taken, batches = self._batches(states)
        if not batches:
            return True
        failure: Exception | None = None
        done: frozenset[Partition] = frozenset(batches)
        self.flush_since = started = time.monotonic()
        self._space_out(started)
        stall = asyncio.get_running_loop().call_later(
            self._publish_stall_s, self._publish_stalled, sum(n for _, n in taken.values())
        )
        try:
            await self._sink.flush(batches)
        except FlushError as exc:
            failure, done = exc, exc.done
            # Those being revoked too (no longer in _parts): a fence, not an outage.
            lost = {p: st for p in exc.lost if (st := self._parts.get(p)) is not None}
            lost.update((p, taken[p][0]) for p in exc.lost if p in taken)
            self._lose(list(lost.values()))
        except asyncio.CancelledError:
            self._doubt(taken)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is retried; the records stay
            failure, done = exc, frozenset()
        finally:
            self.flush_since = None
            stall.cancel()
        for part in done:
            state, count = taken.pop(part)
            self._published(state, count)
        if done:
            metrics.COMMITS.inc()
        waiting = sum(n for s, n in taken.values() if not s.revoked)
        if failure is not None and waiting:
            self.kafka_unreachable(failure, waiting)
            return False
        self.kafka_reachable()
        self._publish_resumed()
        return True

    def _batches(
        self, states: Sequence[_PartState]
    ) -> tuple[dict[Partition, tuple[_PartState, int]], dict[Partition, Flush]]:
        """What a flush of ``states`` takes of each (its state and how many answers), and
        the batches it hands the sink."""
        taken: dict[Partition, tuple[_PartState, int]] = {}
        batches: dict[Partition, Flush] = {}
        for state in states:
            if state.revoked or not state.flushable:
                continue
            count = 0
            for entry in state.answered:
                if not state.publishable(entry):
                    break
                count += 1
            if not count:
                continue
            batches[state.part] = self._batch(state, count)
            taken[state.part] = (state, count)
        return taken, batches

    def _published(self, state: _PartState, count: int) -> None:
        """The state's first ``count`` answers are durable."""
        for entry in state.answered[:count]:
            entry.published = True
        del state.answered[:count]
        state.staged = max(0, state.staged - count)
        state.drop_published()
        self._check_pause(state)

    @staticmethod
    def _batch(state: _PartState, count: int) -> Flush:
        """The flush of the state's first ``count`` answers: their records, the position
        once they are durable, and the offsets after it that are durable then."""
        taken = state.answered[:count]
        durable = {id(e) for e in taken}
        position: int | None = None
        ahead: list[int] = []
        for entry in state.entries:
            if entry.published or id(entry) in durable:
                if position is not None:
                    ahead.append(entry.record.offset)
            elif position is None:
                position = entry.record.offset
        if position is None:  # every record in hand is answered durably then
            position = state.entries[-1].record.offset + 1
        records = tuple(r for e in taken for r in e.outgoing)
        return Flush(records, position, encode_ahead(position, ahead))

    def _publish_stalled(self, waiting: int) -> None:
        """A flush has waited ``publish_stall_s`` on the sink: say it now (a WARNING, the
        metric, readiness), not when the client gives up (the results topic may refuse
        writes for as long as it is misconfigured, and the client retries all that time)."""
        if self._stalled_since is not None:
            return
        self._stalled_since = time.monotonic() - self._publish_stall_s
        metrics.RESULTS_PUBLISHABLE.set(0)
        log.warning(
            "results not published for %.0fs: %d result(s) wait on Kafka (a results topic "
            "that refuses writes, e.g. fewer in-sync replicas than min.insync.replicas, or "
            "an overloaded broker); still trying",
            self._publish_stall_s,
            waiting,
        )

    def _publish_resumed(self) -> None:
        if self._stalled_since is None:
            return
        log.warning("results published again after %.1fs", time.monotonic() - self._stalled_since)
        self._stalled_since = None
        metrics.RESULTS_PUBLISHABLE.set(1)

    @property
    def take_over_failing_s(self) -> float:
        """How long take-overs have been failing (0: none is); their partitions' records
        wait meanwhile."""
        since = self._take_over_failing_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def publishing_now(self) -> bool:
        """False while a flush has been waiting on the sink for ``publish_stall_s``."""
        return self._stalled_since is None

    def _doubt(self, taken: Mapping[Partition, tuple[_PartState, int]]) -> None:
        """A flush cut short: the partitions whose commit was sent are in doubt."""
        if self._settler is None:
            return
        for part in self._settler.in_doubt:
            if part in taken:
                state, count = taken[part]
                state.in_doubt = count
                self._in_doubt[part] = state

    async def _settle(self) -> None:
        """Learn the outcome of the commit cut short before anything more is flushed: its
        results are then dropped (stored) or flushed again (not stored). If it cannot be
        learnt they are handed over unpublished, never sent in another transaction."""
        if self._settler is None:
            return
        states = list(self._in_doubt.values())
        count = sum(s.in_doubt for s in states)
        try:
            stored = await self._settler.settle()
        except Exception as exc:  # noqa: BLE001 - unknown: hand the partitions over
            self._in_doubt.clear()
            log.warning(
                "the outcome of a commit cut short cannot be learnt (%s): %d result(s) of %s "
                "are handed over unpublished, never sent again",
                exc,
                count,
                [s.part for s in states],
            )
            self._lose([s for s in states if not s.revoked])
            return
        self._in_doubt.clear()
        for state in states:
            if stored:
                self._published(state, state.in_doubt)
            state.in_doubt = 0
            state.staged = 0  # the sink's transaction ended with the flush cut short
            if self._stager is not None:
                self._stage(self._stager, state)
        log.info(
            "a commit cut short %s: %d result(s) of %s %s",
            "completed" if stored else "did not complete",
            count,
            [s.part for s in states],
            "are durable" if stored else "are published again",
        )

    def _lose(self, states: Sequence[_PartState]) -> None:
        """These partitions' producer was fenced: stop their work, publish nothing of it.
        Another member may own them now; if the consumer still has them, the fence came
        without a rebalance (a transaction aborted by its timeout, another producer on the
        id): ask the group for a new assignment, which takes them over afresh."""
        still_assigned = []
        for state in states:
            log.warning("%s[%d] was fenced; dropping its work in hand", *state.part)
            if self._parts.get(state.part) is state:
                del self._parts[state.part]
                if self._source.owns(state.part):
                    still_assigned.append(state.part)
                    self._lost.add(state.part)
            self._drop_waiting(state)
            state.revoked = True
            for entry in state.running.values():
                if entry.task is not None:
                    entry.task.cancel()
            if state.paused:
                state.paused = False
                metrics.PAUSED_PARTITIONS.dec()
            self._in_doubt.pop(state.part, None)
        metrics.FENCED_PARTITIONS.set(len(self._lost))
        if still_assigned and not self._stopping.is_set():
            log.warning(
                "fenced while still assigned %s: asking the group for a new assignment",
                still_assigned,
            )
            self._source.rejoin()

    async def _flush_bounded(self, states: Sequence[_PartState]) -> None:
        """Final flush (shutdown, revocation): retried until ``commit_timeout_s``."""
        deadline = time.monotonic() + self._commit_timeout_s
        delay = self._retry_initial_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ok = await asyncio.wait_for(self._flush_ready(states), left)
            except TimeoutError:
                break
            if ok:
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, self._retry_max_s)
        waiting = sum(len(s.answered) - s.in_doubt for s in states)
        if waiting:
            log.warning(
                "%d result(s) not made durable within %.1fs; their records will be read again",
                waiting,
                self._commit_timeout_s,
            )

    def kafka_unreachable(self, exc: BaseException, waiting: int | None = None) -> None:
        """Say once per outage (and in a metric) that Kafka cannot be reached."""
        metrics.KAFKA_REACHABLE.set(0)
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            if waiting is None:
                waiting = sum(len(s.answered) for s in self._parts.values())
            log.warning(
                "Kafka unreachable: %d result(s) wait to be published and committed; "
                "fetching pauses, retrying with backoff (%s)",
                waiting,
                exc,
            )
        else:
            log.debug("Kafka still unreachable: %s", exc)

    def kafka_reachable(self) -> None:
        metrics.KAFKA_REACHABLE.set(1)
        if self._unreachable_since is not None:
            log.warning(
                "Kafka reachable again after %.1fs; results published and committed",
                time.monotonic() - self._unreachable_since,
            )
            self._unreachable_since = None

    # -- rebalances ----------------------------------------------------------------------------

    async def _finish_running(self, states: Sequence[_PartState], grace_s: float) -> int:
        """Wait up to ``grace_s`` for the states' running records; cancel the rest."""
        tasks = [e.task for s in states for e in s.running.values() if e.task is not None]
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
            log.warning(
                "%d command(s) still running after %.1fs were cancelled; their records "
                "will be read again (a cancel already sent is reconciled then)",
                len(pending),
                grace_s,
            )
            metrics.ABANDONED.inc(len(pending))
        return len(pending)

    async def on_revoked(self, parts: Sequence[Partition]) -> None:
        """Drop queued work, finish running work (bounded), flush, let go of the parts."""
        states = [s for p in parts if (s := self._parts.pop(p, None)) is not None]
        self._lost.difference_update(parts)
        metrics.FENCED_PARTITIONS.set(len(self._lost))
        self._revoking.update(parts)
        try:
            await self._let_go(parts, states)
        finally:
            self._revoking.difference_update(parts)
            doubtful = [s for p in parts if (s := self._in_doubt.pop(p, None)) is not None]
            if doubtful:
                log.warning(
                    "%d result(s) of %s were being committed when the revocation's bound ran "
                    "out: handed over unpublished (their next owner starts from whatever the "
                    "commit stored), never sent again",
                    sum(s.in_doubt for s in doubtful),
                    [s.part for s in doubtful],
                )

    async def _let_go(self, parts: Sequence[Partition], states: Sequence[_PartState]) -> None:
        await self._end_take_overs(parts)
        for state in states:
            self._drop_waiting(state)  # running records may still finish and be flushed
        await self._finish_running(states, self._revoke_grace_s)
        # Bounded: a flush that does not end (Kafka down) must not cost the member its
        # session. Without the lock the parts are let go of unflushed; the flush under way
        # then publishes nothing of them (they are revoked) or its transaction is refused.
        try:
            await asyncio.wait_for(self._flush_lock.acquire(), self._commit_timeout_s)
        except TimeoutError:
            log.warning(
                "a flush under way did not end within %.1fs; letting go of %s unflushed "
                "(their records will be read again)",
                self._commit_timeout_s,
                list(parts),
            )
        else:
            try:
                await self._flush_bounded(states)
            finally:
                self._flush_lock.release()
        for state in states:
            state.revoked = True
            if state.paused:
                metrics.PAUSED_PARTITIONS.dec()
        await self._sink.revoked(list(parts))

    def on_assigned(self, parts: Sequence[Partition]) -> None:
        """Hold the parts' records until the sink owns them and their position is rewound.

        Once stopping, nothing is taken over: the consumer may still re-join the group (its
        session lapsed) before it closes and leaves, and the parts go to another member."""
        if self._stopping.is_set():
            if parts:
                log.info("partitions assigned while stopping, not taken over: %s", parts)
            return
        self._lost.difference_update(parts)
        metrics.FENCED_PARTITIONS.set(len(self._lost))
        for part in parts:
            self._parts.setdefault(part, _PartState(part))
        if parts:
            task = asyncio.create_task(self._prepare(list(parts)), name="prepare-partitions")
            for part in parts:
                self._preparing[part] = task

    async def _prepare(self, parts: list[Partition]) -> None:
        delay = self._retry_initial_s
        while True:
            try:
                await self._sink.assigned(parts)
                skips = await self._source.rewind(parts)
                break
            except TakeOverRefusedError as exc:
                self._fail(exc, say=False)
                return
            except Exception as exc:  # noqa: BLE001 - retried until it works or is revoked
                metrics.TAKE_OVER_FAILURES.inc()
                if self._take_over_failing_since is None:
                    self._take_over_failing_since = time.monotonic()
                level = logging.WARNING if delay == self._retry_initial_s else logging.DEBUG
                log.log(level, "taking over %s failed (retrying with backoff): %s", parts, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
        if not any(t is not asyncio.current_task() for t in self._preparing.values()):
            self._take_over_failing_since = None
        for part in parts:
            if self._preparing.get(part) is asyncio.current_task():
                del self._preparing[part]
            state = self._parts.get(part)
            if state is None:
                continue
            # Records read before the rewind are dropped; they come again from the position.
            state.entries.clear()
            state.lanes.clear()
            state.answered.clear()
            state.staged = 0
            state.skip = skips.get(part, frozenset())
            state.ready = True
            self._check_pause(state)
        log.info("taken over, processing from the committed positions: %s", parts)
