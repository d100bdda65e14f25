"""The official Binance Portfolio Margin SDK talks to the simulator unchanged.

This is the evidence that the simulator is faithful: the SDK signs, sends and parses the
answers exactly as it would against papi.binance.com.
"""

from __future__ import annotations

import pytest
from binance_common.configuration import ConfigurationRestAPI
from binance_common.errors import BadRequestError
from binance_sdk_derivatives_trading_portfolio_margin.derivatives_trading_portfolio_margin import (
    DerivativesTradingPortfolioMargin,
)
from binance_sdk_derivatives_trading_portfolio_margin.rest_api.models import (
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
