"""The simulator's order book: conditional (UM, CM) and UM algo orders per account (pure)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any


class SimError(Exception):
    """An exchange error answer: HTTP status, Binance code, message."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg


# Factories, not shared instances: raising one exception object again and again chains a new
# traceback onto the old one each time (and keeps every frame of it alive).
def unknown_order() -> SimError:
    return SimError(400, -2011, "Unknown order sent.")


def no_such_order() -> SimError:
    return SimError(400, -2013, "Order does not exist.")


CONDITIONAL_TYPES = (
    "STOP",
    "STOP_MARKET",
    "TAKE_PROFIT",
    "TAKE_PROFIT_MARKET",
    "TRAILING_STOP_MARKET",
)
FINAL = ("CANCELED", "TRIGGERED", "FINISHED", "EXPIRED", "REJECTED")


def decimal_str(value: object, name: str) -> str:
    """Normalize a decimal parameter to Binance's plain string form, rejecting junk."""
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise SimError(400, -1100, f"Illegal characters found in parameter '{name}'.") from None
    if not number.is_finite() or number < 0:
        raise SimError(400, -1100, f"Illegal characters found in parameter '{name}'.")
    return format(number.normalize(), "f")


@dataclass
class ConditionalOrder:
    account: str
    market: str
    strategy_id: int
    client_id: str
    symbol: str
    side: str
    strategy_type: str
    position_side: str = "BOTH"
    orig_qty: str = "1"
    price: str = "0"
    stop_price: str = "0"
    activate_price: str | None = None
    price_rate: str | None = None
    time_in_force: str = "GTC"
    working_type: str = "CONTRACT_PRICE"
    reduce_only: bool = False
    price_protect: bool = False
    book_time: int = 0
    update_time: int = 0
    status: str = "NEW"
    self_trade_prevention_mode: str = "NONE"
    good_till_date: int = 0
    price_match: str = "NONE"

    def as_strategy(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "newClientStrategyId": self.client_id,
            "strategyId": self.strategy_id,
            "strategyStatus": self.status,
            "strategyType": self.strategy_type,
            "origQty": self.orig_qty,
            "price": self.price,
            "reduceOnly": self.reduce_only,
            "side": self.side,
            "positionSide": self.position_side,
            "stopPrice": self.stop_price,
            "symbol": self.symbol,
            "timeInForce": self.time_in_force,
            "activatePrice": self.activate_price,
            "priceRate": self.price_rate,
            "bookTime": self.book_time,
            "updateTime": self.update_time,
            "workingType": self.working_type,
            "priceProtect": self.price_protect,
        }
        if self.strategy_type != "TRAILING_STOP_MARKET":
            del obj["activatePrice"], obj["priceRate"]
        if self.market == "UM":
            obj.update(
                selfTradePreventionMode=self.self_trade_prevention_mode,
                goodTillDate=self.good_till_date,
                priceMatch=self.price_match,
            )
        return obj


@dataclass
class AlgoOrder:
    account: str
    algo_id: int
    client_algo_id: str
    symbol: str
    side: str
    order_type: str
    position_side: str = "BOTH"
    quantity: str = "1"
    price: str = "0"
    trigger_price: str = "0"
    time_in_force: str = "GTC"
    working_type: str = "CONTRACT_PRICE"
    reduce_only: bool = False
    price_protect: bool = False
    close_position: bool = False
    create_time: int = 0
    update_time: int = 0
    trigger_time: int = 0
    status: str = "NEW"
    self_trade_prevention_mode: str = "NONE"
    price_match: str = "NONE"
    good_till_date: int = 0

    def as_algo(self) -> dict[str, Any]:
        return {
            "algoId": self.algo_id,
            "clientAlgoId": self.client_algo_id,
            "algoType": "CONDITIONAL",
            "orderType": self.order_type,
            "symbol": self.symbol,
            "side": self.side,
            "positionSide": self.position_side,
            "timeInForce": self.time_in_force,
            "quantity": self.quantity,
            "algoStatus": self.status,
            "actualOrderId": "",
            "actualPrice": "0",
            "triggerPrice": self.trigger_price,
            "price": self.price,
            "selfTradePreventionMode": self.self_trade_prevention_mode,
            "workingType": self.working_type,
            "priceMatch": self.price_match,
            "closePosition": self.close_position,
            "priceProtect": self.price_protect,
            "reduceOnly": self.reduce_only,
            "createTime": self.create_time,
            "updateTime": self.update_time,
            "triggerTime": self.trigger_time,
            "goodTillDate": self.good_till_date,
        }


@dataclass
class CancelRecord:
    """One cancel the book applied: the ground truth tests compare results with."""

    kind: str
    account: str
    market: str
    order_id: int
    at: int


