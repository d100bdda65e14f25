"""Pods behind one egress IP share the exchange's weight budget without a static split.

Two workers' exchange sides (each its own :class:`PapiClient` and :class:`RateGovernor`,
each configured with the exchange's *whole* limit, as the Kubernetes ConfigMap configures
every pod) send a burst of cancels at once to one simulator, which counts the weight of both
against one IP limit, as the exchange does for pods leaving through one NAT IP. Each
governor learns what the other spent from the exchange's ``X-MBX-USED-WEIGHT-1M`` on every
answer, keeps at most half the room it sees in flight, and after a 429 sends one request
at a time into a window until the exchange has answered there: together they stay within
the limit but for a 429 or two where their counts lag each other's requests in flight, are
never banned, and every cancel is done.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from worker.core.commands import Command, Market
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.governor import GovernorSettings, RateGovernor
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, Outcome, RetryPolicy
from worker.tools.sim.app import SimConfig, seed_order
from worker.tools.sim.server import running_sim, state_from_accounts

LIMIT = 40  # the exchange's IP weight limit per window, small so that a burst meets it
WINDOW_MS = 2_000
# The clock-error guard at a window's edges, scaled to the window as the default 250 ms is
# to the exchange's 60 s (both sides read one clock here): answers within it teach nothing.
GUARD_MS = 10
PODS = 2
CANCELS = 3 * LIMIT  # three windows' worth, sent at once


async def test_two_pods_with_the_whole_limit_each_stay_within_the_ips_limit(
    accounts: dict[str, Credentials],
) -> None:
    desks = sorted(a for a in accounts if a.startswith("desk-") and a[5:].isdigit())
    # A little exchange latency, so that each pod has requests in flight when the other's
    # answers arrive (on loopback every answer would otherwise come before the next send).
    state = state_from_accounts(
        accounts,
        SimConfig(weight_limit=LIMIT, weight_window_ms=WINDOW_MS, fixed_latency_ms=20),
    )
    orders = [
        (
            desks[i % len(desks)],
            seed_order(state, {"account": desks[i % len(desks)], "kind": "algo"}),
        )
        for i in range(CANCELS)
    ]
    governors = [
        RateGovernor(
            GovernorSettings(weight_limit=LIMIT, weight_window_ms=WINDOW_MS, guard_ms=GUARD_MS),
            now_ms,
        )
        for _ in range(PODS)
    ]
    async with running_sim(state) as url:
        clients = [PapiClient(url, clock=now_ms, timeout_s=5, governor=g) for g in governors]
        try:
            for client in clients:
                await client.__aenter__()
            executors = [
                CancelExecutor(c, accounts, RetryPolicy(default_deadline_ms=30_000), now_ms)
                for c in clients
            ]

            async def cancel(i: int, account: str, order: dict[str, Any]) -> Outcome:
                command = Command(
                    command_id=f"burst-{i}",
                    account=account,
                    market=Market.UM,
                    issued_at=now_ms(),
                    algo_id=order["algo_id"],
                )
                return await executors[i % PODS].execute(command, now_ms())

            outcomes = await asyncio.gather(*(cancel(i, a, o) for i, (a, o) in enumerate(orders)))
        finally:
            for client in clients:
                await client.__aexit__(None, None, None)

    assert all(o.canceled for o in outcomes), [o for o in outcomes if not o.canceled][:3]
    papi = [r for r in state.requests if r["path"].startswith("/papi/")]
    assert state.banned_until == 0
    statuses = collections.Counter(r["status"] for r in papi)
    assert set(statuses) <= {200, 429}, statuses  # never banned
    assert statuses[200] == CANCELS
    # Where the pods' counts lag each other's requests in flight, a window may be overfilled
    # by one or two; each pod backs off at its first 429 (the simulator bans at the third).
    over = collections.Counter(r["at"] // WINDOW_MS for r in papi if r["status"] == 429)
    assert all(n <= 2 for n in over.values()), over
    assert sum(g.stats.bans_418 for g in governors) == 0
    # Together they used the whole limit in a window: no static split held either back.
    sent = collections.Counter(r["at"] // WINDOW_MS for r in papi if r["status"] == 200)
    assert max(sent.values()) == LIMIT
    assert len(sent) >= CANCELS // LIMIT
