"""Simulator fault injection: scripted faults and seeded, named fault profiles.

A :class:`Fault` is one scripted answer for a signed request. Kinds:

* ``answer`` — an HTTP error (status, optional Binance code and message, ``Retry-After``:
  ``retry_after_s`` as a number, or ``retry_after`` as any raw header text, ``"1e9"``,
  ``"inf"``, ``"²"``, for a hostile exchange);
* ``timeout`` — hold the request, then answer ``status``: for ``delay_ms`` when a scripted
  fault sets it, otherwise (``delay_ms = 0``, as in the ``timeouts`` profile) for the
  simulator's ``timeout_hold_ms``, which by default outlasts the worker's default HTTP timeout;
* ``reset`` — send the response head, then drop the connection;
* ``ban`` — ban the IP for ``delay_ms`` and answer 418.

``apply``: run the real handler first (the book changes), then misbehave — the exchange did
the work but the client cannot know it. That is what makes an outcome ambiguous.

A profile is a list of (probability, fault) drawn per request from a seeded generator, plus
a latency range for every answer. Profiles apply to the methods in ``methods`` (cancels by
default), so reconciliation queries see a healthy exchange unless a test asks otherwise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SERVICE_UNAVAILABLE = "Service Unavailable."  # the exchange's "not executed" 503 message
UNKNOWN_503 = "Unknown error, please check your request or try again later."
TOO_MANY = "Too many requests; current limit of IP(127.0.0.1) is {limit} requests per minute."


@dataclass(frozen=True)
class Fault:
    status: int = 500
    code: int | None = None
    msg: str = ""
    apply: bool = False
    retry_after_s: int | None = None
    # The Retry-After header's raw text (wins over retry_after_s): anything an exchange or a
    # proxy could send.
    retry_after: str | None = None
    kind: str = "answer"
    delay_ms: int = 0
    # The body of an ``answer``: "auto" is Binance's JSON when ``code`` is set, else the
    # message as text (a gateway's page); "json" is JSON with the message (and the code when
    # set), as the exchange's own 503s carry it; "empty" is no body at all.
    body: str = "auto"
    # Scripted faults only: the method of the requests this one is for (None: any). A queued
    # fault for DELETE lets status queries (GET) pass untouched.
    method: str | None = None


@dataclass(frozen=True)
class Profile:
    faults: tuple[tuple[float, Fault], ...] = ()
    latency_ms: tuple[int, int] = (0, 0)
    methods: tuple[str, ...] = ("DELETE",)


@dataclass
class Injector:
    """Draws the fault (if any) and latency for each request, reproducibly from the seed."""

    profile: Profile = field(default_factory=Profile)
    seed: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def reset(self, profile: Profile, seed: int) -> None:
        self.profile, self.seed = profile, seed
        self.rng = random.Random(seed)  # noqa: S311 - reproducible faults, not cryptography

    def draw(self, method: str) -> tuple[Fault | None, int]:
        low, high = self.profile.latency_ms
        latency = self.rng.randint(low, high) if high > 0 else 0
        if method not in self.profile.methods:
            return None, latency
        roll = self.rng.random()
        for probability, fault in self.profile.faults:
            if roll < probability:
                return fault, latency
            roll -= probability
        return None, latency


def _timeout(applied: bool) -> Fault:
    # delay_ms = 0: held for the simulator's configured timeout_hold_ms.
    return Fault(503, None, "held past the client's timeout", apply=applied, kind="timeout")


_UNKNOWN_MSG = {
    -1006: "An unexpected response was received from the message bus. Execution status unknown.",
    -1007: "Timeout waiting for response from backend server. Send status unknown; execution "
    "status unknown.",
}


def _unknown(code: int, *, applied: bool) -> Fault:
    return Fault(400, code, _UNKNOWN_MSG[code], apply=applied)


PROFILES: dict[str, Profile] = {
    "none": Profile(),
    "latency": Profile(latency_ms=(20, 150)),
    "timeouts": Profile(((0.25, _timeout(True)), (0.25, _timeout(False)))),
    "resets": Profile(
        ((0.25, Fault(kind="reset", apply=True)), (0.25, Fault(kind="reset", apply=False)))
    ),
    "5xx": Profile(
        (
            (0.15, Fault(500, None, "Internal Server Error")),
            (0.15, Fault(502, None, "Bad Gateway", apply=True)),
            (0.10, Fault(503, None, SERVICE_UNAVAILABLE, body="json")),
            (0.05, Fault(503, None, "", body="empty", apply=True)),  # a gateway's bare 503
            (0.10, Fault(504, None, "Gateway Timeout", apply=True)),
        )
    ),
    "unknown-503": Profile(
        (
            (0.4, Fault(503, -1000, UNKNOWN_503, apply=True)),
            (0.2, Fault(503, -1000, UNKNOWN_503, apply=False)),
        )
    ),
    "unknown-1006": Profile(
        (
            (0.2, _unknown(-1006, applied=True)),
            (0.2, _unknown(-1006, applied=False)),
            (0.1, _unknown(-1007, applied=True)),
            (0.1, _unknown(-1007, applied=False)),
        )
    ),
    "storm-429": Profile(((0.3, Fault(429, -1003, TOO_MANY.format(limit=6000), retry_after_s=1)),)),
    "ban-418": Profile(((0.1, Fault(418, -1003, "", kind="ban", delay_ms=1_500)),)),
}
