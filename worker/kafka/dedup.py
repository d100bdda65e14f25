"""The duplicate-command window: which commands already have a final result, and what it was.

A command seen again within the window (a producer retry, a replay) sends no second
request: the processor answers it with ``cancel.duplicate``, carrying the first result's
outcome, or, when the record is the very one the first result answers (read again after a
restart), with nothing at all. The same command id with other content is refused
(``id_conflict``), never taken for a duplicate.

Contracts:

* **Key and fingerprint.** An entry is keyed on (``account``, ``command_id``): a command id
  is a producer's name for one cancel of one account, and claiming it for another account
  claims nothing. Each entry keeps the command's content fingerprint
  (:func:`worker.core.events.fingerprint`, carried by every result as ``fingerprint``): a command
  whose key is in the window with another fingerprint is a conflict, not a duplicate. An
  entry rebuilt from a result written before results carried fingerprints has none, and
  matches any content (what the window did before).
* **What counts.** Only final results of commands that were taken up: ``strategy.canceled``,
  ``strategies.canceled`` and ``cancel.failed``, except the refusals (:data:`REFUSED`:
  ``invalid_command``, ``unknown_account``, ``unauthorized``, ``id_conflict``), which cost
  no request and no rate budget: remembering them would let anyone fill the window, or
  claim a command id in advance, with records that cost nothing. They still get their
  result, every time they are read. ``cancel.duplicate`` is never stored. A result that
  does not have the shape of the schema (:func:`first_result_of`) is ignored.
* **One entry per key, the first result.** A later result for the same key does not
  replace it, with three exceptions: a re-driven command's result (its ``retry_of``,
  :mod:`worker.core.redrive`) replaces the re-drivable failure it retries; a result read back
  from the results topic replaces one that was only recorded by this process and has not
  been read back yet (what is on the topic is what every member can see); and so does a
  new result for the same record (the record was answered again because its first answer
  may not have been made durable).
* **Bounded, in time and in bytes.** By time: an entry whose result completed more than
  ``window_ms`` ago (by the result's ``completed_at``, on :attr:`SeenCommands.clock`) is
  forgotten. By count: beyond ``max_entries`` the first recorded are forgotten first
  (results arrive nearly in the order they completed). An entry is fixed-size whatever the
  command: a 128-bit keyed BLAKE2b digest of the key (an int) and one packed bytes value
  (:data:`_VALUE`), so :data:`ENTRY_BYTES_MAX` bounds the bytes an entry costs, measured at
  its worst (tests/test_seen_commands.py), and ``max_entries`` bounds the window in bytes.
* **Survives a restart.** There is no database: :class:`ResultsFeed` rebuilds the window at
  start from the results topic (the results of the last ``window_ms``, up to the end
  offsets found at start), then follows the topic in the background, so results published
  by the other members of the group are known too. Results this process produces are
  recorded at once (:meth:`SeenCommands.add` with ``on_topic=False``), so a duplicate right
  behind its original is caught before the result is read back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from worker.core import redrive
from worker.core.contracts import load_schema
from worker.core.errors import FailureReason
from worker.core.redrive import RecordAt
from worker.core.routes import Route
from worker.core.timeutil import now_ms
from worker.kafka.io import security_options
from worker.kafka.topic_reader import ResultsReader
from worker.settings import Settings

log = logging.getLogger(__name__)

FINAL_TYPES = frozenset({"strategy.canceled", "strategies.canceled", "cancel.failed"})
"""Result types that close a command for the window (``cancel.duplicate`` does not)."""

REFUSED: frozenset[str] = frozenset(
    r.value
    for r in (
        FailureReason.INVALID_COMMAND,
        FailureReason.UNKNOWN_ACCOUNT,
        FailureReason.UNAUTHORIZED,
        FailureReason.ID_CONFLICT,
    )
)
"""Failures of commands that were refused before any request or rate budget was spent:
never remembered (see the module docstring)."""

ENTRY_BYTES_MAX: Final = 340
"""What one entry costs at most, in bytes, whatever its command id (up to 64 characters)
and account: the key int (48), the packed value (80), its share of the dict (30 to 120:
a dict's table is a third to a sixth full after it grows) and of the queue, with the
earlier places of replaced entries up to the compaction bound and a resize's transient
copy. tracemalloc measures 324 at the worst point (tests/test_seen_commands.py); 170-190
for a window filled once. Times ``DEDUP_MAX_ENTRIES`` it bounds the window."""

WORKER_BASE_BYTES: Final = 160 * 1024 * 1024
"""The peak resident memory of a worker besides its duplicate window (interpreter,
libraries, Kafka clients, commands in hand, a flood of refusals, a rebuild), with room to
spare: ``python -m tests.bench.window`` measured 88 MiB with 3,000 entries, and 166 MiB
rebuilding 300,000 entries from 1,300,000 results, about 110 MiB besides the window
(docs/duplicate-window.md). The Deployment's memory limit must hold this plus
``ENTRY_BYTES_MAX`` times ``DEDUP_MAX_ENTRIES`` (tests/test_seen_commands.py checks the
manifest)."""

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

FINGERPRINT_BYTES: Final = 16
_NO_FINGERPRINT: Final = bytes(FINGERPRINT_BYTES)  # packed for an entry without one


@dataclass(frozen=True, slots=True)
class FirstResult:
    """The outcome of the first final result for a command.

    ``reason`` is the failure reason of a ``cancel.failed``, None for ``strategy.canceled``
    and a kill switch's ``strategies.canceled`` (neither is a failure). ``route`` is the
    order's route of a ``strategy.canceled`` (always set), None for ``strategies.canceled``
    (a kill switch covers every route of its symbol). ``order_status`` is the canceled
    order's status of a ``strategy.canceled``, the ``order_status`` of a ``cancel.failed``,
    None for ``strategies.canceled``. The schema's ``first_result`` says the same, type by
    type. ``fingerprint`` is the command's content fingerprint (16 bytes), None when the
    result carried none (written before results did): it then matches any content."""

    type: str
    reason: str | None
    route: str | None
    order_status: str | None
    origin: RecordAt
    completed_at: int
    fingerprint: bytes | None = None

    def as_dict(self) -> dict[str, Any]:
        """The ``first_result`` object of a ``cancel.duplicate`` event."""
        return {
            "type": self.type,
            "reason": self.reason,
            "route": self.route,
            "order_status": self.order_status,
            "origin": self.origin.as_dict(),
            "completed_at": self.completed_at,
        }

    def matches(self, fingerprint: bytes) -> bool:
        """Whether a command with ``fingerprint`` is the one this result answered (always,
        when the result carried no fingerprint)."""
        return self.fingerprint is None or self.fingerprint == fingerprint


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _one_of(value: object, allowed: frozenset[str]) -> str | None:
    """``value`` interned when it is one of ``allowed``, None otherwise."""
    return sys.intern(value) if isinstance(value, str) and value in allowed else None


def _fingerprint(value: object) -> tuple[bool, bytes | None]:
    """(well-formed, bytes) of a result's ``fingerprint``: (True, None) when it has none."""
    if value is None:
        return True, None
    if not isinstance(value, str) or len(value) != 2 * FINGERPRINT_BYTES:
        return False, None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return False, None
    return value == raw.hex(), raw  # lowercase only, as the schema says


class Found(NamedTuple):
    """What :func:`first_result_of` found in a result: the window's key and the outcome."""

    account: str
    command_id: str
    first: FirstResult


def first_result_of(event: Mapping[str, Any]) -> Found | None:
    """The key and outcome of a result event, or None when the event does not count for the
    window: not a final result, a refusal (:data:`REFUSED`), no ``account`` or
    ``command_id``, or not shaped as the schema says (an unknown reason, route or status,
    an origin, ``completed_at`` or ``fingerprint`` that is not one)."""
    kind = event.get("type")
    command_id = event.get("command_id")
    account = event.get("account")
    if kind not in FINAL_TYPES or not isinstance(command_id, str) or not command_id:
        return None
    if not isinstance(account, str) or not account:
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
        if reason is None or reason in REFUSED:
            return None
    order_status = _one_of(status, _ORDER_STATUSES)
    if status is not None and order_status is None:
        return None
    well_formed, fingerprint = _fingerprint(event.get("fingerprint"))
    if not well_formed:
        return None
    first = FirstResult(
        type=sys.intern(kind),
        reason=reason,
        route=_one_of(route, _ROUTES),
        order_status=order_status,
        origin=RecordAt(sys.intern(topic), partition, offset),
        completed_at=completed_at,
        fingerprint=fingerprint,
    )
    return Found(account, command_id, first)


@dataclass(frozen=True, slots=True)
class Seen:
    """A window entry: the first result, and whether it was read back from the results topic
    (False: recorded by this process when it produced it, not read back yet)."""

    first: FirstResult
    on_topic: bool


# An entry's value, packed into one bytes object of fixed size: completed_at, the codes of
# type, reason, route and order status (0: None), the origin's topic (an index into the
# window's topic table), partition and offset, the fingerprint (zeros: none), and last the
# on_topic flag (so that a result read back changes only the last byte).
_VALUE: Final = struct.Struct(">QBBBBHIQ16sB")
_TYPES: Final = (None, *sorted(FINAL_TYPES))
_REASON_CODES: Final = (None, *sorted(_REASONS))
_ROUTE_CODES: Final = (None, *sorted(_ROUTES))
_STATUS_CODES: Final = (None, *sorted(_ORDER_STATUSES))
_MAX_TOPICS: Final = 0xFFFF
_MAX_PARTITION: Final = 0xFFFFFFFF
_MAX_U64: Final = (1 << 64) - 1


def _codes(names: tuple[str | None, ...]) -> dict[str | None, int]:
    return {name: i for i, name in enumerate(names)}


_TYPE_OF: Final = _codes(_TYPES)
_REASON_OF: Final = _codes(_REASON_CODES)
_ROUTE_OF: Final = _codes(_ROUTE_CODES)
_STATUS_OF: Final = _codes(_STATUS_CODES)


def _completed_at(value: bytes) -> int:
    return int.from_bytes(value[:8])


class SeenCommands:
    """A bounded map (account, command id) → :class:`Seen` (see the module docstring). Pure:
    no I/O; time comes from ``clock`` (ms since the epoch).

    Storage, bounded in bytes and with nothing for the garbage collector to walk: a dict from
    the key's digest (a 128-bit int: BLAKE2b keyed with a secret of this process, so nobody
    can choose keys that collide) to a packed bytes value (:data:`_VALUE`), and a queue of
    the keys in the order their entries were recorded. Entries are forgotten from the head
    of the queue: while the head's result is older than the window, or the window holds
    more than ``max_entries`` (results arrive nearly in the order they completed; one that
    arrives late is still never reported once it is older than the window). A replaced
    entry goes to the tail; its earlier place is skipped (``_stale`` counts such places)."""

    def __init__(
        self, window_ms: int, max_entries: int, *, clock: Callable[[], int] = now_ms
    ) -> None:
        if window_ms <= 0 or max_entries <= 0:
            raise ValueError("window_ms and max_entries must be positive")
        self.window_ms = window_ms
        self.max_entries = max_entries
        self.clock = clock
        self._secret = os.urandom(16)
        self._entries: dict[int, bytes] = {}
        # Every key of _entries is in _order 1 + _stale[key] times; the last place is its
        # entry's, the earlier ones are skipped when they reach the head.
        self._order: collections.deque[int] = collections.deque()
        self._stale: dict[int, int] = {}
        self._topics: list[str] = []
        self._topic_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, account: str, command_id: str) -> int:
        raw = f"{len(account)}:{account}:{command_id}".encode("utf-8", "surrogatepass")
        return int.from_bytes(hashlib.blake2b(raw, digest_size=16, key=self._secret).digest())

    def get(self, account: str, command_id: str) -> Seen | None:
        """The entry for (``account``, ``command_id``), or None when it has none within the
        window."""
        now = self.clock()
        self._expire(now)
        packed = self._entries.get(self._key(account, command_id))
        if packed is None or _completed_at(packed) < now - self.window_ms:
            return None
        return self._unpack(packed)

    def add(self, event: Mapping[str, Any], *, on_topic: bool) -> bool:
        """Record a result event if it counts (:func:`first_result_of`); ``on_topic``: it
        was read from the results topic. True when the window changed."""
        found = first_result_of(event)
        if found is None:
            return False
        return self.put(
            found.account,
            found.command_id,
            found.first,
            on_topic=on_topic,
            retries=redrive.retried_origin(event),
        )

    def put(
        self,
        account: str,
        command_id: str,
        first: FirstResult,
        *,
        on_topic: bool,
        retries: tuple[str, int, int] | None = None,
    ) -> bool:
        """Record ``first`` for (``account``, ``command_id``) unless an entry it does not
        replace is there (see the module docstring) or it is already out of the window.
        ``retries``: where the failure that ``first`` re-drives was read (its
        ``retry_of``). True when the window changed."""
        now = self.clock()
        oldest_kept = now - self.window_ms
        if first.completed_at < oldest_kept:
            return False
        value = self._pack(first, on_topic)
        if value is None:
            return False
        key = self._key(account, command_id)
        old = self._entries.get(key)
        if old is not None and _completed_at(old) >= oldest_kept:
            held = self._unpack(old)
            same_record = held.first.origin == first.origin
            redriven = (
                retries is not None
                and held.first.origin == tuple(retries)
                and redrive.may_redrive(held.first.type, held.first.reason, redrive.REDRIVABLE)
            )
            if not redriven and (held.on_topic or not (on_topic or same_record)):
                return False
            if value[:-1] == old[:-1]:  # the same result: only its flag changes, in place
                self._entries[key] = value
                return value != old
        if old is not None:
            self._stale[key] = self._stale.get(key, 0) + 1
        self._entries[key] = value
        self._order.append(key)
        if len(self._order) > len(self._entries) + len(self._entries) // 4 + 1024:
            self._compact()
        self._expire(now)
        return key in self._entries

    def _pack(self, first: FirstResult, on_topic: bool) -> bytes | None:
        """The packed value, or None when it cannot be packed (a number beyond its field, a
        topic beyond the table: never from a result of the schema)."""
        origin = first.origin
        codes = (
            _TYPE_OF.get(first.type),
            _REASON_OF.get(first.reason),
            _ROUTE_OF.get(first.route),
            _STATUS_OF.get(first.order_status),
        )
        fingerprint = first.fingerprint if first.fingerprint is not None else _NO_FINGERPRINT
        if (
            None in codes
            or len(fingerprint) != FINGERPRINT_BYTES
            or not 0 <= origin.partition <= _MAX_PARTITION
            or not 0 <= origin.offset <= _MAX_U64
            or not 0 <= first.completed_at <= _MAX_U64
        ):
            return None
        topic = self._topic_of.get(origin.topic)
        if topic is None:
            if len(self._topics) >= _MAX_TOPICS:
                return None
            topic = self._topic_of[origin.topic] = len(self._topics)
            self._topics.append(origin.topic)
        return _VALUE.pack(
            first.completed_at,
            *codes,
            topic,
            origin.partition,
            origin.offset,
            fingerprint,
            1 if on_topic else 0,
        )

    def _unpack(self, packed: bytes) -> Seen:
        completed_at, kind, reason, route, status, topic, partition, offset, fp, on_topic = (
            _VALUE.unpack(packed)
        )
        first = FirstResult(
            type=str(_TYPES[kind]),
            reason=_REASON_CODES[reason],
            route=_ROUTE_CODES[route],
            order_status=_STATUS_CODES[status],
            origin=RecordAt(self._topics[topic], partition, offset),
            completed_at=completed_at,
            fingerprint=None if fp == _NO_FINGERPRINT else fp,
        )
        return Seen(first, bool(on_topic))

    def _expire(self, now: int) -> None:
        oldest_kept = now - self.window_ms
        order, entries, stale = self._order, self._entries, self._stale
        while order:
            key = order[0]
            skipped = stale.get(key)
            if skipped:  # an earlier place of a replaced entry
                order.popleft()
                if skipped == 1:
                    del stale[key]
                else:
                    stale[key] = skipped - 1
                continue
            if len(entries) <= self.max_entries and _completed_at(entries[key]) >= oldest_kept:
                return
            order.popleft()
            del entries[key]

    def _compact(self) -> None:
        """Drop the earlier places of replaced entries from the queue."""
        skip = self._stale
        kept: collections.deque[int] = collections.deque()
        for key in self._order:
            skipped = skip.get(key)
            if skipped:
                skip[key] = skipped - 1
            else:
                kept.append(key)
        self._order = kept
        self._stale = {}


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
