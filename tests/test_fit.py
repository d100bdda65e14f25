"""A kill switch's result kept within one record, whatever the exchange lists (pure)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.core import events
from worker.core.commands import Command, Market, Scope
from worker.core.contracts import load_schema, result_validator
from worker.core.events import Origin
from worker.core.fit import fit_kill_switch
from worker.core.routes import Route
from worker.core.sweep import Listed, RouteOutcome, RouteReport, SweepReport, Swept


def _strategy(algo_id: int) -> dict[str, Any]:
    fields = load_schema("result-event.schema.json")["$defs"]["strategy"]["required"]
    strategy: dict[str, Any] = dict.fromkeys(fields)
    strategy.update(algo_id=algo_id, status="NEW", orig_qty="1.500", side="SELL")
    return strategy


def _event(canceled: int, still_open: int) -> dict[str, Any]:
    listed = [Listed(Route.UM_ALGO, i, _strategy(i)) for i in range(canceled + still_open)]
    swept = Swept(canceled=listed[:canceled], still_open=listed[canceled:])
    report = SweepReport((RouteReport(Route.UM_ALGO, RouteOutcome.DONE, len(listed)),), swept)
    command = Command(
        command_id="kill-1",
        account="desk-a",
        market=Market.UM,
        symbol="BTCUSDT",
        issued_at=1_795_260_000_000,
        scope=Scope("symbol"),
    )
    origin = Origin("cmd", 0, 1, b"desk-a:BTCUSDT")
    return events.strategies_canceled(command, origin, report, 3, 1, 2)


def test_a_result_that_fits_is_not_touched() -> None:
    event = _event(3, 1)
    before = orjson.dumps(event)
    assert fit_kill_switch(event, 1_000_000) == {}
    assert orjson.dumps(event) == before and "omitted" not in event


@pytest.mark.parametrize("budget", [5_000, 100_000, 1_000_000])
def test_thousands_of_listed_orders_are_cut_to_the_budget_and_counted(budget: int) -> None:
    event = _event(canceled=6_000, still_open=300)
    omitted = fit_kill_switch(event, budget)
    assert len(orjson.dumps(event)) <= budget
    result_validator().validate(event)
    # Nothing dropped silently: kept plus omitted is what was listed, per group.
    assert len(event["strategies"]) + event["omitted"]["strategies"] == 6_000
    assert len(event["still_open"]) + event["omitted"]["still_open"] == 300
    assert omitted == {g: n for g, n in event["omitted"].items() if n}
    # What an operator must act on is kept first.
    if event["strategies"]:
        assert event["omitted"]["still_open"] == 0
    assert event["complete"] is False and event["routes"][0]["listed"] == 6_300


def test_a_budget_too_small_for_the_event_itself_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        fit_kill_switch(_event(10, 0), 200)
