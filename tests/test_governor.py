"""The rate governor (pure parts on a fake clock; waits in real time kept short)."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from worker.core.commands import Command, Market
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.governor import (
    BORROW_HEADROOM_SHARE,
    GovernorDeadlineError,
    GovernorSettings,
    Priority,
    Purpose,
    RateGovernor,
    WindowBudget,
)
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, RetryPolicy
from worker.tools.sim.app import SimConfig, seed_order
from worker.tools.sim.faults import TOO_MANY, Fault
from worker.tools.sim.server import running_sim, state_from_accounts


class FakeClock:
    def __init__(self, now: int = 1_795_260_030_000) -> None:  # mid-window
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_window_budget_counts_rolls_and_takes_corrections() -> None:
    budget = WindowBudget(limit=3, window_ms=10_000, guard_ms=100)
    now = 55_000  # window 5 is [50000, 60000) on the exchange clock
    for _ in range(3):
        assert budget.has_room(now)
        budget.take(now)
        budget.correct(now, None)  # answered
    assert not budget.has_room(now)
    assert budget.next_window_at(now) == 60_100  # once window 5 is surely over
    assert not budget.has_room(60_050)  # could still be window 5 for the exchange
    assert budget.has_room(60_100)
    budget.correct(60_500, 2)  # the exchange counted more than we did: believe it
    budget.take(60_500)
    assert not budget.has_room(60_500)
    budget.correct(60_500, 1)  # a lower count never frees room
    assert not budget.has_room(60_500)


def test_requests_near_a_boundary_count_in_both_windows() -> None:
    """The exchange must never see more than the limit in one window, whatever side of the
    boundary an uncertain request lands on, and a request still in flight when a window
    opens counts there too."""
    budget = WindowBudget(limit=2, window_ms=1_000, guard_ms=100)
    first = budget.take(1_950)  # within the guard of the 2000 boundary: windows 1 and 2
    second = budget.take(1_960)
    assert first == second == {1, 2}
    assert not budget.has_room(2_050)  # window 2 already holds two possible arrivals
    assert budget.has_room(2_200) is False
    budget.settle(2_400, first)  # both answered (or given up on) inside window 2
    budget.settle(2_400, second)
    assert budget.has_room(3_100)
    exchange_counts: dict[int, int] = {}
    budget = WindowBudget(limit=5, window_ms=1_000, guard_ms=100)
    for t in range(0, 5_000, 7):
        if budget.has_room(t):
            budget.settle(t + 5, budget.take(t))  # answered a few ms later
            for index in {(t - 100) // 1_000, (t + 100) // 1_000}:  # any skew within the guard
                exchange_counts[index] = exchange_counts.get(index, 0) + 1
    assert max(exchange_counts.values()) <= 5


async def test_account_order_budget_blocks_only_that_account() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(order_limit=2, order_window_ms=60_000), clock)
    for _ in range(2):
        await governor.acquire("a", is_order=True, deadline_ms=None)
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 1_000)
    assert info.value.reason == "account_orders"
    await governor.acquire("b", is_order=True, deadline_ms=clock.now + 1)  # b is unaffected
    await governor.acquire("a", is_order=False, deadline_ms=clock.now + 1)  # queries still go


async def test_429_pauses_the_ip_then_reopens_gradually() -> None:
    clock = FakeClock()
    settings = GovernorSettings(weight_limit=100, ramp_ms=10_000)
    governor = RateGovernor(settings, clock)
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(ticket, 429, {"retry-after": "2", "x-mbx-used-weight-1m": "40"}, -1003, "x")
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("b", is_order=False, deadline_ms=clock.now + 1_500)
    assert info.value.reason == "ip_429_pause"
    assert info.value.wait_until_ms == clock.now + 2_000
    clock.now += 2_000  # pause over: only 10% of the budget at first, then more with time
    assert governor._ip_limit(clock.now) == 10
    clock.now += 5_000
    assert governor._ip_limit(clock.now) == 55
    clock.now += 5_000
    assert governor._ip_limit(clock.now) == 100
    assert governor.stats.pauses_429 == 1


async def test_418_and_banned_until_stop_all_traffic_until_the_ban_ends() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(), clock)
    until = clock.now + 30_000
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(
        ticket, 400, {}, -1003, f"Way too many requests; IP(1.2.3.4) banned until {until}. Please"
    )
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("other", is_order=False, deadline_ms=clock.now + 29_000)
    assert info.value.reason == "ip_banned" and info.value.wait_until_ms == until
    governor.observe(ticket, 418, {"retry-after": "60"})
    assert governor._banned_until == clock.now + 60_000
    clock.now += 60_000
    await governor.acquire("other", is_order=False, deadline_ms=None)
    assert governor.stats.bans_418 == 2


async def test_acquire_waits_for_the_next_window_in_real_time() -> None:
    import time  # noqa: PLC0415

    def wall() -> int:
        return time.time_ns() // 1_000_000

    governor = RateGovernor(
        GovernorSettings(weight_limit=1, weight_window_ms=200, guard_ms=0), wall
    )
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(ticket, 200, {})  # answered
    waited = (await governor.acquire("a", is_order=False, deadline_ms=wall() + 5_000)).waited_s
    assert 0 < waited < 1.0
    assert governor.stats.waits == {"ip_weight": 1}


async def test_a_window_the_exchange_has_not_counted_yet_admits_only_a_few() -> None:
    """After a restart the window may already be used (by this account's previous run or
    another process): a few orders go, then the exchange's own count decides."""
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(order_limit=60, order_window_ms=60_000), clock)
    tickets = [await governor.acquire("a", is_order=True, deadline_ms=None) for _ in range(5)]
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10)
    assert info.value.reason == "awaiting_exchange_count"
    # The first answer: the exchange has counted 54 (earlier use plus this request); the
    # four others of ours still in flight are added on top: 58 of 60, so two more may go.
    governor.observe(tickets[0], 200, {"x-mbx-order-count-1m": "54"})
    for _ in range(2):
        await governor.acquire("a", is_order=True, deadline_ms=None)
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10)
    assert info.value.reason == "account_orders"


