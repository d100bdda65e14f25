"""In-memory ports for fast pipeline tests: a partitioned log with a consumer's assignment,
positions, pauses and committed offsets, and a sink that can be made to fail or fence.

They behave like the Kafka adapters where the pipeline depends on it: ``fetch`` returns
records of owned, unpaused partitions from their positions; ``rewind`` seeks to the
committed offset; a flush stores outgoing records and positions atomically per partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from worker.kafka.pipeline import Flush, FlushError, InRecord, OutRecord, Partition, decode_ahead


class MemoryLog:
    """Partitions of records plus the group's committed offsets (shared by members)."""

    def __init__(self) -> None:
        self.records: dict[Partition, list[InRecord]] = {}
        self.committed: dict[Partition, int] = {}
        self.metadata: dict[Partition, str] = {}  # committed with the position

    def append(
        self,
        part: Partition,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> InRecord:
        records = self.records.setdefault(part, [])
        record = InRecord(part[0], part[1], len(records), key, value, tuple(headers))
        records.append(record)
        return record


class MemorySource:
    def __init__(self, log: MemoryLog, *, batch: int = 50) -> None:
        self.log = log
        self.batch = batch
        self.assignment: set[Partition] = set()
        self.positions: dict[Partition, int] = {}
        self.paused: set[Partition] = set()
        self.pause_calls = 0
        self.fetch_hook: asyncio.Event | None = None
        self.rejoins = 0
        self.on_rejoin: Callable[[], object] | None = None  # the group's answer to a rejoin

    async def fetch(self, timeout_ms: int) -> Sequence[InRecord]:
        out: list[InRecord] = []
        for part in sorted(self.assignment):
            if part in self.paused:
                continue
            position = self.positions.get(part, 0)
            chunk = self.log.records.get(part, [])[position : position + self.batch]
            out.extend(chunk)
            self.positions[part] = position + len(chunk)
        if not out:
            await asyncio.sleep(min(timeout_ms, 10) / 1000)
        else:
            await asyncio.sleep(0)
        return out

    def owns(self, part: Partition) -> bool:
        return part in self.assignment

    def pause(self, parts: Sequence[Partition]) -> None:
        self.pause_calls += 1
        self.paused.update(parts)

    def resume(self, parts: Sequence[Partition]) -> None:
        self.paused.difference_update(parts)

    async def rewind(self, parts: Sequence[Partition]) -> dict[Partition, frozenset[int]]:
        skips: dict[Partition, frozenset[int]] = {}
        for part in parts:
            if part in self.assignment:
                position = self.positions[part] = self.log.committed.get(part, 0)
                skips[part] = decode_ahead(position, self.log.metadata.get(part))
        return skips

    def rejoin(self) -> None:
        self.rejoins += 1
        if self.on_rejoin is not None:
            self.on_rejoin()

    def assign(self, parts: Sequence[Partition]) -> None:
        """The consumer's side of an assignment: positions from the committed offsets."""
        self.assignment = set(parts)
        for part in parts:
            self.positions[part] = self.log.committed.get(part, 0)
        self.paused = set()  # a new assignment starts unpaused, as in the consumer


class MemorySink:
    """Stores flushed records per partition with their positions, atomically."""

    def __init__(self, log: MemoryLog) -> None:
        self.log = log
        self.published: list[OutRecord] = []
        self.fail = False  # every flush and take-over fails (the broker is down)
        self.fail_flushes = False  # flushes fail, take-overs succeed
        self.fenced: set[Partition] = set()
        self.owned: set[Partition] = set()
        self.flushes = 0
        self.flush_started: list[float] = []  # loop time of each flush's start
        self.flush_parts: list[tuple[Partition, ...]] = []  # the partitions of each flush
        self.flush_records: list[int] = []  # how many records each flush carried
        self.delay_s = 0.0
        self.assign_gate: asyncio.Event | None = None  # take-overs wait for it when set
        self.assign_cleanup_s = 0.0  # a take-over cancelled at the gate takes this to end
        self.at_gate = 0  # take-overs waiting at the gate
        # At-least-once's two steps: records published, then (after this long) positions
        # committed; a flush cancelled in between has published without committing.
        self.commit_delay_s = 0.0
        # A commit whose answer is slow: stored, then answered this much later; a flush cut
        # short meanwhile leaves its partitions in doubt until ``settle``.
        self.answer_late_s = 0.0
        self.late: asyncio.Future[None] | None = None
        self.late_parts: frozenset[Partition] = frozenset()
        self.settle_fails = False  # the outcome of a commit cut short cannot be learnt
        self.violations: list[str] = []  # broken promises (each also fails its flush)

    @property
    def in_doubt(self) -> frozenset[Partition]:
        return self.late_parts if self.late is not None else frozenset()

    async def settle(self) -> bool:
        if self.late is None:
            self.violations.append("settle without a commit in doubt")
            return True
        if self.settle_fails:
            self.late = None
            raise ConnectionError("the producer that sent the commit is gone")
        await asyncio.shield(self.late)
        self.late, self.late_parts = None, frozenset()
        return True

    async def flush(self, batches: Mapping[Partition, Flush]) -> None:
        self.flushes += 1
        self.flush_started.append(asyncio.get_running_loop().time())
        self.flush_parts.append(tuple(sorted(batches)))
        self.flush_records.append(sum(len(b.records) for b in batches.values()))
        if self.late is not None:  # as a new producer on the id would: it goes ahead
            self.violations.append("a flush while a commit is in doubt")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail or self.fail_flushes:
            raise ConnectionError("broker unreachable")
        lost = [p for p in batches if p in self.fenced]
        done = [p for p in batches if p not in self.fenced]
        for part in done:
            self.published.extend(batches[part].records)
        if self.commit_delay_s:
            await asyncio.sleep(self.commit_delay_s)
        for part in done:
            self.log.committed[part] = batches[part].position
            self.log.metadata[part] = batches[part].metadata
        if self.answer_late_s:
            self.late = asyncio.ensure_future(asyncio.sleep(self.answer_late_s))
            self.late_parts = frozenset(done)
            await asyncio.shield(self.late)
            self.late, self.late_parts = None, frozenset()
        if lost:
            raise FlushError("fenced", done=done, lost=lost)

    async def assigned(self, parts: Sequence[Partition]) -> None:
        if self.assign_gate is not None:
            self.at_gate += 1
            try:
                await self.assign_gate.wait()
            except asyncio.CancelledError:  # as a producer half started is stopped
                await asyncio.sleep(self.assign_cleanup_s)
                raise
            finally:
                self.at_gate -= 1
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.owned.update(parts)
        self.fenced.difference_update(parts)  # a new producer epoch for them

    async def revoked(self, parts: Sequence[Partition]) -> None:
        self.owned.difference_update(parts)


class MemoryStagingSink(MemorySink):
    """A sink with exactly-once's staging: results are taken into an open transaction as
    they complete and committed by the flush with the positions, or dropped with it.

    It checks what the pipeline promises a staging sink: a flush holds every partition
    with staged results, each batch beginning with exactly the records staged for it.
    ``refuse`` makes every n-th stage refused (the flush then carries those records)."""

    def __init__(self, log: MemoryLog, *, refuse: int = 0) -> None:
        super().__init__(log)
        self.transaction = 0
        self.pending: dict[Partition, list[OutRecord]] = {}
        self.refuse = refuse
        self.stage_calls = 0
        self.staged_records = 0  # staged and then committed
        self.dropped = 0  # staged and then aborted
        self.flushing = False
        self.offered_while_flushing = 0  # stage calls the pipeline could have spared

    @property
    def accepting(self) -> bool:
        return not self.fail and not self.flushing and self.late is None

    def stage(self, part: Partition, records: Sequence[OutRecord]) -> bool:
        self.stage_calls += 1
        if not records:
            self.violations.append(f"{part}: nothing to stage")
        refused = self.refuse and self.stage_calls % self.refuse == 0
        # As the Kafka sink: nothing is staged while a flush is under way (the transaction
        # it commits is closed to new records; the next flush sends them).
        self.offered_while_flushing += self.flushing
        if not self.accepting or part not in self.owned or refused:
            return False
        self.pending.setdefault(part, []).extend(records)
        return True

    def _abort(self) -> None:
        self.dropped += sum(len(r) for r in self.pending.values())
        self.pending.clear()
        self.transaction += 1

    async def flush(self, batches: Mapping[Partition, Flush]) -> None:
        self.flushing = True
        try:
            await self._flush(batches)
        finally:
            self.flushing = False

    async def _flush(self, batches: Mapping[Partition, Flush]) -> None:
        pending, self.pending = self.pending, {}
        for part, records in pending.items():
            if part not in batches:
                self.violations.append(f"{part} has staged results and is not in the flush")
            elif list(batches[part].records[: len(records)]) != records:
                self.violations.append(f"{part}: the flush does not begin with what was staged")
        if self.violations:
            self.pending = pending
            self._abort()
            raise RuntimeError(self.violations[-1])
        try:
            await super().flush(batches)
        except BaseException as exc:
            done = exc.done if isinstance(exc, FlushError) else frozenset()
            self.staged_records += sum(len(r) for p, r in pending.items() if p in done)
            self.pending = {p: r for p, r in pending.items() if p not in done}
            self._abort()
            raise
        self.staged_records += sum(len(r) for r in pending.values())
        self.transaction += 1

    async def assigned(self, parts: Sequence[Partition]) -> None:
        if any(p in self.pending for p in parts):
            self._abort()
        await super().assigned(parts)

    async def revoked(self, parts: Sequence[Partition]) -> None:
        if any(p in self.pending for p in parts):
            self._abort()
        await super().revoked(parts)
