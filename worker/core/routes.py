"""Choosing the PAPI route for a command and building its parameters (pure).

=================  ==================================  ====================================
route              cancel endpoint                     identified by
=================  ==================================  ====================================
``um_conditional``  DELETE /papi/v1/um/conditional/order  symbol + strategyId | newClientStrategyId
``cm_conditional``  DELETE /papi/v1/cm/conditional/order  symbol + strategyId | newClientStrategyId
``um_algo``         DELETE /papi/v1/um/algo/order         algoId | clientAlgoId (no symbol)
=================  ==================================  ====================================

The UM conditional route was deprecated on 2026-04-28 in favour of UM algo; when the
exchange answers 404 on it the worker reports ``route_retired`` with :data:`RETIRED_HINTS`.

A kill switch (``scope: "symbol"``) sweeps every route of its market (:func:`plan_sweep`):
UM → the UM algo route, then the UM conditional one while the exchange still serves it;
CM → the CM conditional route. Per route: list the open orders on the symbol
(``openAlgoOrders`` / ``openOrders``), cancel them all (``allOpenOrders``), list again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from worker.core.commands import Command, Market


def encode_params(params: Iterable[tuple[str, str]]) -> str:
    """Percent-encode parameters in the given order (order is part of what is signed)."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)


class Route(enum.StrEnum):
    UM_CONDITIONAL = "um_conditional"
    CM_CONDITIONAL = "cm_conditional"
    UM_ALGO = "um_algo"


CANCEL_PATHS: dict[Route, str] = {
    Route.UM_CONDITIONAL: "/papi/v1/um/conditional/order",
    Route.CM_CONDITIONAL: "/papi/v1/cm/conditional/order",
    Route.UM_ALGO: "/papi/v1/um/algo/order",
}

RETIRED_HINTS: dict[Route, str] = {
    Route.UM_CONDITIONAL: (
        "The UM conditional route is retired (deprecated 2026-04-28). Resend the cancel with "
        "algo_id or client_algo_id instead of strategy_id/client_strategy_id, market UM: the "
        "worker then uses DELETE /papi/v1/um/algo/order."
    ),
    Route.CM_CONDITIONAL: (
        "The exchange no longer serves the CM conditional route at the configured PAPI_URL; "
        "check CANCEL_WORKER_PAPI_URL and the exchange's change log."
    ),
    Route.UM_ALGO: (
        "The exchange does not serve the UM algo route at the configured PAPI_URL; "
        "check CANCEL_WORKER_PAPI_URL."
    ),
}

QUERY_PATHS: dict[Route, tuple[str, ...]] = {
    # Open orders first, then finished ones: a conditional order leaves openOrder once it is
    # CANCELED, TRIGGERED or EXPIRED and appears in orderHistory instead.
    Route.UM_CONDITIONAL: (
        "/papi/v1/um/conditional/openOrder",
        "/papi/v1/um/conditional/orderHistory",
    ),
    Route.CM_CONDITIONAL: (
        "/papi/v1/cm/conditional/openOrder",
        "/papi/v1/cm/conditional/orderHistory",
    ),
    Route.UM_ALGO: ("/papi/v1/um/algo/algoOrder",),
}


LIST_PATHS: dict[Route, str] = {
    Route.UM_ALGO: "/papi/v1/um/algo/openAlgoOrders",
    Route.UM_CONDITIONAL: "/papi/v1/um/conditional/openOrders",
    Route.CM_CONDITIONAL: "/papi/v1/cm/conditional/openOrders",
}

CANCEL_ALL_PATHS: dict[Route, str] = {
    Route.UM_ALGO: "/papi/v1/um/algo/allOpenOrders",
    Route.UM_CONDITIONAL: "/papi/v1/um/conditional/allOpenOrders",
    Route.CM_CONDITIONAL: "/papi/v1/cm/conditional/allOpenOrders",
}