async def test_unanswered_requests_free_their_place_so_an_uncounted_window_never_stalls() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(order_limit=60, order_window_ms=60_000), clock)
    tickets = [await governor.acquire("a", is_order=True, deadline_ms=None) for _ in range(5)]
    for ticket in tickets[:2]:  # two time out: no count learned, but no longer in flight
        governor.settle(ticket)
    for _ in range(2):
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10)
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10)
    assert info.value.reason == "awaiting_exchange_count"


async def test_nothing_is_admitted_at_or_after_its_deadline_even_with_room() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(), clock)
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("a", is_order=True, deadline_ms=clock.now)
    assert info.value.reason == "deadline_passed"
    await governor.acquire("a", is_order=True, deadline_ms=clock.now + 1)


async def test_a_request_that_never_left_is_refunded() -> None:
    """Refused connections cost no budget: a minute of them must not use up the window."""
    clock = FakeClock()
    governor = RateGovernor(
        GovernorSettings(weight_limit=10, order_limit=3, order_window_ms=60_000), clock
    )
    for _ in range(50):
        governor.refund(await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10))
    tickets = [
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10) for _ in range(3)
    ]
    with pytest.raises(GovernorDeadlineError):
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10)
    for ticket in tickets:
        governor.settle(ticket)  # sent, unanswered: still counted
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("a", is_order=True, deadline_ms=clock.now + 10)
    assert info.value.reason == "account_orders"


async def test_a_ticket_covers_only_the_windows_it_was_counted_in() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(weight_window_ms=1_000, guard_ms=100), clock)
    clock.now = 10_400
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    clock.now = 10_850
    assert governor.covers(ticket)  # still inside window 10, away from its end
    clock.now = 10_950
    assert not governor.covers(ticket)  # may land in window 11, where it was not counted


# -- caps on what the exchange can make the worker do ---------------------------------------


@pytest.mark.parametrize("retry_after", ["1e9", "inf", "nan", "-1", "²", "2.5", "9" * 40, ""])
async def test_an_unreadable_retry_after_pauses_for_the_cap_never_raises(retry_after: str) -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(max_pause_ms=60_000), clock)
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(ticket, 429, {"retry-after": retry_after})
    assert governor.paused_until_ms == clock.now + 60_000
    assert governor.stats.capped_stops == 1


