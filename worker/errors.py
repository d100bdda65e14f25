"""The error taxonomy: every exchange signal maps to retryable, terminal or ambiguous.

Error tree (the retry policy reads ``disposition``; nothing else decides)::

    PapiError                      base; carries disposition and failure reason
     ├── TransportError            no HTTP answer
     │     written=False           connect failed / pool timeout: retryable
     │     written=True            timeout or reset after the request was sent: ambiguous
     └── ExchangeError             the exchange answered with an error (status, code, msg)

``TAXONOMY`` is the one table, in order of precedence; ``classify`` picks the first rule that
matches. The README's table is generated from it (``cancel-worker check --taxonomy``) and a
test keeps the two equal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Disposition(enum.StrEnum):
    RETRYABLE = "retryable"  # not executed; safe to send again (fresh timestamp and signature)
    TERMINAL = "terminal"  # final answer; sending again unchanged cannot help
    AMBIGUOUS = "ambiguous"  # the cancel may or may not have happened


class FailureReason(enum.StrEnum):
    """The closed set of ``cancel.failed`` reasons (mirrors schemas/result-event.schema.json)."""

    INVALID_COMMAND = "invalid_command"
    REJECTED = "rejected"
    ALREADY_CLOSED = "already_closed"
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    UNKNOWN_ACCOUNT = "unknown_account"
    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    EXCHANGE_UNAVAILABLE = "exchange_unavailable"
    RETRIES_EXHAUSTED = "retries_exhausted"
    ROUTE_RETIRED = "route_retired"
    OUTCOME_UNKNOWN = "outcome_unknown"


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the taxonomy. ``None`` matches anything; ``msg_contains`` is case-insensitive."""

    signal: str
    status: int | None
    code: int | None
    disposition: Disposition
    reason: FailureReason
    action: str
    msg_contains: str | None = None
    status_range: tuple[int, int] | None = None

    def matches(self, status: int, code: int | None, msg: str | None) -> bool:
        if self.status is not None and status != self.status:
            return False
        if (
            self.status_range is not None
            and not self.status_range[0] <= status <= self.status_range[1]
        ):
            return False
        if self.code is not None and code != self.code:
            return False
        return self.msg_contains is None or self.msg_contains.lower() in (msg or "").lower()


R, T, A = Disposition.RETRYABLE, Disposition.TERMINAL, Disposition.AMBIGUOUS
F = FailureReason

