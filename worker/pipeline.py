"""The consume → process → publish → commit loop.

Ordering: records are chained per *lane* (topic, partition, record key); a record starts
only after the previous record of its lane has its result durably published, so results
per key appear in command order. Different lanes run concurrently, at most
``max_in_flight`` records at once (the fetch loop waits for a free slot: backpressure).

Durability: a record's offset is completed only after its outgoing records (the result,
and for poison the dead-letter copy) are acknowledged by the broker; the commit position of
a partition never passes an incomplete record (see :mod:`worker.offsets`). A crash
therefore repeats work but never loses a command (at-least-once).

The commit path is one replaceable part, :class:`ResultSink`: ``publish`` makes outgoing
records durable and ``commit`` stores positions.

Shutdown order (``stop``): stop fetching → let in-flight records finish within
``shutdown_grace_s`` → their results are published by then → commit → return; the caller
closes the consumer and producer. A failure to publish is fatal: the loop stops without
committing past the record, and ``run`` re-raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from worker import metrics
from worker.offsets import OffsetTracker

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


class ResultSink(Protocol):
    async def publish(self, records: Sequence[OutRecord]) -> None:
        """Return only once every record is durably stored (acks=all)."""

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        """Store the next position to read, per partition."""


class RecordSource(Protocol):
    async def fetch(self, timeout_ms: int) -> Sequence[InRecord]: ...


class PublishFailedError(RuntimeError):
    """Outgoing records could not be made durable; the worker must stop and restart."""


class Pipeline:
    def __init__(
        self,
        source: RecordSource,
        sink: ResultSink,
        handler: Handler,
        *,
        max_in_flight: int = 256,
        commit_interval_s: float = 0.2,
        shutdown_grace_s: float = 10.0,
    ) -> None:
        self._source = source
        self._sink = sink
        self._handler = handler
        self._slots = asyncio.Semaphore(max_in_flight)
        self._commit_interval_s = commit_interval_s
        self._shutdown_grace_s = shutdown_grace_s
        self._tracker: OffsetTracker[Partition] = OffsetTracker()
        self._lanes: dict[tuple[str, int, bytes | None], asyncio.Task[None]] = {}
        self._tasks: dict[asyncio.Task[None], Partition] = {}
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._commit_lock = asyncio.Lock()
        self.processed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop fetching and drain (idempotent)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Fetch and dispatch until :meth:`stop`; then drain, commit and return."""
        committer = asyncio.create_task(self._commit_periodically(), name="committer")
        try:
            while not self._stopping.is_set():
                records = await self._source.fetch(timeout_ms=100)
                for record in records:
                    if self._stopping.is_set():
                        break  # unstarted records are not tracked: they are read again later
                    await self._dispatch(record)
        finally:
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            await self._drain(self._shutdown_grace_s)
            if self._fatal is None:
                await self.commit_now()
        if self._fatal is not None:
            raise self._fatal

    # -- dispatch ----------------------------------------------------------------------------

    async def _dispatch(self, record: InRecord) -> None:
        await self._slots.acquire()  # in-flight tasks always finish, so this always returns
        if self._stopping.is_set():
            self._slots.release()
            return
        part = (record.topic, record.partition)
        try:
            self._tracker.track(part, record.offset)
        except ValueError:
            # Delivered again without a rebalance (should not happen): it is already in hand.
            log.warning("skipping %s[%d]@%d: already tracked", *part, record.offset)
            self._slots.release()
            return
        lane = (record.topic, record.partition, record.key)
        previous = self._lanes.get(lane)
        task = asyncio.create_task(self._process(record, previous), name=f"record-{record.offset}")
        self._lanes[lane] = task
        self._tasks[task] = part
        metrics.IN_FLIGHT.inc()

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.pop(t, None)
            if self._lanes.get(lane) is t:
                del self._lanes[lane]
            self._slots.release()
            metrics.IN_FLIGHT.dec()

        task.add_done_callback(finished)

    async def _process(self, record: InRecord, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        if self._fatal is not None:
            return  # nothing more is published once one record failed; it is read again later
        started = time.monotonic()
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        try:
            outgoing = await self._handler(record)
        except Exception as exc:  # noqa: BLE001 - any failure here must stop the worker
            # Handlers turn every failure into a result; reaching here is a defect.
            self._fail(RuntimeError(f"handler failed for {where}: {exc!r}"))
            return
        try:
            await self._sink.publish(outgoing)
        except Exception as exc:  # noqa: BLE001 - any publish failure must stop the worker
            self._fail(PublishFailedError(f"publishing results for {where} failed: {exc}"))
            return
        self._tracker.complete((record.topic, record.partition), record.offset)
        self.processed += 1
        metrics.COMMAND_SECONDS.observe(time.monotonic() - started)

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            log.error("fatal: %s; stopping without committing past it", exc)
            self._fatal = exc
        self._stopping.set()

    # -- commits and rebalances ------------------------------------------------------------

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._commit_interval_s)
            await self.commit_now()

    async def commit_now(self, parts: Sequence[Partition] | None = None) -> None:
        async with self._commit_lock:
            positions = self._tracker.to_commit(parts)
            if not positions:
                return
            try:
                await self._sink.commit(positions)
            except Exception as exc:  # noqa: BLE001 - a failed commit is retried next round
                log.warning("offset commit failed (will retry): %s", exc)
                return
            self._tracker.mark_committed(positions)
            metrics.COMMITS.inc()

    async def _drain(self, grace_s: float, parts: Sequence[Partition] | None = None) -> None:
        tasks = [t for t, p in self._tasks.items() if parts is None or p in parts]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        if pending:
            log.warning(
                "%d record(s) still in flight after %.1fs; they will be read again",
                len(pending),
                grace_s,
            )

    async def on_revoked(self, parts: Sequence[Partition]) -> None:
        """Finish the revoked partitions' in-flight records (bounded), commit, forget them."""
        await self._drain(self._shutdown_grace_s, parts)
        await self.commit_now(parts)
        self._tracker.drop(parts)

    def on_assigned(self, parts: Sequence[Partition]) -> None:
        self._tracker.drop(parts)  # start clean from the committed position
