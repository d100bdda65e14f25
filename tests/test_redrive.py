"""The re-drive rules shared by ``replay --failed`` and the worker (pure)."""

from __future__ import annotations

import pytest

from worker.core import redrive
from worker.core.contracts import load_schema
from worker.core.errors import FailureReason
from worker.core.redrive import RecordAt
from worker.core.timeutil import now_ms
from worker.kafka.dedup import FirstResult, SeenCommands


def test_every_failure_reason_is_either_redrivable_or_never() -> None:
    every = {r.value for r in FailureReason}
    assert every == redrive.REDRIVABLE | redrive.NEVER
    assert not redrive.REDRIVABLE & redrive.NEVER
    assert {
        "exchange_unavailable",
        "rate_limited",
        "retries_exhausted",
        "outcome_unknown",
        "expired",
    } == redrive.REDRIVE_DEFAULT
    assert {"invalid_command", "already_closed", "not_found", "rejected"} <= redrive.NEVER


def test_the_schema_names_exactly_the_redrivable_reasons() -> None:
    schema = load_schema("result-event.schema.json")
    (named, _) = schema["$defs"]["retry_of"]["properties"]["reason"]["anyOf"]
    assert set(named["enum"]) == redrive.REDRIVABLE


def test_selected_reasons() -> None:
    assert redrive.selected_reasons(()) == redrive.REDRIVE_DEFAULT
    assert redrive.selected_reasons(("auth",)) == {"auth"}
    with pytest.raises(ValueError, match="already_closed cannot be re-driven"):
        redrive.selected_reasons(("already_closed",))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"papi.cancel.commands:2:1200", redrive.RecordAt("papi.cancel.commands", 2, 1200)),
        ("t:0:0", redrive.RecordAt("t", 0, 0)),
        (b"t:0", None),
        (b"t:0:0:0", None),
        (b":0:0", None),
        (b"t:-1:0", None),
        (b"t:0:x", None),
        (b"t:\xd9\xa1:0", None),  # a non-ASCII digit
        (b"\xff:0:0", None),
        (None, None),
    ],
)
def test_parse_record_at(raw: bytes | str | None, expected: redrive.RecordAt | None) -> None:
    assert redrive.parse_record_at(raw) == expected


def test_the_last_redrive_header_counts() -> None:
    headers = [(redrive.REDRIVE_OF, b"t:0:1"), ("other", None), (redrive.REDRIVE_OF, b"t:0:2")]
    assert redrive.redrive_header(headers) == redrive.RecordAt("t", 0, 2)
    assert redrive.redrive_header([("x", b"t:0:1")]) is None


def test_a_redrive_keeps_issued_at_and_gives_a_fresh_deadline() -> None:
    command = {"command_id": "c", "issued_at": 1_000, "expires_at": 2_000}
    assert redrive.redrive_value(command, 50_000, None) == {
        "command_id": "c",
        "issued_at": 1_000,
        "expires_at": 50_000 + redrive.DEFAULT_EXPIRES_IN_MS,
    }
    assert redrive.redrive_value(command, 50_000, 5_000)["expires_at"] == 55_000
    no_deadline = {"command_id": "c", "issued_at": 1_000}
    assert redrive.redrive_value(no_deadline, 50_000, None) == no_deadline
    assert redrive.redrive_value(no_deadline, 50_000, 7_000)["expires_at"] == 57_000


def _event(kind: str, offset: int, reason: str | None, retry_of: int | None) -> dict[str, object]:
    event: dict[str, object] = {
        "type": kind,
        "command_id": "c-1",
        "account": "desk-a",
        "origin": {"topic": "cmd", "partition": 0, "offset": offset, "key": "k"},
        "completed_at": now_ms(),
        "route": "um_algo",
        "reason": reason,
        "order_status": None,
    }
    if kind == "strategy.canceled":
        event["strategy"] = {"status": "CANCELED"}
    if retry_of is not None:
        event["retry_of"] = {
            "type": "cancel.failed",
            "reason": "outcome_unknown",
            "origin": {"topic": "cmd", "partition": 0, "offset": retry_of},
            "completed_at": None,
        }
    return event


def test_the_window_rebuilt_from_the_topic_holds_the_latest_of_a_redriven_command() -> None:
    """Read in topic order at start: failure, its re-drive's failure, that one's re-drive."""
    seen = SeenCommands(3_600_000, 100)
    for event in (
        _event("cancel.failed", 3, "outcome_unknown", None),
        _event("cancel.failed", 10, "exchange_unavailable", 3),
        _event("strategy.canceled", 20, None, 10),
    ):
        assert seen.add(event, on_topic=True)
    entry = seen.get("desk-a", "c-1")
    assert entry is not None and entry.first.type == "strategy.canceled"
    assert entry.first.origin == RecordAt("cmd", 0, 20)
    # A stale claim (it retries a failure that is no longer the latest) changes nothing.
    assert not seen.add(_event("cancel.failed", 30, "expired", 10), on_topic=True)
    # Nor does a claim to retry a success.
    assert not seen.add(_event("cancel.failed", 31, "expired", 20), on_topic=True)
    entry = seen.get("desk-a", "c-1")
    assert entry is not None and entry.first.origin == RecordAt("cmd", 0, 20)


def test_a_first_result_that_is_a_success_is_never_replaced_by_a_claim() -> None:
    seen = SeenCommands(3_600_000, 100)
    first = FirstResult(
        "strategy.canceled", None, "um_algo", "CANCELED", RecordAt("cmd", 0, 3), now_ms()
    )
    seen.put("desk-a", "c-1", first, on_topic=True)
    assert not seen.add(_event("cancel.failed", 9, "expired", 3), on_topic=False)
