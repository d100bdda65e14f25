"""Turning one validated command into an outcome: route, sign, send with retry, reconcile.

This module only orchestrates; what each answer, error and order status means is decided in
:mod:`worker.core.decisions` (pure, with the contract in its docstring).

* a cancel is sent with retry and capped exponential backoff with jitter (fresh timestamp
  and signature each time) while :func:`~worker.core.decisions.should_retry` says so (the answer
  said "not executed", or the request never left), until the next attempt would start past
  the command's deadline: the deadline bounds the retries, not a count
  (:func:`~worker.core.decisions.retries_spent`);
* ``max_attempts`` caps the cancels that *may have landed* (ambiguous answers): each is
  reconciled by query first, and after that many no further cancel is sent;
* a -1021 re-syncs the clock and re-signs once, within the attempt;
* an ambiguous answer or an "order gone" -2011/-2013 leads to a status query (conditional
  ``openOrder`` then ``orderHistory``; algo ``algoOrder``), retried until the reconcile
  deadline; "still open" sends the cancel again, up to ``max_cancel_rounds``.

Deadlines: the command's ``expires_at`` forbids any signing at or after it and caps
``recvWindow`` (from the same clock reading, so the exchange itself refuses a late arrival);
retries stop at the retry deadline (``expires_at`` or start + ``default_deadline_ms``);
waiting on the rate governor never passes either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.stop import stop_base

from worker import metrics, tracing
from worker.core import decisions, normalize
from worker.core.commands import Command
from worker.core.decisions import (
    GONE_CODES,
    Finding,
    Gone,
    Next,
    Outcome,
    decide_gone,
)
from worker.core.errors import ExchangeError, NotAdmittedError, NotSentError, PapiError
from worker.core.retry_policy import RetryPolicy
from worker.core.routes import CancelRequest, plan_cancel, plan_queries
from worker.exchange.accounts import Credentials
from worker.exchange.governor import Priority, Purpose
from worker.exchange.papi import PapiClient, PapiResponse
from worker.jobs import Job
from worker.killswitch import KillSwitch

__all__ = ["CancelExecutor", "Finding", "Gone", "Outcome", "RetryPolicy", "decide_gone"]

log = logging.getLogger(__name__)


class _StopRetrying(stop_base):
    """Stop when the retry budget is spent or the next attempt would start at or after the
    deadline (wait included)."""

    def __init__(
        self, job: Job, clock: Callable[[], int], deadline_ms: int, max_attempts: int | None
    ) -> None:
        self._job = job
        self._clock = clock
        self._deadline_ms = deadline_ms
        self._max_attempts = max_attempts

    def __call__(self, retry_state: RetryCallState) -> bool:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        return self.would_stop(error, retry_state.upcoming_sleep)

    def would_stop(self, error: BaseException | None, pause_s: float) -> bool:
        if self._clock() + int(pause_s * 1000) >= self._deadline_ms:
            return True
        if self._max_attempts is None:
            return False
        return decisions.retries_spent(error, self._job.landed_maybe, self._max_attempts)


def _log_retry(job: Job) -> Callable[[BaseException | None, int, float], None]:
    def say(error: BaseException | None, attempt: int, pause_s: float) -> None:
        # A refused connection is said once by the client, not once per command and try.
        level = logging.DEBUG if isinstance(error, NotSentError) else logging.INFO
        metrics.RETRIES.labels(_retry_reason(error)).inc()
        log.log(
            level,
            "retrying command_id=%s attempt=%d after %s, sleeping %.3fs",
            job.command.command_id,
            attempt,
            error,
            pause_s,
        )

    return say


def _retry_reason(error: BaseException | None) -> str:
    """A bounded label for what made a request go again."""
    if isinstance(error, NotSentError):
        return "not_sent"
    if isinstance(error, PapiError):
        return error.disposition.value
    return "other"


def _before_sleep(job: Job) -> Callable[[RetryCallState], None]:
    say = _log_retry(job)

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        say(error, state.attempt_number + 1, state.upcoming_sleep)

    return before_sleep


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
        # One retry policy for every command; each retrying command runs on a copy of it.
        self._retrying = AsyncRetrying(
            wait=policy.backoff(),
            retry=retry_if_exception(decisions.should_retry),
            reraise=True,
        )
        self._kill_switch = KillSwitch(self, clock)

    @property
    def policy(self) -> RetryPolicy:
        return self._policy

    def retry_deadline_ms(self, command: Command) -> int:
        """No retry starts after this (exchange clock); ``expires_at`` also forbids any send."""
        default = self._clock() + self._policy.default_deadline_ms
        return min(command.expires_at, default) if command.expires_at is not None else default

    async def execute(
        self, command: Command, received_at: int, *, redrive: bool = False
    ) -> Outcome:
        """Cancel as the command asks. ``received_at`` (local ms) is kept for the caller's
        records; deadlines are read on the exchange clock from the start of execution.
        ``redrive``: an operator's re-drive of a recent failure (it passed the duplicate
        window's check), whose deadline was renewed: exempt from ``max_command_age_ms``."""
        creds = self._accounts.get(command.account)
        if creds is None:
            return decisions.unknown_account(command)
        now = self._clock()
        late = decisions.expired_on_arrival(command, now)
        if late is None and not redrive:
            late = decisions.too_old(command, now, self._policy.max_command_age_ms)
        if late is not None:
            return late
        if command.is_sweep:
            return await self._kill_switch.execute(command, creds, self.retry_deadline_ms(command))
        cancel = plan_cancel(command)
        job = Job(command, creds, cancel.route, self.retry_deadline_ms(command), cancel)
        for round_no in range(self._policy.max_cancel_rounds):
            if round_no and self._clock() >= job.deadline:
                break  # the order still stands and the retry budget is spent
            try:
                response = await self.cancel_with_retry(job)
            except PapiError as exc:
                step = decisions.after_cancel_error(exc, job.progress())
                if isinstance(step, Outcome):
                    return step
                decided = await self._reconcile(job, exc)
                if isinstance(decided, Outcome):
                    return decided
                if job.landed_maybe >= self._policy.max_attempts:
                    break  # as many cancels as may land unanswered have been sent
                log.info(
                    "command_id=%s: order still open after %s; canceling again",
                    command.command_id,
                    exc,
                )
                continue
            return decisions.after_answer(response.status, response.body, job.progress())
        return decisions.out_of_rounds(job.progress())

    # -- sending ------------------------------------------------------------------------------

    async def cancel_with_retry(self, job: Job) -> PapiResponse:
        """Send the job's cancel request with retry (see the module docstring)."""
        # Most cancels are answered at the first attempt: no retry machinery for those.
        try:
            return await self._cancel_once(job)
        except PapiError as exc:
            first = exc
        stop = _StopRetrying(job, self._clock, job.deadline, self._policy.max_attempts)
        pause = self._policy.first_backoff_s()
        if not decisions.should_retry(first) or stop.would_stop(first, pause):
            raise first
        _log_retry(job)(first, 1, pause)
        await asyncio.sleep(pause)
        retrying = self._retrying.copy(stop=stop, before_sleep=_before_sleep(job))
        async for attempt in retrying:
            with attempt:
                return await self._cancel_once(job)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _cancel_once(self, job: Job) -> PapiResponse:
        """One cancel; a -1021 re-syncs the clock and re-signs once, within this attempt."""
        request = job.cancel
        while True:
            generation = self._clock_generation()
            try:
                return await self._send(job, request, is_order=True, deadline=job.deadline)
            except ExchangeError as exc:
                if self._resync_clock is None or not decisions.is_resync(exc, job.resynced):
                    raise
                job.resynced = True
                log.warning(
                    "command_id=%s: -1021, re-syncing the clock and re-signing once",
                    job.command.command_id,
                )
                await self._resync_clock(generation)

    async def _send(
        self,
        job: Job,
        request: CancelRequest,
        *,
        is_order: bool,
        deadline: int,
        purpose: Purpose = Purpose.QUERY,
    ) -> PapiResponse:
        # A kill switch's requests go ahead of single cancels when requests wait for weight.
        priority = Priority.KILL_SWITCH if job.command.is_sweep else Priority.NORMAL
        try:
            response = await self._client.signed(
                job.creds,
                request.method,
                request.path,
                request.query,
                is_order=is_order,
                deadline_ms=deadline,
                expires_at=job.expires_at if is_order else None,
                recv_window_ms=self._policy.recv_window_ms,
                route=request.route.value,
                priority=priority,
                purpose=Purpose.CANCEL if is_order else purpose,
            )
        except NotSentError as exc:
            if not isinstance(exc, NotAdmittedError):
                job.not_sent += 1
                metrics.HTTP_REQUESTS.labels(request.route.value, "not_sent").inc()
            raise
        except PapiError as exc:
            job.attempts += 1
            job.last_error = exc
            if is_order and exc.ambiguous:
                job.maybe_landed = True
                job.landed_maybe += 1
            metrics.HTTP_REQUESTS.labels(request.route.value, exc.disposition.value).inc()
            raise
        job.attempts += 1
        metrics.HTTP_REQUESTS.labels(request.route.value, "ok").inc()
        return response

    # -- reconciliation -------------------------------------------------------------------------

    async def ask(
        self,
        job: Job,
        requests: Sequence[CancelRequest],
        deadline: int,
        readable: Callable[[Any], bool],
        purpose: Purpose = Purpose.QUERY,
    ) -> PapiResponse | None:
        """Read-only requests, asked in order until one answers with a ``readable`` body;
        "no such order" (-2011/-2013) moves to the next, and None means every one said so.
        What may be transient is asked again until ``deadline``; the last error is raised.
        ``purpose``: :attr:`Purpose.RECONCILE` for a cancel's status queries (their weight is
        capped per account by the governor)."""
        retrying = AsyncRetrying(
            stop=_StopRetrying(job, self._clock, deadline, None),
            wait=self._policy.backoff(),
            retry=retry_if_exception(decisions.should_ask_again),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                for request in requests:
                    try:
                        response = await self._send(
                            job, request, is_order=False, deadline=deadline, purpose=purpose
                        )
                    except ExchangeError as exc:
                        if exc.code in GONE_CODES:
                            continue  # not there: ask the next place
                        raise
                    if readable(response.body):
                        return response
                    raise ExchangeError(response.status, None, "unreadable answer")
                return None
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _query(self, job: Job, deadline: int) -> tuple[Finding, dict[str, Any] | None]:
        """Ask the order's status; retry what may be transient until ``deadline``."""
        try:
            response = await self.ask(
                job,
                plan_queries(job.command),
                deadline,
                lambda body: normalize.status_of(body, job.route) is not None,
                Purpose.RECONCILE,
            )
        except PapiError as exc:
            log.warning("command_id=%s: order status not learned: %s", job.command.command_id, exc)
            return Finding.UNKNOWN, None
        if response is None:
            return Finding.NOT_FOUND, None
        return Finding.FOUND, response.body

    async def _reconcile(self, job: Job, cause: PapiError) -> Outcome | Next:
        """Ask the order's status after ``cause`` and decide."""
        deadline = max(job.deadline, self._clock() + self._policy.reconcile_budget_ms)
        with tracing.span(tracing.RECONCILE, {tracing.ROUTE: job.route.value}) as span:
            finding, body = await self._query(job, deadline)
            span.set_attribute("cancel_worker.finding", finding.value)
        status = normalize.status_of(body, job.route) if body is not None else None
        metrics.RECONCILIATIONS.labels(status or finding.value).inc()
        decided = decisions.after_query(finding, body, cause, job.progress())
        if isinstance(decided, Outcome) and decided.canceled and not cause.ambiguous:
            log.info(
                "command_id=%s: %s, but the order was canceled by this command "
                "(update_time=%s, issued_at=%d, maybe_landed=%s)",
                job.command.command_id,
                cause,
                (decided.strategy or {}).get("update_time"),
                job.command.issued_at,
                job.maybe_landed,
            )
        return decided
