"""The duplicate-command window (``worker.kafka.dedup.SeenCommands``): pure, with an
injected clock."""

from __future__ import annotations

import gc
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.core.redrive import RecordAt
from worker.kafka.dedup import (
    ENTRY_BYTES_MAX,
    REFUSED,
    WORKER_BASE_BYTES,
    FirstResult,
    SeenCommands,
    first_result_of,
)
from worker.settings import Settings, SettingsError

HOUR = 3_600_000
T0 = 1_795_260_000_000
ACCOUNT = "desk-a"


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def canceled(command_id: str | None, offset: int = 0, completed_at: int = T0) -> dict[str, Any]:
    return {
        "type": "strategy.canceled",
        "command_id": command_id,
        "account": ACCOUNT,
        "origin": {"topic": "cmd", "partition": 1, "offset": offset, "key": "k"},
        "completed_at": completed_at,
        "route": "um_algo",
        "strategy": {"status": "CANCELED"},
        "confirmed_by": "cancel",
    }


def failed(
    command_id: str | None, reason: str, offset: int = 0, completed_at: int = T0
) -> dict[str, Any]:
    return {
        "type": "cancel.failed",
        "command_id": command_id,
        "account": ACCOUNT,
        "origin": {"topic": "cmd", "partition": 1, "offset": offset, "key": None},
        "completed_at": completed_at,
        "reason": reason,
        "route": None,
        "order_status": None,
    }


def window(clock: Clock, max_entries: int = 100) -> SeenCommands:
    return SeenCommands(HOUR, max_entries, clock=clock)


def test_a_final_result_is_remembered_with_its_outcome() -> None:
    seen = window(Clock())
    assert seen.add(canceled("c-1", offset=7), on_topic=True)
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.on_topic
    assert entry.first == FirstResult(
        "strategy.canceled", None, "um_algo", "CANCELED", RecordAt("cmd", 1, 7), T0
    )
    assert entry.first.as_dict() == {
        "type": "strategy.canceled",
        "reason": None,
        "route": "um_algo",
        "order_status": "CANCELED",
        "origin": {"topic": "cmd", "partition": 1, "offset": 7},
        "completed_at": T0,
    }
    assert seen.get(ACCOUNT, "c-2") is None


def test_which_results_count() -> None:
    seen = window(Clock())
    assert seen.add(failed("c-1", "already_closed") | {"order_status": "FINISHED"}, on_topic=True)
    assert seen.add(failed("c-2", "outcome_unknown"), on_topic=True)
    # A kill switch's result closes its command too: no single route or order status.
    assert seen.add(canceled("c-3") | {"type": "strategies.canceled", "route": None}, on_topic=True)
    # Refusals never count, with an id or without (they cost no request: remembering them
    # would let anyone fill the window or claim an id in advance).
    for reason in sorted(REFUSED):
        assert not seen.add(failed("c-r", reason), on_topic=True), reason
        assert not seen.add(failed("c-r", reason), on_topic=False), reason
    assert not seen.add(failed(None, "invalid_command"), on_topic=True)
    # Without an account there is no key.
    assert not seen.add(canceled("c-12") | {"account": None}, on_topic=True)
    assert not seen.add(canceled("c-12") | {"account": ""}, on_topic=True)
    # Duplicates, other types, and results that are not shaped as the schema says do not.
    assert not seen.add(canceled("c-4") | {"type": "cancel.duplicate"}, on_topic=True)
    assert not seen.add(canceled("c-5") | {"type": "strategy.cancelled"}, on_topic=True)
    assert not seen.add(failed("c-6", "no_such_reason"), on_topic=True)
    assert not seen.add(canceled("c-7") | {"route": None}, on_topic=True)
    bad_origin = {"topic": "cmd", "partition": -1, "offset": 0}
    assert not seen.add(canceled("c-8") | {"origin": bad_origin}, on_topic=True)
    assert not seen.add(canceled("c-9") | {"completed_at": True}, on_topic=True)
    assert not seen.add(failed("c-10", "rejected") | {"order_status": "GONE"}, on_topic=True)
    assert not seen.add(canceled(""), on_topic=True)
    # A fingerprint, when there is one, is 32 lowercase hex digits.
    for bad in ("AB" * 16, "ab" * 15, "zz" * 16, 7):
        assert not seen.add(canceled("c-11") | {"fingerprint": bad}, on_topic=True), bad
    kill = seen.get(ACCOUNT, "c-3")
    assert kill is not None and kill.first.route is None and kill.first.order_status is None
    assert len(seen) == 3
    first = seen.get(ACCOUNT, "c-1")
    assert first is not None and first.first.reason == "already_closed"
    assert first.first.order_status == "FINISHED" and first.first.type == "cancel.failed"


