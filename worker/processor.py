"""One record in, its outgoing records out: decode, execute, build the result event.

Never raises: an invalid record becomes ``cancel.failed``/``invalid_command`` plus a copy of
its raw bytes on the dead-letter topic; an unexpected error while executing becomes
``outcome_unknown`` (the request may have been sent, so nothing is claimed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from worker import events, metrics
from worker.commands import Command, InvalidCommand, decode
from worker.errors import FailureReason
from worker.events import Origin
from worker.executor import CancelExecutor, Outcome
from worker.pipeline import InRecord, OutRecord

log = logging.getLogger(__name__)


class CommandProcessor:
    def __init__(
        self,
        executor: CancelExecutor,
        *,
        results_topic: str,
        deadletter_topic: str,
        max_command_bytes: int,
        deadletter_max_bytes: int = 1_000_000,
        clock: Callable[[], int],
    ) -> None:
        self._executor = executor
        self._results_topic = results_topic
        self._deadletter_topic = deadletter_topic
        self._max_command_bytes = max_command_bytes
        self._deadletter_max_bytes = deadletter_max_bytes
        self._clock = clock

    async def __call__(self, record: InRecord) -> Sequence[OutRecord]:
        received_at = self._clock()
        origin = Origin(record.topic, record.partition, record.offset, record.key)
        decoded = decode(record.value, self._max_command_bytes)
        if isinstance(decoded, InvalidCommand):
            return self._invalid(record, origin, decoded, received_at)
        try:
            outcome = await self._executor.execute(decoded, received_at)
        except Exception:
            log.exception("unexpected error executing command_id=%s", decoded.command_id)
            outcome = Outcome(
                False,
                0,
                reason=FailureReason.OUTCOME_UNKNOWN,
                detail="internal error while executing; outcome not claimed",
            )
        return [self._result(record, self._event(decoded, origin, outcome, received_at))]

    def _event(
        self, command: Command, origin: Origin, outcome: Outcome, received_at: int
    ) -> dict[str, object]:
        completed_at = self._clock()
        if outcome.canceled and outcome.route is not None and outcome.strategy is not None:
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
            )
        log.info(
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
        raw = record.value if record.value is not None else b""
        # A copy the dead-letter topic cannot take would stop the worker on every restart;
        # past the limit it keeps the head of the record, and the headers say where the whole
        # record still is (the source offset) and how long it was.
        truncated: tuple[tuple[str, bytes], ...] = ()
        if len(raw) > self._deadletter_max_bytes:
            truncated = (("x-truncated-from", str(len(raw)).encode()),)
            raw = raw[: self._deadletter_max_bytes]
        dead = OutRecord(
            topic=self._deadletter_topic,
            key=record.key,
            value=raw,
            headers=(
                *truncated,
                *record.headers,
                ("x-source-topic", record.topic.encode()),
                ("x-source-partition", str(record.partition).encode()),
                ("x-source-offset", str(record.offset).encode()),
                ("x-error", invalid.detail.encode("utf-8", errors="replace")),
                ("x-null-value", b"1" if record.value is None else b"0"),
            ),
        )
        metrics.DEADLETTERS.inc()
        return [dead, self._result(record, event)]

    def _result(self, record: InRecord, event: dict[str, object]) -> OutRecord:
        metrics.RESULTS.labels(str(event["type"]), str(event.get("reason", ""))).inc()
        headers: tuple[tuple[str, bytes], ...] = (("type", str(event["type"]).encode()),)
        return OutRecord(self._results_topic, record.key, events.serialize(event), headers)
