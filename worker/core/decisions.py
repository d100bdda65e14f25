"""What an answer, an error or an order's status means for one command (pure).

The executor (:mod:`worker.executor`) sends and waits; every decision about what happened and
what to do next is made here, from plain values, and tested table by table.

After a cancel attempt failed (:func:`after_cancel_error`; the error's disposition comes from
the :mod:`worker.core.errors` taxonomy):

* **not admitted** (the deadline would pass before the governor has room, or before signing)
  → ``expired`` when ``expires_at`` stood in the way, else ``rate_limited``; nothing was sent;
* **ambiguous** (no readable answer after the write, an ambiguous 5XX, -1006/-1007), or the
  order is **gone** (-2011/-2013) → :data:`Next.RECONCILE`: ask the order's status;
* **retryable** once the retries are spent → ``rate_limited`` / ``exchange_unavailable`` as
  the error says, else ``retries_exhausted`` (a request that was never sent is retried until
  the deadline, not a number of times: see :func:`retries_spent`);
* **terminal** → the error's failure reason (a 404 with the route's retirement hint).

After the order's status was asked (:func:`after_query`):

* nothing learned in time → ``outcome_unknown`` (``not_found`` if the exchange had said the
  order is gone); no such order anywhere → ``not_found``;
* still NEW → :data:`Next.CANCEL_AGAIN`, unless the exchange had refused the cancel of an
  order it lists as open (``rejected``);
* closed → :func:`decide_gone`.

Decisions on an order found closed (:func:`decide_gone`). Contract: a command processed again
(after a crash, a rebalance, a replay) ends with the answer it would have had once.

* CANCELED, and a cancel of *this* execution may have reached the exchange (it got an
  ambiguous answer: no answer after the write, an ambiguous 5XX, -1006/-1007) →
  ``strategy.canceled``, ``confirmed_by: query``: the likeliest canceller is that cancel,
  landed late;
* CANCELED at or after the command's ``issued_at`` (cancel time = the order's ``updateTime``,
  conditional and algo alike): canceled after the risk engine decided, most likely by an
  earlier delivery of this command → the same ``strategy.canceled``;
* CANCELED before ``issued_at``, or with no readable cancel time, while nothing of this
  execution can have landed → ``already_closed`` with ``order_status: CANCELED`` (this
  command canceled nothing);
* TRIGGERED, TRIGGERING, FINISHED, EXPIRED, REJECTED → ``already_closed`` with that status.

Cancel time (exchange clock) and ``issued_at`` (the producer's clock) are compared as they
are; a skew between the two clocks moves the boundary by that much.

A 2XX answer to the cancel (:func:`after_answer`): a recognizable confirmation →
``strategy.canceled``; a conditional order the exchange reports in another final state →
``already_closed``; anything else → ``outcome_unknown`` (never a guess).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from worker.core import normalize
from worker.core.commands import Command
from worker.core.errors import (
    Disposition,
    ExchangeError,
    ExchangeReply,
    FailureReason,
    NotAdmittedError,
    NotSentError,
    PapiError,
)
from worker.core.routes import RETIRED_HINTS, Route
from worker.core.sweep import SweepReport

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
    sweep: SweepReport | None = None  # a kill switch's routes and orders


class Next(enum.Enum):
    """A step that is not yet an outcome."""

    RECONCILE = "reconcile"  # ask the order's status
    CANCEL_AGAIN = "cancel_again"  # the order still stands: send the cancel again


class Finding(enum.Enum):
    """What asking the order's status found."""

    UNKNOWN = "unknown"  # no readable answer in time
    NOT_FOUND = "not_found"  # no such order, open or finished
    FOUND = "found"


class Gone(enum.Enum):
    """What an order's status, learned after a cancel was refused or went unanswered, means."""

    CANCELED_BY_COMMAND = "canceled_by_command"  # this command's cancel (any delivery of it)
    ALREADY_CLOSED = "already_closed"  # closed before this command, or not by a cancel
    STILL_OPEN = "still_open"


@dataclass(frozen=True, slots=True)
class Progress:
    """What is known about one command's execution so far."""

    command: Command
    route: Route
    attempts: int  # requests that reached (or may have reached) the exchange
    maybe_landed: bool = False  # a cancel of this execution got an ambiguous answer
    last_error: PapiError | None = None
    not_sent: int = 0  # tries that never left (connection refused or timed out)


def reply_of(error: PapiError | None) -> ExchangeReply | None:
    return error.reply if isinstance(error, ExchangeError) else None


def code_of(error: PapiError | None) -> int | None:
    return error.code if isinstance(error, ExchangeError) else None


def _failed(p: Progress, reason: FailureReason, detail: str, **extra: Any) -> Outcome:
    return Outcome(False, p.attempts, route=p.route, reason=reason, detail=detail, **extra)


def unknown_account(command: Command) -> Outcome:
    return Outcome(
        False,
        0,
        reason=FailureReason.UNKNOWN_ACCOUNT,
        detail=f"no credentials configured for account {command.account!r}",
    )