def test_an_unknown_order_status_in_a_canceled_strategy_is_not_counted() -> None:
    assert first_result_of(canceled("c-1") | {"strategy": {"status": "WEIRD"}}) is None
    found = first_result_of(canceled("c-1") | {"strategy": None})
    assert found is not None and found.first.order_status is None


def test_entries_are_forgotten_when_their_result_leaves_the_window() -> None:
    clock = Clock()
    seen = window(clock)
    seen.add(canceled("old", completed_at=T0 - HOUR + 1_000), on_topic=True)
    seen.add(canceled("new", completed_at=T0), on_topic=True)
    # Already out of the window when it arrives (read from the topic, say): not stored.
    assert not seen.add(canceled("older", completed_at=T0 - HOUR - 1), on_topic=True)
    assert seen.get(ACCOUNT, "old") is not None and len(seen) == 2
    clock.now += 1_000  # "old" completed exactly one window ago: still in
    assert seen.get(ACCOUNT, "old") is not None
    clock.now += 1
    assert seen.get(ACCOUNT, "old") is None and seen.get(ACCOUNT, "new") is not None
    clock.now += HOUR
    assert seen.get(ACCOUNT, "new") is None and len(seen) == 0


def test_beyond_max_entries_the_first_recorded_go_first() -> None:
    seen = window(Clock(), max_entries=3)
    # Results arrive nearly in completion order; the count bound forgets in arrival order.
    for command_id, at in (("b", T0 - 20), ("a", T0 - 30), ("d", T0), ("c", T0 - 10)):
        assert seen.add(canceled(command_id, completed_at=at), on_topic=True)
    assert len(seen) == 3
    assert [c for c in "abcd" if seen.get(ACCOUNT, c) is not None] == ["a", "c", "d"]


def test_a_result_arriving_late_is_never_reported_past_the_window() -> None:
    clock = Clock()
    seen = window(clock)
    seen.add(canceled("young", completed_at=T0), on_topic=True)
    seen.add(canceled("late", completed_at=T0 - HOUR + 10), on_topic=True)  # behind "young"
    clock.now += 11
    assert seen.get(ACCOUNT, "late") is None and seen.get(ACCOUNT, "young") is not None
    # Its key may be recorded again, and is then forgotten in its new place.
    assert seen.add(failed("late", "rejected", offset=5, completed_at=clock.now), on_topic=True)
    entry = seen.get(ACCOUNT, "late")
    assert entry is not None and entry.first.reason == "rejected"
    clock.now += HOUR + 1
    assert seen.get(ACCOUNT, "late") is None and len(seen) == 0
    assert not seen._order and not seen._stale


def test_the_first_result_stays() -> None:
    seen = window(Clock())
    seen.add(canceled("c-1", offset=1), on_topic=True)
    # A later result for the id, from another record or the same one: the first stays.
    assert not seen.add(failed("c-1", "already_closed", offset=2), on_topic=True)
    assert not seen.add(failed("c-1", "already_closed", offset=1), on_topic=False)
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.first.origin.offset == 1
    assert entry.first.type == "strategy.canceled"


def test_what_is_on_the_topic_replaces_what_was_only_recorded_here() -> None:
    seen = window(Clock())
    seen.add(failed("c-1", "outcome_unknown", offset=1), on_topic=False)
    # The same record answered again (its first answer may be lost): the new answer stands.
    assert seen.add(canceled("c-1", offset=1), on_topic=False)
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.first.type == "strategy.canceled" and not entry.on_topic
    # Another record's answer recorded here does not replace it...
    assert not seen.add(failed("c-1", "already_closed", offset=2), on_topic=False)
    # ...but one read back from the topic does, and then it is final.
    assert seen.add(failed("c-1", "already_closed", offset=3), on_topic=True)
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.on_topic and entry.first.origin.offset == 3
    assert not seen.add(canceled("c-1", offset=3), on_topic=True)


def test_a_result_read_back_marks_its_entry_as_on_the_topic() -> None:
    seen = window(Clock())
    seen.add(canceled("c-1", offset=4), on_topic=False)
    seen.add(canceled("c-1", offset=4), on_topic=True)
    entry = seen.get(ACCOUNT, "c-1")
    assert entry is not None and entry.on_topic


def test_replacements_do_not_let_the_bookkeeping_grow() -> None:
    clock = Clock()
    seen = window(clock, max_entries=10)
    for i in range(5_000):
        # The same record answered again and again: each answer replaces the last.
        seen.add(canceled("same", offset=3, completed_at=T0 + i), on_topic=False)
        clock.now = T0 + i
    assert len(seen) == 1 and len(seen._order) <= len(seen) + len(seen) // 4 + 1024
    entry = seen.get(ACCOUNT, "same")
    assert entry is not None and entry.first.completed_at == T0 + 4_999


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SeenCommands(0, 10)
    with pytest.raises(ValueError, match="positive"):
        SeenCommands(10, 0)


