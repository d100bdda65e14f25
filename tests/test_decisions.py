"""The outcome decisions, table by table (pure: no I/O, no clock)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.core.commands import Command, Market
from worker.core.decisions import (
    Finding,
    Next,
    Outcome,
    Progress,
    after_answer,
    after_cancel_error,
    after_query,
    retries_spent,
    should_retry,
    too_old,
)
from worker.core.errors import (
    ExchangeError,
    FailureReason,
    NoAnswerError,
    NotAdmittedError,
    NotSentError,
    PapiError,
)
from worker.core.routes import Route

ISSUED = 1_700_000_000_000
ALGO = Command("c1", "desk-0", Market.UM, ISSUED, algo_id=7)
UM = Command("c2", "desk-0", Market.UM, ISSUED, symbol="BTCUSDT", strategy_id=9)


def progress(
    *, attempts: int = 1, maybe_landed: bool = False, route: Route = Route.UM_ALGO
) -> Progress:
    command = ALGO if route is Route.UM_ALGO else UM
    return Progress(command, route, attempts, maybe_landed=maybe_landed)


def not_admitted(*, expired: bool) -> NotAdmittedError:
    return NotAdmittedError("x", why="account_orders", wait_until_ms=1, expired=expired)


# -- retrying ---------------------------------------------------------------------------------

RETRY_TABLE: list[tuple[str, PapiError, bool]] = [
    ("connection refused", NotSentError("ConnectError"), True),
    ("503 JSON Service Unavailable.", ExchangeError(503, None, "Service Unavailable."), True),
    ("-1001 internal error", ExchangeError(503, -1001, "Internal error; unable to process"), True),
    ("429", ExchangeError(429, -1003, "Too many requests"), True),
    ("bare 503", ExchangeError(503, None, None, text=""), False),
    ("503 Unknown error", ExchangeError(503, -1000, "Unknown error, please check"), False),
    ("timeout after write", NoAnswerError("ReadTimeout"), False),
    ("-2011", ExchangeError(400, -2011, "Unknown order sent."), False),
    ("not admitted", not_admitted(expired=False), False),
]


@pytest.mark.parametrize(("name", "error", "retry"), RETRY_TABLE, ids=[r[0] for r in RETRY_TABLE])
def test_should_retry(name: str, error: PapiError, retry: bool) -> None:
    assert should_retry(error) is retry


def test_what_did_not_execute_is_retried_until_the_deadline_not_a_count() -> None:
    """Only requests that may have landed are counted; "not executed" answers and requests
    that never left are bounded by the deadline alone."""
    not_executed = [
        NotSentError("refused"),
        ExchangeError(503, None, "Service Unavailable."),
        ExchangeError(429, -1003, "Too many requests"),
        ExchangeError(418, -1003, "banned"),
        ExchangeError(400, -1008, "overloaded"),
    ]
    for error in not_executed:
        assert error.retryable, error
        assert not retries_spent(error, maybe_landed=99, max_attempts=4), error
    ambiguous = NoAnswerError("read timeout")
    assert retries_spent(ambiguous, maybe_landed=4, max_attempts=4)
    assert not retries_spent(ambiguous, maybe_landed=3, max_attempts=4)


# -- after the cancel's last error ------------------------------------------------------------

AFTER_ERROR: list[tuple[str, PapiError, Any]] = [
    ("ambiguous: no answer", NoAnswerError("reset"), Next.RECONCILE),
    ("ambiguous: bare 503", ExchangeError(503, None, None), Next.RECONCILE),
    ("ambiguous: -1006", ExchangeError(400, -1006, "unexpected response"), Next.RECONCILE),
    ("gone: -2011", ExchangeError(400, -2011, "Unknown order sent."), Next.RECONCILE),
    ("gone: -2013", ExchangeError(400, -2013, "Order does not exist."), Next.RECONCILE),
    ("expired waiting", not_admitted(expired=True), FailureReason.EXPIRED),
    ("no room in time", not_admitted(expired=False), FailureReason.RATE_LIMITED),
    ("never reached", NotSentError("ConnectError"), FailureReason.EXCHANGE_UNAVAILABLE),
    ("429 spent", ExchangeError(429, -1003, "Too many"), FailureReason.RATE_LIMITED),
    (
        "503 spent",
        ExchangeError(503, None, "Service Unavailable."),
        FailureReason.EXCHANGE_UNAVAILABLE,
    ),
    ("auth", ExchangeError(401, -2015, "Invalid API-key"), FailureReason.AUTH),
    ("bad symbol", ExchangeError(400, -1121, "Invalid symbol."), FailureReason.REJECTED),
    ("route retired", ExchangeError(404, None, None), FailureReason.ROUTE_RETIRED),
]


@pytest.mark.parametrize(
    ("name", "error", "expected"), AFTER_ERROR, ids=[r[0] for r in AFTER_ERROR]
)
def test_after_cancel_error(name: str, error: PapiError, expected: Any) -> None:
    decided = after_cancel_error(error, progress())
    if isinstance(expected, Next):
        assert decided is expected
        return
    assert isinstance(decided, Outcome) and not decided.canceled
    assert decided.reason is expected
    if expected is FailureReason.ROUTE_RETIRED:
        assert decided.hint is not None
    if isinstance(error, ExchangeError) and expected is not FailureReason.EXCHANGE_UNAVAILABLE:
        assert decided.exchange == error.reply


def test_a_cancel_that_never_left_says_so() -> None:
    decided = after_cancel_error(
        NotSentError("ConnectError: nothing was sent"), progress(attempts=0)
    )
    assert isinstance(decided, Outcome) and decided.attempts == 0
    assert "could not be reached" in decided.detail and "nothing was sent" in decided.detail


@pytest.mark.parametrize("expired", [True, False])
def test_the_deadline_met_while_the_exchange_said_not_executed_names_the_incident(
    expired: bool,
) -> None:
    """The cancel kept getting "not executed" until no attempt fit before the deadline:
    the reason is what the exchange kept answering, whichever wait hit the deadline."""
    for answer, reason in (
        (ExchangeError(503, None, "Service Unavailable."), FailureReason.EXCHANGE_UNAVAILABLE),
        (ExchangeError(429, -1003, "Too many requests"), FailureReason.RATE_LIMITED),
    ):
        p = Progress(progress().command, Route.UM_ALGO, 9, last_error=answer)
        decided = after_cancel_error(not_admitted(expired=expired), p)
        assert isinstance(decided, Outcome) and decided.reason is reason
        assert decided.exchange == answer.reply and "kept answering" in decided.detail


# -- after a 2XX answer -------------------------------------------------------------------------

CONDITIONAL = {
    "strategyId": 9,
    "newClientStrategyId": "x",
    "strategyStatus": "CANCELED",
    "symbol": "BTCUSDT",
    "side": "SELL",
    "strategyType": "STOP",
    "origQty": "0.010",
    "price": "1.0",
    "stopPrice": "2.0",
    "updateTime": ISSUED + 5,
}

ANSWERS: list[tuple[str, Route, Any, bool, FailureReason | None]] = [
    ("algo complete", Route.UM_ALGO, {"algoId": 7, "code": "200", "complete": True}, True, None),
    ("algo not complete", Route.UM_ALGO, {"complete": False}, False, FailureReason.OUTCOME_UNKNOWN),
    ("conditional canceled", Route.UM_CONDITIONAL, CONDITIONAL, True, None),
    (
        "conditional already triggered",
        Route.UM_CONDITIONAL,
        {**CONDITIONAL, "strategyStatus": "TRIGGERED"},
        False,
        FailureReason.ALREADY_CLOSED,
    ),
    ("a list", Route.UM_CONDITIONAL, [CONDITIONAL], False, FailureReason.OUTCOME_UNKNOWN),
    ("empty object", Route.CM_CONDITIONAL, {}, False, FailureReason.OUTCOME_UNKNOWN),
]


@pytest.mark.parametrize(
    ("name", "route", "body", "canceled", "reason"), ANSWERS, ids=[r[0] for r in ANSWERS]
)
def test_after_answer(
    name: str, route: Route, body: Any, canceled: bool, reason: FailureReason | None
) -> None:
    out = after_answer(200, body, progress(route=route))
    assert (out.canceled, out.reason) == (canceled, reason)
    assert out.confirmed_by == "cancel"


# -- after asking the order's status ------------------------------------------------------------


def algo_status(status: str, update_time: int) -> dict[str, Any]:
    return {
        "algoId": 7,
        "clientAlgoId": "a",
        "algoStatus": status,
        "symbol": "BTCUSDT",
        "side": "SELL",
        "orderType": "STOP_MARKET",
        "quantity": "0.010",
        "triggerPrice": "25000.10",
        "updateTime": update_time,
    }


TIMEOUT = NoAnswerError("ReadTimeout after the request was sent")
GONE = ExchangeError(400, -2011, "Unknown order sent.")
BEFORE, AFTER = ISSUED - 60_000, ISSUED + 10

FOUND, NEW, CANCELED, AGAIN = Finding.FOUND, "NEW", "CANCELED", Next.CANCEL_AGAIN
CLOSED = (False, "already_closed")
st = algo_status

QUERIES: list[tuple[str, Finding, dict[str, Any] | None, PapiError, bool, Any]] = [
    # (name, finding, body, cause, maybe_landed, expected: Next | (canceled, reason))
    ("unknown after ambiguous", Finding.UNKNOWN, None, TIMEOUT, True, (False, "outcome_unknown")),
    ("unknown after gone", Finding.UNKNOWN, None, GONE, False, (False, "not_found")),
    ("no such order", Finding.NOT_FOUND, None, GONE, False, (False, "not_found")),
    ("still NEW after ambiguous", FOUND, st(NEW, BEFORE), TIMEOUT, True, AGAIN),
    ("NEW yet -2011", FOUND, st(NEW, BEFORE), GONE, False, (False, "rejected")),
    ("CANCELED after our ambiguous", FOUND, st(CANCELED, BEFORE), TIMEOUT, True, (True, None)),
    # the late landing: ambiguous earlier, -2011 now, canceled "before" issued_at (skew)
    ("late landing", FOUND, st(CANCELED, BEFORE), GONE, True, (True, None)),
    ("CANCELED after issued_at", FOUND, st(CANCELED, AFTER), GONE, False, (True, None)),
    ("CANCELED before issued_at", FOUND, st(CANCELED, BEFORE), GONE, False, CLOSED),
    ("TRIGGERED", FOUND, st("TRIGGERED", AFTER), GONE, True, CLOSED),
    ("EXPIRED", FOUND, st("EXPIRED", AFTER), TIMEOUT, True, CLOSED),
    ("unreadable status", FOUND, {"algoStatus": 5}, TIMEOUT, True, (False, "outcome_unknown")),
]


@pytest.mark.parametrize(
    ("name", "finding", "body", "cause", "maybe_landed", "expected"),
    QUERIES,
    ids=[r[0] for r in QUERIES],
)
def test_after_query(
    name: str,
    finding: Finding,
    body: dict[str, Any] | None,
    cause: PapiError,
    maybe_landed: bool,
    expected: Any,
) -> None:
    decided = after_query(finding, body, cause, progress(attempts=3, maybe_landed=maybe_landed))
    if isinstance(expected, Next):
        assert decided is expected
        return
    canceled, reason = expected
    assert isinstance(decided, Outcome)
    assert decided.canceled is canceled
    assert (decided.reason.value if decided.reason else None) == reason
    assert decided.attempts == 3
    if canceled:
        assert decided.confirmed_by == "query"
        assert decided.strategy is not None and decided.strategy["status"] == "CANCELED"
    if reason == "already_closed":
        assert decided.order_status == body["algoStatus"] if body else None


def test_a_command_older_than_the_age_limit_is_expired_without_a_request() -> None:
    command = progress().command
    issued = command.issued_at
    assert too_old(command, issued + 600_000, 600_000) is None  # at the limit: still young
    old = too_old(command, issued + 600_001, 600_000)
    assert old is not None and old.reason is FailureReason.EXPIRED and old.attempts == 0
    assert "MAX_COMMAND_AGE_MS" in old.detail and "replay --failed" in old.detail
    assert too_old(command, issued + 10**9, 0) is None  # 0: no limit
