"""The error taxonomy: every exchange signal maps to retryable, terminal or ambiguous.

The PAPI client (:mod:`worker.exchange.papi`) raises only this tree; every library error is
translated at that boundary::

    PapiError                  base; carries the taxonomy rule, disposition and failure reason
     ├── NotSentError          nothing reached the exchange (connect refused or timed out, no
     │    │                    pooled connection): retryable until the command's deadline
     │    └── NotAdmittedError the deadline would pass first (the rate governor has no room
     │                         in time, or it passed before signing): nothing was sent
     ├── NoAnswerError         written, no readable answer (read timeout, reset, protocol
     │                         error, undecodable, truncated or oversized body, a 2XX that is
     │                         not JSON): ambiguous
     └── ExchangeError         an error status; ``code``/``msg`` from the JSON body only,
                               classified by ``TAXONOMY``; ``reply`` is the ExchangeReply

``TAXONOMY`` is the one table, in order of precedence; ``classify`` picks the first answer rule
that matches, and the three rules without an answer (:data:`NOT_SENT`, :data:`NOT_ADMITTED`,
:data:`NO_ANSWER`) belong to their error classes. What each disposition leads to is decided
in :mod:`worker.core.decisions`. docs/exchange.md's table is generated from this one
(``cancel-worker check --taxonomy``) and a test keeps the two equal.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

REPLY_MSG_MAX = 1024  # longest exchange message carried in a result event
MESSAGE_SHOWN_MAX = 200  # longest exchange message quoted in an error's text (logs, details)

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: what can end a log
# line or move a terminal's cursor. The bidirectional overrides, which reorder what a reader
# sees, too.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as its escape (``\\n``, ``\\x1b``,
    ``\\u2028``): one line, nothing a terminal or a log reader acts on."""
    return _CONTROLS.sub(_escape, text)


def bounded(text: str, limit: int) -> str:
    """Control characters escaped, then at most ``limit`` characters (cut ones end in
    ``...``): how a message from outside is quoted."""
    text = escape_controls(text)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


class Disposition(enum.StrEnum):
    RETRYABLE = "retryable"  # not executed; safe to send again (fresh timestamp and signature)
    TERMINAL = "terminal"  # final answer; sending again unchanged cannot help
    AMBIGUOUS = "ambiguous"  # the cancel may or may not have happened


