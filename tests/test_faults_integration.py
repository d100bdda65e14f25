"""Resilience against a misbehaving exchange, with the real broker and the real simulator.

For every fault profile the worker's final result for each command must be the truth the
simulator knows: canceled exactly when the book canceled it, the real status for orders that
were already closed, not_found for orders that never existed. Nothing is lost.
"""

from __future__ import annotations

import collections
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import (
    SimControl,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    running_worker,
    worker_settings,
)
from worker.tools.devstack import Broker
from worker.tools.sim.faults import PROFILES

pytestmark = pytest.mark.integration

FAULT_PROFILES = sorted(set(PROFILES) - {"none"})


def _mixed_book(sim: SimControl) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Open orders on all three routes, some already closed, and two that never existed.

    Returns the commands and, per command_id, what the truth must be.
    """
    specs: list[dict[str, Any]] = []
    for i in range(30):
        account = f"desk-{i % 5}"
        kind = i % 3
        if kind == 0:
            specs.append({"account": account, "market": "UM", "symbol": "BTCUSDT"})
        elif kind == 1:
            specs.append({"account": account, "market": "CM", "symbol": "ETHUSD_PERP"})
        else:
            specs.append({"account": account, "kind": "algo", "symbol": "ETHUSDT"})
    for status in ("TRIGGERED", "EXPIRED", "FINISHED"):
        specs.append({"account": "desk-1", "market": "UM", "symbol": "SOLUSDT", "status": status})
    specs.append({"account": "desk-2", "kind": "algo", "status": "TRIGGERED"})
    orders = sim.seed(specs)
    commands: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    for spec, order in zip(specs, orders, strict=True):
        cmd = command(spec["account"], order)
        commands.append(cmd)
        expected[cmd["command_id"]] = spec.get("status", "CANCELED")
    for n, missing in enumerate(
        (
            {"kind": "algo", "algo_id": 77_000_000_001},
            {
                "kind": "conditional",
                "market": "CM",
                "symbol": "BTCUSD_PERP",
                "strategy_id": 77_000_000_002,
            },
        )
    ):
        cmd = command(f"desk-{n}", missing)
        commands.append(cmd)
        expected[cmd["command_id"]] = "MISSING"
    return commands, expected


def _order_id(cmd: dict[str, Any]) -> int:
    return int(cmd.get("strategy_id") or cmd["algo_id"])


@pytest.mark.parametrize("profile", FAULT_PROFILES)
async def test_results_are_the_simulators_truth_under_faults(
    broker: Broker, sim: SimControl, accounts_file: Path, profile: str
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    commands, expected = _mixed_book(sim)
    since = sim.last_seq()
    sim.configure(profile=profile, seed=zlib.crc32(profile.encode()))
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        http_timeout_s=1.0,
        max_attempts=10,
        backoff_initial_s=0.02,
        backoff_max_s=0.5,
        default_deadline_ms=60_000,
        reconcile_budget_ms=20_000,
        rate_guard_ms=50,
    )
    async with running_worker(settings):
        await produce(
            broker.bootstrap,
            topics.commands,
            [(f"{c['account']}:{c.get('symbol')}".encode(), orjson.dumps(c)) for c in commands],
        )
        results = events_of(
            await consume(broker.bootstrap, topics.results, len(commands), timeout_s=150)
        )
    sim.reset()

    assert len(results) == len(commands), "a command has no result"
    by_id = {e["command_id"]: e for e in results}
    book = sim.orders()
    canceled_by_book = collections.Counter(c["order_id"] for c in sim.cancels())
    for cmd in commands:
        event, truth = by_id[cmd["command_id"]], expected[cmd["command_id"]]
        order = book.get(_order_id(cmd))
        if truth == "MISSING":
            assert event["reason"] == "not_found", event
        elif truth == "CANCELED":
            # Every open order ends canceled at the exchange, exactly once, and the result says so.
            assert event["type"] == "strategy.canceled", (
                profile,
                event.get("reason"),
                event.get("detail"),
                event["attempts"],
            )
            assert order is not None and order["status"] == "CANCELED"
            assert canceled_by_book[_order_id(cmd)] == 1
        else:
            assert order is not None and order["status"] == truth  # the worker changed nothing
            assert event["reason"] == "already_closed" and event["order_status"] == truth, event
        if event["type"] == "strategy.canceled":
            assert order is not None and order["status"] == "CANCELED"
    faults = [r for r in sim.requests(since) if r.get("fault")]
    assert faults or profile == "latency", f"profile {profile} injected nothing"


async def test_burst_within_small_limits_sees_no_429_or_418(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """500 commands over 5 accounts against 60 orders per 10 s per account: the governor
    spreads them over the windows instead of letting the exchange refuse them."""
    sim.configure(order_limit=60, order_window_ms=10_000, weight_limit=400, weight_window_ms=10_000)
    before = sim.stats()
    topics = await fresh_topics(broker.bootstrap, partitions=5)
    specs = [{"account": f"desk-{i % 5}", "market": "UM", "symbol": "BTCUSDT"} for i in range(500)]
    orders = sim.seed(specs)
    commands = [command(s["account"], o) for s, o in zip(specs, orders, strict=True)]
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        rate_order_limit=60,
        rate_order_window_ms=10_000,
        rate_weight_limit=400,
        rate_weight_window_ms=10_000,
        default_deadline_ms=120_000,
    )
    # The whole burst is queued before the worker starts, one key per command: as many
    # cancels as the in-flight limit allows want to go at once, whatever the machine's speed.
    await produce(
        broker.bootstrap,
        topics.commands,
        [(f"{c['account']}:{i}".encode(), orjson.dumps(c)) for i, c in enumerate(commands)],
    )
    async with running_worker(settings) as worker:
        results = events_of(await consume(broker.bootstrap, topics.results, 500, timeout_s=240))
        governor = worker.governor.stats
    after = sim.stats()
    stats = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert len(results) == 500
    assert all(e["type"] == "strategy.canceled" for e in results)
    assert stats.get("orders_429", 0) == 0 and stats.get("weight_429", 0) == 0
    assert stats.get("bans_418", 0) == 0
    # The waits are visible. Which budget a wait is counted under depends on what stood in
    # the way first (the account's orders, its share of the IP's weight among the accounts
    # with work waiting, or the exchange's count not yet known).
    assert sum(governor.waits.values()) > 0, governor.waits
    assert set(governor.waits) <= {
        "account_orders",
        "account_weight_share",
        "awaiting_exchange_count",
        "ip_weight",
    }
    assert governor.waited_s > 0


async def test_clock_skew_costs_at_most_one_1021_per_command(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The simulator runs 3 s ahead; later it jumps further while the worker runs."""
    sim.configure(clock_skew_ms=3_000)
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    first = sim.seed([{"account": "desk-3", "kind": "algo"} for _ in range(20)])
    later = sim.seed(
        [{"account": "desk-4", "market": "CM", "symbol": "BTCUSD_PERP"} for _ in range(20)]
    )
    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, recv_window_ms=1_000
    )
    since = sim.last_seq()
    async with running_worker(settings) as worker:
        await produce(
            broker.bootstrap,
            topics.commands,
            [(b"k%d" % (i % 4), orjson.dumps(command("desk-3", o))) for i, o in enumerate(first)],
        )
        assert len(await consume(broker.bootstrap, topics.results, 20)) == 20
        assert 2_500 <= worker.clock.offset_ms <= 3_500  # learned from the time endpoint
        mid = sim.last_seq()
        sim.configure(clock_skew_ms=9_000)  # the exchange clock moves 6 s: drift, caught by -1021
        await produce(
            broker.bootstrap,
            topics.commands,
            [(b"k%d" % (i % 4), orjson.dumps(command("desk-4", o))) for i, o in enumerate(later)],
        )
        results = events_of(await consume(broker.bootstrap, topics.results, 40))
    assert all(e["type"] == "strategy.canceled" for e in results)
    before = [r for r in sim.requests(since) if r["seq"] <= mid]
    assert not [r for r in before if r.get("code") == -1021]  # synced before the first send
    rejected = collections.Counter(
        r["params"]["strategyId"] for r in sim.requests(mid) if r.get("code") == -1021
    )
    assert rejected and max(rejected.values()) == 1  # at most one -1021 per command


async def test_a_418_ban_stops_all_traffic_until_it_ends(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    orders = sim.seed([{"account": f"desk-{i % 5}", "kind": "algo"} for i in range(30)])
    sim.script({"kind": "ban", "status": 418, "code": -1003, "delay_ms": 2_000})
    since = sim.last_seq()
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        max_in_flight=4,
        default_deadline_ms=60_000,
    )
    async with running_worker(settings) as worker:
        await produce(
            broker.bootstrap,
            topics.commands,
            [
                (f"k{i}".encode(), orjson.dumps(command(f"desk-{i % 5}", o)))
                for i, o in enumerate(orders)
            ],
        )
        results = events_of(await consume(broker.bootstrap, topics.results, 30))
        assert worker.governor.stats.bans_418 >= 1
    assert all(e["type"] == "strategy.canceled" for e in results)
    requests = sim.requests(since)
    banned = next(r for r in requests if r["status"] == 418)
    ban_end = banned["at"] + 2_000
    during = [r for r in requests if banned["seq"] < r["seq"] and r["at"] < ban_end]
    assert len(during) <= 4  # only what was already in flight when the ban was announced
