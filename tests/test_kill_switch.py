"""The kill switch (``scope: "symbol"``) against the simulator over real loopback HTTP.

The simulator runs in this event loop (uvicorn on 127.0.0.1); every request is real and
signed. Each test checks the result against the simulator's book (the ground truth).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.support import HMAC_ACCOUNTS
from worker.core.commands import Command, Market, Scope
from worker.core.decisions import Outcome
from worker.core.errors import FailureReason
from worker.core.events import Origin, strategies_canceled
from worker.core.routes import Route
from worker.core.sweep import RouteOutcome, SweepReport
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, RetryPolicy
from worker.tools.sim.app import Fault, SimConfig, SimState, seed_order
from worker.tools.sim.faults import PROFILES, Profile
from worker.tools.sim.server import running_sim, state_from_accounts

ACCOUNT = next(iter(HMAC_ACCOUNTS))


@dataclass
class Rig:
    state: SimState
    executor: CancelExecutor

    def seed(self, **spec: Any) -> int:
        created = seed_order(self.state, {"account": ACCOUNT, **spec})
        return int(created.get("algo_id") or created["strategy_id"])

    def status(self, order_id: int) -> str:
        book = self.state.book
        algo = book.algo.get(order_id)
        if algo is not None:
            return algo.status
        return next(o.status for o in book.conditional.values() if o.strategy_id == order_id)

    def requests(self, method: str, path_end: str) -> list[dict[str, Any]]:
        return [
            r for r in self.state.requests if r["method"] == method and r["path"].endswith(path_end)
        ]


@pytest.fixture
async def rig(accounts: dict[str, Credentials]) -> AsyncIterator[Rig]:
    state = state_from_accounts(accounts, SimConfig(timeout_hold_ms=600))
    policy = RetryPolicy(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=0.05)
    async with running_sim(state) as url, PapiClient(url, clock=now_ms, timeout_s=0.3) as client:
        yield Rig(state, CancelExecutor(client, accounts, policy, now_ms))


def kill_switch(market: Market = Market.UM, symbol: str = "BTCUSDT", **extra: Any) -> Command:
    return Command(
        command_id="ks-1",
        account=ACCOUNT,
        market=market,
        issued_at=now_ms(),
        symbol=symbol,
        scope=Scope.SYMBOL,
        **extra,
    )


def ids(listed: list[Any]) -> set[int]:
    out = set()
    for x in listed:
        s = x.strategy
        out.add(s["algo_id"] if x.route is Route.UM_ALGO else s["strategy_id"])
    return out


def report_of(outcome: Outcome) -> SweepReport:
    assert outcome.sweep is not None, outcome
    return outcome.sweep


def outcomes(report: SweepReport) -> dict[Route, RouteOutcome | None]:
    return {r.route: r.outcome for r in report.routes}


async def test_um_kill_switch_cancels_exactly_the_symbols_orders_on_both_routes(rig: Rig) -> None:
    algo = {rig.seed(kind="algo", symbol="BTCUSDT") for _ in range(30)}
    conditional = {rig.seed(market="UM", symbol="BTCUSDT") for _ in range(20)}
    others = {
        rig.seed(kind="algo", symbol="ETHUSDT"),
        rig.seed(market="UM", symbol="ETHUSDT"),
        rig.seed(market="CM", symbol="BTCUSD_PERP"),
        int(seed_order(rig.state, {"account": "desk-1", "kind": "algo"})["algo_id"]),
        int(
            seed_order(rig.state, {"account": "desk-1", "market": "UM", "symbol": "BTCUSDT"})[
                "strategy_id"
            ]
        ),
    }

    outcome = await rig.executor.execute(kill_switch(), now_ms())

    report = report_of(outcome)
    assert outcome.canceled and report.complete
    assert outcomes(report) == {
        Route.UM_ALGO: RouteOutcome.DONE,
        Route.UM_CONDITIONAL: RouteOutcome.DONE,
    }
    assert ids(report.swept.canceled) == algo | conditional
    assert all(x.strategy["status"] == "CANCELED" for x in report.swept.canceled)
    assert not report.swept.still_open and not report.swept.unknown
    assert all(rig.status(i) == "CANCELED" for i in algo | conditional)
    assert all(rig.status(i) == "NEW" for i in others)
    # One cancel-all per route; the strategy objects are the exchange's, decimals as strings.
    assert len(rig.requests("DELETE", "/allOpenOrders")) == 2
    sample = next(x.strategy for x in report.swept.canceled if x.route is Route.UM_CONDITIONAL)
    assert isinstance(sample["orig_qty"], str) and sample["update_time"] is not None


async def test_a_retired_um_conditional_route_is_reported_not_failed(rig: Rig) -> None:
    algo = {rig.seed(kind="algo", symbol="SOLUSDT") for _ in range(3)}
    rig.state.config = dataclasses.replace(rig.state.config, um_conditional_enabled=False)
    rig.state.apply_config()

    outcome = await rig.executor.execute(kill_switch(symbol="SOLUSDT"), now_ms())

    report = report_of(outcome)
    assert outcome.canceled and report.complete
    assert outcomes(report) == {
        Route.UM_ALGO: RouteOutcome.DONE,
        Route.UM_CONDITIONAL: RouteOutcome.RETIRED,
    }
    assert ids(report.swept.canceled) == algo
    # Listing the retired route answered 404: its cancel-all was not sent.
    assert rig.requests("DELETE", "/um/conditional/allOpenOrders") == []


async def test_cm_kill_switch_and_an_empty_symbol(rig: Rig) -> None:
    cm = {rig.seed(market="CM", symbol="ETHUSD_PERP") for _ in range(4)}
    outcome = await rig.executor.execute(kill_switch(Market.CM, "ETHUSD_PERP"), now_ms())
    report = report_of(outcome)
    assert outcomes(report) == {Route.CM_CONDITIONAL: RouteOutcome.DONE}
    assert ids(report.swept.canceled) == cm and report.complete

    # Nothing open: the cancel-all is still sent (an order may have come since the listing).
    before = len(rig.requests("DELETE", "/cm/conditional/allOpenOrders"))
    again = report_of(await rig.executor.execute(kill_switch(Market.CM, "ETHUSD_PERP"), now_ms()))
    assert again.complete and again.swept.canceled == []
    assert len(rig.requests("DELETE", "/cm/conditional/allOpenOrders")) == before + 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault(kind="timeout", apply=True),
        Fault(kind="reset", apply=True),
        Fault(502, None, "Bad Gateway", apply=True),
        Fault(400, -1007, "Timeout waiting for response from backend server.", apply=True),
    ],
    ids=["timeout", "reset", "502", "-1007"],
)
async def test_an_ambiguous_cancel_all_is_reconciled_by_listing(rig: Rig, fault: Fault) -> None:
    cm = {rig.seed(market="CM", symbol="BTCUSD_261225") for _ in range(5)}
    # Faults on DELETEs only: the cancel-all is applied but its answer is lost.
    rig.state.injector.reset(Profile(((1.0, fault),)), 0)

    outcome = await rig.executor.execute(kill_switch(Market.CM, "BTCUSD_261225"), now_ms())

    report = report_of(outcome)
    assert outcome.canceled
    assert outcomes(report) == {Route.CM_CONDITIONAL: RouteOutcome.UNCONFIRMED}
    assert ids(report.swept.canceled) == cm and report.complete is False
    assert all(rig.status(i) == "CANCELED" for i in cm)
    # Never guessed: listed again, and each order's status asked.
    assert len(rig.requests("GET", "/cm/conditional/openOrders")) == 2
    assert len(rig.requests("GET", "/cm/conditional/orderHistory")) == len(cm)


async def test_refused_listing_fails_the_command_with_the_reason(rig: Rig) -> None:
    order = rig.seed(market="CM", symbol="BNBUSD_PERP")
    rig.state.faults.append(Fault(401, -2015, "Invalid API-key, IP, or permissions for action."))
    failed_routes = (
        "cancel_worker_kill_switch_routes_total",
        {"route": "cm_conditional", "outcome": "failed"},
    )
    counted = REGISTRY.get_sample_value(*failed_routes) or 0.0

    outcome = await rig.executor.execute(kill_switch(Market.CM, "BNBUSD_PERP"), now_ms())

    assert not outcome.canceled
    assert outcome.reason is FailureReason.AUTH
    report = report_of(outcome)
    assert outcomes(report) == {Route.CM_CONDITIONAL: RouteOutcome.FAILED}
    assert rig.status(order) == "NEW"
    assert rig.requests("DELETE", "/allOpenOrders") == []
    # A kill switch that failed is counted too.
    assert REGISTRY.get_sample_value(*failed_routes) == counted + 1


async def test_expired_before_anything_is_sent(rig: Rig) -> None:
    rig.seed(kind="algo", symbol="LTCUSDT")
    outcome = await rig.executor.execute(
        kill_switch(symbol="LTCUSDT", expires_at=now_ms() - 1), now_ms()
    )
    assert not outcome.canceled and outcome.reason is FailureReason.EXPIRED
    assert rig.requests("DELETE", "/allOpenOrders") == []


@pytest.mark.parametrize("profile", ["timeouts", "resets", "5xx", "unknown-1006"])
async def test_under_a_fault_profile_the_result_matches_the_book(rig: Rig, profile: str) -> None:
    """Faults on every DELETE (the cancel-alls): whatever the worker says must be what the
    book says."""
    assert profile in PROFILES
    algo = {rig.seed(kind="algo", symbol="DOGEUSDT") for _ in range(10)}
    conditional = {rig.seed(market="UM", symbol="DOGEUSDT") for _ in range(10)}
    rig.state.config = dataclasses.replace(rig.state.config, profile=profile, seed=7)
    rig.state.apply_config()

    for n in range(3):  # a few kill switches, as a risk engine retrying would send
        outcome = await rig.executor.execute(kill_switch(symbol="DOGEUSDT"), now_ms())
        if outcome.sweep is None:
            continue
        report = outcome.sweep
        for x in report.swept.canceled:
            assert rig.status(next(iter(ids([x])))) == "CANCELED", (n, x)
        for x in report.swept.still_open:
            assert rig.status(next(iter(ids([x])))) == "NEW", (n, x)
        event = strategies_canceled(
            kill_switch(symbol="DOGEUSDT"), Origin("t", 0, n, None), report, 1, 1, 2
        )
        assert event["complete"] is report.complete
    canceled_in_book = {i for i in algo | conditional if rig.status(i) == "CANCELED"}
    assert canceled_in_book == algo | conditional
