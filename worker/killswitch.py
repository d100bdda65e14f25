"""The kill switch: cancel every open order of an account on a symbol, and say exactly which.

Orchestration only; what each listing, answer and status means is decided in
:mod:`worker.core.sweep` (pure). The routes of the command's market are swept concurrently:

1. list the open orders on the symbol (retried like a status query until the deadline);
2. cancel them all (retried like a single cancel: fresh signature each time, the governor,
   the deadline and ``expires_at``, a -1021 re-sync);
3. list again, and ask the status of each order that left the list (a few at a time), until
   the reconcile deadline; a listed order still open sends the cancel-all again, up to
   ``max_cancel_rounds``.

Every request goes through the same client, governor and clock as single cancels, and the
command is processed in its key's order like any other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from worker import metrics
from worker.core import decisions, normalize
from worker.core.commands import Command
from worker.core.decisions import Outcome
from worker.core.errors import ExchangeError, FailureReason, PapiError
from worker.core.retry_policy import RetryPolicy
from worker.core.routes import Route, Sweep, plan_order_status, plan_sweep
from worker.core.sweep import (
    Listed,
    RouteOutcome,
    RouteReport,
    SweepReport,
    cancel_all_confirmed,
    classify,
    failure,
    may_cancel_again,
    normalized,
    parse_listing,
    to_ask,
)
from worker.exchange.accounts import Credentials
from worker.jobs import Job

if TYPE_CHECKING:
    from worker.exchange.papi import PapiResponse

log = logging.getLogger(__name__)

STATUS_QUERIES_IN_FLIGHT = 8  # per kill switch: the governor still decides when each is sent


class SweepPort(Protocol):
    """What the kill switch needs from the executor."""

    @property
    def policy(self) -> RetryPolicy: ...

    async def cancel_with_retry(self, job: Job) -> PapiResponse: ...

    async def ask(
        self,
        job: Job,
        requests: Sequence[Any],
        deadline: int,
        readable: Callable[[Any], bool],
    ) -> PapiResponse | None: ...


class KillSwitch:
    def __init__(self, port: SweepPort, clock: Callable[[], int]) -> None:
        self._port = port
        self._clock = clock

    async def execute(self, command: Command, creds: Credentials, deadline: int) -> Outcome:
        sweeps = plan_sweep(command)
        jobs: list[Job] = []  # every request budget of this command: their attempts add up

        def budget(sweep: Sweep) -> Job:
            job = Job(command, creds, sweep.route, deadline, sweep.cancel_all)
            jobs.append(job)
            return job

        # Listings and status queries share one budget per route; each cancel-all (the first
        # and every one sent again) has its own, as a single cancel would.
        asking = {s.route: budget(s) for s in sweeps}
        reports = {s.route: RouteReport(s.route) for s in sweeps}
        listings = await asyncio.gather(
            *(self._list_first(asking[s.route], s, reports[s.route]) for s in sweeps)
        )
        before = [x for listed in listings for x in listed or ()]
        live = [s for s, listed in zip(sweeps, listings, strict=True) if listed is not None]
        await asyncio.gather(*(self._cancel_all(budget(s), s, reports[s.route]) for s in live))
        reconcile_by = max(deadline, self._clock() + self._port.policy.reconcile_budget_ms)
        open_after: dict[tuple[Route, int], Listed] = {}
        statuses: dict[tuple[Route, int], dict[str, Any] | None] = {}
        rounds = self._port.policy.max_cancel_rounds
        for round_no in range(rounds):
            # Every listed route is reconciled, whatever its cancel-all met: each listed
            # order ends in exactly one group, by what the exchange says of it.
            open_after = await self._list_again(asking, live, reconcile_by)
            # Ask only what is not known to be final yet (an order found NEW is asked again).
            unsettled = [
                x
                for x in to_ask(before, open_after)
                if (statuses.get(x.key) or {}).get("status") in (None, "NEW")
            ]
            statuses.update(await self._statuses(asking, command, unsettled, reconcile_by))
            standing = {x.route for x in before if x.key in open_after}
            standing |= {
                x.route for x in before if (statuses.get(x.key) or {}).get("status") == "NEW"
            }
            again = {r for r in standing if may_cancel_again(reports[r])}
            if not again or round_no + 1 >= rounds or self._clock() >= deadline:
                break  # nothing to cancel again, or no round or time left for it
            log.info(
                "command_id=%s: orders still open on %s after the cancel-all; canceling again",
                command.command_id,
                ", ".join(sorted(r.value for r in again)),
            )
            await asyncio.gather(
                *(
                    self._cancel_all(budget(s), s, reports[s.route])
                    for s in live
                    if s.route in again
                )
            )
        report = SweepReport(
            tuple(reports[s.route] for s in sweeps), classify(before, open_after, statuses)
        )
        attempts = sum(j.attempts for j in jobs)
        _count(report)
        refused = failure(report.routes)
        if refused is not None and not report.swept.canceled:
            reason, detail, exchange, hint = refused
            return Outcome(
                False,
                attempts,
                reason=reason,
                detail=detail,
                exchange=exchange,
                hint=hint,
                sweep=report,
            )
        return Outcome(True, attempts, sweep=report)

    # -- the steps ------------------------------------------------------------------------------

    async def _list(self, job: Job, sweep: Sweep, deadline: int) -> list[Listed]:
        """The route's open orders on the symbol now (the last error raised)."""
        response = await self._port.ask(
            job, (sweep.listing,), deadline, lambda b: parse_listing(b, sweep.route) is not None
        )
        if response is None:  # "no such order" on a listing: nothing listed
            return []
        return parse_listing(response.body, sweep.route) or []

    async def _list_first(self, job: Job, sweep: Sweep, report: RouteReport) -> list[Listed] | None:
        """The route's open orders before the cancel-all, or None when the route is retired or
        failed (``report`` says which)."""
        try:
            listed = await self._list(job, sweep, job.deadline)
        except PapiError as exc:
            self._failed(job, sweep, report, exc, listing=True)
            return None
        report.listed = len(listed)
        return listed

    async def _cancel_all(self, job: Job, sweep: Sweep, report: RouteReport) -> None:
        try:
            response = await self._port.cancel_with_retry(job)
        except PapiError as exc:
            self._failed(job, sweep, report, exc, listing=False)
            return
        if cancel_all_confirmed(response.body):
            report.outcome = RouteOutcome.DONE
            report.reason, report.detail, report.exchange = None, "", None
        else:
            report.outcome = RouteOutcome.UNCONFIRMED
            report.reason, report.exchange = None, None
            report.detail = "the cancel-all answer confirmed nothing; reconciled by listing"

    def _failed(
        self, job: Job, sweep: Sweep, report: RouteReport, exc: PapiError, *, listing: bool
    ) -> None:
        step = decisions.after_cancel_error(exc, job.progress())
        if isinstance(step, Outcome):
            if step.reason is FailureReason.ROUTE_RETIRED and sweep.retirable:
                report.outcome = RouteOutcome.RETIRED
                report.detail = "the exchange no longer serves this route: nothing open there"
                return
            report.outcome = RouteOutcome.FAILED
            report.reason, report.detail, report.exchange = step.reason, step.detail, step.exchange
        elif listing:  # no readable listing in time: what would be canceled cannot be told
            report.outcome = RouteOutcome.FAILED
            report.reason = FailureReason.EXCHANGE_UNAVAILABLE
            report.detail = f"open orders not listed: {exc}"
            report.exchange = exc.reply if isinstance(exc, ExchangeError) else None
        else:  # the cancel-all may have applied: reconciled by listing, never guessed
            report.outcome = RouteOutcome.UNCONFIRMED
            report.reason, report.exchange = None, None
            report.detail = f"no readable answer to the cancel-all ({exc}); reconciled by listing"
        log.info(
            "command_id=%s: %s %s: %s",
            job.command.command_id,
            sweep.route.value,
            report.outcome.value,
            report.detail,
        )

    async def _list_again(
        self, jobs: dict[Route, Job], swept: Sequence[Sweep], deadline: int
    ) -> dict[tuple[Route, int], Listed]:
        """The routes' open orders now; a route that cannot be listed is left out (its
        orders' statuses are asked one by one instead)."""

        async def one(sweep: Sweep) -> list[Listed]:
            try:
                return await self._list(jobs[sweep.route], sweep, deadline)
            except PapiError as exc:
                log.warning(
                    "command_id=%s: %s not listed again: %s",
                    jobs[sweep.route].command.command_id,
                    sweep.route.value,
                    exc,
                )
                return []

        found = await asyncio.gather(*(one(s) for s in swept))
        return {x.key: x for listed in found for x in listed}

    async def _statuses(
        self, jobs: dict[Route, Job], command: Command, orders: Sequence[Listed], deadline: int
    ) -> dict[tuple[Route, int], dict[str, Any] | None]:
        """Each order's normalized status answer, or None when it could not be learned."""
        gate = asyncio.Semaphore(STATUS_QUERIES_IN_FLIGHT)
        symbol = command.symbol or ""

        async def one(listed: Listed) -> tuple[tuple[Route, int], dict[str, Any] | None]:
            route = listed.route
            async with gate:
                try:
                    response = await self._port.ask(
                        jobs[route],
                        plan_order_status(route, symbol, listed.order_id),
                        deadline,
                        lambda b: normalize.status_of(b, route) is not None,
                    )
                except PapiError as exc:
                    log.warning(
                        "command_id=%s: status of %s %d not learned: %s",
                        command.command_id,
                        route.value,
                        listed.order_id,
                        exc,
                    )
                    return listed.key, None
            if response is None or not isinstance(response.body, dict):
                return listed.key, None
            return listed.key, normalized(response.body, route)

        return dict(await asyncio.gather(*(one(x) for x in orders)))


def _count(report: SweepReport) -> None:
    """Every kill switch's routes and listed orders, whatever its result."""
    for route in report.routes:
        outcome = route.outcome or RouteOutcome.FAILED
        metrics.SWEEP_ROUTES.labels(route.route.value, outcome.value).inc()
    swept = report.swept
    for group, orders in (
        ("canceled", swept.canceled),
        ("closed_otherwise", swept.closed_otherwise),
        ("still_open", swept.still_open),
        ("unknown", swept.unknown),
    ):
        metrics.SWEEP_ORDERS.labels(group).inc(len(orders))
