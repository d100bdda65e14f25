"""The official Binance Portfolio Margin SDK talks to the simulator unchanged.

This is the evidence that the simulator is faithful: the SDK signs, sends and parses the
answers exactly as it would against papi.binance.com.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from binance_common.configuration import ConfigurationRestAPI
from binance_common.errors import BadRequestError
from binance_sdk_derivatives_trading_portfolio_margin.derivatives_trading_portfolio_margin import (
    DerivativesTradingPortfolioMargin,
)
from binance_sdk_derivatives_trading_portfolio_margin.rest_api.api import trade_api
from binance_sdk_derivatives_trading_portfolio_margin.rest_api.models import (
    CancelAllCmOpenConditionalOrdersResponse,
    CancelAllUmAlgoOpenOrdersResponse,
    NewCmConditionalOrderSideEnum,
    NewCmConditionalOrderStrategyTypeEnum,
    NewUmAlgoOrderAlgoTypeEnum,
    NewUmAlgoOrderSideEnum,
    NewUmAlgoOrderTypeEnum,
)

from tests.support import HMAC_ACCOUNTS, SimControl

pytestmark = pytest.mark.e2e


def sdk_client(url: str, account: str = "desk-0", secret: str | None = None):  # type: ignore[no-untyped-def]
    key, real_secret = HMAC_ACCOUNTS[account]
    config = ConfigurationRestAPI(
        api_key=key,
        api_secret=secret or real_secret,
        base_path=url,
        timeout=5000,
        retries=0,
        compression=False,
    )
    return DerivativesTradingPortfolioMargin(config_rest_api=config).rest_api


def test_sdk_places_and_cancels_cm_conditional_order(sim: SimControl) -> None:
    api = sdk_client(sim.url)
    placed = api.new_cm_conditional_order(
        symbol="BTCUSD_PERP",
        side=NewCmConditionalOrderSideEnum.SELL,
        strategy_type=NewCmConditionalOrderStrategyTypeEnum.STOP_MARKET,
        quantity=2,
        stop_price=25000.5,
        new_client_strategy_id="sdk-cm-1",
    ).data()
    assert placed.strategy_status == "NEW"
    assert placed.symbol == "BTCUSD_PERP"
    assert placed.stop_price == "25000.5"

    canceled = api.cancel_cm_conditional_order(
        symbol="BTCUSD_PERP", strategy_id=placed.strategy_id
    ).data()
    assert canceled.strategy_id == placed.strategy_id
    assert canceled.strategy_status == "CANCELED"
    assert canceled.new_client_strategy_id == "sdk-cm-1"
    assert canceled.orig_qty == "2"

    # The book agrees, and a second cancel of the same order is refused as the exchange does.
    assert any(c["order_id"] == placed.strategy_id for c in sim.cancels())
    with pytest.raises(BadRequestError) as info:
        api.cancel_cm_conditional_order(symbol="BTCUSD_PERP", strategy_id=placed.strategy_id)
    assert "-2011" in str(info.value)


def test_sdk_places_and_cancels_um_algo_order(sim: SimControl) -> None:
    api = sdk_client(sim.url, "desk-1")
    placed = api.new_um_algo_order(
        algo_type=NewUmAlgoOrderAlgoTypeEnum.CONDITIONAL,
        symbol="ETHUSDT",
        side=NewUmAlgoOrderSideEnum.BUY,
        type=NewUmAlgoOrderTypeEnum.STOP_MARKET,
        quantity=0.5,
        trigger_price=4100.25,
        client_algo_id="sdk-algo-1",
    ).data()
    assert placed.algo_status == "NEW"
    assert placed.trigger_price == "4100.25"

    canceled = api.cancel_um_algo_order(algo_id=placed.algo_id).data()
    assert canceled.complete is True
    assert any(c["order_id"] == placed.algo_id and c["kind"] == "algo" for c in sim.cancels())


def test_sdk_with_wrong_secret_gets_signature_error(sim: SimControl) -> None:
    api = sdk_client(sim.url, "desk-2", secret="not-the-secret")
    with pytest.raises(BadRequestError) as info:
        api.cancel_um_algo_order(algo_id=123)
    assert "-1022" in str(info.value)


# -- the kill switch: cancel-all and the open-order lists ------------------------------------
#
# The UM conditional routes (DELETE /papi/v1/um/conditional/allOpenOrders and
# GET /papi/v1/um/conditional/openOrders) are not covered here: the SDK no longer has any
# method for /papi/v1/um/conditional/* (UM conditional orders moved to the algo routes), so
# there is nothing of the SDK's to drive them with. The test below pins that, so a release
# that brings them back is noticed.


def _kill_switch_expectation(
    before: dict[int, dict[str, Any]], target: Callable[[dict[str, Any]], bool]
) -> tuple[set[int], dict[int, str]]:
    """The ids the cancel-all should hit, and every order's expected status afterwards.

    ``target`` picks the orders of the canceled account, market and symbol; of those, the
    NEW ones become CANCELED and every other order of the book keeps its status.
    """
    hit = {oid for oid, o in before.items() if target(o) and o["status"] == "NEW"}
    expected = {oid: "CANCELED" if oid in hit else o["status"] for oid, o in before.items()}
    return hit, expected


def test_sdk_has_no_um_conditional_routes() -> None:
    assert "/papi/v1/um/conditional/" not in inspect.getsource(trade_api)


def test_sdk_cancels_all_um_algo_orders_on_one_symbol(sim: SimControl) -> None:
    api = sdk_client(sim.url, "desk-3")
    seeded = sim.seed(
        [
            {"account": "desk-3", "kind": "algo", "symbol": "SOLUSDT", "trigger_price": "151.5"},
            {"account": "desk-3", "kind": "algo", "symbol": "SOLUSDT", "side": "BUY"},
            {"account": "desk-3", "kind": "algo", "symbol": "XRPUSDT"},
            {"account": "desk-4", "kind": "algo", "symbol": "SOLUSDT"},
        ]
    )
    sol_1, sol_2, xrp, other_account = (o["algo_id"] for o in seeded)
    before = sim.orders()
    hit, expected = _kill_switch_expectation(
        before,
        lambda o: "algo_id" in o and o["account"] == "desk-3" and o["symbol"] == "SOLUSDT",
    )
    assert {sol_1, sol_2} <= hit
    assert not {xrp, other_account} & hit

    # The SDK parses the list: exactly the account's NEW algo orders on the symbol.
    listed = api.query_all_current_um_open_algo_orders(symbol="SOLUSDT").data()
    assert {o.algo_id for o in listed} == hit
    by_id = {o.algo_id: o for o in listed}
    assert by_id[sol_1].algo_status == "NEW"
    assert by_id[sol_1].algo_type == "CONDITIONAL"
    assert by_id[sol_1].symbol == "SOLUSDT"
    assert by_id[sol_1].trigger_price == "151.5"
    assert by_id[sol_1].client_algo_id == seeded[0]["client_algo_id"]
    assert by_id[sol_2].side == "BUY"

    cancels_before = len(sim.cancels())
    answer = api.cancel_all_um_algo_open_orders(symbol="SOLUSDT")
    assert answer.status == 200
    done = answer.data()
    assert isinstance(done, CancelAllUmAlgoOpenOrdersResponse)
    assert done.code == 200  # an integer on the algo route
    assert done.msg == "The operation of cancel all open order is done."

    after = sim.orders()
    assert {oid: after[oid]["status"] for oid in before} == expected
    assert after[xrp]["status"] == "NEW"
    assert after[other_account]["status"] == "NEW"
    new_cancels = sim.cancels()[cancels_before:]
    assert {c["order_id"] for c in new_cancels} == hit
    assert all(c["kind"] == "algo" and c["account"] == "desk-3" for c in new_cancels)

    # Listed again: nothing left on the symbol; the other symbol's order is still open.
    assert api.query_all_current_um_open_algo_orders(symbol="SOLUSDT").data() == []
    others = api.query_all_current_um_open_algo_orders(symbol="XRPUSDT").data()
    assert xrp in {o.algo_id for o in others}
    assert all(o.algo_status == "NEW" and o.symbol == "XRPUSDT" for o in others)
    # Without a symbol (every symbol of the account): the same shape, parsed the same way.
    everywhere = {o.algo_id for o in api.query_all_current_um_open_algo_orders().data()}
    assert xrp in everywhere
    assert not hit & everywhere


def test_sdk_cancels_all_cm_conditional_orders_on_one_symbol(sim: SimControl) -> None:
    api = sdk_client(sim.url, "desk-3")
    seeded = sim.seed(
        [
            {"account": "desk-3", "market": "CM", "symbol": "BNBUSD_PERP", "stop_price": "610.5"},
            {
                "account": "desk-3",
                "market": "CM",
                "symbol": "BNBUSD_PERP",
                "type": "TRAILING_STOP_MARKET",
            },
            {"account": "desk-3", "market": "CM", "symbol": "ETHUSD_PERP"},
            {"account": "desk-4", "market": "CM", "symbol": "BNBUSD_PERP"},
        ]
    )
    bnb_1, bnb_trailing, eth, other_account = (o["strategy_id"] for o in seeded)
    before = sim.orders()
    hit, expected = _kill_switch_expectation(
        before,
        lambda o: (
            o.get("market") == "CM" and o["account"] == "desk-3" and o["symbol"] == "BNBUSD_PERP"
        ),
    )
    assert {bnb_1, bnb_trailing} <= hit
    assert not {eth, other_account} & hit

    # The SDK parses the list: exactly the account's NEW conditional orders on the symbol.
    listed = api.query_all_current_cm_open_conditional_orders(symbol="BNBUSD_PERP").data()
    assert {o.strategy_id for o in listed} == hit
    by_id = {o.strategy_id: o for o in listed}
    assert by_id[bnb_1].strategy_status == "NEW"
    assert by_id[bnb_1].strategy_type == "STOP_MARKET"
    assert by_id[bnb_1].symbol == "BNBUSD_PERP"
    assert by_id[bnb_1].stop_price == "610.5"
    assert by_id[bnb_1].new_client_strategy_id == seeded[0]["client_strategy_id"]
    assert by_id[bnb_trailing].strategy_type == "TRAILING_STOP_MARKET"
    assert by_id[bnb_trailing].activate_price == "26000.5"
    assert by_id[bnb_trailing].price_rate == "0.3"

    cancels_before = len(sim.cancels())
    answer = api.cancel_all_cm_open_conditional_orders(symbol="BNBUSD_PERP")
    assert answer.status == 200
    done = answer.data()
    assert isinstance(done, CancelAllCmOpenConditionalOrdersResponse)
    assert done.code == "200"  # a string on the conditional routes
    assert done.msg == "The operation of cancel all conditional open order is done."

    after = sim.orders()
    assert {oid: after[oid]["status"] for oid in before} == expected
    assert after[eth]["status"] == "NEW"
    assert after[other_account]["status"] == "NEW"
    new_cancels = sim.cancels()[cancels_before:]
    assert {c["order_id"] for c in new_cancels} == hit
    assert all(c["market"] == "CM" and c["account"] == "desk-3" for c in new_cancels)

    # Listed again: nothing left on the symbol; the other symbol's order is still open.
    assert api.query_all_current_cm_open_conditional_orders(symbol="BNBUSD_PERP").data() == []
    others = api.query_all_current_cm_open_conditional_orders(symbol="ETHUSD_PERP").data()
    assert eth in {o.strategy_id for o in others}
    assert all(o.strategy_status == "NEW" and o.symbol == "ETHUSD_PERP" for o in others)
    # Without a symbol (every symbol of the account): the same shape, parsed the same way.
    everywhere = {o.strategy_id for o in api.query_all_current_cm_open_conditional_orders().data()}
    assert eth in everywhere
    assert not hit & everywhere


def test_a_ban_and_the_weight_counted_do_not_outlive_a_reset(sim: SimControl) -> None:
    """The session shares one simulator: a test that ran its window into 429s and a ban
    leaves neither to the next (``SimControl.reset`` posts ``reset_limits``), while within a
    test the window counts what every client spent, as the exchange's does."""
    from binance_common.errors import RateLimitBanError, TooManyRequestsError  # noqa: PLC0415

    api = sdk_client(sim.url, account="desk-4")
    sim.configure(weight_limit=10, ban_after_violations=2)
    refused: list[type[Exception]] = []
    for _ in range(30):
        try:
            api.query_all_current_um_open_algo_orders(symbol="SOLUSDT")
        except (TooManyRequestsError, RateLimitBanError) as exc:
            refused.append(type(exc))
            if isinstance(exc, RateLimitBanError):
                break
    assert refused and refused[-1] is RateLimitBanError, refused
    stats = sim.stats()
    assert stats.get("weight_429", 0) >= 1, stats
    sim.reset()
    api.query_all_current_um_open_algo_orders(symbol="SOLUSDT")  # answered: no ban, no weight
