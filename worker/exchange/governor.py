"""The rate governor: keeps the worker inside the exchange's limits instead of hitting them.

Two kinds of budget, both fixed windows like the exchange's:

* IP request weight (default 6000 per 60 s), shared by every account in the process;
* orders per account (default 1200 per 60 s).

Each budget counts what this process sends and is corrected upwards from the exchange's own
count on every answer (``X-MBX-USED-WEIGHT-1M``, ``X-MBX-ORDER-COUNT-1M``): the exchange's
number wins when it is higher (other processes on the IP, requests in flight). Windows are
read on the exchange clock; a request within ``guard_ms`` of a boundary counts in both
windows it might land in, so a clock error smaller than that never overfills either.

Fairness: each account has a share of the IP weight (``reserved_weight_share`` from the accounts
file, or an equal part of what the reserved shares leave). Within its share of a window an
account sends freely. Past it, it borrows the other accounts' unused shares only as the window
passes: at a fraction f of the window the others' unused equal parts are held back but for f of
them (never less than ``BORROW_HEADROOM_SHARE`` of the limit while they have that much unused),
and a reserved share is held back whole. So a flood from one account cannot spend the window
before the others come, an account that comes late in a window still finds room at once instead
of waiting for the next window, and a window the others leave idle is the flooder's by its end
but for that headroom. Requests that wait are admitted by :class:`Priority` (a kill switch
before single cancels), then across accounts in weighted fair order (each account's virtual time
grows by 1/share per request; the least goes next; an idle account banks no credit), then first
come first served within an account. Status queries that reconcile a cancel (:class:`Purpose`)
are capped per account at ``reconcile_weight_share`` of the weight limit a window; past the cap
they wait for the account's next window, and one that would wait past its deadline is refused at
once (the executor then reports what it knows: ``not_found`` or ``outcome_unknown``).

Stops: a 429 pauses all sending on the IP until ``Retry-After`` (default 1 s), after which the
IP budget is reopened gradually over ``ramp_ms``; a 418 or a -1003 "banned until <ms>" stops
all traffic until the ban ends. Both are capped (``max_pause_ms``, ``max_ban_ms``): a longer
stop, or one whose length is not ASCII digits (``1e9``, ``inf``, ``²``), is taken as the cap,
and when it ends one request probes the exchange before anything else goes (the probe's
answer opens the ramp, or stops again). ``acquire`` waits for room, but never past the
caller's deadline, and never admits a request at or after it: it raises
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
import dataclasses
import heapq
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from worker import metrics
from worker.exchange.headers import ascii_int

log = logging.getLogger(__name__)

# The ban's end as the exchange words it; read with ascii_int (ASCII digits only), anything
# else is an unreadable end, taken as the cap.
_BANNED_UNTIL = re.compile(r"banned until ([^\s.]*)", re.IGNORECASE)


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

    def room(self, now: int, limit: int | None = None) -> int:
        """What is left of the limit in the fullest window a request sent now may land in."""
        cap = self.limit if limit is None else limit
        return min(cap - self.used.get(i, 0) for i in self._indices(now))

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
    # Caps on what the exchange can make the worker do: a longer (or unreadable) Retry-After
    # or ban is taken as this long, then one request probes before the IP opens again.
    max_pause_ms: int = 60_000
    max_ban_ms: int = 300_000
    # Status queries reconciling a cancel (after "not found" or an ambiguous answer): at most
    # this share of the weight limit per account per weight window.
    reconcile_weight_share: float = 0.1


class Priority(IntEnum):
    """Who goes first when requests wait for the IP's weight (higher first)."""

    NORMAL = 0
    KILL_SWITCH = 1


