"""Normalizing exchange answers into the ``strategy`` object of ``strategy.canceled`` (pure).

The exchange is external input too: every field is type-checked on the way in. Decimals
stay strings (a number where a string is expected is kept only if it is an integer, never
through float); anything malformed becomes null rather than a guess.
"""

from __future__ import annotations

import re
from typing import Any

from worker.core.commands import Command
from worker.core.routes import Route

_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
STATUSES = frozenset(
    {"NEW", "CANCELED", "TRIGGERED", "TRIGGERING", "FINISHED", "EXPIRED", "REJECTED"}
)
_SIDES = frozenset({"BUY", "SELL"})
_POSITION_SIDES = frozenset({"BOTH", "LONG", "SHORT"})

STRATEGY_FIELDS = (
    "strategy_id",
    "client_strategy_id",
    "algo_id",
    "client_algo_id",
    "status",
    "order_type",
    "side",
    "position_side",
    "orig_qty",
    "price",
    "stop_price",
    "activate_price",
    "price_rate",
    "time_in_force",
    "working_type",
    "reduce_only",
    "price_protect",
    "book_time",
    "update_time",
    "self_trade_prevention_mode",
    "good_till_date",
    "price_match",
)


def _decimal(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return value
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _str(value: object, limit: int = 64) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _choice(value: object, allowed: frozenset[str]) -> str | None:
    return value if isinstance(value, str) and value in allowed else None


def empty_strategy() -> dict[str, Any]:
    return dict.fromkeys(STRATEGY_FIELDS)


def from_strategy_object(obj: dict[str, Any], route: Route) -> dict[str, Any]:
    """Normalize the strategy object a conditional cancel returns.

    UM-only fields (``selfTradePreventionMode``, ``goodTillDate``, ``priceMatch``) are null
    for CM even if the answer carried them.
    """
    um = route is Route.UM_CONDITIONAL
    out = empty_strategy()
    out.update(
        strategy_id=_int(obj.get("strategyId")),
        client_strategy_id=_str(obj.get("newClientStrategyId")),
        status=_choice(obj.get("strategyStatus"), STATUSES),
        order_type=_str(obj.get("strategyType")),
        side=_choice(obj.get("side"), _SIDES),
        position_side=_choice(obj.get("positionSide"), _POSITION_SIDES),
        orig_qty=_decimal(obj.get("origQty")),
        price=_decimal(obj.get("price")),
        stop_price=_decimal(obj.get("stopPrice")),
        activate_price=_decimal(obj.get("activatePrice")),
        price_rate=_decimal(obj.get("priceRate")),
        time_in_force=_str(obj.get("timeInForce")),
        working_type=_str(obj.get("workingType")),
        reduce_only=_bool(obj.get("reduceOnly")),
        price_protect=_bool(obj.get("priceProtect")),
        book_time=_int(obj.get("bookTime")),
        update_time=_int(obj.get("updateTime")),
        self_trade_prevention_mode=_str(obj.get("selfTradePreventionMode")) if um else None,
        good_till_date=_int(obj.get("goodTillDate")) if um else None,
        price_match=_str(obj.get("priceMatch")) if um else None,
    )
    return out


def from_algo_cancel(command: Command) -> dict[str, Any]:
    """The UM algo cancel answers only ``{"complete": true}``: the ids come from the command.

    Every field the exchange did not report stays null; the status is CANCELED because the
    exchange confirmed exactly that.
    """
    out = empty_strategy()
    out.update(algo_id=command.algo_id, client_algo_id=command.client_algo_id, status="CANCELED")
    return out


def strategy_status_ok(obj: dict[str, Any]) -> bool:
    """A conditional cancel answer is a confirmation only if it says CANCELED."""
    return obj.get("strategyStatus") == "CANCELED"


def from_algo_object(obj: dict[str, Any]) -> dict[str, Any]:
    """Normalize a UM algo order as ``GET /papi/v1/um/algo/algoOrder`` returns it."""
    out = empty_strategy()
    out.update(
        algo_id=_int(obj.get("algoId")),
        client_algo_id=_str(obj.get("clientAlgoId")),
        status=_choice(obj.get("algoStatus"), STATUSES),
        order_type=_str(obj.get("orderType")),
        side=_choice(obj.get("side"), _SIDES),
        position_side=_choice(obj.get("positionSide"), _POSITION_SIDES),
        orig_qty=_decimal(obj.get("quantity")),
        price=_decimal(obj.get("price")),
        stop_price=_decimal(obj.get("triggerPrice")),
        activate_price=_decimal(obj.get("activatePrice")),
        price_rate=_decimal(obj.get("callbackRate")),
        time_in_force=_str(obj.get("timeInForce")),
        working_type=_str(obj.get("workingType")),
        reduce_only=_bool(obj.get("reduceOnly")),
        price_protect=_bool(obj.get("priceProtect")),
        book_time=_int(obj.get("createTime")),
        update_time=_int(obj.get("updateTime")),
        self_trade_prevention_mode=_str(obj.get("selfTradePreventionMode")),
        good_till_date=_int(obj.get("goodTillDate")),
        price_match=_str(obj.get("priceMatch")),
    )
    return out


def status_of(obj: object, route: Route) -> str | None:
    """The order status in a query answer, if it is one of the known statuses."""
    if not isinstance(obj, dict):
        return None
    return _choice(obj.get("algoStatus" if route is Route.UM_ALGO else "strategyStatus"), STATUSES)
