"""The kill switch's decisions (pure), table by table."""

from __future__ import annotations

from typing import Any

import pytest

from worker.core.errors import ExchangeReply, FailureReason
from worker.core.routes import Route
from worker.core.sweep import (
    Listed,
    RouteOutcome,
    RouteReport,
    SweepReport,
    Swept,
    cancel_all_confirmed,
    classify,
    failure,
    may_cancel_again,
    parse_listing,
    to_ask,
)


def algo(order_id: int, status: str = "NEW") -> dict[str, Any]:
    return {"algoId": order_id, "algoStatus": status, "quantity": "0.010", "symbol": "BTCUSDT"}


def conditional(order_id: int, status: str = "NEW") -> dict[str, Any]:
    return {"strategyId": order_id, "strategyStatus": status, "origQty": "1.5", "symbol": "X"}


def listed(route: Route, order_id: int, status: str = "NEW") -> Listed:
    body = algo(order_id, status) if route is Route.UM_ALGO else conditional(order_id, status)
    parsed = parse_listing([body], route)
    assert parsed is not None
    return parsed[0]


@pytest.mark.parametrize(
    ("body", "confirmed"),
    [
        ({"code": 200, "msg": "done"}, True),
        ({"code": "200", "msg": "done"}, True),
        ({"code": True}, False),  # a bool is not the integer 200
        ({"code": 200.0}, False),
        ({"code": "-1", "msg": "x"}, False),
        ({"msg": "done"}, False),
        ([], False),
        (None, False),
        ("200", False),
    ],
)
def test_cancel_all_confirmation(body: object, confirmed: bool) -> None:
    assert cancel_all_confirmed(body) is confirmed


def test_listing_parses_both_shapes_and_refuses_junk() -> None:
    parsed = parse_listing([algo(1), algo(2)], Route.UM_ALGO)
    assert parsed is not None and [x.order_id for x in parsed] == [1, 2]
    assert parsed[0].strategy["orig_qty"] == "0.010"  # decimals stay strings
    cond = parse_listing([conditional(7)], Route.CM_CONDITIONAL)
    assert cond is not None and cond[0].strategy["strategy_id"] == 7
    assert parse_listing([], Route.UM_ALGO) == []
    for junk in ({"code": -1}, [1, 2], [algo(1), "x"], [{"algoId": "1"}], [conditional(-3)], None):
        assert parse_listing(junk, Route.UM_ALGO) is None, junk
    assert parse_listing([conditional(-3)], Route.UM_CONDITIONAL) is None  # no valid id


def test_every_listed_order_lands_in_exactly_one_group() -> None:
    a1, a2, a3, a4, a5 = (listed(Route.UM_ALGO, i) for i in range(1, 6))
    c1 = listed(Route.UM_CONDITIONAL, 1)  # the same number on another route is another order
    open_after = {a2.key: listed(Route.UM_ALGO, 2)}
    statuses = {
        a1.key: listed(Route.UM_ALGO, 1, "CANCELED").strategy,
        a3.key: listed(Route.UM_ALGO, 3, "TRIGGERED").strategy,
        a4.key: None,  # not learned
        a5.key: listed(Route.UM_ALGO, 5, "NEW").strategy,  # left the list, yet still NEW
        c1.key: listed(Route.UM_CONDITIONAL, 1, "CANCELED").strategy,
    }
    before = [a1, a2, a3, a4, a5, c1]
    assert to_ask(before, open_after) == [a1, a3, a4, a5, c1]
    swept = classify(before, open_after, statuses)
    assert [x.key for x in swept.canceled] == [a1.key, c1.key]
    assert swept.canceled[0].strategy["status"] == "CANCELED"
    assert [x.key for x in swept.closed_otherwise] == [a3.key]
    assert [x.key for x in swept.still_open] == [a2.key, a5.key]
    assert [x.key for x in swept.unknown] == [a4.key]
    assert not swept.settled


def test_complete_only_when_every_route_is_done_or_retired_and_all_settled() -> None:
    done = RouteReport(Route.UM_ALGO, RouteOutcome.DONE)
    retired = RouteReport(Route.UM_CONDITIONAL, RouteOutcome.RETIRED)
    unconfirmed = RouteReport(Route.UM_CONDITIONAL, RouteOutcome.UNCONFIRMED)
    assert SweepReport((done, retired), Swept()).complete
    assert not SweepReport((done, unconfirmed), Swept()).complete
    assert not SweepReport((done,), Swept(unknown=[listed(Route.UM_ALGO, 1)])).complete
    fields = SweepReport((done, retired), Swept()).as_fields()
    assert fields["routes"][1]["outcome"] == "retired" and fields["scope"] == "symbol"


def test_failure_only_when_no_route_may_have_swept() -> None:
    reply = ExchangeReply(401, -2015, "Invalid API-key")
    refused = RouteReport(
        Route.UM_ALGO, RouteOutcome.FAILED, reason=FailureReason.AUTH, detail="x", exchange=reply
    )
    retired = RouteReport(Route.UM_CONDITIONAL, RouteOutcome.RETIRED)
    assert failure([refused, retired]) == (FailureReason.AUTH, "um_algo: x", reply, None)
    all_retired = failure([retired])
    assert all_retired is not None and all_retired[0] is FailureReason.ROUTE_RETIRED
    assert all_retired[3] is not None and "algo_id" in all_retired[3]  # the retirement hint
    assert failure([refused, RouteReport(Route.UM_CONDITIONAL, RouteOutcome.UNCONFIRMED)]) is None
    assert failure([RouteReport(Route.UM_ALGO)]) == (
        FailureReason.OUTCOME_UNKNOWN,
        "um_algo: outcome_unknown",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("outcome", "reason", "again"),
    [
        (RouteOutcome.DONE, None, True),
        (RouteOutcome.UNCONFIRMED, None, True),
        (RouteOutcome.FAILED, FailureReason.EXCHANGE_UNAVAILABLE, True),  # 503s spent
        (RouteOutcome.FAILED, FailureReason.RATE_LIMITED, True),
        (RouteOutcome.FAILED, FailureReason.AUTH, False),  # would only repeat
        (RouteOutcome.FAILED, FailureReason.REJECTED, False),
        (RouteOutcome.RETIRED, None, False),
    ],
)
def test_which_routes_get_another_cancel_all(
    outcome: RouteOutcome, reason: FailureReason | None, again: bool
) -> None:
    report = RouteReport(Route.UM_CONDITIONAL, outcome, reason=reason)
    assert may_cancel_again(report) is again