def test_settings() -> None:
    assert Settings().dedup_window_ms == HOUR and Settings().dedup_max_entries == 1_000_000
    Settings(dedup_window_ms=0).check()  # off
    with pytest.raises(SettingsError, match="DEDUP_WINDOW_MS must not be negative"):
        Settings(dedup_window_ms=-1).check()
    with pytest.raises(SettingsError, match="DEDUP_MAX_ENTRIES must be positive"):
        Settings(dedup_max_entries=0).check()


def test_a_full_window_is_invisible_to_the_garbage_collector() -> None:
    """The window can hold a million commands for an hour: its entries must not be objects
    that every collection walks (as class instances they made the worker's full collections
    take tens of ms at 20,000 entries, growing with the window). After one collection, the
    objects the collector tracks barely grow with the window; every entry is still found."""
    clock = Clock()
    seen = SeenCommands(HOUR, 1_000_000, clock=clock)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20_000):
        seen.add(canceled(f"c{i}", offset=i), on_topic=False)
        seen.add(canceled(f"c{i}", offset=i), on_topic=True)  # read back: replaces it
    gc.collect()
    gc.collect()  # a tuple is untracked once what it holds is: nested ones may take two
    assert len(gc.get_objects()) - before < 100
    entry = seen.get(ACCOUNT, "c12345")
    assert entry is not None and entry.on_topic
    assert entry.first.origin == RecordAt("cmd", 1, 12345)
    assert entry.first.route == "um_algo" and entry.first.order_status == "CANCELED"
    assert len(seen) == 20_000


# -- the bound in bytes ---------------------------------------------------------------------

DEPLOYMENT = Path(__file__).parent.parent / "deploy" / "k8s" / "base" / "deployment.yaml"
_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}


def _quantity(text: str) -> int:
    number, unit = re.fullmatch(r"([0-9]+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    return int(number) * (_UNITS[unit] if unit else 1)


def _window_peak_bytes_per_entry(entries: int, rounds: int) -> float:
    """tracemalloc's peak for a window of ``entries`` at its worst, per entry: 64-character
    ids and accounts; every result recorded here first (not read back), a third of them
    answered again with another outcome (a replaced entry: its earlier place stays in the
    queue), ``rounds`` times the window's size recorded, so that the count bound forgets
    entries all along (the dict then holds dummies and resizes)."""
    clock = Clock()
    gc.collect()
    tracemalloc.start()
    try:
        seen = SeenCommands(HOUR, entries, clock=clock)
        base = tracemalloc.get_traced_memory()[0]
        fingerprint = bytes(range(16))
        for i in range(rounds * entries):
            clock.now = T0 + i // 100
            at = RecordAt("papi.cancel.commands", 5, 10**12 + i)
            command_id, account = f"{i:064d}", f"{i % 7:064d}"
            first = FirstResult(
                "cancel.failed",
                "outcome_unknown",
                "um_conditional",
                "NEW",
                at,
                clock.now,
                fingerprint,
            )
            seen.put(account, command_id, first, on_topic=False)
            if i % 3 == 0:
                again = FirstResult(
                    "strategy.canceled",
                    None,
                    "um_conditional",
                    "CANCELED",
                    at,
                    clock.now,
                    fingerprint,
                )
                assert seen.put(account, command_id, again, on_topic=False)
        assert len(seen) == entries
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return (peak - base) / entries


def test_an_entry_costs_at_most_entry_bytes_max() -> None:
    """Measured where the dict is at its emptiest after a resize (3 x entries just above a
    power of two: 3 x 43,700 = 131,100 > 2^17), the worst case for the bytes per entry; the
    cost of ids, accounts and outcomes is the same at any size (fixed-size entries)."""
    per_entry = _window_peak_bytes_per_entry(43_700, rounds=2)
    assert ENTRY_BYTES_MAX / 2 < per_entry <= ENTRY_BYTES_MAX, per_entry


def test_the_default_window_fits_the_deployment_memory_limit() -> None:
    """The worst case of the defaults (every entry at its worst, DEDUP_MAX_ENTRIES of them,
    plus the rest of the worker) within the Deployment's memory limit."""
    (deployment,) = yaml.safe_load_all(DEPLOYMENT.read_text("utf-8"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    limit = _quantity(container["resources"]["limits"]["memory"])
    worst = WORKER_BASE_BYTES + ENTRY_BYTES_MAX * Settings().dedup_max_entries
    assert worst <= limit, (worst / 2**20, limit / 2**20)
    assert _quantity(container["resources"]["requests"]["memory"]) == limit