# -- retrying -------------------------------------------------------------------------------


def should_retry(error: BaseException) -> bool:
    """Whether a failed cancel may be sent again as it is (fresh timestamp and signature).
    Not admitted is terminal: the governor already waited as long as the deadline allows."""
    return isinstance(error, PapiError) and error.retryable


def should_ask_again(error: BaseException) -> bool:
    """Whether a failed status query may be asked again: a query changes nothing, so
    anything but a terminal answer (or no room before the deadline) is worth another try."""
    return isinstance(error, PapiError) and error.disposition is not Disposition.TERMINAL


def retries_spent(error: BaseException | None, maybe_landed: int, max_attempts: int) -> bool:
    """Whether the retry budget is spent (the deadline is checked apart).

    What a retry may repeat is a cancel that did not execute: a request that never left, and
    an answer that says "not executed" (the taxonomy's retryable rows: 429, 418, the two
    "not executed" 503 messages, -1003, -1008, -1000, -1001...). Repeating those is safe
    whatever the count, so they are tried again until the deadline: a risk engine sets a
    deadline, not a number of tries, and an exchange incident shorter than it costs latency,
    not cancels. The count that stays is of requests that *may have landed* (``maybe_landed``:
    ambiguous answers, each reconciled by query before another cancel is sent): after
    ``max_attempts`` of those, no further cancel is sent.
    """
    if isinstance(error, PapiError) and error.retryable:
        return False
    return maybe_landed >= max_attempts


def is_resync(error: PapiError, already_resynced: bool) -> bool:
    """-1021 (timestamp outside recvWindow): re-sync the clock and re-sign, once."""
    return code_of(error) == -1021 and not already_resynced


# -- after the cancel -----------------------------------------------------------------------


def after_cancel_error(error: PapiError, p: Progress) -> Outcome | Next:
    """What a cancel's final error (retries already spent where they apply) means."""
    if isinstance(error, NotAdmittedError):
        incident = p.last_error
        if (
            incident is not None
            and incident.retryable
            and incident.reason in (FailureReason.RATE_LIMITED, FailureReason.EXCHANGE_UNAVAILABLE)
        ):
            # Retrying an answer that said "not executed" until the deadline came: the cause
            # is what the exchange kept answering, not the deadline.
            return _failed(
                p,
                incident.reason,
                f"gave up at the deadline after {p.attempts} attempt(s) ({error}); the "
                f"exchange kept answering: {incident}",
                exchange=reply_of(incident),
            )
        if error.expired:
            detail = (
                "expires_at passed before the cancel could be signed"
                if error.why == "expired"
                else f"expires_at would pass while waiting: {error}"
            )
            return _expired(p, detail)
        return _failed(
            p,
            FailureReason.RATE_LIMITED,
            f"not sent within the retry deadline: {error}",
            exchange=reply_of(p.last_error),
        )
    if error.ambiguous or code_of(error) in GONE_CODES:
        return Next.RECONCILE
    reply = reply_of(error)
    if error.disposition is Disposition.RETRYABLE:
        reason = (
            error.reason
            if error.reason in (FailureReason.RATE_LIMITED, FailureReason.EXCHANGE_UNAVAILABLE)
            else FailureReason.RETRIES_EXHAUSTED
        )
        if isinstance(error, NotSentError):
            detail = (
                f"the exchange could not be reached until the deadline ({p.not_sent} "
                f"connection attempt(s)); nothing was sent: {error}"
            )
            if p.attempts:
                detail += f"; earlier: {p.last_error}"
            return _failed(p, reason, detail, exchange=reply_of(p.last_error))
        return _failed(p, reason, f"gave up after {p.attempts} attempt(s): {error}", exchange=reply)
    hint = RETIRED_HINTS[p.route] if error.reason is FailureReason.ROUTE_RETIRED else None
    return _failed(
        p, error.reason, f"exchange refused the cancel: {error}", exchange=reply, hint=hint
    )


def expired_on_arrival(command: Command, now: int) -> Outcome | None:
    """``expired`` without a request when ``expires_at`` had passed (on the exchange clock)
    by the time the command was taken up; None while it stands."""
    if command.expires_at is None or now < command.expires_at:
        return None
    return Outcome(
        False,
        0,
        reason=FailureReason.EXPIRED,
        detail=(
            f"expires_at had passed when the command was taken up ({now - command.expires_at} "
            "ms before, on the exchange clock): nothing was sent"
        ),
    )


def too_old(command: Command, now: int, max_age_ms: int) -> Outcome | None:
    """``expired`` without a request when the command was issued more than ``max_age_ms``
    before ``now`` (0: no limit). An old command read again (a replay, an offset reset, a
    backlog after a long outage) must not cancel what the risk engine no longer means: a
    client order id may name a newer order by now."""
    age = now - command.issued_at
    if max_age_ms <= 0 or age <= max_age_ms:
        return None
    return Outcome(
        False,
        0,
        reason=FailureReason.EXPIRED,
        detail=(
            f"issued {age} ms ago, longer than MAX_COMMAND_AGE_MS ({max_age_ms} ms): nothing "
            "was sent (cancel-worker replay --failed re-drives it on purpose)"
        ),
    )