class FailureReason(enum.StrEnum):
    """The closed set of ``cancel.failed`` reasons (mirrors schemas/result-event.schema.json)."""

    INVALID_COMMAND = "invalid_command"
    UNAUTHORIZED = "unauthorized"
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
    ID_CONFLICT = "id_conflict"  # the command id was answered for other content: no request


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the taxonomy. ``None`` matches anything; ``msg_contains`` is case-insensitive
    and looks at the JSON body's ``msg`` only (never the HTTP reason phrase). Rules whose
    ``answered`` is False describe a request that got no answer; they never match one."""

    signal: str
    status: int | None
    code: int | None
    disposition: Disposition
    reason: FailureReason
    action: str
    msg_contains: str | None = None
    status_range: tuple[int, int] | None = None
    answered: bool = True

    def matches(self, status: int, code: int | None, msg: str | None) -> bool:
        if not self.answered:
            return False
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

NOT_SENT = Rule(
    "connect refused or timed out (not sent)",
    None,
    None,
    Disposition.RETRYABLE,
    FailureReason.EXCHANGE_UNAVAILABLE,
    "nothing reached the exchange: send again with capped backoff until the deadline",
    answered=False,
)
NOT_ADMITTED = Rule(
    "deadline before room or signing (not sent)",
    None,
    None,
    Disposition.TERMINAL,
    FailureReason.RATE_LIMITED,
    "nothing sent: `expired` if expires_at stood in the way, else `rate_limited`",
    answered=False,
)
NO_ANSWER = Rule(
    "timeout, reset or unreadable answer after the write",
    None,
    None,
    Disposition.AMBIGUOUS,
    FailureReason.OUTCOME_UNKNOWN,
    "status unknown: reconcile by query",
    answered=False,
)

TAXONOMY: tuple[Rule, ...] = (
    NOT_SENT,
    NOT_ADMITTED,
    NO_ANSWER,
    Rule("418", 418, None, R, F.RATE_LIMITED, "IP banned: stop all traffic until Retry-After"),
    Rule("429", 429, None, R, F.RATE_LIMITED, "back off on this IP, honour Retry-After"),
    # A 5XX speaks for itself, whatever code the body carries: only the two JSON messages
    # that say "not executed" are safe to send again; everything else, a bare 503 from a
    # gateway that may already have forwarded the cancel included, may have happened.
    Rule(
        "503 JSON msg Service Unavailable",
        503,
        None,
        R,
        F.EXCHANGE_UNAVAILABLE,
        "not executed: retry with backoff",
        msg_contains="service unavailable",
    ),
    Rule(
        "503 JSON msg Internal error; unable to process",
        503,
        None,
        R,
        F.EXCHANGE_UNAVAILABLE,
        "not executed: retry with backoff",
        msg_contains="unable to process",
    ),
    Rule(
        "5XX other (503 Unknown error, a 503 without a JSON msg)",
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
    """The taxonomy as the Markdown table docs/exchange.md carries."""
    lines = ["| signal | disposition | failure reason | action |", "|---|---|---|---|"]
    lines += [
        f"| {r.signal} | {r.disposition.value} | `{r.reason.value}` | {r.action} |"
        for r in TAXONOMY
    ]
    return "\n".join(lines)


class PapiError(Exception):
    """Base of everything the PAPI client raises (the whole tree is in the module docstring)."""

    disposition: Disposition = Disposition.AMBIGUOUS
    reason: FailureReason = FailureReason.OUTCOME_UNKNOWN
    rule: Rule = _FALLBACK

    @property
    def retryable(self) -> bool:
        return self.disposition is Disposition.RETRYABLE

    @property
    def ambiguous(self) -> bool:
        return self.disposition is Disposition.AMBIGUOUS

    @property
    def sent(self) -> bool:
        """Whether the request may have reached the exchange."""
        return True


class NotSentError(PapiError):
    """The request never reached the exchange: sending it again is safe."""

    rule = NOT_SENT
    disposition = NOT_SENT.disposition
    reason = NOT_SENT.reason

    @property
    def sent(self) -> bool:
        return False


class NotAdmittedError(NotSentError):
    """Not sent because its deadline would pass first: the rate governor had no room in
    time, or the deadline passed before the request could be signed.

    ``expired`` is True when ``expires_at`` itself stood in the way (signing refused past it,
    or the governor's room would only come after it); ``wait_until_ms`` is when room would
    have come (exchange clock), or the time signing was refused.
    """

    rule = NOT_ADMITTED
    disposition = NOT_ADMITTED.disposition
    reason = NOT_ADMITTED.reason

    def __init__(self, message: str, *, why: str, wait_until_ms: int, expired: bool) -> None:
        super().__init__(message)
        self.why = why
        self.wait_until_ms = wait_until_ms
        self.expired = expired


class NoAnswerError(PapiError):
    """The request was (or may have been) written and no readable answer came back: a read
    timeout, a reset, a protocol error, a body that cannot be decoded, is cut short, is too
    large, or (for a 2XX) is not JSON. Whether the exchange acted is unknown."""

    rule = NO_ANSWER
    disposition = NO_ANSWER.disposition
    reason = NO_ANSWER.reason


@dataclass(frozen=True, slots=True)
class ExchangeReply:
    """What the exchange answered, as the result event carries it."""

    http_status: int
    code: int | None
    msg: str | None

    def as_dict(self) -> dict[str, Any]:
        msg = self.msg[:REPLY_MSG_MAX] if self.msg is not None else None
        return {"http_status": self.http_status, "code": self.code, "msg": msg}


class ExchangeError(PapiError):
    """The exchange (or something in front of it) answered with an error status.

    ``code`` and ``msg`` come from the JSON body only; ``text`` is a short, printable excerpt
    of a body that was not Binance's JSON (a proxy's page), for the detail and never for
    classification. ``msg`` is kept with its control characters escaped and at most
    :data:`REPLY_MSG_MAX` characters (what a result carries); the error's own text, which
    logs and details quote, shows at most :data:`MESSAGE_SHOWN_MAX` of it.
    """

    def __init__(self, status: int, code: int | None, msg: str | None, text: str = "") -> None:
        if msg is not None:
            msg = bounded(msg, REPLY_MSG_MAX)
        where = f" body={bounded(text, MESSAGE_SHOWN_MAX)!r}" if text and msg is None else ""
        shown = None if msg is None else bounded(msg, MESSAGE_SHOWN_MAX)
        super().__init__(f"HTTP {status} code={code} msg={shown}{where}")
        self.status = status
        self.code = code
        self.msg = msg
        self.text = text
        self.rule = classify(status, code, msg)
        self.disposition = self.rule.disposition
        self.reason = self.rule.reason

    @property
    def reply(self) -> ExchangeReply:
        return ExchangeReply(self.status, self.code, self.msg)