TAXONOMY: tuple[Rule, ...] = (
    Rule("418", 418, None, R, F.RATE_LIMITED, "IP banned: stop all traffic until Retry-After"),
    Rule("429", 429, None, R, F.RATE_LIMITED, "back off on this IP, honour Retry-After"),
    # A 5XX speaks for itself, whatever code the body carries: only the two messages that
    # say "not executed" are safe to send again; everything else may have happened.
    Rule(
        "503 Service Unavailable",
        503,
        None,
        R,
        F.EXCHANGE_UNAVAILABLE,
        "not executed: retry with backoff",
        msg_contains="service unavailable",
    ),
    Rule(
        "503 Internal error; unable to process",
        503,
        None,
        R,
        F.EXCHANGE_UNAVAILABLE,
        "not executed: retry with backoff",
        msg_contains="unable to process",
    ),
    Rule(
        "5XX other (incl. 503 Unknown error)",
        None,
        None,
        A,
        F.OUTCOME_UNKNOWN,
        "status unknown: reconcile by query",
        status_range=(500, 599),
    ),
    Rule(
        "-1003", None, -1003, R, F.RATE_LIMITED, "too many requests or IP banned: wait, then retry"
    ),
    Rule(
        "-1021",
        None,
        -1021,
        T,
        F.REJECTED,
        "re-sync the clock, re-sign and send once more; then terminal",
    ),
    Rule("-1015", None, -1015, R, F.RATE_LIMITED, "too many orders: wait for the window"),
    Rule("-1022", None, -1022, T, F.AUTH, "bad signature: configuration error"),
    Rule("-2014", None, -2014, T, F.AUTH, "bad API key format"),
    Rule("-2015", None, -2015, T, F.AUTH, "bad API key, IP or permission"),
    Rule("-1102", None, -1102, T, F.REJECTED, "missing or malformed parameter"),
    Rule("-1100", None, -1100, T, F.REJECTED, "illegal characters in a parameter"),
    Rule("-1101", None, -1101, T, F.REJECTED, "duplicate or too many parameters"),
    Rule("-1121", None, -1121, T, F.REJECTED, "invalid symbol"),
    Rule("-2011", None, -2011, T, F.NOT_FOUND, "order gone: query to learn its final status"),
    Rule("-2013", None, -2013, T, F.NOT_FOUND, "order does not exist: query to learn its status"),
    Rule("-1008", None, -1008, R, F.EXCHANGE_UNAVAILABLE, "server overloaded: back off, retry"),
    Rule("-1000", None, -1000, R, F.EXCHANGE_UNAVAILABLE, "internal error, not processed: retry"),
    Rule("-1001", None, -1001, R, F.EXCHANGE_UNAVAILABLE, "disconnected, not processed: retry"),
    Rule("-1006", None, -1006, A, F.OUTCOME_UNKNOWN, "execution status unknown: reconcile"),
    Rule("-1007", None, -1007, A, F.OUTCOME_UNKNOWN, "timeout, status unknown: reconcile"),
    Rule("403", 403, None, T, F.REJECTED, "WAF rule hit: terminal for the request"),
    Rule("404", 404, None, T, F.ROUTE_RETIRED, "route not served: tell the producer"),
    Rule(
        "timeout/reset after write",
        None,
        None,
        A,
        F.OUTCOME_UNKNOWN,
        "status unknown: reconcile",
        status_range=(0, 0),
    ),
    Rule(
        "4XX other",
        None,
        None,
        T,
        F.REJECTED,
        "request was wrong: do not retry unchanged",
        status_range=(400, 499),
    ),
)
del R, T, A, F

_FALLBACK = Rule(
    "other",
    None,
    None,
    Disposition.AMBIGUOUS,
    FailureReason.OUTCOME_UNKNOWN,
    "unexpected answer: reconcile",
)


def classify(status: int, code: int | None, msg: str | None) -> Rule:
    """The first taxonomy rule that matches an exchange answer (status 0: no answer)."""
    for rule in TAXONOMY:
        if rule.matches(status, code, msg):
            return rule
    return _FALLBACK


def taxonomy_markdown() -> str:
    """The taxonomy as the Markdown table the README carries."""
    lines = ["| signal | disposition | failure reason | action |", "|---|---|---|---|"]
    lines += [
        f"| {r.signal} | {r.disposition.value} | `{r.reason.value}` | {r.action} |"
        for r in TAXONOMY
    ]
    return "\n".join(lines)


class PapiError(Exception):
    """Base of everything that can go wrong talking to PAPI."""

    disposition: Disposition = Disposition.AMBIGUOUS
    reason: FailureReason = FailureReason.OUTCOME_UNKNOWN

    @property
    def retryable(self) -> bool:
        return self.disposition is Disposition.RETRYABLE

    @property
    def ambiguous(self) -> bool:
        return self.disposition is Disposition.AMBIGUOUS


class TransportError(PapiError):
    """No HTTP answer. ``written`` tells whether the request may have reached the exchange."""

    def __init__(self, message: str, *, written: bool) -> None:
        super().__init__(message)
        self.written = written
        self.disposition = Disposition.AMBIGUOUS if written else Disposition.RETRYABLE
        self.reason = (
            FailureReason.OUTCOME_UNKNOWN if written else FailureReason.EXCHANGE_UNAVAILABLE
        )


class ExchangeError(PapiError):
    """The exchange answered with an error."""

    def __init__(self, status: int, code: int | None, msg: str | None) -> None:
        super().__init__(f"HTTP {status} code={code} msg={msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.rule = classify(status, code, msg)
        self.disposition = self.rule.disposition
        self.reason = self.rule.reason