def _expired(p: Progress, detail: str) -> Outcome:
    if p.last_error is not None:
        detail += f"; last error: {p.last_error}"
    return _failed(p, FailureReason.EXPIRED, detail, exchange=reply_of(p.last_error))


def after_answer(status: int, body: Any, p: Progress) -> Outcome:
    """A 2XX JSON answer to the cancel."""
    if p.route is Route.UM_ALGO:
        if isinstance(body, dict) and body.get("complete") is True:
            return Outcome(
                True, p.attempts, route=p.route, strategy=normalize.from_algo_cancel(p.command)
            )
    elif isinstance(body, dict) and normalize.strategy_status_ok(body):
        return Outcome(
            True,
            p.attempts,
            route=p.route,
            strategy=normalize.from_strategy_object(body, p.route),
        )
    elif isinstance(body, dict) and body.get("strategyStatus") in normalize.STATUSES:
        closed = str(body["strategyStatus"])
        return _failed(
            p,
            FailureReason.ALREADY_CLOSED,
            f"exchange answered with status {closed}",
            order_status=closed,
        )
    return _failed(
        p,
        FailureReason.OUTCOME_UNKNOWN,
        "exchange answered 2XX without a recognizable confirmation",
        exchange=ExchangeReply(status, None, None),
    )


def out_of_rounds(p: Progress) -> Outcome:
    return _failed(
        p,
        FailureReason.OUTCOME_UNKNOWN,
        "the order still stood when the cancel rounds or the retry budget ran out",
        exchange=reply_of(p.last_error),
    )


# -- after asking the order's status --------------------------------------------------------


def decide_gone(status: str, cancel_time: int | None, issued_at: int, maybe_landed: bool) -> Gone:
    """Decide whose doing a closed order is (the contract is in the module docstring).

    ``cancel_time`` is the order's ``updateTime`` (None when unreadable), ``issued_at`` the
    command's, and ``maybe_landed`` whether a cancel of this execution may have reached the
    exchange. Only CANCELED can be this command's doing.
    """
    if status == "NEW":
        return Gone.STILL_OPEN
    if status != "CANCELED":
        return Gone.ALREADY_CLOSED
    if maybe_landed or (cancel_time is not None and cancel_time >= issued_at):
        return Gone.CANCELED_BY_COMMAND
    return Gone.ALREADY_CLOSED


def strategy_of(route: Route, body: dict[str, Any]) -> dict[str, Any]:
    if route is Route.UM_ALGO:
        return normalize.from_algo_object(body)
    return normalize.from_strategy_object(body, route)


def after_query(
    finding: Finding, body: dict[str, Any] | None, cause: PapiError, p: Progress
) -> Outcome | Next:
    """What the order's status, asked after ``cause``, means (see the module docstring)."""
    gone = code_of(cause) in GONE_CODES
    reply = reply_of(cause)
    if finding is Finding.UNKNOWN:
        if gone:
            return _failed(
                p,
                FailureReason.NOT_FOUND,
                f"the exchange says the order is not open ({cause}); its final status "
                "could not be learned",
                exchange=reply,
            )
        return _failed(
            p,
            FailureReason.OUTCOME_UNKNOWN,
            f"the cancel may have happened ({cause}) and the order's status could not be "
            "learned in time; none is claimed",
            exchange=reply,
        )
    if finding is Finding.NOT_FOUND:
        return _failed(
            p, FailureReason.NOT_FOUND, "no such order, open or finished", exchange=reply
        )
    status = normalize.status_of(body, p.route) if body is not None else None
    if body is None or status is None:
        return _failed(
            p,
            FailureReason.OUTCOME_UNKNOWN,
            "the order's status answer could not be read",
            exchange=reply,
        )
    strategy = strategy_of(p.route, body)
    verdict = decide_gone(
        status, strategy["update_time"], p.command.issued_at, p.maybe_landed or cause.ambiguous
    )
    if verdict is Gone.STILL_OPEN:
        if gone:  # the exchange refused the cancel yet lists the order as open
            return _failed(
                p,
                FailureReason.REJECTED,
                f"cancel refused ({cause}) although the order is open",
                exchange=reply,
                order_status=status,
            )
        return Next.CANCEL_AGAIN
    if verdict is Gone.CANCELED_BY_COMMAND:
        return Outcome(True, p.attempts, route=p.route, confirmed_by="query", strategy=strategy)
    detail = f"the order was already {status} ({cause})"
    if status == "CANCELED":
        when = strategy["update_time"]
        detail += (
            f"; canceled at {when}, before this command was issued at {p.command.issued_at}"
            if when is not None
            else "; its cancel time is unknown and no cancel of this command can have "
            "reached the exchange"
        )
    return _failed(p, FailureReason.ALREADY_CLOSED, detail, exchange=reply, order_status=status)
