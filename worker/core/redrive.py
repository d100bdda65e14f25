"""Re-driving failed cancels after an incident (pure: the rules shared by ``replay --failed``
and the worker).

A failed cancel whose cause may have passed (the exchange was unavailable, the rate budget
ran out, the deadline came first, the outcome could not be learned) is worth sending again
once the incident is over; a final answer (the order was canceled, was already closed, does
not exist, the command is invalid) is not. Contracts:

* **Which results may be re-driven.** A ``cancel.failed`` whose reason is in
  :data:`REDRIVE_DEFAULT` (what ``replay --failed`` re-drives when no reason is named), or
  in :data:`REDRIVE_ON_REQUEST` when the operator names it (``--failed auth`` once a key is
  fixed, ``--failed unknown_account`` once the account is configured). Nothing else, ever:
  ``strategy.canceled``, ``strategies.canceled``, and the failures in :data:`NEVER`.
* **On purpose, not by accident.** A re-driven copy carries the header
  :data:`REDRIVE_OF` (``<topic>:<partition>:<offset>``: where the command whose failure it
  retries was read, the failure's ``origin``) and :data:`REDRIVE_REASON`. The worker lets it
  through the duplicate window only when the command id's entry there is a re-drivable
  ``cancel.failed`` read at exactly that place (:func:`passes_window`). Its result carries
  ``retry_of`` (the failure it retries) and takes that failure's place in the window, so a
  second copy naming the same failure, or any other repeat, gets ``cancel.duplicate``.
* **The deadline starts again, ``issued_at`` does not.** A re-drive keeps ``issued_at`` (an
  order canceled at or after it is still recognised as this command's doing, so an
  ``outcome_unknown`` cancel that did land reports ``strategy.canceled``) and, when the
  command has an ``expires_at``, moves it to the re-drive time plus a fresh window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from worker.core.errors import FailureReason

REDRIVE_OF = "x-redrive-of"
REDRIVE_REASON = "x-redrive-reason"

REDRIVE_DEFAULT: frozenset[str] = frozenset(
    {
        FailureReason.EXCHANGE_UNAVAILABLE,
        FailureReason.RATE_LIMITED,
        FailureReason.RETRIES_EXHAUSTED,
        FailureReason.OUTCOME_UNKNOWN,
        FailureReason.EXPIRED,
    }
)
"""Failures whose cause is the incident, not the command: ``replay --failed`` re-drives them."""

REDRIVE_ON_REQUEST: frozenset[str] = frozenset({FailureReason.AUTH, FailureReason.UNKNOWN_ACCOUNT})
"""Failures a fix of the worker's configuration can cure: re-driven only when named."""

REDRIVABLE: frozenset[str] = REDRIVE_DEFAULT | REDRIVE_ON_REQUEST

NEVER: frozenset[str] = frozenset(r.value for r in FailureReason) - REDRIVABLE
"""Final answers about the order or the command: re-sending cannot change them."""

DEFAULT_EXPIRES_IN_MS = 30_000
"""A re-driven command that had an ``expires_at`` gets this long from the re-drive on."""


class RecordAt(NamedTuple):
    """Where a command was read: topic, partition, offset."""

    topic: str
    partition: int
    offset: int

    def header(self) -> bytes:
        return f"{self.topic}:{self.partition}:{self.offset}".encode()

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


def parse_record_at(raw: bytes | str | None) -> RecordAt | None:
    """``<topic>:<partition>:<offset>`` (a Kafka topic name has no ``:``), or None when
    ``raw`` is not exactly that."""
    if raw is None:
        return None
    try:
        text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    parts = text.split(":")
    if len(parts) != 3 or not parts[0] or len(parts[0]) > 249:
        return None
    topic, partition, offset = parts
    if not (partition.isascii() and partition.isdigit() and offset.isascii() and offset.isdigit()):
        return None
    if len(partition) > 10 or len(offset) > 19:
        return None
    return RecordAt(topic, int(partition), int(offset))


def selected_reasons(names: Sequence[str]) -> frozenset[str]:
    """The reasons ``--failed`` selects: :data:`REDRIVE_DEFAULT` when none are named.
    Raises :class:`ValueError` naming what may be re-driven for any other name."""
    if not names:
        return REDRIVE_DEFAULT
    wrong = [n for n in names if n not in REDRIVABLE]
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)} cannot be re-driven: re-drivable failures are "
            f"{', '.join(sorted(REDRIVE_DEFAULT))} (the default) and, when named, "
            f"{', '.join(sorted(REDRIVE_ON_REQUEST))}; "
            f"never {', '.join(sorted(NEVER))}, nor a cancel that succeeded"
        )
    return frozenset(names)


def may_redrive(result_type: str | None, reason: str | None, reasons: Iterable[str]) -> bool:
    """Whether a final result of ``result_type``/``reason`` is one ``reasons`` re-drives."""
    return result_type == "cancel.failed" and reason is not None and reason in set(reasons)


def redrive_header(headers: Iterable[tuple[str, bytes | None]]) -> RecordAt | None:
    """The failure a record says it re-drives (the last :data:`REDRIVE_OF` header), or None."""
    found: RecordAt | None = None
    seen = False
    for name, value in headers:
        if name == REDRIVE_OF:
            seen = True
            found = parse_record_at(value)
    return found if seen else None


def passes_window(
    redrives: RecordAt | None,
    entry_type: str,
    entry_reason: str | None,
    entry_origin: tuple[str, int, int],
) -> bool:
    """Whether a record claiming to re-drive ``redrives`` may pass the duplicate window,
    whose entry for its command id is ``entry_*``: only a re-drivable failure read at
    exactly that place (see the module docstring)."""
    return (
        redrives is not None
        and tuple(redrives) == tuple(entry_origin)
        and may_redrive(entry_type, entry_reason, REDRIVABLE)
    )


def retry_of(origin: RecordAt, reason: str | None, completed_at: int | None) -> dict[str, Any]:
    """The ``retry_of`` object of a re-driven command's result."""
    return {
        "type": "cancel.failed",
        "reason": reason if reason in REDRIVABLE else None,
        "origin": origin.as_dict(),
        "completed_at": completed_at,
    }


def origin_of(origin: object) -> RecordAt | None:
    """An event's ``origin`` object as a :class:`RecordAt`, or None when it is not one (a
    topic that could not stand in a :data:`REDRIVE_OF` header included)."""
    if not isinstance(origin, Mapping):
        return None
    topic, partition, offset = origin.get("topic"), origin.get("partition"), origin.get("offset")
    if (
        not isinstance(topic, str)
        or not topic
        or ":" in topic
        or type(partition) is not int
        or type(offset) is not int
        or partition < 0
        or offset < 0
    ):
        return None
    return RecordAt(topic, partition, offset)


def retried_origin(event: Mapping[str, Any]) -> RecordAt | None:
    """Where the failure a result retries was read (its ``retry_of.origin``), or None."""
    retried = event.get("retry_of")
    return origin_of(retried.get("origin")) if isinstance(retried, Mapping) else None


def redrive_value(
    command: Mapping[str, Any], now: int, expires_in_ms: int | None
) -> dict[str, Any]:
    """The command as re-driven: ``issued_at`` kept; an ``expires_at`` moved to ``now`` plus
    ``expires_in_ms`` (default :data:`DEFAULT_EXPIRES_IN_MS`). ``expires_in_ms`` also sets
    one on a command that had none."""
    out = dict(command)
    if expires_in_ms is not None or "expires_at" in command:
        out["expires_at"] = now + (
            expires_in_ms if expires_in_ms is not None else DEFAULT_EXPIRES_IN_MS
        )
    return out
