"""The duplicate-command window: which command ids already have a final result, and what it was.

A command id seen again within the window (a producer retry, a replay) sends no second
request: the processor answers it with ``cancel.duplicate``, carrying the first result's
outcome, or, when the record is the very one the first result answers (read again after a
restart), with nothing at all.

Contracts:

* **What counts.** Only final results: ``strategy.canceled`` and ``cancel.failed``, except a
  ``cancel.failed`` without a ``command_id`` (an ``invalid_command`` with nothing to key on).
  ``cancel.duplicate`` is never stored. A result that does not have the shape of the schema
  (:func:`first_result_of`) is ignored.
* **One entry per command id, the first result.** A later result for the same id does not
  replace it, with three exceptions: a re-driven command's result (its ``retry_of``,
  :mod:`worker.redrive`) replaces the re-drivable failure it retries; a result read back
  from the results topic replaces one that was only recorded by this process and has not
  been read back yet (what is on the topic is what every member can see); and so does a
  new result for the same record (the record was answered again because its first answer
  may not have been made durable).
* **Bounded.** By time: an entry whose result completed more than ``window_ms`` ago (by the
  result's ``completed_at``, on :attr:`SeenCommands.clock`) is forgotten. By count: beyond
  ``max_entries`` the oldest (by ``completed_at``) are forgotten first.
* **Survives a restart.** There is no database: :class:`ResultsFeed` rebuilds the window at
  start from the results topic (the results of the last ``window_ms``, up to the end
  offsets found at start), then follows the topic in the background, so results published
  by the other members of the group are known too. Results this process produces are
  recorded at once (:meth:`SeenCommands.add` with ``on_topic=False``), so a duplicate right
  behind its original is caught before the result is read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from worker import redrive
from worker.contracts import load_schema
from worker.errors import FailureReason
from worker.kafka_io import security_options
from worker.routes import Route
from worker.settings import Settings
from worker.timeutil import now_ms
from worker.topic_reader import ResultsReader

log = logging.getLogger(__name__)

FINAL_TYPES = frozenset({"strategy.canceled", "strategies.canceled", "cancel.failed"})
"""Result types that close a command for the window (``cancel.duplicate`` does not)."""

_REASONS = frozenset(r.value for r in FailureReason)
_ROUTES = frozenset(r.value for r in Route)
_ORDER_STATUSES = frozenset(
    load_schema("result-event.schema.json")["$defs"]["order_status"]["enum"]
)
PROGRESS_EVERY_S = 10.0
FOLLOW_RETRY_MAX_S = 30.0
FOLLOW_PACE_S = 0.25
"""How often the window takes in the results other members published. This process's own
results are recorded at once; the others' need not be prompt (a duplicate racing its
original across members is not caught either way), and following every transaction as it
commits would cost a fetch per transaction."""


class RecordAt(NamedTuple):
    """Where a command was read: topic, partition, offset."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class FirstResult:
    """The outcome of the first final result for a command id.

    ``reason`` is the failure reason of a ``cancel.failed``, None for ``strategy.canceled``
    and a kill switch's ``strategies.canceled`` (neither is a failure). ``route`` is the
    order's route of a ``strategy.canceled`` (always set), None for ``strategies.canceled``
    (a kill switch covers every route of its symbol). ``order_status`` is the canceled
    order's status of a ``strategy.canceled``, the ``order_status`` of a ``cancel.failed``,
    None for ``strategies.canceled``. The schema's ``first_result`` says the same, type by
    type."""

    type: str
    reason: str | None
    route: str | None
    order_status: str | None
    origin: RecordAt
    completed_at: int

    def as_dict(self) -> dict[str, Any]:
        """The ``first_result`` object of a ``cancel.duplicate`` event."""
        return {
            "type": self.type,
            "reason": self.reason,
            "route": self.route,
            "order_status": self.order_status,
            "origin": {
                "topic": self.origin.topic,
                "partition": self.origin.partition,
                "offset": self.origin.offset,
            },
            "completed_at": self.completed_at,
        }


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _one_of(value: object, allowed: frozenset[str]) -> str | None:
    """``value`` interned when it is one of ``allowed``, None otherwise."""
    return sys.intern(value) if isinstance(value, str) and value in allowed else None


