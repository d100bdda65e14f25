"""One record in, its outgoing records out: decode, execute, build the result event.

Never raises: an invalid record becomes ``cancel.failed``/``invalid_command`` plus a copy of
its raw bytes on the dead-letter topic; an unexpected error while executing becomes
``outcome_unknown`` (the request may have been sent, so nothing is claimed).

Any record Kafka can carry is accounted for, and nothing this module publishes can be
larger than the dead-letter limit (``deadletter_max_bytes``), so no record can stop the
worker (or, by stopping every member in turn, the group):

* A null key is fine: the record is processed, and its results are published without a key.
  A null value (a tombstone) is an invalid command. A header without a value stays None,
  in the dead-letter copy too.
* A record whose key is longer than ``max_key_bytes`` (:data:`MAX_KEY_BYTES`), or whose
  headers add up (names plus values) to more than ``max_header_bytes``
  (:data:`MAX_HEADER_BYTES`), is not executed, even if its value is a valid command: it is
  an invalid command whose detail says which bound it broke (identifying fields of the value
  are kept in the event where they are well-formed).
* Key rule: the result and the dead-letter copy of a record are keyed with the record's key,
  except when that key is longer than ``max_key_bytes``; then with a bounded stand-in, its
  first :data:`KEY_HEAD_BYTES` bytes, ``b"...sha256:"`` and the 64-hex-digit SHA-256 of the
  whole key (at most 138 bytes). The stand-in depends only on the key, so every record with
  the same oversize key still lands in the same partition, in order. (The event's
  ``origin.key`` is the key as text, clipped to 256 characters, as for every record.)
* The dead-letter copy as a whole fits in ``deadletter_max_bytes``, counted with
  :func:`record_bytes` (key, value, header names and values, plus Kafka's framing at its
  largest). Room is given in this order: the key (or its stand-in) and the worker's own
  headers (``x-source-topic``, ``x-source-partition``, ``x-source-offset``, ``x-error``,
  ``x-null-value``, and, where they apply, ``x-key-truncated-from: <key bytes>``,
  ``x-truncated-from: <value bytes>``, ``x-headers-dropped: <count>``); then the record's
  own headers, in order, each kept if it still fits both ``max_header_bytes`` and the
  remaining room, dropped otherwise (so one huge header does not push out the small ones
  after it); then the value, cut to its head if it does not fit. The whole record stays at
  its source offset.

Duplicate commands (with a :class:`~worker.kafka.dedup.SeenCommands` window; ``seen`` None turns
it off): a valid command whose (``account``, ``command_id``) already has a final result in
the window is not executed. When that result was for other content (another
:func:`~worker.core.events.fingerprint`), the command gets ``cancel.failed``/``id_conflict``,
no request, and the window keeps the first result. When the result answers another record
(a producer retry, a replay), the command gets one ``cancel.duplicate`` event carrying the
first result's outcome. When it answers this very record (same topic, partition and
offset: the record is read again, after a restart or by a new group, and its result is
already on the results topic), nothing is published. A record this process answered whose
result has not been read back from the results topic yet is answered again: its first
answer may not have been made durable. Every final result the processor produces is
recorded in the window at once, except refusals (``invalid_command``, ``unknown_account``,
``unauthorized``, ``id_conflict``: :data:`worker.kafka.dedup.REFUSED`), which cost no request
and are answered again whenever they are read. Invalid commands are never checked against
the window.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

from worker import metrics, tracing
from worker.core import events, redrive
from worker.core.commands import Command, InvalidCommand, decode
from worker.core.decisions import Outcome
from worker.core.errors import FailureReason
from worker.core.events import Origin
from worker.core.fit import GROUPS, fit_kill_switch
from worker.executor import CancelExecutor
from worker.kafka.dedup import FirstResult, Seen, SeenCommands
from worker.kafka.pipeline import InRecord, OutRecord
from worker.producers import PRODUCER_HEADER, Producer, Producers, Refusal

log = logging.getLogger(__name__)

# Header names (schemas/asyncapi.yaml documents them; tests/test_asyncapi.py holds both equal).
TYPE_HEADER = "type"
"""Every result record's header: the event's ``type``."""
SOURCE_TOPIC_HEADER = "x-source-topic"
SOURCE_PARTITION_HEADER = "x-source-partition"
SOURCE_OFFSET_HEADER = "x-source-offset"
ERROR_HEADER = "x-error"
NULL_VALUE_HEADER = "x-null-value"
KEY_TRUNCATED_FROM_HEADER = "x-key-truncated-from"
TRUNCATED_FROM_HEADER = "x-truncated-from"
HEADERS_DROPPED_HEADER = "x-headers-dropped"
DEADLETTER_HEADERS = (
    SOURCE_TOPIC_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_OFFSET_HEADER,
    ERROR_HEADER,
    NULL_VALUE_HEADER,
    KEY_TRUNCATED_FROM_HEADER,
    TRUNCATED_FROM_HEADER,
    HEADERS_DROPPED_HEADER,
)
"""The headers the worker adds to a dead-letter copy (the record's own headers follow)."""

MAX_KEY_BYTES = 4096
"""A longer record key is refused (and replaced by a stand-in where it is published)."""
MAX_HEADER_BYTES = 64 * 1024
"""Records whose header names and values add up to more are refused."""
KEY_HEAD_BYTES = 64
"""How much of an oversize key its stand-in keeps, before the digest."""
_STAND_IN_BYTES = KEY_HEAD_BYTES + len(b"...sha256:") + 64

# Kafka's framing at its largest: the record batch header (61 bytes) plus one record's
# length, attributes, timestamp and offset deltas and the key, value and header-count
# varints (< 40 bytes); each header adds two length varints (<= 5 bytes each).
RECORD_OVERHEAD = 128
HEADER_OVERHEAD = 10
# Room a dead-letter copy needs besides the key: the worker's own headers (the error clipped
# to _ERROR_MAX bytes, a topic name of up to 249 characters), with framing.
_DEADLETTER_ROOM = 4096
_ERROR_MAX = 1024
_NUMBER_MAX = 20  # digits of any size or count written in a header

Header = tuple[str, bytes | None]


def header_bytes(name: str, value: bytes | None) -> int:
    """The size of one header as the record's header bound counts it: name plus value."""
    return len(name.encode("utf-8", errors="surrogatepass")) + (
        len(value) if value is not None else 0
    )


def record_bytes(record: OutRecord) -> int:
    """An upper bound of the size of ``record`` on the wire, as one record in its own batch."""
    return (
        RECORD_OVERHEAD
        + (len(record.key) if record.key is not None else 0)
        + len(record.value)
        + sum(HEADER_OVERHEAD + header_bytes(n, v) for n, v in record.headers)
    )


def key_stand_in(key: bytes) -> bytes:
    """The bounded key published in place of an oversize one (see the module docstring)."""
    return key[:KEY_HEAD_BYTES] + b"...sha256:" + hashlib.sha256(key).hexdigest().encode()


class CommandProcessor:
    def __init__(
        self,
        executor: CancelExecutor,
        *,
        results_topic: str,
        deadletter_topic: str,
        max_command_bytes: int,
        deadletter_max_bytes: int = 1_000_000,
        max_key_bytes: int = MAX_KEY_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
        clock: Callable[[], int],
        seen: SeenCommands | None = None,
        producers: Producers | None = None,
        group: str | None = None,
    ) -> None:
        """``group``: the consumer group reading the commands (named on the spans)."""
        if max_key_bytes <= 0 or max_header_bytes < 0:
            raise ValueError("max_key_bytes must be positive, max_header_bytes not negative")
        smallest = max(max_key_bytes, _STAND_IN_BYTES) + _DEADLETTER_ROOM
        if deadletter_max_bytes < smallest:
            raise ValueError(
                f"deadletter_max_bytes must be at least {smallest} "
                f"(a {max_key_bytes}-byte key plus the dead-letter headers)"
            )
        self._executor = executor
        self._results_topic = results_topic
        self._deadletter_topic = deadletter_topic
        self._max_command_bytes = max_command_bytes
        self._deadletter_max_bytes = deadletter_max_bytes
        self._max_key_bytes = max_key_bytes
        self._max_header_bytes = max_header_bytes
        self._clock = clock
        self._seen = seen
        # None: commands are not verified (REQUIRE_SIGNED_COMMANDS=false).
        self._producers = producers
        self._group = group

    async def __call__(self, record: InRecord) -> Sequence[OutRecord]:
        if tracing.ON:
            with tracing.process_span(
                record.topic,
                record.partition,
                record.offset,
                record.key,
                record.value,
                record.headers,
                self._group,
            ):
                return await self._handle(record)
        return await self._handle(record)

    async def _handle(self, record: InRecord) -> Sequence[OutRecord]:
        received_at = self._clock()
        origin = Origin(record.topic, record.partition, record.offset, record.key)
        if tracing.ON:
            with tracing.span(tracing.VALIDATE) as span:
                checked = self._check(record)
                if not isinstance(checked, tuple):
                    span.set_attribute(tracing.ERROR_TYPE, _refusal_kind(checked))
        else:
            checked = self._check(record)
        if isinstance(checked, Refusal):
            return self._unauthorized(record, origin, checked, received_at)
        if isinstance(checked, InvalidCommand):
            return self._invalid(record, origin, checked, received_at)
        decoded = checked[1]
        redrives = redrive.redrive_header(record.headers)
        retry_of: dict[str, object] | None = None
        verified_redrive = False
        if self._seen is not None:
            seen = self._seen.get(decoded.account, decoded.command_id)
            if seen is not None:
                first = seen.first
                fingerprint = events.fingerprint(decoded)
                if not first.matches(fingerprint):
                    return self._conflict(record, origin, decoded, first, fingerprint, received_at)
                if redrive.passes_window(redrives, first.type, first.reason, first.origin):
                    retry_of = redrive.retry_of(first.origin, first.reason, first.completed_at)
                    verified_redrive = True
                    log.info(
                        "command_id=%s at %s[%d]@%d re-drives its %s/%s at %s[%d]@%d",
                        decoded.command_id,
                        record.topic,
                        record.partition,
                        record.offset,
                        first.type,
                        first.reason,
                        first.origin.topic,
                        first.origin.partition,
                        first.origin.offset,
                    )
                else:
                    repeat = self._repeat(record, origin, decoded, seen, received_at)
                    if repeat is not None:
                        return repeat
        if retry_of is None and redrives is not None:
            # Nothing in the window to check the claim against (it was forgotten, or the
            # window is off): processed like any command; the result names what the copy
            # says it retries, with the reason only as the copy's header states it.
            claimed = dict(record.headers).get(redrive.REDRIVE_REASON)
            reason = claimed.decode("ascii", "replace") if claimed is not None else None
            retry_of = redrive.retry_of(redrives, reason, None)
        try:
            outcome = await self._executor.execute(decoded, received_at, redrive=verified_redrive)
        except Exception:
            log.exception("unexpected error executing command_id=%s", decoded.command_id)
            outcome = Outcome(
                False,
                0,
                reason=FailureReason.OUTCOME_UNKNOWN,
                detail="internal error while executing; outcome not claimed",
            )
        event = self._event(decoded, origin, outcome, received_at)
        if retry_of is not None:
            event["retry_of"] = retry_of
        self._remember(event)
        return [self._result(record, event)]

    def _check(
        self, record: InRecord
    ) -> tuple[Producer | None, Command] | Refusal | InvalidCommand:
        """Who sent the record and its command, or why it is refused: who sent it comes
        first (an unsigned or forged record is refused before its value is read, and never
        reaches the duplicate window), then the command, its bounds, and whether its
        producer may send it."""
        producer: Producer | None = None
        if self._producers is not None:
            verified = self._producers.verify(record.headers, record.value)
            if isinstance(verified, Refusal):
                return verified
            producer = verified
        decoded = decode(record.value, self._max_command_bytes)
        oversize = self._oversize(record)
        if oversize is not None:
            decoded = _refused(decoded, oversize)
        if isinstance(decoded, InvalidCommand):
            return decoded
        if producer is not None:
            refused = Producers.entitled(producer, decoded.account, decoded.is_sweep)
            if refused is not None:
                return refused
        return producer, decoded

    def _repeat(
        self, record: InRecord, origin: Origin, command: Command, seen: Seen, received_at: int
    ) -> Sequence[OutRecord] | None:
        """What to publish for a command whose id is in the window (see the module
        docstring), or None when the record is to be processed."""
        first = seen.first
        if first.origin == redrive.RecordAt(record.topic, record.partition, record.offset):
            if not seen.on_topic:
                log.info(
                    "command_id=%s at %s[%d]@%d read again before its result was read back "
                    "from the results topic; answering it again",
                    command.command_id,
                    record.topic,
                    record.partition,
                    record.offset,
                )
                return None
            log.info(
                "command_id=%s at %s[%d]@%d already answered (%s, on the results topic); "
                "nothing published",
                command.command_id,
                record.topic,
                record.partition,
                record.offset,
                first.type,
            )
            metrics.ALREADY_ANSWERED.inc()
            return []
        event = events.duplicate(command, origin, first.as_dict(), received_at, self._clock())
        log.info(
            "duplicate command_id=%s account=%s at %s[%d]@%d: first answered at %s[%d]@%d "
            "(type=%s reason=%s); no request sent",
            command.command_id,
            command.account,
            record.topic,
            record.partition,
            record.offset,
            first.origin.topic,
            first.origin.partition,
            first.origin.offset,
            first.type,
            first.reason,
        )
        return [self._result(record, event)]

    def _conflict(
        self,
        record: InRecord,
        origin: Origin,
        command: Command,
        first: FirstResult,
        fingerprint: bytes,
        received_at: int,
    ) -> Sequence[OutRecord]:
        """``cancel.failed``/``id_conflict`` for a command whose (account, command id) the
        window holds for other content: no request, and not remembered (the first result
        stays the id's). Never a duplicate: that would tell its producer that a command it
        never sent was answered for it."""
        at = first.origin
        detail = (
            f"command_id {command.command_id} of account {command.account} was already "
            f"answered ({first.type}) for a command with other content (fingerprint "
            f"{first.fingerprint.hex() if first.fingerprint else '?'}, this one "
            f"{fingerprint.hex()}), read at {at.topic}[{at.partition}]@{at.offset}; "
            "nothing sent"
        )
        event = events.failed(
            command,
            origin,
            FailureReason.ID_CONFLICT,
            detail,
            0,
            received_at,
            self._clock(),
            hint="use a new command_id for each cancel; a retry must repeat the command as sent",
        )
        log.warning(
            "command id conflict command_id=%s account=%s at %s[%d]@%d: answered at %s[%d]@%d "
            "for other content; no request sent",
            command.command_id,
            command.account,
            record.topic,
            record.partition,
            record.offset,
            at.topic,
            at.partition,
            at.offset,
        )
        return [self._result(record, event)]

    def _remember(self, event: dict[str, object]) -> None:
        """Record a final result in the window as soon as it is produced (a refusal is
        not remembered: :data:`worker.kafka.dedup.REFUSED`)."""
        if self._seen is not None:
            self._seen.add(event, on_topic=False)

    def _oversize(self, record: InRecord) -> str | None:
        """Why the record's key or headers are too large to process, or None."""
        limit = self._max_key_bytes
        if record.key is not None and len(record.key) > limit:
            return f"record key of {len(record.key)} bytes exceeds the {limit}-byte limit"
        size = sum(header_bytes(n, v) for n, v in record.headers)
        if size > self._max_header_bytes:
            return f"record headers of {size} bytes exceed the {self._max_header_bytes}-byte limit"
        return None

    def _key(self, record: InRecord) -> bytes | None:
        """The key to publish a record's results and dead-letter copy with."""
        key = record.key
        if key is not None and len(key) > self._max_key_bytes:
            return key_stand_in(key)
        return key

    def _event(
        self, command: Command, origin: Origin, outcome: Outcome, received_at: int
    ) -> dict[str, object]:
        completed_at = self._clock()
        if outcome.canceled and outcome.sweep is not None:
            event = events.strategies_canceled(
                command, origin, outcome.sweep, outcome.attempts, received_at, completed_at
            )
        elif outcome.canceled and outcome.route is not None and outcome.strategy is not None:
            event = events.canceled(
                command,
                origin,
                outcome.route,
                outcome.strategy,
                outcome.attempts,
                received_at,
                completed_at,
                confirmed_by=outcome.confirmed_by,
            )
        else:
            reason = outcome.reason or FailureReason.OUTCOME_UNKNOWN
            event = events.failed(
                command,
                origin,
                reason,
                outcome.detail or reason.value,
                outcome.attempts,
                received_at,
                completed_at,
                route=outcome.route,
                exchange=outcome.exchange,
                order_status=outcome.order_status,
                hint=outcome.hint,
                sweep=outcome.sweep,
            )
        # The results topic is the record of every answer; the log says each failure at
        # INFO, and each cancel only at DEBUG (a line per cancel costs ~40 µs at full speed).
        log.log(
            logging.DEBUG if event["type"] == events.CANCELED else logging.INFO,
            "result command_id=%s account=%s type=%s reason=%s route=%s attempts=%d latency_ms=%d",
            command.command_id,
            command.account,
            event["type"],
            event.get("reason"),
            event.get("route"),
            outcome.attempts,
            completed_at - received_at,
        )
        return event

    def _invalid(
        self, record: InRecord, origin: Origin, invalid: InvalidCommand, received_at: int
    ) -> Sequence[OutRecord]:
        event = events.failed(
            invalid,
            origin,
            FailureReason.INVALID_COMMAND,
            invalid.detail,
            0,
            received_at,
            self._clock(),
        )
        log.warning(
            "invalid command at %s[%d]@%d command_id=%s: %s",
            record.topic,
            record.partition,
            record.offset,
            invalid.command_id,
            invalid.detail,
        )
        # Not remembered: an invalid record costs nothing, and must not claim its command id.
        dead = self._deadletter(record, invalid.detail)
        metrics.DEADLETTERS.inc()
        return [dead, self._result(record, event)]

    def _deadletter(self, record: InRecord, detail: str) -> OutRecord:
        """The record's copy for the dead-letter topic, within ``deadletter_max_bytes``.

        A copy the topic cannot take would stop the worker on every restart; what does not
        fit is cut or dropped, and the headers say so (the whole record stays at its source
        offset)."""
        key = self._key(record)
        own: list[Header] = [
            (SOURCE_TOPIC_HEADER, record.topic.encode()),
            (SOURCE_PARTITION_HEADER, str(record.partition).encode()),
            (SOURCE_OFFSET_HEADER, str(record.offset).encode()),
            (ERROR_HEADER, detail.encode("utf-8", errors="replace")[:_ERROR_MAX]),
            (NULL_VALUE_HEADER, b"1" if record.value is None else b"0"),
        ]
        if record.key is not None and key != record.key:
            own.append((KEY_TRUNCATED_FROM_HEADER, str(len(record.key)).encode()))
        # Room for the markers that may still be added, at their largest.
        markers = sum(
            HEADER_OVERHEAD + header_bytes(name, b"9" * _NUMBER_MAX)
            for name in (TRUNCATED_FROM_HEADER, HEADERS_DROPPED_HEADER)
        )
        room = (
            self._deadletter_max_bytes
            - record_bytes(OutRecord(self._deadletter_topic, key, b"", tuple(own)))
            - markers
        )
        kept: list[Header] = []
        kept_bytes = 0
        dropped = 0
        for name, value in record.headers:
            size = header_bytes(name, value)
            if kept_bytes + size <= self._max_header_bytes and HEADER_OVERHEAD + size <= room:
                kept.append((name, value))
                kept_bytes += size
                room -= HEADER_OVERHEAD + size
            else:
                dropped += 1
        raw = record.value if record.value is not None else b""
        truncated: tuple[Header, ...] = ()
        if len(raw) > room:
            truncated = ((TRUNCATED_FROM_HEADER, str(len(raw)).encode()),)
            raw = raw[: max(room, 0)]
        if dropped:
            own.append((HEADERS_DROPPED_HEADER, str(dropped).encode()))
        return OutRecord(self._deadletter_topic, key, raw, (*truncated, *kept, *own))

    def _result(self, record: InRecord, event: dict[str, object]) -> OutRecord:
        event["producer"] = self._producer_of(record)
        metrics.RESULTS.labels(str(event["type"]), str(event.get("reason", ""))).inc()
        headers: tuple[Header, ...] = ((TYPE_HEADER, str(event["type"]).encode()),)
        key = self._key(record)
        if tracing.ON:
            headers = self._traced(headers, key, event)
        if event["type"] == events.SWEPT:
            # The exchange decides how many orders a kill switch lists: the result is kept
            # within the same bound as every other record this module publishes.
            frame = record_bytes(OutRecord(self._results_topic, key, b"", headers))
            omitted = fit_kill_switch(event, self._deadletter_max_bytes - frame)
            for group, count in omitted.items():
                metrics.SWEEP_OMITTED.labels(group).inc(count)
            if omitted:
                log.warning(
                    "command_id=%s: the kill switch's result names too many orders for one "
                    "record; left out (counted in its omitted object): %s",
                    event.get("command_id"),
                    omitted,
                )
        return OutRecord(self._results_topic, key, events.serialize(event), headers)

    def _traced(
        self, headers: tuple[Header, ...], key: bytes | None, event: dict[str, object]
    ) -> tuple[Header, ...]:
        """``headers`` with the trace context of the result's creation (a consumer of the
        result continues the command's trace), as much of it as the record's bound leaves
        room for (a kill switch's result is fitted to the bound with them)."""
        trace = tracing.result_headers(self._results_topic, key, event)
        room = self._deadletter_max_bytes - _least_bytes(event)
        while (
            trace
            and record_bytes(OutRecord(self._results_topic, key, b"", (*headers, *trace))) > room
        ):
            trace = trace[:-1]  # tracestate first, then traceparent
        return (*headers, *trace)

    def _producer_of(self, record: InRecord) -> str | None:
        """The producer a record's result names: its ``x-producer``, which reached here
        only verified; None when commands are not verified."""
        if self._producers is None:
            return None
        for name, value in record.headers:
            if name == PRODUCER_HEADER and value is not None:
                return value.decode("ascii", "replace")
        return None  # pragma: no cover - a verified record has one

    def _unauthorized(
        self, record: InRecord, origin: Origin, refusal: Refusal, received_at: int
    ) -> Sequence[OutRecord]:
        """``cancel.failed``/``unauthorized`` and a dead-letter copy: no request, and the
        duplicate window is neither consulted nor told. The event keeps what identifies
        the command (as the record states it) so that its sender can find the answer."""
        decoded = decode(record.value, self._max_command_bytes)
        event = events.failed(
            decoded,
            origin,
            FailureReason.UNAUTHORIZED,
            f"unauthorized ({refusal.cause}): {refusal.detail}",
            0,
            received_at,
            self._clock(),
            hint="sign the command with the key of a producer of the worker's producers file "
            "that may name this account (and send a kill switch, for scope symbol)",
            producer=refusal.verified,
        )
        log.warning(
            "unauthorized command at %s[%d]@%d command_id=%s account=%s producer=%s: %s",
            record.topic,
            record.partition,
            record.offset,
            decoded.command_id,
            decoded.account,
            refusal.producer,
            refusal.detail,
        )
        metrics.UNAUTHORIZED.labels(refusal.producer, refusal.cause).inc()
        dead = self._deadletter(record, f"unauthorized ({refusal.cause}): {refusal.detail}")
        metrics.DEADLETTERS.inc()
        metrics.RESULTS.labels(events.FAILED, FailureReason.UNAUTHORIZED.value).inc()
        key = self._key(record)
        headers: tuple[Header, ...] = ((TYPE_HEADER, events.FAILED.encode()),)
        if tracing.ON:
            headers = self._traced(headers, key, event)
        result = OutRecord(self._results_topic, key, events.serialize(event), headers)
        return [dead, result]


def _least_bytes(event: dict[str, object]) -> int:
    """The fewest bytes the event can take in its record: a kill switch's result can be cut
    to its routes and counts (:func:`~worker.core.fit.fit_kill_switch`), any other is whole."""
    if event["type"] != events.SWEPT:
        return len(events.serialize(event))
    bare = {**event, **{group: [] for group in GROUPS}, "omitted": dict.fromkeys(GROUPS, 0)}
    return len(events.serialize(bare)) + 4 * 20  # the omitted counts at their longest


def _refusal_kind(refused: Refusal | InvalidCommand) -> str:
    """The ``error.type`` of a validation that refused the record."""
    return "unauthorized" if isinstance(refused, Refusal) else "invalid_command"


def _refused(decoded: Command | InvalidCommand, detail: str) -> InvalidCommand:
    """A record refused for its key or headers, keeping what identifies its command."""
    return InvalidCommand(
        detail=detail,
        command_id=decoded.command_id,
        account=decoded.account,
        market=decoded.market,
        symbol=decoded.symbol,
    )
