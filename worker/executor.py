"""Turning one validated command into an outcome: route, sign, send with retry, decide.

Decisions come from the :mod:`worker.errors` taxonomy:

* **retryable** — sent again with backoff and jitter (fresh timestamp and signature each
  time), until ``max_attempts`` or until the next attempt would start past the deadline;
* **terminal** — reported as it is, except -1021 (the clock is re-synced and the cancel
  re-signed and sent once more) and -2011/-2013 (the order's status is queried: no such
  order → ``not_found``; listed as open → ``rejected``; closed → :func:`decide_gone`);
* **ambiguous** — the cancel may have happened, so nothing is sent blindly: the order's
  status is queried (conditional ``openOrder`` then ``orderHistory``; algo ``algoOrder``).
  Still NEW → cancel again; closed → :func:`decide_gone`; nothing learned in time →
  ``outcome_unknown``.

Decisions on an order found closed (:func:`decide_gone`, pure). Contract: a command
processed again (after a crash, a rebalance, a replay) ends with the answer it would have
had once.

* CANCELED, and an attempt of *this* execution may have reached the exchange (an ambiguous
  answer: timeout or reset after the write, an ambiguous 5XX, -1006/-1007) →
  ``strategy.canceled``, ``confirmed_by: query``, the strategy as the query returned it;
* CANCELED at or after the command's ``issued_at`` (cancel time = the order's
  ``updateTime``, conditional and algo alike): canceled after the risk engine decided, most
  likely by an earlier delivery of this command → the same ``strategy.canceled``;
* CANCELED before ``issued_at``, or with no readable cancel time while nothing of this
  execution can have landed → ``already_closed`` with ``order_status: CANCELED`` (this
  command canceled nothing);
* TRIGGERED, TRIGGERING, FINISHED, EXPIRED, REJECTED → ``already_closed`` with that status.

Cancel time (exchange clock) and ``issued_at`` (the producer's clock) are compared as they
are; a skew between the two clocks moves the boundary by that much.

Deadlines: the command's ``expires_at`` forbids any send after it and caps ``recvWindow``
(the exchange itself then refuses a late arrival); retries stop at the retry deadline
(``expires_at`` or ``received_at + default_deadline_ms``); waiting on the rate governor
never passes either.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from worker import metrics, normalize
from worker.accounts import Credentials
from worker.commands import Command
from worker.errors import Disposition, ExchangeError, FailureReason, PapiError
from worker.events import ExchangeReply
from worker.governor import GovernorDeadlineError
from worker.papi import PapiClient, PapiResponse
from worker.routes import (
    RETIRED_HINTS,
    CancelRequest,
    Route,
    choose_route,
    plan_cancel,
    plan_queries,
)

log = logging.getLogger(__name__)

GONE_CODES = frozenset({-2011, -2013})
CLOSED = frozenset({"TRIGGERED", "TRIGGERING", "FINISHED", "EXPIRED", "REJECTED"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one command; the processor turns it into a result event."""

    canceled: bool
    attempts: int
    route: Route | None = None
    strategy: dict[str, Any] | None = None
    confirmed_by: str = "cancel"
    reason: FailureReason | None = None
    detail: str = ""
    exchange: ExchangeReply | None = None
    order_status: str | None = None
    hint: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    default_deadline_ms: int = 30_000
    recv_window_ms: int = 5_000
    reconcile_budget_ms: int = 5_000
    max_cancel_rounds: int = 8


class _ExpiredError(Exception):
    """``expires_at`` passed before the next attempt could be sent."""


class _StopBeforeDeadline(stop_base):
    """Stop when the next attempt would start at or after the deadline (wait included)."""

    def __init__(self, clock: Callable[[], int], deadline_ms: int) -> None:
        self._clock = clock
        self._deadline_ms = deadline_ms

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._clock() + int(retry_state.upcoming_sleep * 1000) >= self._deadline_ms


class Gone(enum.Enum):
    """What an order's status, learned after a cancel was refused or went unanswered, means."""

    CANCELED_BY_COMMAND = "canceled_by_command"  # this command's cancel (any delivery of it)
    ALREADY_CLOSED = "already_closed"  # closed before this command, or not by a cancel
    STILL_OPEN = "still_open"


