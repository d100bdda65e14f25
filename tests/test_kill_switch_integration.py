"""The kill switch (``scope: "symbol"``) through the whole worker: real broker, the simulator
process, fresh topics per test. Every result is checked against the simulator's book and its
request log (the ground truth)."""

from __future__ import annotations

import collections
import uuid
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
    open_um_orders,
    produce,
    read_to_end,
    running_worker,
    worker_settings,
)
from worker.core.timeutil import now_ms
from worker.tools.devstack import Broker

pytestmark = pytest.mark.integration

GROUPS = ("strategies", "closed_otherwise", "still_open", "unknown")
LISTINGS = {"/papi/v1/um/algo/openAlgoOrders", "/papi/v1/um/conditional/openOrders"}
CANCEL_ALLS = {"/papi/v1/um/algo/allOpenOrders", "/papi/v1/um/conditional/allOpenOrders"}
STATUS_QUERIES = {
    "/papi/v1/um/algo/algoOrder",
    "/papi/v1/um/conditional/openOrder",
    "/papi/v1/um/conditional/orderHistory",
}


def kill_switch(account: str, symbol: str, **extra: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {
        "command_id": f"ks-{uuid.uuid4().hex[:20]}",
        "account": account,
        "market": "UM",
        "symbol": symbol,
        "scope": "symbol",
        "issued_at": now_ms(),
    }
    cmd.update(extra)
    return cmd


def oid(order: dict[str, Any]) -> int:
    """The exchange id of a seeded order."""
    return int(order["algo_id"] if order["kind"] == "algo" else order["strategy_id"])


def listed_id(item: dict[str, Any]) -> int:
    """The exchange id of one order of a ``strategies.canceled`` group; the id field must be
    the one of its route."""
    strategy = item["strategy"]
    if item["route"] == "um_algo":
        assert strategy["strategy_id"] is None, item
        return int(strategy["algo_id"])
    assert item["route"] == "um_conditional" and strategy["algo_id"] is None, item
    return int(strategy["strategy_id"])


def ids_in(event: dict[str, Any], group: str) -> list[int]:
    return [listed_id(item) for item in event[group]]


def key(account: str, symbol: str) -> bytes:
    return f"{account}:{symbol}".encode()


def mixed(account: str, symbol: str, n: int) -> list[dict[str, Any]]:
    """``n`` open orders, algo and UM conditional alternately."""
    return [
        {"account": account, "kind": "algo", "symbol": symbol}
        if i % 2 == 0
        else {"account": account, "market": "UM", "symbol": symbol}
        for i in range(n)
    ]


async def test_kill_switch_cancels_exactly_the_accounts_open_orders_on_the_symbol(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    account, symbol = "desk-rsa", "ADAUSDT"
    assert not open_um_orders(sim.orders(), account, symbol), "the test's key must start empty"
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    targets = sim.seed(mixed(account, symbol, 50))
    bystanders = sim.seed(
        [
            {"account": account, "kind": "algo", "symbol": "LTCUSDT"},  # another symbol
            {"account": account, "market": "UM", "symbol": "LTCUSDT"},
            {"account": account, "market": "CM", "symbol": "BTCUSD_PERP"},  # another market
            {"account": "desk-ed", "kind": "algo", "symbol": symbol},  # another account
            {"account": "desk-ed", "market": "UM", "symbol": symbol},
        ]
    )
    target_ids = {oid(o) for o in targets}
    algo_ids = {oid(o) for o in targets if o["kind"] == "algo"}
    assert len(target_ids) == 50 and len(algo_ids) == 25
    ks = kill_switch(account, symbol, reason="risk-off")
    since = sim.last_seq()
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        await produce(broker.bootstrap, topics.commands, [(key(account, symbol), orjson.dumps(ks))])
        (event,) = events_of(await consume(broker.bootstrap, topics.results, 1))
    everything = events_of(await read_to_end(broker.bootstrap, topics.results))

    assert [e["command_id"] for e in everything] == [ks["command_id"]]  # exactly one result
    assert event["type"] == "strategies.canceled", event
    assert (event["account"], event["market"], event["symbol"], event["scope"]) == (
        account,
        "UM",
        symbol,
        "symbol",
    )
    assert event["command_reason"] == "risk-off"
    assert event["complete"] is True
    assert {r["route"]: (r["outcome"], r["listed"], r["reason"]) for r in event["routes"]} == {
        "um_algo": ("done", 25, None),
        "um_conditional": ("done", 25, None),
    }
    canceled = ids_in(event, "strategies")
    assert len(canceled) == 50 and set(canceled) == target_ids
    assert {listed_id(x) for x in event["strategies"] if x["route"] == "um_algo"} == algo_ids
    assert all(x["strategy"]["status"] == "CANCELED" for x in event["strategies"])
    assert all(x["strategy"]["update_time"] is not None for x in event["strategies"])
    assert event["closed_otherwise"] == event["still_open"] == event["unknown"] == []

    # The book agrees: the 50 canceled, once each; everything else untouched.
    book = sim.orders()
    assert {i: book[i]["status"] for i in target_ids} == dict.fromkeys(target_ids, "CANCELED")
    assert [book[oid(o)]["status"] for o in bystanders] == ["NEW"] * len(bystanders)
    cancels = collections.Counter(c["order_id"] for c in sim.cancels())
    assert all(cancels[i] == 1 for i in target_ids)
    assert not any(cancels[oid(o)] for o in bystanders)
    # Two cancel-alls on the symbol, no order canceled one by one, nothing sent for others.
    requests = sim.requests(since)
    assert {r["account"] for r in requests} == {account}
    deletes = [r for r in requests if r["method"] == "DELETE"]
    assert sorted(r["path"] for r in deletes) == sorted(CANCEL_ALLS)
    assert all(r["params"]["symbol"] == symbol and r["status"] == 200 for r in deletes)


async def test_a_kill_switch_sent_twice_with_one_command_id_gets_a_valid_duplicate(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """An operator's retry of a kill switch (same command id): the second copy sends nothing
    and is answered `cancel.duplicate`, whose `first_result` is the kill switch's (no reason,
    route or order status: it is neither a failure nor one order's), valid against the
    schema (`consume` and `events_of` check every result they read)."""
    account, symbol = "desk-1", "LTCUSDT"
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    preexisting = open_um_orders(sim.orders(), account, symbol)  # left open by other tests
    targets = sim.seed(mixed(account, symbol, 4))
    ks = kill_switch(account, symbol, reason="flatten", command_id="kill-retry-1")
    since = sim.last_seq()
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        await produce(broker.bootstrap, topics.commands, [(key(account, symbol), orjson.dumps(ks))])
        (first,) = events_of(await consume(broker.bootstrap, topics.results, 1))
        after_first = sim.last_seq()
        await produce(broker.bootstrap, topics.commands, [(key(account, symbol), orjson.dumps(ks))])
        records = await consume(broker.bootstrap, topics.results, 2)
    assert len(records) == 2
    records.sort(key=lambda r: r.offset)
    first_again, again = events_of(records)
    assert first_again == first
    assert first["type"] == "strategies.canceled" and first["complete"] is True, first
    assert {oid(o) for o in targets} | preexisting == set(ids_in(first, "strategies"))

    assert again["type"] == "cancel.duplicate", again
    assert (again["command_id"], again["account"], again["symbol"], again["attempts"]) == (
        "kill-retry-1",
        account,
        symbol,
        0,
    )
    assert again["first_result"] == {
        "type": "strategies.canceled",
        "reason": None,
        "route": None,
        "order_status": None,
        "origin": {k: first["origin"][k] for k in ("topic", "partition", "offset")},
        "completed_at": first["completed_at"],
    }
    assert again["origin"]["offset"] > first["origin"]["offset"]
    assert dict(records[1].headers)["type"] == b"cancel.duplicate"
    # Nothing was sent for the repeat.
    assert sim.last_seq() == after_first
    assert len([r for r in sim.requests(since) if r["method"] == "DELETE"]) == 2  # two routes


# The profiles draw a fault per DELETE (the cancel-alls) from the seed; each seed was chosen
# for what it makes the exchange do. The two routes' first cancel-alls draw in the order they
# arrive, so "one route" below is whichever reached the simulator first.
FAULT_CASES = [
    # both first cancel-alls applied, answered 502/504: unconfirmed, reconciled by status
    pytest.param("5xx", 3, "XRPUSDT", id="5xx-applied-unanswered"),
    # one route done; all 8 cancel-alls of the other held past the HTTP timeout, none
    # applied: its orders are still open when the cancel rounds run out
    pytest.param("timeouts", 33244, "DOGEUSDT", id="timeouts-one-route-never-applied"),
    # one route done; the other's 8 cancel-alls answered 500 (ambiguous, not applied) or 503
    # "Service Unavailable." (not executed), the last one a 503: that route ends failed
    pytest.param("5xx", 391277, "BNBUSDT", id="5xx-one-route-ends-refused"),
]


@pytest.mark.parametrize(("profile", "seed", "symbol"), FAULT_CASES)
async def test_kill_switch_under_faults_reports_the_books_truth(
    broker: Broker,
    sim: SimControl,
    accounts_file: Path,
    profile: str,
    seed: int,
    symbol: str,
) -> None:
    account = "desk-ed"
    assert not open_um_orders(sim.orders(), account, symbol), "the test's key must start empty"
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    targets = sim.seed(mixed(account, symbol, 50))
    (bystander,) = sim.seed([{"account": "desk-3", "market": "UM", "symbol": symbol}])
    target_ids = {oid(o) for o in targets}
    first = kill_switch(account, symbol)
    second = kill_switch(account, symbol)
    http_timeout_s = 0.3
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        http_timeout_s=http_timeout_s,
        max_attempts=3,
        backoff_initial_s=0.02,
        backoff_max_s=0.2,
        default_deadline_ms=10_000,
        reconcile_budget_ms=3_000,
    )
    since = sim.last_seq()
    try:
        # A held request outlasts the worker's HTTP timeout, by a little: the test stays fast.
        sim.configure(profile=profile, seed=seed, timeout_hold_ms=int(http_timeout_s * 1000) + 300)
        async with running_worker(settings):
            await produce(
                broker.bootstrap, topics.commands, [(key(account, symbol), orjson.dumps(first))]
            )
            (result,) = events_of(await consume(broker.bootstrap, topics.results, 1))
            faulted = [r for r in sim.requests(since) if r.get("fault")]
            book = sim.orders()
            # The exchange recovers; the operator sends the kill switch again.
            sim.reset()
            left = {i for i in target_ids if book[i]["status"] == "NEW"}
            await produce(
                broker.bootstrap, topics.commands, [(key(account, symbol), orjson.dumps(second))]
            )
            results = events_of(await consume(broker.bootstrap, topics.results, 2))
    finally:
        sim.reset()

    assert faulted, f"profile {profile} (seed {seed}) injected no fault: nothing was tested"
    assert all(r["method"] == "DELETE" for r in faulted)
    assert result["command_id"] == first["command_id"]
    assert result["type"] in ("strategies.canceled", "cancel.failed"), result
    statuses = {i: book[i]["status"] for i in target_ids}
    if result["type"] == "cancel.failed":  # no cancel-all may have applied: nothing canceled
        assert set(statuses.values()) == {"NEW"}, (result, statuses)
    else:
        groups = {g: ids_in(result, g) for g in GROUPS}
        named = [i for ids in groups.values() for i in ids]
        # Every listed order is in exactly one group; the listing saw exactly the 50.
        missing = target_ids - set(named)
        assert not missing, (
            f"{len(missing)} listed orders in no group, book statuses "
            f"{collections.Counter(statuses[i] for i in missing)}; routes {result['routes']}"
        )
        assert sorted(named) == sorted(target_ids), {g: len(v) for g, v in groups.items()}
        assert sum(r["listed"] for r in result["routes"]) == 50, result["routes"]
        # Each group is the book's truth.
        assert all(statuses[i] == "CANCELED" for i in groups["strategies"]), statuses
        assert all(statuses[i] == "NEW" for i in groups["still_open"]), statuses
        assert groups["closed_otherwise"] == []  # nothing here triggers or expires
        for i in set(target_ids) - set(groups["unknown"]):
            assert (statuses[i] == "CANCELED") == (i in groups["strategies"]), i
        assert all(x["strategy"]["status"] == "CANCELED" for x in result["strategies"])
        assert all(x["strategy"]["status"] == "NEW" for x in result["still_open"])
        outcomes = {r["route"]: r["outcome"] for r in result["routes"]}
        assert set(outcomes) == {"um_algo", "um_conditional"}
        settled = not groups["still_open"] and not groups["unknown"]
        all_done = set(outcomes.values()) <= {"done", "retired"}
        for route in result["routes"]:  # a failure reason only on a failed route
            assert (route["reason"] is None) is (route["outcome"] != "failed"), route
        assert result["complete"] is (settled and all_done), result["routes"]

    # The second kill switch, on a healthy exchange, cancels exactly what was left.
    again = next(e for e in results if e["command_id"] == second["command_id"])
    assert again["type"] == "strategies.canceled", again
    assert again["complete"] is True, again["routes"]
    assert set(ids_in(again, "strategies")) == left
    assert len(again["strategies"]) == len(left)
    assert again["closed_otherwise"] == again["still_open"] == again["unknown"] == []
    final = sim.orders()
    assert {i: final[i]["status"] for i in target_ids} == dict.fromkeys(target_ids, "CANCELED")
    assert final[oid(bystander)]["status"] == "NEW"
    cancels = collections.Counter(c["order_id"] for c in sim.cancels())
    assert all(cancels[i] == 1 for i in target_ids)  # a cancel-all cancels an order once


async def test_one_key_single_cancel_kill_switch_single_cancel_in_order(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """On key desk-0:SOLUSDT: cancel X, kill switch, cancel Y (issued before the kill switch),
    then cancel W (issued after it). Each runs after the previous one's result, at the
    exchange as on the results partition."""
    account, symbol = "desk-0", "SOLUSDT"
    issued_before = now_ms()
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    preexisting = open_um_orders(sim.orders(), account, symbol)  # left open by other tests
    x, y, w, *rest = sim.seed(
        [
            {"account": account, "market": "UM", "symbol": symbol},
            {"account": account, "kind": "algo", "symbol": symbol},
            {"account": account, "market": "UM", "symbol": symbol},
            *mixed(account, symbol, 6),
        ]
    )
    (elsewhere,) = sim.seed([{"account": account, "market": "UM", "symbol": "BNBUSDT"}])
    swept = preexisting | {oid(o) for o in (y, w, *rest)}
    cmd_x = command(account, x)
    ks = kill_switch(account, symbol)
    cmd_y = command(account, y, issued_at=issued_before)
    since = sim.last_seq()
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        await produce(
            broker.bootstrap,
            topics.commands,
            [(key(account, symbol), orjson.dumps(c)) for c in (cmd_x, ks, cmd_y)],
        )
        first_three = await consume(broker.bootstrap, topics.results, 3)
        cmd_w = command(account, w)  # issued now: after the kill switch canceled W
        assert cmd_w["issued_at"] > issued_before
        await produce(
            broker.bootstrap, topics.commands, [(key(account, symbol), orjson.dumps(cmd_w))]
        )
        records = await consume(broker.bootstrap, topics.results, 4)
    assert len(first_three) == 3 and len(records) == 4

    # The results partition: one partition for the key, results in command order.
    assert {r.key for r in records} == {key(account, symbol)}
    assert len({r.partition for r in records}) == 1
    records.sort(key=lambda r: r.offset)
    res_x, res_ks, res_y, res_w = events_of(records)
    assert [e["command_id"] for e in (res_x, res_ks, res_y, res_w)] == [
        c["command_id"] for c in (cmd_x, ks, cmd_y, cmd_w)
    ]
    offsets = [e["origin"]["offset"] for e in (res_x, res_ks, res_y, res_w)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 4

    # X: canceled by its own command.
    assert res_x["type"] == "strategy.canceled" and res_x["confirmed_by"] == "cancel", res_x
    assert res_x["strategy"]["strategy_id"] == oid(x)
    # The kill switch: everything open on the symbol, X no longer among it.
    assert res_ks["type"] == "strategies.canceled" and res_ks["complete"] is True, res_ks
    assert set(ids_in(res_ks, "strategies")) == swept
    assert len(res_ks["strategies"]) == len(swept)
    assert all(oid(x) not in ids_in(res_ks, g) for g in GROUPS)
    assert res_ks["closed_otherwise"] == res_ks["still_open"] == res_ks["unknown"] == []
    # Y: its own cancel found it gone (-2011); the status query found it CANCELED at the kill
    # switch's time, which is after Y's issued_at: decisions.decide_gone reads that as this
    # command's cancel (CANCELED_BY_COMMAND), so Y's result claims it, confirmed by query.
    cancels = [c for c in sim.cancels() if c["order_id"] in swept | {oid(x)}]
    cancel_at = {c["order_id"]: c["at"] for c in cancels}
    assert collections.Counter(c["order_id"] for c in cancels) == dict.fromkeys(swept | {oid(x)}, 1)
    assert res_y["type"] == "strategy.canceled", res_y
    assert res_y["confirmed_by"] == "query"
    assert res_y["route"] == "um_algo" and res_y["strategy"]["algo_id"] == oid(y)
    assert res_y["strategy"]["status"] == "CANCELED"
    assert res_y["strategy"]["update_time"] == cancel_at[oid(y)] >= cmd_y["issued_at"]
    # W, whose command was issued after the kill switch canceled it: already closed.
    assert res_w["type"] == "cancel.failed", res_w
    assert res_w["reason"] == "already_closed" and res_w["order_status"] == "CANCELED"
    assert res_w["route"] == "um_conditional"
    assert res_w["exchange"]["code"] == -2011
    assert cancel_at[oid(w)] < cmd_w["issued_at"]
    assert sim.orders()[oid(elsewhere)]["status"] == "NEW"

    # The exchange saw X's cancel, then the kill switch's requests, then Y's, then W's.
    log = [r for r in sim.requests(since) if r["account"] == account]
    deletes = [r for r in log if r["method"] == "DELETE"]
    x_del = log[0]  # the first request of all
    assert (x_del["method"], x_del["path"], x_del["params"]["strategyId"]) == (
        "DELETE",
        "/papi/v1/um/conditional/order",
        str(oid(x)),
    )
    y_del = next(r for r in deletes if r["params"].get("algoId") == str(oid(y)))
    w_del = next(
        r
        for r in deletes
        if r["path"] == "/papi/v1/um/conditional/order"
        and r["params"].get("strategyId") == str(oid(w))
    )
    assert x_del["status"] == 200
    assert y_del["code"] == -2011 and w_del["code"] == -2011
    assert x_del["seq"] < y_del["seq"] < w_del["seq"]
    ks_phase = [r for r in log if x_del["seq"] < r["seq"] < y_del["seq"]]
    # Between X's cancel and Y's: the kill switch, and only it.
    assert {r["path"] for r in ks_phase if r["method"] == "DELETE"} == CANCEL_ALLS
    assert sum(r["method"] == "DELETE" for r in ks_phase) == 2
    assert {r["path"] for r in ks_phase} <= LISTINGS | CANCEL_ALLS | STATUS_QUERIES
    assert {r["path"] for r in ks_phase} >= LISTINGS
    for r in ks_phase:
        if r["path"] in LISTINGS | CANCEL_ALLS:
            assert r["params"]["symbol"] == symbol
        else:
            asked = r["params"].get("algoId") or r["params"].get("strategyId")
            assert int(asked) in swept, r
    # Nothing of the kill switch before X's cancel or after Y's.
    outside = [r for r in log if not x_del["seq"] < r["seq"] < y_del["seq"]]
    assert not [r for r in outside if r["path"] in LISTINGS | CANCEL_ALLS]
    # And in time: each phase arrived after the previous one had been answered.
    assert x_del["at"] <= min(r["at"] for r in ks_phase)
    assert max(r["at"] for r in ks_phase) <= y_del["at"] <= w_del["at"]
