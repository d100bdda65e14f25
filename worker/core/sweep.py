"""The kill switch's decisions (pure): what the listings, the cancel-all answers and each
order's status mean. :mod:`worker.killswitch` sends and waits; everything decided is here.

A kill switch (``scope: "symbol"``) sweeps every route of its market (:func:`worker.core.routes.
plan_sweep`). Per route, in order:

1. **list** the open orders on the symbol. A 404 on a retirable route (UM conditional) means
   the exchange no longer serves it: nothing can be open there (:data:`RouteOutcome.RETIRED`,
   not a failure). Any other failure to list fails the route: what it would cancel could not
   be reported, and the same error would meet the cancel;
2. **cancel all**. A confirmation (``code`` 200, an integer or a string by route) →
   :data:`RouteOutcome.DONE`; an ambiguous answer, or a confirmation not recognized →
   :data:`RouteOutcome.UNCONFIRMED`, reconciled like a confirmed one, never guessed; a refusal
   (terminal, retries spent, not admitted) → :data:`RouteOutcome.FAILED`;
3. **list again** (every route that was listed, whatever its cancel-all met), and ask the
   status of every order that left the list. Orders still standing on a route whose refusal
   may pass another time (:func:`may_cancel_again`) get another cancel-all, each with its
   own retry budget, up to ``max_cancel_rounds``.

Every order listed in step 1 ends in exactly one group of the ``strategies.canceled`` event
(:func:`classify`): ``strategies`` (went from NEW to CANCELED), ``closed_otherwise``
(TRIGGERED, EXPIRED, ...), ``still_open`` (NEW after the cancel-all) or ``unknown`` (its status
could not be learned). The event is ``complete`` when every route is done or retired and
every listed order was canceled or closed otherwise.

When no route got as far as a cancel-all that may have applied (each failed or is retired),
the outcome is ``cancel.failed`` with the first failed route's reason (``route_retired`` when
every route is retired) — see :func:`failure`.

Orders placed between the first listing and the cancel-all are canceled by it too, but the
exchange names none: they are not reported, since nothing listed them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.core import normalize
from worker.core.errors import ExchangeReply, FailureReason
from worker.core.routes import RETIRED_HINTS, Route


class RouteOutcome(enum.StrEnum):
    DONE = "done"  # the exchange confirmed the cancel-all
    UNCONFIRMED = "unconfirmed"  # no readable confirmation: reconciled by listing again
    RETIRED = "retired"  # 404 on a retirable route: the exchange no longer serves it
    FAILED = "failed"  # listing or cancel-all refused, or not sent in time


@dataclass(frozen=True, slots=True)
class Listed:
    """One order a listing showed: its route, exchange id and normalized strategy object."""

    route: Route
    order_id: int
    strategy: dict[str, Any]

    @property
    def key(self) -> tuple[Route, int]:
        return (self.route, self.order_id)

    def as_dict(self) -> dict[str, Any]:
        return {"route": self.route.value, "strategy": self.strategy}


@dataclass(slots=True)
class RouteReport:
    """What became of one route of a kill switch."""

    route: Route
    outcome: RouteOutcome | None = None
    listed: int = 0  # orders open on the route at the first listing
    reason: FailureReason | None = None
    detail: str = ""
    exchange: ExchangeReply | None = None

    @property
    def swept(self) -> bool:
        """A cancel-all that may have applied: its orders are reconciled."""
        return self.outcome in (RouteOutcome.DONE, RouteOutcome.UNCONFIRMED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.route.value,
            "outcome": (self.outcome or RouteOutcome.FAILED).value,
            "listed": self.listed,
            "reason": self.reason.value if self.reason is not None else None,
            "detail": self.detail or None,
            "exchange": self.exchange.as_dict() if self.exchange is not None else None,
        }


@dataclass(slots=True)
class Swept:
    """The orders of a kill switch, each in exactly one group (see the module docstring)."""

    canceled: list[Listed] = field(default_factory=list)
    closed_otherwise: list[Listed] = field(default_factory=list)
    still_open: list[Listed] = field(default_factory=list)
    unknown: list[Listed] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        """Every listed order was canceled or closed otherwise."""
        return not self.still_open and not self.unknown


@dataclass(frozen=True, slots=True)
class SweepReport:
    """A kill switch's result: the ``strategies.canceled`` event's own fields."""

    routes: tuple[RouteReport, ...]
    swept: Swept

    @property
    def complete(self) -> bool:
        return self.swept.settled and all(
            r.outcome in (RouteOutcome.DONE, RouteOutcome.RETIRED) for r in self.routes
        )

    def as_fields(self) -> dict[str, Any]:
        return {
            "scope": "symbol",
            "complete": self.complete,
            "routes": [r.as_dict() for r in self.routes],
            "strategies": [x.as_dict() for x in self.swept.canceled],
            "closed_otherwise": [x.as_dict() for x in self.swept.closed_otherwise],
            "still_open": [x.as_dict() for x in self.swept.still_open],
            "unknown": [x.as_dict() for x in self.swept.unknown],
        }


# -- reading the exchange's answers ------------------------------------------------------------


def normalized(obj: Mapping[str, Any], route: Route) -> dict[str, Any]:
    """An order object of ``route`` (list or status answer) as the event's strategy object."""
    if route is Route.UM_ALGO:
        return normalize.from_algo_object(dict(obj))
    return normalize.from_strategy_object(dict(obj), route)