def decide_gone(status: str, cancel_time: int | None, issued_at: int, maybe_landed: bool) -> Gone:
    """Decide whose doing a closed order is (the contract is in the module docstring).

    ``cancel_time`` is the order's ``updateTime`` (None when unreadable), ``issued_at`` the
    command's, and ``maybe_landed`` whether an attempt of this execution may have reached the
    exchange (an ambiguous answer). Only CANCELED can be this command's doing.
    """
    if status == "NEW":
        return Gone.STILL_OPEN
    if status != "CANCELED":
        return Gone.ALREADY_CLOSED
    if maybe_landed or (cancel_time is not None and cancel_time >= issued_at):
        return Gone.CANCELED_BY_COMMAND
    return Gone.ALREADY_CLOSED


class Finding(enum.Enum):
    UNKNOWN = "unknown"
    NOT_FOUND = "not_found"
    FOUND = "found"


@dataclass
class _Job:
    """Per-command state shared by the attempts."""

    command: Command
    creds: Credentials
    route: Route
    expires_at: int | None
    deadline: int
    attempts: int = 0
    resynced: bool = False
    last_error: PapiError | None = None
    maybe_landed: bool = False  # a cancel of this execution got an ambiguous answer


def _failed(job: _Job, reason: FailureReason, *, detail: str, **extra: Any) -> Outcome:
    """A failure outcome for this job (route and attempts filled in)."""
    return Outcome(False, job.attempts, route=job.route, reason=reason, detail=detail, **extra)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, PapiError) and exc.retryable


def _reply(exc: PapiError | None) -> ExchangeReply | None:
    if isinstance(exc, ExchangeError):
        return ExchangeReply(exc.status, exc.code, exc.msg)
    return None


def _code(exc: PapiError) -> int | None:
    return exc.code if isinstance(exc, ExchangeError) else None


