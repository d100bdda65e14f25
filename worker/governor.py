"""The rate governor: keeps the worker inside the exchange's limits instead of hitting them.

Two kinds of budget, both fixed windows like the exchange's:

* IP request weight (default 6000 per 60 s), shared by every account in the process;
* orders per account (default 1200 per 60 s).

Each budget counts what this process sends and is corrected upwards from the exchange's own
count on every answer (``X-MBX-USED-WEIGHT-1M``, ``X-MBX-ORDER-COUNT-1M``): the exchange's
number wins when it is higher (other processes on the IP, requests in flight). Windows are
read on the exchange clock; a request within ``guard_ms`` of a boundary counts in both
windows it might land in, so a clock error smaller than that never overfills either.

Stops: a 429 pauses all sending on the IP until ``Retry-After`` (default 1 s), after which the
IP budget is reopened gradually over ``ramp_ms``; a 418 or a -1003 "banned until <ms>" stops
all traffic until the ban ends. ``acquire`` waits for room, but never past the caller's
deadline, and never admits a request at or after it: it raises
:class:`GovernorDeadlineError` instead, so a waiting command keeps its deadline. Per-key
order is kept by the pipeline (a key's next command waits for this one).

A :class:`Ticket` records the windows one admitted request was counted in. Exactly one of
three things ends it: ``observe`` (an answer came: the exchange's counts are learned),
``settle`` (the request went out and no answer came: no longer in flight, still counted) or
``refund`` (it never left: uncounted, so a refused connection costs no budget). A ticket
whose windows no longer cover the time of sending (``covers``) is refunded and the request
admitted again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from worker import metrics

log = logging.getLogger(__name__)

_BANNED_UNTIL = re.compile(r"banned until (\d{12,14})", re.IGNORECASE)


class GovernorDeadlineError(Exception):
    """No room before the deadline; nothing was sent."""

    def __init__(self, reason: str, wait_until_ms: int) -> None:
        super().__init__(f"waiting for the rate governor ({reason}) would pass the deadline")
        self.reason = reason
        self.wait_until_ms = wait_until_ms


@dataclass
class WindowBudget:
    """A fixed-window counter that stays right despite clock error (pure).

    The exchange counts per window ``[k*W, (k+1)*W)`` on its clock; ours is an estimate off
    by up to ``guard_ms``. A request within ``guard_ms`` of a boundary may land in either
    window, so it must fit in both and is counted in both.
    """

    limit: int
    window_ms: int
    guard_ms: int = 250
    # Until the exchange has answered in a window, its count there is unknown (another
    # process, or this one before a restart, may have used it): only this many may be in
    # flight at once there, so the first answer's count arrives before the budget is spent.
    unconfirmed_allowance: int = 5
    # Shared with other processes that send at the same time (the IP's weight, pods behind
    # one NAT IP): in a confirmed window too, only half the room left may be in flight.
    shared: bool = False
    used: dict[int, int] = field(default_factory=dict)
    in_flight: dict[int, int] = field(default_factory=dict)
    confirmed: set[int] = field(default_factory=set)
    _last_now: int = field(default=-1, repr=False)
    _last_indices: frozenset[int] = field(default=frozenset(), repr=False)

    def _indices(self, now: int) -> frozenset[int]:
        """The windows a request made now may be counted in; each is opened on first sight.

        A window opens holding the requests still in flight from the one before: they were
        counted there, but may arrive (and be counted by the exchange) in this one.
        """
        if now == self._last_now and self._last_indices:
            return self._last_indices  # asked many times a millisecond under load
        indices = frozenset(
            {(now - self.guard_ms) // self.window_ms, (now + self.guard_ms) // self.window_ms}
        )
        for index in sorted(indices):
            if index not in self.used:
                carry = self.in_flight.get(index - 1, 0)
                self.used[index] = carry
                self.in_flight[index] = carry
        self._last_now, self._last_indices = now, indices
        return indices

    def _prune(self, now: int) -> None:
        self._last_now = -1  # windows may go: the next _indices opens what it needs again
        oldest = (now - self.guard_ms) // self.window_ms
        for index in [i for i in self.used if i < oldest]:
            del self.used[index]
            self.in_flight.pop(index, None)
        self.confirmed = {i for i in self.confirmed if i >= oldest}

    def _under_limit(self, index: int, limit: int | None) -> bool:
        return self.used.get(index, 0) < (self.limit if limit is None else limit)

    def _unknown_crowded(self, index: int, limit: int | None = None) -> bool:
        """Whether more in flight now could overfill the window for want of a fresher count.

        Unconfirmed: ``unconfirmed_allowance`` at most. Confirmed and ``shared``: the count
        covers what had reached it by its last answer, from every process on the IP, but
        not what the others have in flight since; each keeps at most half the room it sees
        in flight, so processes sharing the IP and doing the same leave each other room and
        meet the limit in shrinking steps, each step's answers bringing the count up to date.
        (With plenty of room this is no limit: a burst goes out at once.)
        """
        in_flight = self.in_flight.get(index, 0)
        if index not in self.confirmed:
            return in_flight >= self.unconfirmed_allowance
        if not self.shared:
            return False
        room = (self.limit if limit is None else limit) - self.used.get(index, 0)
        return in_flight >= max(1, room // 2)

    def has_room(self, now: int, limit: int | None = None) -> bool:
        return all(
            self._under_limit(i, limit) and not self._unknown_crowded(i, limit)
            for i in self._indices(now)
        )

    def awaiting_count(self, now: int, limit: int | None = None) -> bool:
        """Whether the only thing missing is the exchange's count for the window."""
        indices = self._indices(now)
        return all(self._under_limit(i, limit) for i in indices) and any(
            self._unknown_crowded(i, limit) for i in indices
        )

    def settle(self, now: int, taken: frozenset[int] = frozenset()) -> None:
        """A request ended without an answer: no longer in flight, and nothing learned.

        ``taken`` are the windows it was counted in; windows opened since carry it too.
        """
        for index in taken | self._indices(now):
            if self.in_flight.get(index, 0) > 0:
                self.in_flight[index] -= 1

    def refund(self, now: int, taken: frozenset[int]) -> None:
        """A request counted in ``taken`` never left: neither used nor in flight there."""
        self.settle(now, taken)
        for index in taken:
            if self.used.get(index, 0) > 0:
                self.used[index] -= 1

    def used_in(self, now: int) -> int:
        """Requests counted in the window ``now`` falls in (a read: nothing is opened)."""
        return self.used.get(now // self.window_ms, 0)

    def take(self, now: int) -> frozenset[int]:
        """Count one request sent now; return the windows it was counted in."""
        self._prune(now)
        indices = self._indices(now)
        for index in indices:
            self.used[index] = self.used.get(index, 0) + 1
            self.in_flight[index] = self.in_flight.get(index, 0) + 1
        return frozenset(indices)

    def covers(self, now: int, taken: frozenset[int]) -> bool:
        """Whether a request counted in ``taken`` may still be sent now."""
        return self._indices(now) <= taken

    def correct(self, now: int, reported: int | None, taken: frozenset[int] = frozenset()) -> None:
        """An answer in this window: believe the exchange's count when it is higher (unless
        the window is uncertain), and stop holding back for want of it.

        The exchange counted this request but perhaps not the others still in flight, so
        those are added on top: an over-count by a few is safe, an under-count is a 429.
        """
        self.settle(now, taken)
        indices = self._indices(now)
        if len(indices) == 1:
            (index,) = indices
            self.confirmed.add(index)
            if reported is not None:
                pending = self.in_flight.get(index, 0)
                self.used[index] = max(self.used.get(index, 0), reported + pending)

    def next_window_at(self, now: int, limit: int | None = None) -> int:
        """When room may next appear: once the latest full window is surely over."""
        full = [i for i in self._indices(now) if not self._under_limit(i, limit)]
        return (max(full) + 1) * self.window_ms + self.guard_ms if full else now


@dataclass
class GovernorSettings:
    weight_limit: int = 6000
    weight_window_ms: int = 60_000
    order_limit: int = 1200
    order_window_ms: int = 60_000
    guard_ms: int = 250
    ramp_ms: int = 5_000
    default_retry_after_ms: int = 1_000
    default_ban_ms: int = 120_000


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted request: the windows it was counted in (see the module docstring)."""

    account: str
    is_order: bool
    weight_windows: frozenset[int]
    order_windows: frozenset[int]
    waited_s: float = 0.0


@dataclass
class GovernorStats:
    waits: dict[str, int] = field(default_factory=dict)
    waited_s: float = 0.0
    pauses_429: int = 0
    bans_418: int = 0


class RateGovernor:
    def __init__(self, settings: GovernorSettings, clock: Callable[[], int]) -> None:
        self._s = settings
        self._clock = clock
        self._weight = WindowBudget(
            settings.weight_limit, settings.weight_window_ms, settings.guard_ms, shared=True
        )
        self._unconfirmed = self._weight.unconfirmed_allowance
        self._orders: dict[str, WindowBudget] = {}
        self._ip_paused_until = 0
        self._banned_until = 0
        self._ramp_from = 0
        self.stats = GovernorStats()

    @property
    def banned_until_ms(self) -> int:
        """End of the exchange's IP ban on its clock (ms); in the past when not banned."""
        return self._banned_until

    @property
    def paused_until_ms(self) -> int:
        """End of the exchange's 429 pause on its clock (ms); in the past when none."""
        return self._ip_paused_until

    def weight_used(self) -> int:
        """Weight counted in the exchange's current window, as this process sees it."""
        return self._weight.used_in(self._clock())

    @property
    def weight_limit(self) -> int:
        return self._s.weight_limit

    def _account(self, account: str) -> WindowBudget:
        budget = self._orders.get(account)
        if budget is None:
            budget = self._orders[account] = WindowBudget(
                self._s.order_limit, self._s.order_window_ms, self._s.guard_ms
            )
        return budget

    def _ip_limit(self, now: int) -> int:
        """The IP budget, reopened gradually after a 429 pause or a ban."""
        since = now - self._ramp_from
        if self._ramp_from == 0 or since >= self._s.ramp_ms:
            return self._s.weight_limit
        share = 0.1 + 0.9 * since / self._s.ramp_ms
        return max(1, int(self._s.weight_limit * share))

    def _blocked_until(self, account: str, is_order: bool, now: int) -> tuple[str, int] | None:
        if self._banned_until > now:
            return "ip_banned", self._banned_until
        if self._ip_paused_until > now:
            return "ip_429_pause", self._ip_paused_until
        limit = self._ip_limit(now)
        # After a 429 or a ban, the IP was full: until the exchange answers in a window, one
        # request at a time finds out whether the other processes on it have filled it again.
        recovering = self._ramp_from and now - self._ramp_from < self._s.ramp_ms
        self._weight.unconfirmed_allowance = 1 if recovering else self._unconfirmed
        if not self._weight.has_room(now, limit):
            if self._weight.awaiting_count(now, limit):
                return "awaiting_exchange_count", now + 20
            if self._ramp_from and now - self._ramp_from < self._s.ramp_ms:
                return "ip_ramp", min(now + 100, self._weight.next_window_at(now, limit))
            return "ip_weight", self._weight.next_window_at(now, limit)
        if is_order:
            budget = self._account(account)
            if not budget.has_room(now):
                if budget.awaiting_count(now):
                    return "awaiting_exchange_count", now + 20
                return "account_orders", budget.next_window_at(now)
        return None

    async def acquire(self, account: str, *, is_order: bool, deadline_ms: int | None) -> Ticket:
        """Wait for room for one request (weight 1, plus one order if ``is_order``).

        Returns the :class:`Ticket` to end with ``observe``, ``settle`` or ``refund``. Raises
        :class:`GovernorDeadlineError` if the deadline (exchange-clock ms) has passed, or if
        room would only come at or after it.
        """
        started = time.monotonic()
        first_reason: str | None = None
        while True:
            now = self._clock()
            blocked = self._blocked_until(account, is_order, now)
            if blocked is None and deadline_ms is not None and now >= deadline_ms:
                blocked = "deadline_passed", now
            if blocked is None:
                weight = self._weight.take(now)
                orders = self._account(account).take(now) if is_order else frozenset()
                waited = time.monotonic() - started
                if first_reason is not None:
                    self._record_wait(first_reason, waited, account)
                return Ticket(account, is_order, weight, orders, waited)
            reason, until = blocked
            if deadline_ms is not None and until >= deadline_ms:
                if first_reason is not None:
                    self._record_wait(first_reason, time.monotonic() - started, account)
                raise GovernorDeadlineError(reason, until)
            first_reason = first_reason or reason
            # Re-check at least every second: an answer may move a window or lift a pause.
            await asyncio.sleep(min(max(until - now, 1), 1000) / 1000)

    def covers(self, ticket: Ticket) -> bool:
        """Whether the request may still be sent now in the windows it was counted in."""
        now = self._clock()
        return self._weight.covers(now, ticket.weight_windows) and (
            not ticket.is_order or self._account(ticket.account).covers(now, ticket.order_windows)
        )

    def settle(self, ticket: Ticket) -> None:
        """The request went out and no answer came (timeout, reset): no longer in flight."""
        now = self._clock()
        self._weight.settle(now, ticket.weight_windows)
        if ticket.is_order:
            self._account(ticket.account).settle(now, ticket.order_windows)

    def refund(self, ticket: Ticket) -> None:
        """The request never left (connection refused, signing refused): uncount it."""
        now = self._clock()
        self._weight.refund(now, ticket.weight_windows)
        if ticket.is_order:
            self._account(ticket.account).refund(now, ticket.order_windows)

    def _record_wait(self, reason: str, waited_s: float, account: str) -> None:
        self.stats.waits[reason] = self.stats.waits.get(reason, 0) + 1
        self.stats.waited_s += waited_s
        metrics.GOVERNOR_WAITS.labels(reason).inc()
        metrics.GOVERNOR_WAIT_SECONDS.observe(waited_s)
        log.info(
            "rate governor held a request for %.3fs (reason=%s account=%s)",
            waited_s,
            reason,
            account,
        )

    def observe(
        self,
        ticket: Ticket,
        status: int,
        headers: Mapping[str, str],
        code: int | None = None,
        msg: str | None = None,
    ) -> None:
        """Learn from an answer: the exchange's counts, 429 pauses and 418 bans."""
        now = self._clock()
        self._weight.correct(now, _int(headers.get("x-mbx-used-weight-1m")), ticket.weight_windows)
        if ticket.is_order:
            self._account(ticket.account).correct(
                now, _int(headers.get("x-mbx-order-count-1m")), ticket.order_windows
            )
        retry_after_ms = _retry_after_ms(headers)
        banned = _BANNED_UNTIL.search(msg or "") if code == -1003 else None
        if status == 418 or banned is not None:
            until = (
                int(banned.group(1))
                if banned is not None
                else now
                + (retry_after_ms if retry_after_ms is not None else self._s.default_ban_ms)
            )
            if until > self._banned_until:
                self._banned_until = until
                self._ramp_from = until
                self.stats.bans_418 += 1
                metrics.GOVERNOR_STOPS.labels("ban").inc()
                log.error(
                    "IP banned by the exchange until %d (in %.1fs): all traffic stopped",
                    until,
                    (until - now) / 1000,
                )
        elif status == 429:
            until = now + (
                retry_after_ms if retry_after_ms is not None else self._s.default_retry_after_ms
            )
            if until > self._ip_paused_until:
                self._ip_paused_until = until
                self._ramp_from = until
                self.stats.pauses_429 += 1
                metrics.GOVERNOR_STOPS.labels("429").inc()
                log.warning(
                    "429 from the exchange: pausing the IP for %.1fs, then ramping up",
                    (until - now) / 1000,
                )


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _retry_after_ms(headers: Mapping[str, str]) -> int | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0, int(float(value) * 1000))
    except ValueError:
        return None