class Purpose(Enum):
    """What a request is for: reconciliation's weight is capped per account."""

    CANCEL = "cancel"  # a cancel (or a kill switch's cancel-all): counts an order
    QUERY = "query"  # a read that is part of the command's own work (a kill switch's listing)
    RECONCILE = "reconcile"  # a status query after "not found" or an ambiguous answer


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted request: the windows it was counted in (see the module docstring)."""

    account: str
    is_order: bool
    weight_windows: frozenset[int]
    order_windows: frozenset[int]
    waited_s: float = 0.0
    # The account's own weight window it was charged to (fair shares, reconciliation).
    account_window: int = -1
    reconcile: bool = False
    # The one request sent after a stop whose end was the worker's guess (capped, unreadable).
    probe: bool = False


@dataclass
class GovernorStats:
    waits: dict[str, int] = field(default_factory=dict)
    waited_s: float = 0.0
    # Per account: how many of its requests were held, and for how long in all.
    held_by_account: dict[str, int] = field(default_factory=dict)
    held_s_by_account: dict[str, float] = field(default_factory=dict)
    pauses_429: int = 0
    bans_418: int = 0
    capped_stops: int = 0  # pauses and bans shortened to the cap (or unreadable)
    probes: int = 0


@dataclass(eq=False)
class _Waiter:
    account: str
    is_order: bool
    reconcile: bool
    priority: int
    deadline_ms: int | None
    seq: int
    future: asyncio.Future[Ticket]
    reason: str


_Lane = tuple[str, int, str]  # (account, priority, kind)


def _kind(is_order: bool, reconcile: bool) -> str:
    return "order" if is_order else "reconcile" if reconcile else "query"


# Held requests are said at most once per reason in this long (with how many since).
HOLDS_SAID_EVERY_MS = 10_000
# The part of the weight limit an account past its share never borrows while the others have
# that much of theirs unused: without it a flood borrows a window to its last request, and
# another desk's cancel coming late in the window waits for the next (measured in the
# fairness bench: desk-1 held 5-6 times in 400 cancels, 12 ms each, its p99 to the exchange
# 10-13 ms against 4-8 alone). At least one request's weight.
BORROW_HEADROOM_SHARE = 0.02


class RateGovernor:
    def __init__(
        self,
        settings: GovernorSettings,
        clock: Callable[[], int],
        accounts: Mapping[str, float | None] | None = None,
    ) -> None:
        """``accounts``: every configured account and its reserved share of the IP weight
        (None: an equal part of what the reserved shares leave)."""
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
        # "" (none), "needed" (the next admission is the probe) or "in_flight".
        self._probe = ""
        self._reserved = {a: r for a, r in (accounts or {}).items() if r}
        self._shares: dict[str, float] = {}
        for account in accounts or {}:
            self._shares[account] = 0.0
        self._set_shares()
        # Weight this process sent per account, by weight window; reconciliation's apart.
        self._spent: dict[str, dict[int, int]] = {}
        self._reconciled: dict[str, dict[int, int]] = {}
        # Weighted fair queueing: each account's virtual finish time, and the system's.
        self._vtime: dict[str, float] = {}
        self._vnow = 0.0
        self._lanes: dict[_Lane, deque[_Waiter]] = {}
        self._waiting = 0
        self._seq = 0
        self._deadlines: list[tuple[int, int, _Waiter]] = []
        self._lane_checked: dict[_Lane, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0
        self.stats = GovernorStats()
        # Per reason: when a held request was last said (governor clock, ms), and the
        # holds since (count, seconds): an outage holds every request, one line says them.
        self._holds_said: dict[str, tuple[int, int, float]] = {}

    # -- reading --------------------------------------------------------------------------------

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

    def share_of(self, account: str) -> float:
        """The account's share of the IP weight (reserved, or an equal part of the rest)."""
        return self._shares.get(account, 0.0)

    @property
    def waiting(self) -> int:
        """Requests waiting for admission now."""
        return self._waiting

    # -- budgets --------------------------------------------------------------------------------

    def _set_shares(self) -> None:
        reserved = sum(self._reserved.values())
        rest = [a for a in self._shares if a not in self._reserved]
        each = max(0.0, 1.0 - reserved) / len(rest) if rest else 0.0
        for account in self._shares:
            self._shares[account] = self._reserved.get(account, each)

    def _know(self, account: str) -> None:
        if account not in self._shares:  # an account the accounts file did not name
            self._shares[account] = 0.0
            self._set_shares()

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

    def _ip_block(self, now: int) -> tuple[str, int] | None:
        """What keeps every account from sending now, and until when."""
        if self._banned_until > now:
            return "ip_banned", self._banned_until
        if self._ip_paused_until > now:
            return "ip_429_pause", self._ip_paused_until
        if self._probe == "in_flight":
            return "probing", now + 20  # its answer (observe, settle) opens or stops again
        limit = self._ip_limit(now)
        # After a 429 or a ban, the IP was full: until the exchange answers in a window, one
        # request at a time finds out whether the other processes on it have filled it again.
        recovering = self._ramp_from and now - self._ramp_from < self._s.ramp_ms
        self._weight.unconfirmed_allowance = 1 if recovering else self._unconfirmed
        if not self._weight.has_room(now, limit):
            if self._weight.awaiting_count(now, limit):
                return "awaiting_exchange_count", now + 20
            if recovering:
                return "ip_ramp", min(now + 100, self._weight.next_window_at(now, limit))
            return "ip_weight", self._weight.next_window_at(now, limit)
        return None

    def _account_block(
        self, account: str, is_order: bool, reconcile: bool, now: int, priority: int
    ) -> tuple[str, int] | None:
        """What keeps this account's request from going now, though the IP has room."""
        window = self._s.weight_window_ms
        index = now // window
        next_window = (index + 1) * window + self._s.guard_ms
        if reconcile:
            cap = max(1, int(self._s.reconcile_weight_share * self._s.weight_limit))
            if self._reconciled.get(account, {}).get(index, 0) >= cap:
                return "account_reconcile_cap", next_window
        share = self._share_block(account, now, index, priority >= Priority.KILL_SWITCH)
        if share is not None:
            return share
        if is_order:
            budget = self._account(account)
            if not budget.has_room(now):
                if budget.awaiting_count(now):
                    return "awaiting_exchange_count", now + 20
                return "account_orders", budget.next_window_at(now)
        return None

    def _share_block(
        self, account: str, now: int, index: int, kill_switch: bool
    ) -> tuple[str, int] | None:
        """An account past its share of the window borrows what the others leave unused, but
        only as the window passes: at a fraction f of it, the others' unused shares are held
        back but for f of them, never below ``BORROW_HEADROOM_SHARE`` of the limit (a
        reserved share is held back whole). So an account that floods cannot spend the window
        before the others come, and an idle window is still the flooder's by its end but for
        the headroom (a kill switch's requests borrow it too: nothing goes ahead of them)."""
        limit = self._ip_limit(now)
        share = self._shares.get(account, 1.0)
        if share >= 1.0:
            return None
        spent = self._spent.get(account, {}).get(index, 0)
        if spent + 1 <= share * limit:
            return None  # within its own share
        window = self._s.weight_window_ms
        elapsed = (now - index * window) / window
        held_whole = 0.0  # reserved shares, held back all window long
        held_decaying = 0.0  # equal parts, lent as the window passes
        for other, other_share in self._shares.items():
            if other == account or other_share <= 0.0:
                continue
            # In whole requests: a share below one request a window holds nothing back.
            unused = math.floor(other_share * limit) - self._spent.get(other, {}).get(index, 0)
            if unused <= 0:
                continue
            if other in self._reserved:
                held_whole += unused
            else:
                held_decaying += unused
        room_after = self._weight.room(now, limit) - 1
        headroom = (
            0.0
            if kill_switch
            else min(held_decaying, max(1.0, math.ceil(BORROW_HEADROOM_SHARE * limit)))
        )
        if room_after >= held_whole + max(held_decaying * (1.0 - elapsed), headroom):
            return None
        next_window = (index + 1) * window + self._s.guard_ms
        if held_decaying <= 0 or room_after < held_whole + headroom:
            return "account_weight_share", next_window
        # When the decaying part has shrunk enough for one more request.
        fraction = 1.0 - (room_after - held_whole) / held_decaying
        at = index * window + math.ceil(fraction * window)
        return "account_weight_share", min(max(at, now + 1), next_window)

    def _blocked_until(
        self, account: str, is_order: bool, now: int, reconcile: bool, priority: int
    ) -> tuple[str, int] | None:
        return self._ip_block(now) or self._account_block(
            account, is_order, reconcile, now, priority
        )

    # -- admission ------------------------------------------------------------------------------

    async def acquire(
        self,
        account: str,
        *,
        is_order: bool,
        deadline_ms: int | None,
        priority: Priority = Priority.NORMAL,
        purpose: Purpose | None = None,
    ) -> Ticket:
        """Wait for room for one request (weight 1, plus one order if ``is_order``).

        Returns the :class:`Ticket` to end with ``observe``, ``settle`` or ``refund``. Raises
        :class:`GovernorDeadlineError` if the deadline (exchange-clock ms) has passed, or if
        room would only come at or after it. Requests that wait are admitted by priority,
        then in weighted fair order across accounts (see the module docstring).
        """
        reconcile = purpose is Purpose.RECONCILE
        self._know(account)
        now = self._clock()
        blocked = self._blocked_until(account, is_order, now, reconcile, int(priority))
        if blocked is None and deadline_ms is not None and now >= deadline_ms:
            blocked = "deadline_passed", now
        if blocked is None and self._waiting == 0:
            return self._admit(account, is_order, reconcile, now, 0.0)
        reason, until = blocked or ("fair_queue", now)
        if deadline_ms is not None and until >= deadline_ms:
            raise GovernorDeadlineError(reason, until)
        started = time.monotonic()
        self._seq += 1
        waiter = _Waiter(
            account,
            is_order,
            reconcile,
            int(priority),
            deadline_ms,
            self._seq,
            asyncio.get_running_loop().create_future(),
            reason,
        )
        lane = (account, waiter.priority, _kind(is_order, reconcile))
        self._lanes.setdefault(lane, deque()).append(waiter)
        self._waiting += 1
        if deadline_ms is not None:
            heapq.heappush(self._deadlines, (deadline_ms, waiter.seq, waiter))
        self._pump()
        if waiter.future.done() and not waiter.future.exception():
            return waiter.future.result()  # its turn came at once: no wait
        try:
            ticket = await waiter.future
        except GovernorDeadlineError as exc:
            self._record_wait(waiter.reason, time.monotonic() - started, account)
            raise exc from None
        except asyncio.CancelledError:
            if not waiter.future.cancelled() and waiter.future.done():
                if waiter.future.exception() is None:
                    self.refund(waiter.future.result())  # admitted as the caller went away
            else:
                self._waiting -= 1  # left in its lane, skipped there
            raise
        waited = time.monotonic() - started
        self._record_wait(waiter.reason, waited, account)
        return dataclasses.replace(ticket, waited_s=waited)

    def _admit(
        self, account: str, is_order: bool, reconcile: bool, now: int, waited: float
    ) -> Ticket:
        weight = self._weight.take(now)
        orders = self._account(account).take(now) if is_order else frozenset()
        index = now // self._s.weight_window_ms
        spent = self._spent.setdefault(account, {})
        spent[index] = spent.get(index, 0) + 1
        if reconcile:
            reconciled = self._reconciled.setdefault(account, {})
            reconciled[index] = reconciled.get(index, 0) + 1
        if len(spent) > 2:
            self._prune_spent(index)
        start = max(self._vnow, self._vtime.get(account, 0.0))
        self._vnow = start
        self._vtime[account] = start + 1.0 / max(self._shares.get(account, 1.0), 1e-3)
        probe = self._probe == "needed"
        if probe:
            self._probe = "in_flight"
            self.stats.probes += 1
            log.warning("probing the exchange with one request after a capped stop")
        return Ticket(account, is_order, weight, orders, waited, index, reconcile, probe)

    def _prune_spent(self, index: int) -> None:
        for table in (self._spent, self._reconciled):
            for by_window in table.values():
                for old in [i for i in by_window if i < index - 1]:
                    del by_window[old]

    # -- the queue of waiting requests ----------------------------------------------------------

    def _pump(self) -> None:
        """Admit waiting requests while there is room: the highest priority first, then the
        account with the least weighted service (its virtual time); fail those whose
        deadline room would come too late for."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiting == 0:
            return
        now = self._clock()
        self._expire(now)
        wake: int | None = None
        while self._waiting:
            ip = self._ip_block(now)
            if ip is not None:
                reason, until = ip
                self._fail_before(until, reason)
                wake = until
                break
            picked, wake = self._pick(now)
            if picked is None:
                break
            waiter = self._lanes[picked].popleft()
            self._waiting -= 1
            ticket = self._admit(waiter.account, waiter.is_order, waiter.reconcile, now, 0.0)
            waiter.future.set_result(ticket)
        if self._waiting:
            self._schedule(now, wake)

    def _pick(self, now: int) -> tuple[_Lane | None, int | None]:
        """The lane whose head goes next, or None and when to look again."""
        wake: int | None = None
        by_priority: dict[int, dict[str, list[_Lane]]] = {}
        for lane, waiters in list(self._lanes.items()):
            while waiters and waiters[0].future.done():
                waiters.popleft()  # failed or given up: skipped
            if not waiters:
                del self._lanes[lane]
                self._lane_checked.pop(lane, None)
                continue
            by_priority.setdefault(lane[1], {}).setdefault(lane[0], []).append(lane)
        for priority in sorted(by_priority, reverse=True):
            accounts = by_priority[priority]
            order = sorted(accounts, key=lambda a: max(self._vnow, self._vtime.get(a, 0.0)))
            for account in order:
                lanes = sorted(accounts[account], key=lambda lane: self._lanes[lane][0].seq)
                for lane in lanes:
                    head = self._lanes[lane][0]
                    blocked = self._account_block(
                        account, head.is_order, head.reconcile, now, head.priority
                    )
                    if blocked is None:
                        return lane, None
                    reason, until = blocked
                    self._fail_lane(lane, reason, until)
                    wake = until if wake is None else min(wake, until)
        return None, wake

    def _fail_lane(self, lane: _Lane, reason: str, until: int) -> None:
        """Fail the lane's waiters whose deadline comes before ``until``; the others wait."""
        if self._lane_checked.get(lane) == until:
            return
        self._lane_checked[lane] = until
        for waiter in self._lanes[lane]:
            if waiter.future.done():
                continue
            waiter.reason = reason
            if waiter.deadline_ms is not None and until >= waiter.deadline_ms:
                self._fail(waiter, reason, until)

    def _fail_before(self, until: int, reason: str) -> None:
        """Fail every waiter whose deadline comes before ``until`` (the IP is stopped)."""
        while self._deadlines and self._deadlines[0][0] <= until:
            _, _, waiter = heapq.heappop(self._deadlines)
            if not waiter.future.done():
                waiter.reason = reason if waiter.reason == "fair_queue" else waiter.reason
                self._fail(waiter, reason, until)

    def _expire(self, now: int) -> None:
        """Fail every waiter whose deadline has come: nothing is admitted at or after it."""
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, waiter = heapq.heappop(self._deadlines)
            if not waiter.future.done():
                self._fail(waiter, waiter.reason, deadline)

    def _fail(self, waiter: _Waiter, reason: str, until: int) -> None:
        self._waiting -= 1
        waiter.future.set_exception(GovernorDeadlineError(reason, until))

    def _schedule(self, now: int, wake: int | None) -> None:
        """Look again at ``wake``, at the next deadline, and at least every second."""
        at = now + 1_000
        if wake is not None:
            at = min(at, wake)
        if self._deadlines:
            at = min(at, self._deadlines[0][0])
        delay_ms = max(at - now, 1)
        self._timer_at = now + delay_ms
        self._timer = asyncio.get_running_loop().call_later(delay_ms / 1000, self._pump)

    def _wake(self) -> None:
        """Something changed (an answer, a settled or refunded request): look at the queue."""
        if self._waiting:
            self._pump()

    # -- ends of a ticket -----------------------------------------------------------------------

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
        if ticket.probe and self._probe == "in_flight":
            self._probe = "needed"  # no answer: the next request probes again
        self._wake()

    def refund(self, ticket: Ticket) -> None:
        """The request never left (connection refused, signing refused): uncount it."""
        now = self._clock()
        self._weight.refund(now, ticket.weight_windows)
        if ticket.is_order:
            self._account(ticket.account).refund(now, ticket.order_windows)
        for table, counted in ((self._spent, True), (self._reconciled, ticket.reconcile)):
            by_window = table.get(ticket.account, {})
            if counted and by_window.get(ticket.account_window, 0) > 0:
                by_window[ticket.account_window] -= 1
        if ticket.probe and self._probe == "in_flight":
            self._probe = "needed"
        self._wake()

    def _record_wait(self, reason: str, waited_s: float, account: str) -> None:
        self.stats.waits[reason] = self.stats.waits.get(reason, 0) + 1
        self.stats.waited_s += waited_s
        held = self.stats.held_by_account
        held[account] = held.get(account, 0) + 1
        held_s = self.stats.held_s_by_account
        held_s[account] = held_s.get(account, 0.0) + waited_s
        metrics.GOVERNOR_WAITS.labels(reason).inc()
        metrics.GOVERNOR_WAIT_SECONDS.observe(waited_s)
        now = self._clock()
        said_at, count, total_s = self._holds_said.get(reason, (-HOLDS_SAID_EVERY_MS, 0, 0.0))
        count, total_s = count + 1, total_s + waited_s
        if now - said_at < HOLDS_SAID_EVERY_MS:
            self._holds_said[reason] = (said_at, count, total_s)
            return
        self._holds_said[reason] = (now, 0, 0.0)
        if count == 1:
            log.info(
                "rate governor held a request for %.3fs (reason=%s account=%s)",
                waited_s,
                reason,
                account,
            )
        else:
            log.info(
                "rate governor held %d requests for %.3fs in all since it last said so "
                "(reason=%s; the last: account=%s)",
                count,
                total_s,
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
        """Learn from an answer: the exchange's counts, 429 pauses and 418 bans (capped)."""
        now = self._clock()
        self._weight.correct(
            now, ascii_int(headers.get("x-mbx-used-weight-1m")), ticket.weight_windows
        )
        if ticket.is_order:
            self._account(ticket.account).correct(
                now, ascii_int(headers.get("x-mbx-order-count-1m")), ticket.order_windows
            )
        banned = _BANNED_UNTIL.search(msg or "") if code == -1003 else None
        probe_answered = ticket.probe and self._probe == "in_flight"
        if probe_answered:
            self._probe = ""  # a stop below sets it again if its end is a guess
        if status == 418 or banned is not None:
            self._ban(now, headers.get("retry-after"), banned)
        elif status == 429:
            self._pause(now, headers.get("retry-after"))
        elif probe_answered:
            self._ramp_from = now  # the exchange answers: reopen gradually from here
            log.warning("the exchange answered the probe: sending again, ramping up")
        self._wake()

    def _stop_end(self, now: int, wanted_ms: int | None, cap_ms: int) -> tuple[int, bool]:
        """When a stop the exchange asked for ends, and whether that is a guess: a length
        that cannot be read, or one past ``cap_ms``, is the cap, and then one request must
        probe before traffic reopens."""
        guessed = wanted_ms is None or wanted_ms > cap_ms
        if guessed:
            self._probe = "needed"
            self.stats.capped_stops += 1
        return now + (cap_ms if guessed or wanted_ms is None else wanted_ms), guessed

    def _ban(self, now: int, retry_after: str | None, banned: re.Match[str] | None) -> None:
        if banned is not None:
            said = ascii_int(banned.group(1))
            wanted = None if said is None else said - now
        elif retry_after is not None:
            seconds = ascii_int(retry_after)
            wanted = None if seconds is None else seconds * 1000
        else:
            wanted = self._s.default_ban_ms
        until, guessed = self._stop_end(now, wanted, self._s.max_ban_ms)
        if guessed:
            log.error(
                "IP ban from the exchange for %s: capped at %.1fs, then one request probes",
                "an unreadable time" if wanted is None else f"{wanted / 1000:.0f}s",
                self._s.max_ban_ms / 1000,
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

    def _pause(self, now: int, retry_after: str | None) -> None:
        seconds = ascii_int(retry_after)
        if retry_after is None:
            wanted: int | None = self._s.default_retry_after_ms
        else:
            wanted = None if seconds is None else seconds * 1000
        until, guessed = self._stop_end(now, wanted, self._s.max_pause_ms)
        if guessed:
            log.warning(
                "429 with Retry-After %s: pause capped at %.1fs, then one request probes",
                "unreadable" if wanted is None else f"{wanted / 1000:.0f}s",
                self._s.max_pause_ms / 1000,
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