async def test_a_huge_retry_after_is_capped_then_one_request_probes() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(max_pause_ms=2_000), clock)
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(ticket, 429, {"retry-after": "1000000000"})  # about 31 years
    assert governor.paused_until_ms == clock.now + 2_000
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("b", is_order=False, deadline_ms=clock.now + 1_999)
    assert info.value.reason == "ip_429_pause"
    clock.now += 2_000
    probe = await governor.acquire("b", is_order=False, deadline_ms=None)
    assert probe.probe
    with pytest.raises(GovernorDeadlineError) as info:  # nothing else until it is answered
        await governor.acquire("a", is_order=False, deadline_ms=clock.now + 10)
    assert info.value.reason == "probing"
    governor.observe(probe, 200, {"x-mbx-used-weight-1m": "1"})
    after = await governor.acquire("a", is_order=False, deadline_ms=clock.now + 10)
    assert not after.probe
    assert governor.stats.probes == 1


async def test_a_probe_that_meets_the_stop_again_stops_again_and_probes_after() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(max_ban_ms=5_000), clock)
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(ticket, 418, {"retry-after": "inf"})
    assert governor.banned_until_ms == clock.now + 5_000
    clock.now += 5_000
    probe = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.settle(probe)  # no answer: the next request probes again
    probe = await governor.acquire("a", is_order=False, deadline_ms=None)
    assert probe.probe
    far = clock.now + 10 * 365 * 86_400_000
    governor.observe(probe, 418, {}, -1003, f"Way too many requests; IP banned until {far}.")
    assert governor.banned_until_ms == clock.now + 5_000
    clock.now += 5_000
    assert (await governor.acquire("a", is_order=False, deadline_ms=None)).probe


@pytest.mark.parametrize(
    "message",
    [
        "IP banned until 99999999999999999999999999999999.",  # past what an int64 holds
        "IP banned until ١٧٩٥٢٦٠٠٣٠٠٠٠.",  # digits, but not ASCII ones
        "IP banned until soon.",
    ],
)
async def test_an_unreadable_or_huge_ban_is_the_cap(message: str) -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(max_ban_ms=300_000), clock)
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(ticket, 418, {}, -1003, message)
    assert governor.banned_until_ms == clock.now + 300_000


async def test_stops_within_the_caps_are_the_exchanges_word_and_need_no_probe() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(), clock)
    ticket = await governor.acquire("a", is_order=False, deadline_ms=None)
    governor.observe(ticket, 429, {"retry-after": "3", "x-mbx-used-weight-1m": "²"})
    assert governor.paused_until_ms == clock.now + 3_000
    clock.now += 3_000
    assert not (await governor.acquire("a", is_order=False, deadline_ms=None)).probe
    assert governor.stats.capped_stops == 0


# -- fair shares ------------------------------------------------------------------------------


async def _send_until_refused(
    governor: RateGovernor, account: str, clock: FakeClock
) -> tuple[int, str]:
    """Send (each answered at once) until the governor refuses: how many, and why."""
    sent = 0
    while True:
        try:
            ticket = await governor.acquire(account, is_order=False, deadline_ms=clock.now + 1)
        except GovernorDeadlineError as exc:
            return sent, exc.reason
        governor.observe(ticket, 200, {})
        sent += 1


async def test_an_account_past_its_share_borrows_only_as_the_window_passes() -> None:
    """Two accounts, 100 a window: a flood from "a" gets its 50 at once, then borrows what "b"
    leaves unused only as the window passes, so "b" finds room whenever it comes."""
    clock = FakeClock(1_795_260_000_000)  # a window's start (window 60 s)
    governor = RateGovernor(GovernorSettings(weight_limit=100), clock, {"a": None, "b": None})
    for _ in range(50):
        governor.observe(await governor.acquire("a", is_order=False, deadline_ms=None), 200, {})
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire("a", is_order=False, deadline_ms=clock.now + 100)
    assert info.value.reason == "account_weight_share"
    governor.observe(
        await governor.acquire("b", is_order=False, deadline_ms=clock.now + 1), 200, {}
    )
    clock.now += 30_000  # half the window: half of what b leaves unused may be borrowed
    borrowed, refused = await _send_until_refused(governor, "a", clock)
    assert refused == "account_weight_share"
    assert 20 <= borrowed <= 26, borrowed
    await governor.acquire("b", is_order=False, deadline_ms=clock.now + 1)  # still room for b