# The routes a kill switch sweeps, in order. A 404 on a retirable one means the exchange no
# longer serves it (nothing to cancel there), not that the kill switch failed.
SWEEP_ROUTES: dict[Market, tuple[Route, ...]] = {
    Market.UM: (Route.UM_ALGO, Route.UM_CONDITIONAL),
    Market.CM: (Route.CM_CONDITIONAL,),
}
RETIRABLE = frozenset({Route.UM_CONDITIONAL})


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """An unsigned request: the signer adds ``recvWindow``, ``timestamp`` and ``signature``
    at send time (:class:`worker.exchange.signing.PapiAuth`)."""

    route: Route
    method: str
    path: str
    params: tuple[tuple[str, str], ...]
    query: str = ""  # the parameters percent-encoded in order, built once (what is signed)

    def __post_init__(self) -> None:
        if not self.query and self.params:
            object.__setattr__(self, "query", encode_params(self.params))


def choose_route(command: Command) -> Route:
    """The route follows from the market and the kind of identifier."""
    if command.algo_id is not None or command.client_algo_id is not None:
        return Route.UM_ALGO
    return Route.UM_CONDITIONAL if command.market is Market.UM else Route.CM_CONDITIONAL


def _id_params(command: Command, route: Route) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if route is Route.UM_ALGO:
        if command.algo_id is not None:
            params.append(("algoId", str(command.algo_id)))
        else:
            params.append(("clientAlgoId", str(command.client_algo_id)))
    else:
        if command.symbol is None:  # the schema guarantees it; guard the invariant anyway
            raise ValueError("conditional cancel without symbol")
        params.append(("symbol", command.symbol))
        if command.strategy_id is not None:
            params.append(("strategyId", str(command.strategy_id)))
        else:
            params.append(("newClientStrategyId", str(command.client_strategy_id)))
    return params


def plan_cancel(command: Command) -> CancelRequest:
    """Build the cancel request for a validated command.

    Only values the schema has already constrained reach the parameters.
    """
    route = choose_route(command)
    params = tuple(_id_params(command, route))
    return CancelRequest(route=route, method="DELETE", path=CANCEL_PATHS[route], params=params)


def plan_queries(command: Command) -> tuple[CancelRequest, ...]:
    """The read-only queries that tell an order's status, in the order to ask them."""
    route = choose_route(command)
    params = tuple(_id_params(command, route))
    return tuple(
        CancelRequest(route=route, method="GET", path=path, params=params)
        for path in QUERY_PATHS[route]
    )


@dataclass(frozen=True, slots=True)
class Sweep:
    """One route of a kill switch: list the open orders on the symbol, cancel them all."""

    route: Route
    listing: CancelRequest
    cancel_all: CancelRequest

    @property
    def retirable(self) -> bool:
        return self.route in RETIRABLE


def plan_sweep(command: Command) -> tuple[Sweep, ...]:
    """The routes a kill switch sweeps, in order, with their requests."""
    if command.symbol is None:  # the schema guarantees it; guard the invariant anyway
        raise ValueError("kill switch without symbol")
    params = (("symbol", command.symbol),)
    return tuple(
        Sweep(
            route,
            CancelRequest(route=route, method="GET", path=LIST_PATHS[route], params=params),
            CancelRequest(
                route=route, method="DELETE", path=CANCEL_ALL_PATHS[route], params=params
            ),
        )
        for route in SWEEP_ROUTES[command.market]
    )


def plan_order_status(route: Route, symbol: str, order_id: int) -> tuple[CancelRequest, ...]:
    """The status queries for one order a kill switch listed, finished orders first (it has
    left the open list): conditional ``orderHistory`` then ``openOrder``; algo ``algoOrder``."""
    if route is Route.UM_ALGO:
        params: tuple[tuple[str, str], ...] = (("algoId", str(order_id)),)
    else:
        params = (("symbol", symbol), ("strategyId", str(order_id)))
    return tuple(
        CancelRequest(route=route, method="GET", path=path, params=params)
        for path in reversed(QUERY_PATHS[route])
    )
