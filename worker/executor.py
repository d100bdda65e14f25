"""Turning one validated command into an outcome: route, sign, send with retry, decide.

The decision is made from the :mod:`worker.errors` taxonomy only. Each attempt is a fresh
``send`` (fresh timestamp, fresh signature). Retries stop at ``max_attempts`` or when the
next wait would cross the command's deadline (``expires_at``, or ``received_at`` plus the
default deadline); a command already past ``expires_at`` is never sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from worker import normalize
from worker.accounts import Credentials
from worker.commands import Command
from worker.errors import (
    Disposition,
    ExchangeError,
    FailureReason,
    PapiError,
    TransportError,
)
from worker.events import ExchangeReply
from worker.papi import PapiClient, PapiResponse
from worker.routes import RETIRED_HINTS, CancelRequest, Route, plan_cancel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one command; the pipeline turns it into a result event."""

    canceled: bool
    attempts: int
    route: Route | None = None
    strategy: dict[str, Any] | None = None
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


class _StopBeforeDeadline(stop_base):
    """Stop when the next attempt would start at or after the deadline (wait included)."""

    def __init__(self, clock: Callable[[], int], deadline_ms: int) -> None:
        self._clock = clock
        self._deadline_ms = deadline_ms

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._clock() + int(retry_state.upcoming_sleep * 1000) >= self._deadline_ms


class _ExpiredError(Exception):
    """``expires_at`` passed before the next attempt could be sent."""


@dataclass
class _AttemptLog:
    count: int = 0
    last_error: PapiError | None = field(default=None)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, PapiError) and exc.retryable


def _reply(exc: PapiError) -> ExchangeReply | None:
    if isinstance(exc, ExchangeError):
        return ExchangeReply(exc.status, exc.code, exc.msg)
    return None


class CancelExecutor:
    def __init__(
        self,
        client: PapiClient,
        accounts: Mapping[str, Credentials],
        policy: RetryPolicy,
        clock: Callable[[], int],
    ) -> None:
        self._client = client
        self._accounts = accounts
        self._policy = policy
        self._clock = clock

    def retry_deadline_ms(self, command: Command, received_at: int) -> int:
        """No retry starts after this; ``expires_at`` also forbids the first send."""
        default = received_at + self._policy.default_deadline_ms
        return min(command.expires_at, default) if command.expires_at is not None else default

    async def execute(self, command: Command, received_at: int) -> Outcome:
        creds = self._accounts.get(command.account)
        if creds is None:
            return Outcome(
                False,
                0,
                reason=FailureReason.UNKNOWN_ACCOUNT,
                detail=f"no credentials configured for account {command.account!r}",
            )
        request = plan_cancel(command, self._policy.recv_window_ms)
        deadline = self.retry_deadline_ms(command, received_at)
        attempts = _AttemptLog()
        try:
            response = await self._send_with_retry(
                creds, request, command.expires_at, deadline, attempts
            )
        except _ExpiredError:
            last = attempts.last_error
            detail = "expires_at passed before the cancel could be sent"
            if last is not None:
                detail += f"; last error: {last}"
            return Outcome(
                False,
                attempts.count,
                route=request.route,
                reason=FailureReason.EXPIRED,
                detail=detail,
                exchange=_reply(last) if last is not None else None,
            )
        except PapiError as exc:
            return self._failure(request.route, exc, attempts.count)
        return self._success(command, request.route, response, attempts.count)

    async def _send_with_retry(
        self,
        creds: Credentials,
        request: CancelRequest,
        expires_at: int | None,
        deadline: int,
        attempts: _AttemptLog,
    ) -> PapiResponse:
        policy = self._policy

        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.info(
                "retrying route=%s attempt=%d after %s, sleeping %.3fs",
                request.route,
                state.attempt_number,
                exc,
                state.upcoming_sleep,
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts)
            | _StopBeforeDeadline(self._clock, deadline),
            wait=wait_exponential_jitter(
                multiplier=policy.backoff_initial_s,
                max=policy.backoff_max_s,
                jitter=policy.backoff_initial_s,
            ),
            retry=retry_if_exception(_is_retryable),
            before_sleep=note,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if expires_at is not None and self._clock() >= expires_at:
                    raise _ExpiredError
                attempts.count += 1
                try:
                    return await self._client.signed(
                        creds, request.method, request.path, request.params
                    )
                except PapiError as exc:
                    attempts.last_error = exc
                    raise
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _failure(self, route: Route, exc: PapiError, attempts: int) -> Outcome:
        reply = _reply(exc)
        if exc.disposition is Disposition.AMBIGUOUS:
            written = isinstance(exc, TransportError) and exc.written
            detail = (
                f"the cancel may have reached the exchange ({exc}); "
                "its outcome could not be established, so none is claimed"
            )
            if written:
                detail = f"no answer after the request was sent ({exc}); outcome not claimed"
            return Outcome(
                False,
                attempts,
                route=route,
                reason=FailureReason.OUTCOME_UNKNOWN,
                detail=detail,
                exchange=reply,
            )
        if exc.disposition is Disposition.RETRYABLE:
            reason = (
                exc.reason
                if exc.reason in (FailureReason.RATE_LIMITED, FailureReason.EXCHANGE_UNAVAILABLE)
                else FailureReason.RETRIES_EXHAUSTED
            )
            return Outcome(
                False,
                attempts,
                route=route,
                reason=reason,
                detail=f"gave up after {attempts} attempt(s): {exc}",
                exchange=reply,
            )
        hint = RETIRED_HINTS[route] if exc.reason is FailureReason.ROUTE_RETIRED else None
        return Outcome(
            False,
            attempts,
            route=route,
            reason=exc.reason,
            detail=f"exchange refused the cancel: {exc}",
            exchange=reply,
            hint=hint,
        )

    def _success(
        self, command: Command, route: Route, response: PapiResponse, attempts: int
    ) -> Outcome:
        body = response.body
        if route is Route.UM_ALGO:
            if isinstance(body, dict) and body.get("complete") is True:
                return Outcome(
                    True, attempts, route=route, strategy=normalize.from_algo_cancel(command)
                )
        elif isinstance(body, dict) and normalize.strategy_status_ok(body):
            return Outcome(
                True, attempts, route=route, strategy=normalize.from_strategy_object(body, route)
            )
        elif isinstance(body, dict) and body.get("strategyStatus") in normalize.STATUSES:
            status = str(body["strategyStatus"])
            return Outcome(
                False,
                attempts,
                route=route,
                reason=FailureReason.ALREADY_CLOSED,
                detail=f"exchange answered with status {status}",
                order_status=status,
            )
        return Outcome(
            False,
            attempts,
            route=route,
            reason=FailureReason.OUTCOME_UNKNOWN,
            detail="exchange answered 2XX without a recognizable confirmation",
            exchange=ExchangeReply(response.status, None, None),
        )
