"""The worker in this process against the session's real Kafka broker and PAPI simulator."""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path

import orjson
import pytest

from tests.support import (
    SimControl,
    cancel_requests,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    running_worker,
    until,
    worker_settings,
)
from worker.tools.devstack import Broker

pytestmark = pytest.mark.integration


def _key(cmd: dict[str, object]) -> bytes:
    return f"{cmd['account']}:{cmd.get('symbol') or cmd['market']}".encode()


async def test_mixed_routes_produce_normalized_results(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap)
    um, cm, algo, trailing = sim.seed(
        [
            {
                "account": "desk-0",
                "market": "UM",
                "symbol": "BTCUSDT",
                "quantity": "0.010",
                "stop_price": "25000.10",
            },
            {
                "account": "desk-0",
                "market": "CM",
                "symbol": "ETHUSD_PERP",
                "quantity": "3",
                "stop_price": "1800.5",
            },
            {"account": "desk-0", "kind": "algo", "symbol": "BTCUSDT"},
            {
                "account": "desk-ed",
                "market": "UM",
                "symbol": "ETHUSDT",
                "type": "TRAILING_STOP_MARKET",
                "activate_price": "4000.01",
                "price_rate": "0.3",
            },
        ]
    )
    commands = [
        command("desk-0", um, reason="risk-limit"),
        command("desk-0", cm),
        command("desk-0", algo, source="engine-7"),
        command("desk-ed", trailing),
    ]
    by_id = {c["command_id"]: c for c in commands}
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        await produce(
            broker.bootstrap, topics.commands, [(_key(c), orjson.dumps(c)) for c in commands]
        )
        results = events_of(await consume(broker.bootstrap, topics.results, len(commands)))

    assert {e["command_id"] for e in results} == set(by_id)
    assert all(e["type"] == "strategy.canceled" for e in results), results
    got = {e["command_id"]: e for e in results}

    e_um = got[commands[0]["command_id"]]
    assert e_um["route"] == "um_conditional"
    assert e_um["strategy"]["strategy_id"] == um["strategy_id"]
    assert e_um["strategy"]["status"] == "CANCELED"
    assert e_um["strategy"]["orig_qty"] == "0.010"  # decimals stay strings, trailing zero kept
    assert e_um["strategy"]["stop_price"] == "25000.10"
    assert e_um["strategy"]["self_trade_prevention_mode"] == "NONE"  # UM-only present for UM
    assert e_um["command_reason"] == "risk-limit"
    assert e_um["attempts"] == 1

    e_cm = got[commands[1]["command_id"]]
    assert e_cm["route"] == "cm_conditional"
    assert e_cm["strategy"]["orig_qty"] == "3"
    for um_only in ("self_trade_prevention_mode", "good_till_date", "price_match"):
        assert e_cm["strategy"][um_only] is None

    e_algo = got[commands[2]["command_id"]]
    assert e_algo["route"] == "um_algo"
    assert e_algo["strategy"]["algo_id"] == algo["algo_id"]
    assert e_algo["command_source"] == "engine-7"

    e_trail = got[commands[3]["command_id"]]
    assert e_trail["strategy"]["activate_price"] == "4000.01"
    assert e_trail["strategy"]["price_rate"] == "0.3"

    # The simulator's ground truth agrees: each order was canceled exactly once.
    canceled_ids = collections.Counter(c["order_id"] for c in sim.cancels())
    for order in (um, cm, trailing):
        assert canceled_ids[order["strategy_id"]] == 1
    assert canceled_ids[algo["algo_id"]] == 1