async def test_a_flood_late_in_the_window_leaves_the_headroom_to_the_others() -> None:
    """Past its share, late in the window, a flood borrows all that "b" left unused but for
    ``BORROW_HEADROOM_SHARE`` of the limit (2 of 100): "b" coming then goes at once, not in
    the next window."""
    clock = FakeClock(1_795_260_000_000)
    governor = RateGovernor(GovernorSettings(weight_limit=100), clock, {"a": None, "b": None})
    headroom = max(1, math.ceil(BORROW_HEADROOM_SHARE * 100))
    assert headroom == 2
    clock.now += 59_900  # the window's last 100 ms: b's unused 50 are lent but for the headroom
    sent, refused = await _send_until_refused(governor, "a", clock)
    assert refused == "account_weight_share"
    assert sent == 100 - headroom
    for _ in range(headroom):  # b, late: at once
        ticket = await governor.acquire("b", is_order=False, deadline_ms=clock.now + 1)
        governor.observe(ticket, 200, {})
    with pytest.raises(GovernorDeadlineError) as info:  # the IP's window is full now
        await governor.acquire("b", is_order=False, deadline_ms=clock.now + 1)
    assert info.value.reason == "ip_weight"


async def test_a_kill_switch_past_its_share_may_take_the_headroom() -> None:
    """The headroom is left to the others' single cancels, not to the flooder's own kill
    switch: nothing goes ahead of a kill switch, and on a 60 s window waiting for the next
    one would cost it up to a minute."""
    clock = FakeClock(1_795_260_000_000)
    governor = RateGovernor(GovernorSettings(weight_limit=100), clock, {"a": None, "b": None})
    clock.now += 59_900
    sent, refused = await _send_until_refused(governor, "a", clock)
    assert (sent, refused) == (98, "account_weight_share")  # a single cancel: not the headroom
    ticket = await governor.acquire(
        "a", is_order=False, deadline_ms=clock.now + 1, priority=Priority.KILL_SWITCH
    )
    governor.observe(ticket, 200, {})


async def test_a_reserved_share_is_held_all_window_long() -> None:
    clock = FakeClock(1_795_260_000_000)
    governor = RateGovernor(GovernorSettings(weight_limit=100), clock, {"a": None, "b": 0.3})
    assert governor.share_of("a") == pytest.approx(0.7)
    clock.now += 59_000  # late in the window: b's reserved 30 are still held
    sent, refused = await _send_until_refused(governor, "a", clock)
    assert refused == "account_weight_share"
    assert sent == 70
    for _ in range(30):
        ticket = await governor.acquire("b", is_order=False, deadline_ms=clock.now + 1)
        governor.observe(ticket, 200, {})


async def test_waiting_requests_go_by_priority_then_fairly_across_accounts() -> None:
    """One request per window: waiters from a flooding account, a few from another and a
    kill switch; each window's request goes to the kill switch first, then alternates."""
    import time  # noqa: PLC0415

    def wall() -> int:
        return time.time_ns() // 1_000_000

    governor = RateGovernor(
        GovernorSettings(weight_limit=1, weight_window_ms=100, guard_ms=0), wall
    )
    governor.observe(await governor.acquire("x", is_order=False, deadline_ms=None), 200, {})
    order: list[str] = []

    async def one(name: str, account: str, priority: Priority = Priority.NORMAL) -> None:
        ticket = await governor.acquire(
            account, is_order=False, deadline_ms=wall() + 5_000, priority=priority
        )
        order.append(name)
        governor.observe(ticket, 200, {})

    tasks = [asyncio.create_task(one(f"a{i}", "a")) for i in range(6)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(one(f"b{i}", "b")) for i in range(2)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(one("kill", "c", Priority.KILL_SWITCH)))
    await asyncio.gather(*tasks)
    assert order[0] == "kill"
    assert order[1:5] in (["a0", "b0", "a1", "b1"], ["b0", "a0", "b1", "a1"]), order
    assert order[5:] == ["a2", "a3", "a4", "a5"]


async def test_reconciliation_weight_is_capped_per_account_per_window() -> None:
    clock = FakeClock(1_795_260_000_000)
    settings = GovernorSettings(weight_limit=100, reconcile_weight_share=0.05)
    governor = RateGovernor(settings, clock)
    for _ in range(5):
        ticket = await governor.acquire(
            "a", is_order=False, deadline_ms=None, purpose=Purpose.RECONCILE
        )
        governor.observe(ticket, 200, {})
    with pytest.raises(GovernorDeadlineError) as info:
        await governor.acquire(
            "a", is_order=False, deadline_ms=clock.now + 30_000, purpose=Purpose.RECONCILE
        )
    assert info.value.reason == "account_reconcile_cap"
    assert info.value.wait_until_ms == clock.now + 60_000 + settings.guard_ms
    # The account's cancels, and another account's reconciliation, still go.
    await governor.acquire("a", is_order=True, deadline_ms=clock.now + 1)
    await governor.acquire(
        "b", is_order=False, deadline_ms=clock.now + 1, purpose=Purpose.RECONCILE
    )