def first_result_of(event: Mapping[str, Any]) -> tuple[str, FirstResult] | None:
    """The command id and outcome of a result event, or None when the event does not count
    for the window: not a final result, no ``command_id``, or not shaped as the schema says
    (an unknown reason, route or status, an origin or ``completed_at`` that is not one)."""
    kind = event.get("type")
    command_id = event.get("command_id")
    if kind not in FINAL_TYPES or not isinstance(command_id, str) or not command_id:
        return None
    origin = event.get("origin")
    if not isinstance(origin, Mapping):
        return None
    topic, partition, offset = origin.get("topic"), origin.get("partition"), origin.get("offset")
    completed_at = _int(event.get("completed_at"))
    partition, offset = _int(partition), _int(offset)
    if not isinstance(topic, str) or partition is None or offset is None or completed_at is None:
        return None
    route = event.get("route")
    if route is not None and _one_of(route, _ROUTES) is None:
        return None
    if kind == "strategies.canceled":  # a kill switch: many orders, no single route or status
        reason, status = None, None
    elif kind == "strategy.canceled":
        reason = None
        strategy = event.get("strategy")
        status = strategy.get("status") if isinstance(strategy, Mapping) else None
        if route is None:
            return None
    else:
        reason = _one_of(event.get("reason"), _REASONS)
        status = event.get("order_status")
        if reason is None:
            return None
    order_status = _one_of(status, _ORDER_STATUSES)
    if status is not None and order_status is None:
        return None
    first = FirstResult(
        type=sys.intern(kind),
        reason=reason,
        route=_one_of(route, _ROUTES),
        order_status=order_status,
        origin=RecordAt(sys.intern(topic), partition, offset),
        completed_at=completed_at,
    )
    return command_id, first


@dataclass(frozen=True, slots=True)
class Seen:
    """A window entry: the first result, and whether it was read back from the results topic
    (False: recorded by this process when it produced it, not read back yet)."""

    first: FirstResult
    on_topic: bool


# A window entry as stored: (type, reason, route, order_status, (topic, partition, offset),
# completed_at, on_topic). Exact tuples of str/int/bool/None, untracked by the collector.
_Packed = tuple[str, str | None, str | None, str | None, tuple[str, int, int], int, bool]
_ORIGIN: Final = 4
_COMPLETED_AT: Final = 5
_ON_TOPIC: Final = 6


def _pack(first: FirstResult, on_topic: bool) -> _Packed:
    origin = first.origin
    return (
        first.type,
        first.reason,
        first.route,
        first.order_status,
        (origin.topic, origin.partition, origin.offset),
        first.completed_at,
        on_topic,
    )


def _unpack(packed: _Packed) -> Seen:
    kind, reason, route, status, (topic, partition, offset), completed_at, on_topic = packed
    first = FirstResult(
        kind, reason, route, status, RecordAt(topic, partition, offset), completed_at
    )
    return Seen(first, on_topic)


