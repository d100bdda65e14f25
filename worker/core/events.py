"""Building result events (pure). Shapes are fixed by schemas/result-event.schema.json."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from worker.core.commands import Command, InvalidCommand
from worker.core.errors import ExchangeReply, FailureReason
from worker.core.routes import Route
from worker.core.sweep import SweepReport

SCHEMA_VERSION = 1
CANCELED = "strategy.canceled"
SWEPT = "strategies.canceled"
FAILED = "cancel.failed"
DUPLICATE = "cancel.duplicate"
_DETAIL_MAX = 2048

FINGERPRINT_BYTES = 16


def fingerprint(command: Command) -> bytes:
    """The command's content fingerprint: the 16-byte BLAKE2b digest of the JSON array
    ``[account, market, symbol, strategy_id, client_strategy_id, algo_id, client_algo_id,
    scope]`` (absent fields null), serialized compactly (orjson, no spaces).

    It covers what decides which orders a command cancels, and nothing else: not the
    command id (the window's key), nor ``issued_at`` (a producer that rebuilds a command
    to retry it stamps it again, and ``replay --restamp`` moves it), nor ``expires_at`` (a
    re-drive moves it), nor ``reason``/``source`` (annotations). So a producer retry of a
    command and its re-drive have the command's fingerprint; a command id reused for other
    orders has another (the duplicate window answers it ``id_conflict``)."""
    content = orjson.dumps(
        [
            command.account,
            command.market.value,
            command.symbol,
            command.strategy_id,
            command.client_strategy_id,
            command.algo_id,
            command.client_algo_id,
            command.scope.value if command.scope is not None else None,
        ]
    )
    return hashlib.blake2b(content, digest_size=FINGERPRINT_BYTES).digest()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a command was read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None

    def as_dict(self) -> dict[str, Any]:
        key: str | None = None
        if self.key is not None:
            key = self.key.decode("utf-8", errors="backslashreplace")[:256]
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset, "key": key}


def _common(
    event_type: str,
    subject: Command | InvalidCommand,
    origin: Origin,
    attempts: int,
    received_at: int,
    completed_at: int,
    producer: str | None = None,
) -> dict[str, Any]:
    market = subject.market.value if subject.market is not None else None
    return {
        "type": event_type,
        "schema_version": SCHEMA_VERSION,
        "command_id": subject.command_id,
        "account": subject.account,
        "market": market,
        "symbol": subject.symbol,
        "origin": origin.as_dict(),
        "attempts": attempts,
        "received_at": received_at,
        "completed_at": completed_at,
        "command_reason": subject.reason if isinstance(subject, Command) else None,
        "command_source": subject.source if isinstance(subject, Command) else None,
        "producer": producer,
        # Only a valid command has content to fingerprint (an invalid one is never remembered).
        "fingerprint": fingerprint(subject).hex() if isinstance(subject, Command) else None,
    }


def canceled(
    command: Command,
    origin: Origin,
    route: Route,
    strategy: dict[str, Any],
    attempts: int,
    received_at: int,
    completed_at: int,
    confirmed_by: str = "cancel",
    producer: str | None = None,
) -> dict[str, Any]:
    event = _common(CANCELED, command, origin, attempts, received_at, completed_at, producer)
    event["route"] = route.value
    event["strategy"] = strategy
    event["confirmed_by"] = confirmed_by
    return event


def strategies_canceled(
    command: Command,
    origin: Origin,
    report: SweepReport,
    attempts: int,
    received_at: int,
    completed_at: int,
    producer: str | None = None,
) -> dict[str, Any]:
    """A kill switch's result: every order listed open on the symbol, by what became of it
    (see :mod:`worker.core.sweep`), and each route's outcome."""
    event = _common(SWEPT, command, origin, attempts, received_at, completed_at, producer)
    event.update(report.as_fields())
    return event


def failed(
    subject: Command | InvalidCommand,
    origin: Origin,
    reason: FailureReason,
    detail: str,
    attempts: int,
    received_at: int,
    completed_at: int,
    route: Route | None = None,
    exchange: ExchangeReply | None = None,
    order_status: str | None = None,
    hint: str | None = None,
    sweep: SweepReport | None = None,
    producer: str | None = None,
) -> dict[str, Any]:
    event = _common(FAILED, subject, origin, attempts, received_at, completed_at, producer)
    if sweep is not None:  # a kill switch that canceled nothing: what each route met
        event["routes"] = [r.as_dict() for r in sweep.routes]
    event.update(
        reason=reason.value,
        detail=detail[:_DETAIL_MAX],
        route=route.value if route is not None else None,
        exchange=exchange.as_dict() if exchange is not None else None,
        order_status=order_status,
        hint=hint,
    )
    return event


def duplicate(
    command: Command,
    origin: Origin,
    first_result: Mapping[str, Any],
    received_at: int,
    completed_at: int,
    producer: str | None = None,
) -> dict[str, Any]:
    """A command whose id already has a final result within the duplicate window: no request
    was sent (``attempts`` 0); ``first_result`` is that result's outcome
    (:meth:`worker.kafka.dedup.FirstResult.as_dict`; a kill switch's has no reason, route or order
    status). ``origin`` is this record's."""
    event = _common(DUPLICATE, command, origin, 0, received_at, completed_at, producer)
    event["first_result"] = dict(first_result)
    return event


def serialize(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)