@dataclass
class Book:
    conditional: dict[tuple[str, int], ConditionalOrder] = field(default_factory=dict)
    algo: dict[int, AlgoOrder] = field(default_factory=dict)
    cancels: list[CancelRecord] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(3_000_000_001))
    # Orders by client id, so that a lookup by client id (and every placement, which checks
    # for a duplicate) does not scan the whole book: seeding n orders stays O(n).
    _conditional_by_client: dict[tuple[str, str], list[ConditionalOrder]] = field(
        default_factory=dict
    )
    _algo_by_client: dict[str, list[AlgoOrder]] = field(default_factory=dict)

    def next_id(self) -> int:
        return next(self._ids)

    # -- conditional ---------------------------------------------------------------------

    def place_conditional(self, order: ConditionalOrder) -> ConditionalOrder:
        if (
            self.find_conditional(
                order.account, order.market, order.symbol, None, order.client_id, open_only=True
            )
            is not None
        ):
            raise SimError(400, -4116, "ClientOrderId is duplicated.")
        self.conditional[(order.market, order.strategy_id)] = order
        self._conditional_by_client.setdefault((order.market, order.client_id), []).append(order)
        return order

    def find_conditional(
        self,
        account: str,
        market: str,
        symbol: str,
        strategy_id: int | None,
        client_id: str | None,
        *,
        open_only: bool = False,
    ) -> ConditionalOrder | None:
        if strategy_id is not None:
            found = self.conditional.get((market, strategy_id))
            candidates = [found] if found is not None else []
        else:
            candidates = (
                list(self._conditional_by_client.get((market, client_id), ()))
                if client_id is not None
                else []
            )
            candidates.sort(key=lambda o: (o.status == "NEW", o.book_time, o.strategy_id))
            candidates = candidates[-1:]
        for order in candidates:
            if order.account == account and order.symbol == symbol:
                if open_only and order.status != "NEW":
                    return None
                return order
        return None

    def open_conditional(
        self, account: str, market: str, symbol: str | None
    ) -> list[ConditionalOrder]:
        """The account's NEW conditional orders of a market (one symbol, or all), oldest first."""
        found = [
            o
            for o in self.conditional.values()
            if o.account == account
            and o.market == market
            and o.status == "NEW"
            and (symbol is None or o.symbol == symbol)
        ]
        return sorted(found, key=lambda o: o.strategy_id)

    def cancel_conditional(
        self,
        account: str,
        market: str,
        symbol: str,
        strategy_id: int | None,
        client_id: str | None,
        now: int,
    ) -> ConditionalOrder:
        order = self.find_conditional(account, market, symbol, strategy_id, client_id)
        if order is None or order.status != "NEW":
            raise unknown_order()
        order.status = "CANCELED"
        order.update_time = now
        self.cancels.append(CancelRecord("conditional", account, market, order.strategy_id, now))
        return order

    def cancel_all_conditional(
        self, account: str, market: str, symbol: str, now: int
    ) -> list[ConditionalOrder]:
        """Cancel every NEW conditional order of the account on one symbol (the kill switch)."""
        orders = self.open_conditional(account, market, symbol)
        for order in orders:
            order.status = "CANCELED"
            order.update_time = now
            self.cancels.append(
                CancelRecord("conditional", account, market, order.strategy_id, now)
            )
        return orders

    # -- algo ----------------------------------------------------------------------------

    def place_algo(self, order: AlgoOrder) -> AlgoOrder:
        if self.find_algo(order.account, None, order.client_algo_id, open_only=True) is not None:
            raise SimError(400, -4116, "ClientOrderId is duplicated.")
        self.algo[order.algo_id] = order
        self._algo_by_client.setdefault(order.client_algo_id, []).append(order)
        return order

    def find_algo(
        self,
        account: str,
        algo_id: int | None,
        client_algo_id: str | None,
        *,
        open_only: bool = False,
    ) -> AlgoOrder | None:
        if algo_id is not None:
            found = self.algo.get(algo_id)
            candidates = [found] if found is not None else []
        else:
            candidates = (
                list(self._algo_by_client.get(client_algo_id, ()))
                if client_algo_id is not None
                else []
            )
            candidates.sort(key=lambda o: (o.status == "NEW", o.create_time, o.algo_id))
            candidates = candidates[-1:]
        for order in candidates:
            if order.account == account:
                if open_only and order.status != "NEW":
                    return None
                return order
        return None

    def open_algo(
        self, account: str, symbol: str | None, algo_id: int | None = None
    ) -> list[AlgoOrder]:
        """The account's NEW UM algo orders (one symbol or all; one id or all), oldest first."""
        found = [
            o
            for o in self.algo.values()
            if o.account == account
            and o.status == "NEW"
            and (symbol is None or o.symbol == symbol)
            and (algo_id is None or o.algo_id == algo_id)
        ]
        return sorted(found, key=lambda o: o.algo_id)

    def cancel_algo(
        self, account: str, algo_id: int | None, client_algo_id: str | None, now: int
    ) -> AlgoOrder:
        order = self.find_algo(account, algo_id, client_algo_id)
        if order is None or order.status != "NEW":
            raise unknown_order()
        order.status = "CANCELED"
        order.update_time = now
        self.cancels.append(CancelRecord("algo", account, "UM", order.algo_id, now))
        return order

    def cancel_all_algo(self, account: str, symbol: str, now: int) -> list[AlgoOrder]:
        """Cancel every NEW UM algo order of the account on one symbol (the kill switch)."""
        orders = self.open_algo(account, symbol)
        for order in orders:
            order.status = "CANCELED"
            order.update_time = now
            self.cancels.append(CancelRecord("algo", account, "UM", order.algo_id, now))
        return orders