async def test_thousand_commands_over_twenty_keys(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Exactly one result per command, per-key order kept, no request for invalid commands."""
    topics = await fresh_topics(broker.bootstrap, partitions=4)
    accounts = [f"desk-{i}" for i in range(5)]
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT"]
    keys = [(a, s) for a in accounts for s in symbols]  # 20 keys
    specs = [{"account": a, "market": "UM", "symbol": s} for a, s in keys for _ in range(48)]
    orders = sim.seed(specs)
    records: list[tuple[bytes, bytes]] = []
    invalid_ids: set[str] = set()
    for i, (spec, order) in enumerate(zip(specs, orders, strict=True)):
        cmd = command(spec["account"], order, command_id=f"k{i:04d}")
        key = f"{spec['account']}:{spec['symbol']}".encode()
        if i % 25 == 7:  # 39 invalid commands mixed into the stream: two ids at once
            cmd["algo_id"] = 42
            invalid_ids.add(cmd["command_id"])
        records.append((key, orjson.dumps(cmd)))
    for j in range(40):  # and 40 that are not even JSON, spread over the same keys
        key = f"{keys[j % 20][0]}:{keys[j % 20][1]}".encode()
        records.insert(j * 25, (key, b"{not json " + str(j).encode()))
    assert len(records) == 1000
    sent_order: dict[bytes, list[str]] = collections.defaultdict(list)
    for key, value in records:
        sent_order[key].append(value.decode(errors="replace"))

    since = sim.last_seq()
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file, max_in_flight=64)
    async with running_worker(settings) as worker:
        await produce(broker.bootstrap, topics.commands, records)
        out = await consume(broker.bootstrap, topics.results, 1000, timeout_s=120)
    assert worker.pipeline.processed == 1000  # counted once stopped: each record exactly once

    results = events_of(out)
    assert len(results) == 1000
    # Every record has exactly one result: (partition, offset) of the source is unique.
    origins = collections.Counter(
        (e["origin"]["partition"], e["origin"]["offset"]) for e in results
    )
    assert len(origins) == 1000 and max(origins.values()) == 1
    with_ids = [e for e in results if e["command_id"] is not None]
    assert len({e["command_id"] for e in with_ids}) == len(with_ids) == 960

    # Per key, results appear in the order the commands were sent.
    result_order: dict[bytes, list[int]] = collections.defaultdict(list)
    for record in out:
        event = orjson.loads(record.value)
        result_order[record.key].append(event["origin"]["offset"])
    assert len(result_order) == 20
    for offsets in result_order.values():
        assert offsets == sorted(offsets)
        assert len(offsets) == 50

    # Outcomes: the valid ones canceled; the invalid ones refused without a request.
    canceled = [e for e in results if e["type"] == "strategy.canceled"]
    invalid = [e for e in results if e["type"] == "cancel.failed"]
    assert len(canceled) == 921, collections.Counter(
        (e.get("reason"), e.get("detail", "")[:80])
        for e in results
        if e["type"] != "strategy.canceled" and e.get("reason") != "invalid_command"
    )
    assert len(invalid) == 79
    assert all(e["reason"] == "invalid_command" and e["attempts"] == 0 for e in invalid)
    deletes = cancel_requests(sim, since)
    assert len(deletes) == 921
    sent_ids = {int(r["params"]["strategyId"]) for r in deletes}
    invalid_order_ids = {orders[int(c[1:])]["strategy_id"] for c in invalid_ids}
    assert not sent_ids & invalid_order_ids

    # Poison records are kept, byte for byte, on the dead-letter topic.
    dead = await consume(broker.bootstrap, topics.deadletter, 79, validate=False)
    assert len(dead) == 79
    assert sum(1 for r in dead if r.value.startswith(b"{not json ")) == 40


async def test_invalid_input_is_refused_and_worker_keeps_running(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    (order,) = sim.seed([{"account": "desk-3", "market": "UM", "symbol": "BTCUSDT"}])
    good = command("desk-3", order)
    base = {
        "command_id": "bad-1",
        "account": "desk-3",
        "market": "UM",
        "symbol": "BTCUSDT",
        "issued_at": 1,
    }
    poison: list[bytes | None] = [
        b"\x00\xff not json",
        b'{"command_id": "bad-0"',
        orjson.dumps({**base, "strategy_id": "123"}),  # wrong type
        orjson.dumps({**base, "strategy_id": 1.0}),  # float id
        orjson.dumps({**base, "strategy_id": 5, "client_strategy_id": "x"}),  # both ids
        orjson.dumps(base),  # no id
        orjson.dumps({**base, "symbol": "BTC&x=1", "strategy_id": 5}),
        orjson.dumps({**base, "symbol": "BTC=USDT", "strategy_id": 5}),
        orjson.dumps({**base, "strategy_id": 5, "reason": "x" * 1_000_000}),  # 1 MB
        orjson.dumps([1, 2, 3]),
        None,
    ]
    since = sim.last_seq()
    # The local broker takes 4 MiB records, so the 1 MB poison is kept whole.
    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, deadletter_max_bytes=4_000_000
    )
    async with running_worker(settings):
        await produce(
            broker.bootstrap,
            topics.commands,
            [(b"desk-3:BTCUSDT", p) for p in poison] + [(b"desk-3:BTCUSDT", orjson.dumps(good))],
        )
        results = events_of(await consume(broker.bootstrap, topics.results, len(poison) + 1))
    failed, last = results[:-1], results[-1]
    assert [e["reason"] for e in failed] == ["invalid_command"] * len(poison)
    assert all(len(e["detail"]) <= 300 for e in failed)
    assert last["type"] == "strategy.canceled" and last["command_id"] == good["command_id"]
    assert [r["params"]["strategyId"] for r in cancel_requests(sim, since)] == [
        str(order["strategy_id"])
    ]
    dead = await consume(broker.bootstrap, topics.deadletter, len(poison), validate=False)
    assert [r.value for r in dead] == [p if p is not None else b"" for p in poison]
    big = dead[8]
    assert len(big.value) > 1_000_000
    assert dict(big.headers)["x-source-offset"] == b"8"


async def test_unknown_account_gone_order_and_retired_route(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    um, algo = sim.seed(
        [
            {"account": "desk-4", "market": "UM", "symbol": "BTCUSDT"},
            {"account": "desk-4", "kind": "algo"},
        ]
    )
    stranger = command("nobody", um)
    gone = command("desk-4", {"kind": "algo", "algo_id": 999_999_999})
    retired = command("desk-4", um)
    works = command("desk-4", algo)
    sim.configure(um_conditional_enabled=False)
    since = sim.last_seq()
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        await produce(
            broker.bootstrap,
            topics.commands,
            [(b"k", orjson.dumps(c)) for c in (stranger, gone, retired, works)],
        )
        results = events_of(await consume(broker.bootstrap, topics.results, 4))
    by_id = {e["command_id"]: e for e in results}
    assert by_id[stranger["command_id"]]["reason"] == "unknown_account"
    assert by_id[stranger["command_id"]]["attempts"] == 0
    assert by_id[gone["command_id"]]["reason"] == "not_found"  # asked: no such order anywhere
    assert by_id[gone["command_id"]]["exchange"]["code"] == -2011
    r = by_id[retired["command_id"]]
    assert r["reason"] == "route_retired"
    assert r["exchange"]["http_status"] == 404
    assert "algo_id" in r["hint"]
    assert by_id[works["command_id"]]["type"] == "strategy.canceled"
    # The unknown account's command never reached the exchange; the gone order was asked about.
    assert [req["path"] for req in sim.requests(since)] == [
        "/papi/v1/um/algo/order",
        "/papi/v1/um/algo/algoOrder",
        "/papi/v1/um/conditional/order",
        "/papi/v1/um/algo/order",
    ]


async def test_offsets_committed_only_after_results_and_restart_does_not_repeat(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    orders = sim.seed(
        [{"account": "desk-1", "market": "CM", "symbol": "BTCUSD_PERP"} for _ in range(30)]
    )
    commands = [command("desk-1", o) for o in orders]
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        await produce(
            broker.bootstrap,
            topics.commands,
            [(f"k{i % 6}".encode(), orjson.dumps(c)) for i, c in enumerate(commands)],
        )
        assert len(await consume(broker.bootstrap, topics.results, 30)) == 30
    since = sim.last_seq()
    # A second worker in the same group starts from the committed offsets: nothing repeats.
    async with running_worker(settings) as again:
        extra = sim.seed([{"account": "desk-1", "market": "CM", "symbol": "BTCUSD_PERP"}])
        await produce(
            broker.bootstrap, topics.commands, [(b"k0", orjson.dumps(command("desk-1", extra[0])))]
        )
        results = await consume(broker.bootstrap, topics.results, 31)
        assert len(results) == 31
    assert again.pipeline.processed == 1
    assert len(cancel_requests(sim, since)) == 1


async def test_stopped_while_rejoining_the_group_takes_nothing_over_and_loses_nothing(
    broker: Broker, sim: SimControl, accounts_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen on a loaded 2-core machine: the worker's event loop stalled past the session
    timeout, the consumer lost its membership and re-joined the group while the worker
    stopped, and the re-join's assignment was taken over after the stop: producers started
    and offsets were read on clients being closed, and ten connections leaked.

    Here the loop stalls for real (7.5 s, the session timeout is 6 s) while a cancel hangs
    at the exchange, so the revocation waits for it and the re-join's assignment surely
    comes after the stop. The worker takes nothing over, closes every connection (the
    session's garbage check fails the test otherwise), and the next worker of the group
    answers the command the first one abandoned: once."""
    caplog.set_level(logging.INFO, logger="worker")
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    (order,) = sim.seed([{"account": "desk-3", "market": "UM", "symbol": "ETHUSDT"}])
    cmd = command("desk-3", order, command_id="rejoin-1")
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        http_timeout_s=60.0,
        revoke_grace_s=1.5,
        shutdown_grace_s=1.0,
    )
    sim.script({"kind": "timeout", "delay_ms": 50_000})  # the first cancel hangs
    since = sim.last_seq()
    async with running_worker(settings) as worker:
        await produce(broker.bootstrap, topics.commands, [(b"desk-3:ETHUSDT", orjson.dumps(cmd))])
        await until(lambda: bool(cancel_requests(sim, since)), "the cancel held at the exchange")
        time.sleep(7.5)  # noqa: ASYNC251 - the event loop stalls, as on a starved machine
        await until(lambda: "partitions revoked" in caplog.text, "the membership lost")
        stopped_at = len(caplog.records)
    after = [r.getMessage() for r in caplog.records[stopped_at:]]
    assert any("assigned while stopping, not taken over" in m for m in after), after
    assert not any("taken over, processing" in m for m in after), after
    assert worker.pipeline.processed == 0

    async with running_worker(settings):  # the same group: it gets the partitions
        out = await consume(broker.bootstrap, topics.results, 1, timeout_s=60)
    (event,) = events_of(out)
    assert event["command_id"] == "rejoin-1"
    assert event["type"] == "strategy.canceled", event