class CancelExecutor:
    def __init__(
        self,
        client: PapiClient,
        accounts: Mapping[str, Credentials],
        policy: RetryPolicy,
        clock: Callable[[], int],
        resync_clock: Callable[[int], Awaitable[None]] | None = None,
        clock_generation: Callable[[], int] = lambda: 0,
    ) -> None:
        self._client = client
        self._accounts = accounts
        self._policy = policy
        self._clock = clock
        self._resync_clock = resync_clock
        self._clock_generation = clock_generation

    def retry_deadline_ms(self, command: Command) -> int:
        """No retry starts after this (exchange clock); ``expires_at`` also forbids any send."""
        default = self._clock() + self._policy.default_deadline_ms
        return min(command.expires_at, default) if command.expires_at is not None else default

    async def execute(self, command: Command, received_at: int) -> Outcome:
        """Cancel as the command asks. ``received_at`` (local ms) is kept for the caller's
        records; deadlines are read on the exchange clock from the start of execution."""
        creds = self._accounts.get(command.account)
        if creds is None:
            return Outcome(
                False,
                0,
                reason=FailureReason.UNKNOWN_ACCOUNT,
                detail=f"no credentials configured for account {command.account!r}",
            )
        job = _Job(
            command,
            creds,
            choose_route(command),
            command.expires_at,
            self.retry_deadline_ms(command),
        )
        for round_no in range(self._policy.max_cancel_rounds):
            if round_no and self._clock() >= job.deadline:
                break  # the order still stands and the retry budget is spent
            try:
                response = await self._cancel_with_retry(job)
            except _ExpiredError:
                return self._expired(job, "expires_at passed before the cancel could be sent")
            except GovernorDeadlineError as exc:
                if job.expires_at is not None and exc.wait_until_ms >= job.expires_at:
                    return self._expired(job, f"expires_at would pass while waiting: {exc}")
                return _failed(
                    job,
                    FailureReason.RATE_LIMITED,
                    detail=f"not sent within the retry deadline: {exc}",
                    exchange=_reply(job.last_error),
                )
            except PapiError as exc:
                if exc.ambiguous or _code(exc) in GONE_CODES:
                    outcome = await self._reconcile(job, exc)
                    if outcome is None:
                        continue  # the order still stands: cancel it again
                    return outcome
                return self._failure(job, exc)
            return self._success(job, response)
        return _failed(
            job,
            FailureReason.OUTCOME_UNKNOWN,
            detail="the order still stood when the cancel rounds or the retry budget ran out",
            exchange=_reply(job.last_error),
        )

    # -- sending ------------------------------------------------------------------------------

    def _recv_window(self, job: _Job) -> int:
        window = self._policy.recv_window_ms
        if job.expires_at is not None:
            left = job.expires_at - self._clock()
            if left <= 0:
                raise _ExpiredError
            window = min(window, left)
        return window

    async def _cancel_with_retry(self, job: _Job) -> PapiResponse:
        policy = self._policy
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts)
            | _StopBeforeDeadline(self._clock, job.deadline),
            wait=wait_exponential_jitter(
                multiplier=policy.backoff_initial_s,
                max=policy.backoff_max_s,
                jitter=policy.backoff_initial_s,
            ),
            retry=retry_if_exception(_is_retryable),
            before_sleep=lambda state: log.info(
                "retrying command_id=%s attempt=%d after %s, sleeping %.3fs",
                job.command.command_id,
                state.attempt_number,
                state.outcome.exception() if state.outcome else None,
                state.upcoming_sleep,
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._cancel_once(job)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _cancel_once(self, job: _Job) -> PapiResponse:
        """One cancel; a -1021 re-syncs the clock and re-signs once, within this attempt."""
        while True:
            request = plan_cancel(job.command, self._recv_window(job))
            generation = self._clock_generation()
            try:
                return await self._send(
                    job, request, is_order=True, deadline=job.expires_at or job.deadline
                )
            except ExchangeError as exc:
                if exc.code != -1021 or job.resynced or self._resync_clock is None:
                    raise
                job.resynced = True
                log.warning(
                    "command_id=%s: -1021, re-syncing the clock and re-signing once",
                    job.command.command_id,
                )
                await self._resync_clock(generation)

    async def _send(
        self, job: _Job, request: CancelRequest, *, is_order: bool, deadline: int
    ) -> PapiResponse:
        job.attempts += 1
        try:
            response = await self._client.signed(
                job.creds,
                request.method,
                request.path,
                request.params,
                is_order=is_order,
                deadline_ms=deadline,
            )
        except GovernorDeadlineError:
            job.attempts -= 1  # nothing was sent
            raise
        except PapiError as exc:
            job.last_error = exc
            if is_order and exc.ambiguous:
                job.maybe_landed = True
            metrics.HTTP_REQUESTS.labels(request.route.value, exc.disposition.value).inc()
            raise
        metrics.HTTP_REQUESTS.labels(request.route.value, "ok").inc()
        return response

    # -- reconciliation -------------------------------------------------------------------------

    async def _query(self, job: _Job, deadline: int) -> tuple[Finding, dict[str, Any] | None]:
        """Ask the order's status; retry transient failures until ``deadline``."""
        policy = self._policy
        retrying = AsyncRetrying(
            stop=_StopBeforeDeadline(self._clock, deadline),
            wait=wait_exponential_jitter(
                multiplier=policy.backoff_initial_s,
                max=policy.backoff_max_s,
                jitter=policy.backoff_initial_s,
            ),
            retry=retry_if_exception(
                lambda e: (
                    isinstance(e, PapiError)
                    and not (isinstance(e, ExchangeError) and e.disposition is Disposition.TERMINAL)
                )
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    for request in plan_queries(job.command, self._policy.recv_window_ms):
                        try:
                            response = await self._send(
                                job, request, is_order=False, deadline=deadline
                            )
                        except ExchangeError as exc:
                            if exc.code in GONE_CODES:
                                continue  # not there: ask the next place
                            raise
                        body = response.body
                        if normalize.status_of(body, job.route) is not None:
                            return Finding.FOUND, body
                        raise ExchangeError(response.status, None, "unreadable order status")
                    return Finding.NOT_FOUND, None
        except (PapiError, GovernorDeadlineError) as exc:
            log.warning("command_id=%s: order status not learned: %s", job.command.command_id, exc)
        return Finding.UNKNOWN, None

    async def _reconcile(self, job: _Job, cause: PapiError) -> Outcome | None:
        """Decide after an ambiguous or 'order gone' answer; None means cancel again."""
        gone = _code(cause) in GONE_CODES
        deadline = max(job.deadline, self._clock() + self._policy.reconcile_budget_ms)
        finding, body = await self._query(job, deadline)
        status = normalize.status_of(body, job.route) if body is not None else None
        metrics.RECONCILIATIONS.labels(status or finding.value).inc()
        reply = _reply(cause)
        if finding is Finding.UNKNOWN:
            if gone:
                return _failed(
                    job,
                    FailureReason.NOT_FOUND,
                    exchange=reply,
                    detail=f"the exchange says the order is not open ({cause}); its "
                    "final status could not be learned",
                )
            return _failed(
                job,
                FailureReason.OUTCOME_UNKNOWN,
                exchange=reply,
                detail=f"the cancel may have happened ({cause}) and the order's "
                "status could not be learned in time; none is claimed",
            )
        if finding is Finding.NOT_FOUND:
            return _failed(
                job,
                FailureReason.NOT_FOUND,
                exchange=reply,
                detail="no such order, open or finished",
            )
        if body is None or status is None:  # FOUND always carries a readable status
            return _failed(
                job,
                FailureReason.OUTCOME_UNKNOWN,
                exchange=reply,
                detail="the order's status answer could not be read",
            )
        strategy = self._strategy(job, body)
        verdict = decide_gone(
            status,
            strategy["update_time"],
            job.command.issued_at,
            job.maybe_landed or cause.ambiguous,
        )
        if verdict is Gone.STILL_OPEN:
            if gone:  # the exchange refused the cancel yet lists the order as open
                return _failed(
                    job,
                    FailureReason.REJECTED,
                    exchange=reply,
                    order_status=status,
                    detail=f"cancel refused ({cause}) although the order is open",
                )
            log.info(
                "command_id=%s: order still open after %s; canceling again",
                job.command.command_id,
                cause,
            )
            return None
        if verdict is Gone.CANCELED_BY_COMMAND:
            if gone:
                log.info(
                    "command_id=%s: %s, but the order was canceled by this command "
                    "(update_time=%s, issued_at=%d, maybe_landed=%s)",
                    job.command.command_id,
                    cause,
                    strategy["update_time"],
                    job.command.issued_at,
                    job.maybe_landed,
                )
            return Outcome(
                True,
                job.attempts,
                route=job.route,
                confirmed_by="query",
                strategy=strategy,
            )
        detail = f"the order was already {status} ({cause})"
        if status == "CANCELED":
            when = strategy["update_time"]
            detail += (
                f"; canceled at {when}, before this command was issued at {job.command.issued_at}"
                if when is not None
                else "; its cancel time is unknown and no cancel of this command can have "
                "reached the exchange"
            )
        return _failed(
            job,
            FailureReason.ALREADY_CLOSED,
            exchange=reply,
            order_status=status,
            detail=detail,
        )

    # -- decisions ------------------------------------------------------------------------------

    def _strategy(self, job: _Job, body: dict[str, Any]) -> dict[str, Any]:
        if job.route is Route.UM_ALGO:
            return normalize.from_algo_object(body)
        return normalize.from_strategy_object(body, job.route)

    def _expired(self, job: _Job, detail: str) -> Outcome:
        if job.last_error is not None:
            detail += f"; last error: {job.last_error}"
        return _failed(
            job,
            FailureReason.EXPIRED,
            detail=detail,
            exchange=_reply(job.last_error),
        )

    def _failure(self, job: _Job, exc: PapiError) -> Outcome:
        reply = _reply(exc)
        if exc.disposition is Disposition.RETRYABLE:
            reason = (
                exc.reason
                if exc.reason in (FailureReason.RATE_LIMITED, FailureReason.EXCHANGE_UNAVAILABLE)
                else FailureReason.RETRIES_EXHAUSTED
            )
            return _failed(
                job,
                reason,
                detail=f"gave up after {job.attempts} attempt(s): {exc}",
                exchange=reply,
            )
        hint = RETIRED_HINTS[job.route] if exc.reason is FailureReason.ROUTE_RETIRED else None
        return _failed(
            job,
            exc.reason,
            detail=f"exchange refused the cancel: {exc}",
            exchange=reply,
            hint=hint,
        )

    def _success(self, job: _Job, response: PapiResponse) -> Outcome:
        body = response.body
        if job.route is Route.UM_ALGO:
            if isinstance(body, dict) and body.get("complete") is True:
                return Outcome(
                    True,
                    job.attempts,
                    route=job.route,
                    strategy=normalize.from_algo_cancel(job.command),
                )
        elif isinstance(body, dict) and normalize.strategy_status_ok(body):
            return Outcome(
                True,
                job.attempts,
                route=job.route,
                strategy=normalize.from_strategy_object(body, job.route),
            )
        elif isinstance(body, dict) and body.get("strategyStatus") in normalize.STATUSES:
            status = str(body["strategyStatus"])
            return _failed(
                job,
                FailureReason.ALREADY_CLOSED,
                order_status=status,
                detail=f"exchange answered with status {status}",
            )
        return _failed(
            job,
            FailureReason.OUTCOME_UNKNOWN,
            detail="exchange answered 2XX without a recognizable confirmation",
            exchange=ExchangeReply(response.status, None, None),
        )