class SeenCommands:
    """A bounded map command id → :class:`Seen` (see the module docstring). Pure: no I/O;
    time comes from ``clock`` (ms since the epoch)."""

    def __init__(
        self, window_ms: int, max_entries: int, *, clock: Callable[[], int] = now_ms
    ) -> None:
        if window_ms <= 0 or max_entries <= 0:
            raise ValueError("window_ms and max_entries must be positive")
        self.window_ms = window_ms
        self.max_entries = max_entries
        self.clock = clock
        # Entries are stored as plain tuples of plain values (_pack), which the garbage
        # collector stops tracking: as class instances, a window of a million commands was
        # millions of objects that every full collection walked, a pause every cancel in
        # hand waited out (see worker.app.settle_garbage_collector for the figures).
        self._entries: dict[str, _Packed] = {}
        # (completed_at, seq, command_id, entry), oldest first (seq breaks ties, so entries
        # are never compared); items of replaced entries stay until they surface (their
        # entry is no longer the command id's) or the heap is compacted.
        self._heap: list[tuple[int, int, str, _Packed]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, command_id: str) -> Seen | None:
        """The entry for ``command_id``, or None when it has none within the window."""
        self._expire(self.clock())
        packed = self._entries.get(command_id)
        return None if packed is None else _unpack(packed)

    def add(self, event: Mapping[str, Any], *, on_topic: bool) -> bool:
        """Record a result event if it counts (:func:`first_result_of`); ``on_topic``: it
        was read from the results topic. True when the window changed."""
        found = first_result_of(event)
        if found is None:
            return False
        return self.put(
            found[0], found[1], on_topic=on_topic, retries=redrive.retried_origin(event)
        )

    def put(
        self,
        command_id: str,
        first: FirstResult,
        *,
        on_topic: bool,
        retries: tuple[str, int, int] | None = None,
    ) -> bool:
        """Record ``first`` for ``command_id`` unless an entry it does not replace is there
        (see the module docstring) or it is already out of the window. ``retries``: where
        the failure that ``first`` re-drives was read (its ``retry_of``). True when the
        window changed."""
        now = self.clock()
        if first.completed_at < now - self.window_ms:
            return False
        old = self._entries.get(command_id)
        if old is not None:
            same_record = old[_ORIGIN] == first.origin
            redriven = (
                retries is not None
                and old[_ORIGIN] == tuple(retries)
                and redrive.may_redrive(old[0], old[1], redrive.REDRIVABLE)
            )
            if not redriven and (old[_ON_TOPIC] or not (on_topic or same_record)):
                return False
        self._seq += 1
        entry = self._entries[command_id] = _pack(first, on_topic)
        heapq.heappush(self._heap, (first.completed_at, self._seq, command_id, entry))
        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._compact()
        self._expire(now)
        return command_id in self._entries

    def _expire(self, now: int) -> None:
        oldest_kept = now - self.window_ms
        heap, entries = self._heap, self._entries
        while heap and (heap[0][0] < oldest_kept or len(entries) > self.max_entries):
            _, _, command_id, entry = heapq.heappop(heap)
            if entries.get(command_id) is entry:
                del entries[command_id]

    def _compact(self) -> None:
        self._heap = [
            (e[_COMPLETED_AT], seq, c, e) for seq, (c, e) in enumerate(self._entries.items())
        ]
        self._seq = len(self._heap)
        heapq.heapify(self._heap)


class ResultsFeed:
    """Fills a :class:`SeenCommands` from the results topic: :meth:`start` rebuilds the
    window (the results since ``now - window_ms``, up to the end offsets found at start)
    and then follows the topic in a background task until :meth:`stop`.

    ``start`` raises when the results cannot be read (the topic is missing, the read
    stalls, Kafka cannot be reached): a worker without its window would answer
    duplicates with second requests. A failure while following is logged and retried
    with backoff; the window keeps what it has meanwhile."""

    def __init__(self, seen: SeenCommands, settings: Settings) -> None:
        self._seen = seen
        self._settings = settings
        self._reader: ResultsReader | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self._settings
        self._reader = reader = ResultsReader(
            settings.bootstrap_servers,
            settings.results_topic,
            client_id=f"{settings.client_id}-dedup",
            request_timeout_ms=settings.kafka_request_timeout_ms,
            **security_options(settings),
        )
        await reader.start()
        await self._load(reader)
        self._task = asyncio.create_task(self._follow(reader), name="dedup-follow")

    async def _load(self, reader: ResultsReader) -> None:
        seen = self._seen
        since = seen.clock() - seen.window_ms
        started = last_said = time.monotonic()
        read = 0
        async for result in reader.read_since(since):
            read += 1
            seen.add(result.event, on_topic=True)
            if time.monotonic() - last_said >= PROGRESS_EVERY_S:
                last_said = time.monotonic()
                log.info(
                    "duplicate window: %d result(s) read from %s so far (%.1fs), %d command id(s)",
                    read,
                    reader.topic,
                    last_said - started,
                    len(seen),
                )
        log.info(
            "duplicate window rebuilt: %d result(s) of the last %d ms read from %s in %.1fs; "
            "%d command id(s) in the window",
            read,
            seen.window_ms,
            reader.topic,
            time.monotonic() - started,
            len(seen),
        )

    async def _follow(self, reader: ResultsReader) -> None:
        delay = 1.0
        while True:
            try:
                async for result in reader.follow(pace_s=FOLLOW_PACE_S):
                    self._seen.add(result.event, on_topic=True)
                    delay = 1.0
            except Exception as exc:  # noqa: BLE001 - keep following; the window stays
                log.warning(
                    "following %s for the duplicate window failed (retrying in %.0fs): %r",
                    reader.topic,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, FOLLOW_RETRY_MAX_S)

    async def stop(self) -> None:
        """Stop following and close the reader (safe to call whether or not it started)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