def order_id_of(strategy: Mapping[str, Any], route: Route) -> int | None:
    value = strategy.get("algo_id" if route is Route.UM_ALGO else "strategy_id")
    return value if isinstance(value, int) else None


def parse_listing(body: object, route: Route) -> list[Listed] | None:
    """The orders of an open-orders answer, or None when the answer is not a list of orders
    with ids (then nothing is concluded from it)."""
    if not isinstance(body, list):
        return None
    out: list[Listed] = []
    for item in body:
        if not isinstance(item, dict):
            return None
        strategy = normalized(item, route)
        order_id = order_id_of(strategy, route)
        if order_id is None:
            return None
        out.append(Listed(route, order_id, strategy))
    return out


def cancel_all_confirmed(body: object) -> bool:
    """The cancel-all answers ``{"code": 200, "msg": ...}``: an integer on the UM algo route,
    the string ``"200"`` on the conditional ones. Anything else confirms nothing."""
    if not isinstance(body, dict):
        return False
    code = body.get("code")
    return (isinstance(code, int) and not isinstance(code, bool) and code == 200) or code == "200"


# -- deciding -----------------------------------------------------------------------------------


def classify(
    before: Iterable[Listed],
    open_after: Mapping[tuple[Route, int], Listed],
    statuses: Mapping[tuple[Route, int], dict[str, Any] | None],
) -> Swept:
    """Sort the orders of the first listing by what became of them.

    ``open_after``: the orders the second listing showed (routes not listed again are not in
    it; their orders must be in ``statuses``). ``statuses``: for the orders that left the list,
    the normalized status answer, or None when it could not be learned.
    """
    swept = Swept()
    for listed in before:
        again = open_after.get(listed.key)
        if again is not None:
            swept.still_open.append(Listed(listed.route, listed.order_id, again.strategy))
            continue
        found = statuses.get(listed.key)
        status = found.get("status") if found is not None else None
        if found is None or status is None:
            swept.unknown.append(listed)
        elif status == "CANCELED":
            swept.canceled.append(Listed(listed.route, listed.order_id, found))
        elif status == "NEW":
            swept.still_open.append(Listed(listed.route, listed.order_id, found))
        else:
            swept.closed_otherwise.append(Listed(listed.route, listed.order_id, found))
    return swept


# Refusals that another cancel-all, in a later round, may get past.
_PASSING = frozenset(
    {
        FailureReason.EXCHANGE_UNAVAILABLE,
        FailureReason.RETRIES_EXHAUSTED,
        FailureReason.RATE_LIMITED,
        FailureReason.OUTCOME_UNKNOWN,
    }
)


def may_cancel_again(report: RouteReport) -> bool:
    """Whether a route whose listed orders still stand gets another cancel-all: not after a
    refusal that would only repeat (auth, a bad symbol, a retired route)."""
    if report.outcome is RouteOutcome.RETIRED:
        return False
    return report.outcome is not RouteOutcome.FAILED or report.reason in _PASSING


def to_ask(
    before: Iterable[Listed], open_after: Mapping[tuple[Route, int], Listed]
) -> list[Listed]:
    """The listed orders whose status must be asked: those that left the open list."""
    return [x for x in before if x.key not in open_after]


def failure(
    routes: Sequence[RouteReport],
) -> tuple[FailureReason, str, ExchangeReply | None, str | None] | None:
    """The ``cancel.failed`` of a kill switch none of whose routes got as far as a cancel-all
    that may have applied, or None when at least one did (then the result is
    ``strategies.canceled``, with each route's outcome)."""
    if any(r.swept for r in routes):
        return None
    failed = [r for r in routes if r.outcome is not RouteOutcome.RETIRED]
    if not failed:
        names = ", ".join(r.route.value for r in routes)
        hints = " ".join(RETIRED_HINTS[r.route] for r in routes)
        return (
            FailureReason.ROUTE_RETIRED,
            f"the exchange serves none of the routes swept ({names})",
            None,
            hints,
        )
    first = failed[0]
    reason = first.reason or FailureReason.OUTCOME_UNKNOWN
    return reason, f"{first.route.value}: {first.detail or reason.value}", first.exchange, None