async def test_a_waiter_that_gives_up_leaves_the_queue() -> None:
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(weight_limit=1), clock)
    governor.observe(await governor.acquire("a", is_order=False, deadline_ms=None), 200, {})
    task = asyncio.create_task(governor.acquire("a", is_order=False, deadline_ms=None))
    await asyncio.sleep(0)
    assert governor.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert governor.waiting == 0


# -- a hostile exchange's stops, through the client and the simulator -------------------------

CAP_MS = 1_500
FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01


@pytest.mark.parametrize(
    "fault",
    [
        Fault(429, -1003, TOO_MANY.format(limit=6000), retry_after="1e9", method="DELETE"),
        Fault(429, -1003, TOO_MANY.format(limit=6000), retry_after="inf", method="DELETE"),
        Fault(429, -1003, TOO_MANY.format(limit=6000), retry_after="9" * 30, method="DELETE"),
        Fault(
            418,
            -1003,
            f"Way too many requests; IP(127.0.0.1) banned until {FAR_FUTURE_MS}. Please use "
            "the websocket for live updates to avoid bans.",
            method="DELETE",
        ),
        Fault(418, -1003, "Way too many requests", retry_after="1e9", method="DELETE"),
    ],
    ids=["retry-after-1e9", "retry-after-inf", "retry-after-30-digits", "ban-2100", "ban-1e9"],
)
async def test_a_hostile_stop_keeps_the_worker_answering_within_the_cap(
    accounts: dict[str, Credentials], fault: Fault
) -> None:
    """The exchange asks for a pause or a ban of years (or of an unreadable length): the
    worker stops for the cap at most, probes, and cancels; on the governor before the caps
    the first cancel failed (31 years of pause, a ban until 2100, OverflowError for inf)."""
    state = state_from_accounts(accounts, SimConfig())
    orders = [seed_order(state, {"account": "desk-0", "kind": "algo"}) for _ in range(3)]
    state.faults.append(fault)
    governor = RateGovernor(GovernorSettings(max_pause_ms=CAP_MS, max_ban_ms=CAP_MS), now_ms)
    async with running_sim(state) as url, PapiClient(url, clock=now_ms, governor=governor) as c:
        executor = CancelExecutor(c, accounts, RetryPolicy(default_deadline_ms=20_000), now_ms)
        outcomes = []
        for i, order in enumerate(orders):
            command = Command(
                command_id=f"hostile-{i}",
                account="desk-0",
                market=Market.UM,
                issued_at=now_ms(),
                algo_id=order["algo_id"],
            )
            outcomes.append(await executor.execute(command, now_ms()))
    assert all(o.canceled for o in outcomes), outcomes
    papi = [r for r in state.requests if r["path"].startswith("/papi/")]
    stopped = next(r for r in papi if r.get("fault"))
    assert stopped["status"] == fault.status
    # The stop the worker kept ends within the cap of the answer that asked for it.
    stop_end = max(governor.paused_until_ms, governor.banned_until_ms)
    assert stopped["at"] < stop_end <= stopped["at"] + CAP_MS + 500
    after = [r for r in papi if r["seq"] > stopped["seq"]]
    assert [r["status"] for r in after] == [200] * len(orders)
    assert all(r["at"] >= stop_end - 50 for r in after)  # nothing went during the stop


def test_requests_held_through_an_outage_are_said_in_a_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage holds every request; one INFO line per reason and interval says how many
    (145 held requests were 145 lines)."""
    clock = FakeClock()
    governor = RateGovernor(GovernorSettings(), clock)
    caplog.set_level(logging.INFO, logger="worker.exchange.governor")
    for i in range(145):
        clock.now += 60  # 145 holds over 8.7 s
        governor._record_wait("paused", 0.05, f"desk-{i % 3}")
    clock.now += 2_000  # the next hold after the interval says those since the first
    governor._record_wait("paused", 0.05, "desk-0")
    lines = [r.getMessage() for r in caplog.records if "rate governor held" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "held 145 requests" in lines[1]
    assert governor.stats.waits["paused"] == 146  # every hold still counted
