"""The client library against the real broker, the simulator and a running worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import (
    TEST_PRODUCER_ID,
    TEST_PRODUCER_KEY,
    SimControl,
    Topics,
    fresh_topics,
    produce,
    running_worker,
    until,
    worker_settings,
)
from worker.client import (
    CancelClient,
    CancelDuplicate,
    CancelFailed,
    CancelTimeoutError,
    CommandProducer,
    InvalidCommandError,
    ResultConsumer,
    ResultUnreadableError,
    StrategiesCanceled,
    StrategyCanceled,
    build_command,
    checked_command,
    key_of,
    parse_result,
)
from worker.core.commands import Command, InvalidCommand, decode
from worker.tools.devstack import REPO, Broker

pytestmark = pytest.mark.integration

PLENTY = 1_000_000_000  # rate limits out of the way where a test sends a lot
EXAMPLES = REPO / "schemas" / "examples" / "result" / "valid"


@pytest.fixture
async def topics(broker: Broker) -> Topics:
    return await fresh_topics(broker.bootstrap, partitions=3)


@pytest.fixture
async def client(broker: Broker, topics: Topics) -> AsyncIterator[CancelClient]:
    async with CancelClient(
        broker.bootstrap,
        commands_topic=topics.commands,
        results_topic=topics.results,
        producer_id=TEST_PRODUCER_ID,
        private_key=TEST_PRODUCER_KEY,
    ) as c:
        yield c


@pytest.fixture
async def worker(
    broker: Broker, topics: Topics, sim: SimControl, accounts_file: Path
) -> AsyncIterator[None]:
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        rate_weight_limit=PLENTY,
        rate_order_limit=PLENTY,
    )
    sim.configure(weight_limit=PLENTY, order_limit=PLENTY)
    try:
        async with running_worker(settings):
            yield
    finally:
        sim.reset()


async def test_cancel_returns_typed_results(
    client: CancelClient, worker: None, sim: SimControl
) -> None:
    # The session's simulator is shared: orders other tests left open on this account and
    # symbol are swept first, so that the kill switch below finds the seeded order alone.
    await client.cancel_all("desk-1", "UM", "BNBUSDT", timeout=30)
    cm, algo = sim.seed(
        [
            {"account": "desk-1", "market": "CM", "symbol": "ETHUSD_PERP"},
            {"account": "desk-1", "kind": "algo", "symbol": "BNBUSDT"},
        ]
    )
    done = await client.cancel(
        "desk-1", "CM", symbol="ETHUSD_PERP", strategy_id=cm["strategy_id"], timeout=30
    )
    assert isinstance(done, StrategyCanceled)
    assert done.route == "cm_conditional" and done.strategy.status == "CANCELED"
    assert done.strategy.strategy_id == cm["strategy_id"]
    assert isinstance(done.strategy.orig_qty, str)  # money stays a decimal string

    again = await client.cancel(
        "desk-1", "CM", symbol="ETHUSD_PERP", strategy_id=cm["strategy_id"], timeout=30
    )
    assert isinstance(again, CancelFailed) and again.reason == "already_closed"
    assert again.order_status == "CANCELED" and again.exchange is not None

    unknown = await client.cancel(
        "nobody", "UM", symbol="BNBUSDT", algo_id=algo["algo_id"], timeout=30
    )
    assert isinstance(unknown, CancelFailed) and unknown.reason == "unknown_account"

    swept = await client.cancel_all("desk-1", "UM", "BNBUSDT", timeout=30)
    assert isinstance(swept, StrategiesCanceled) and swept.complete
    assert [s.strategy.algo_id for s in swept.strategies] == [algo["algo_id"]]
    assert {r.route: r.outcome for r in swept.routes} == {
        "um_algo": "done",
        "um_conditional": "done",
    }

    # The same command again (a producer's retry): a duplicate of the first result.
    repeated = await client.request(
        build_command(
            "desk-1",
            "CM",
            symbol="ETHUSD_PERP",
            strategy_id=cm["strategy_id"],
            command_id=done.command_id or "",
        ),
        timeout=30,
    )
    assert isinstance(repeated, CancelDuplicate)
    assert repeated.first_result["type"] == "strategy.canceled"
    # The same id naming another order: a conflict, never a silent duplicate.
    conflict = await client.request(
        build_command(
            "desk-1",
            "UM",
            symbol="BNBUSDT",
            algo_id=algo["algo_id"],
            command_id=done.command_id or "",
        ),
        timeout=30,
    )
    assert isinstance(conflict, CancelFailed) and conflict.reason == "id_conflict"

    # A kill switch retried with one command id: a typed result both times, never a timeout.
    kill_id = f"kill-retry-{swept.command_id}"[:64]
    first_kill = await client.cancel_all("desk-1", "UM", "BNBUSDT", command_id=kill_id, timeout=30)
    assert isinstance(first_kill, StrategiesCanceled) and first_kill.complete
    retried = await client.cancel_all("desk-1", "UM", "BNBUSDT", command_id=kill_id, timeout=30)
    assert isinstance(retried, CancelDuplicate)
    assert retried.first_result["type"] == "strategies.canceled"
    assert retried.first_result["reason"] is None


async def test_a_command_the_worker_would_refuse_is_not_published(client: CancelClient) -> None:
    with pytest.raises(InvalidCommandError, match="symbol"):
        await client.request(build_command("desk-1", "CM", strategy_id=5), timeout=1)  # no symbol
    with pytest.raises(InvalidCommandError, match="exactly one"):
        await client.cancel("desk-1", "UM", symbol="BTCUSDT", timeout=1)  # no id at all
    with pytest.raises(InvalidCommandError):
        await client.cancel_all("desk-1", "UM", "btc&usdt", timeout=1)
    assert client.waiting == 0


async def test_no_result_in_time_raises_cancel_timeout(client: CancelClient) -> None:
    # No worker reads this commands topic: the command is published, no result comes.
    with pytest.raises(CancelTimeoutError) as caught:
        await client.cancel(
            "desk-2", "UM", symbol="BTCUSDT", algo_id=42, command_id="never-answered", timeout=0.5
        )
    assert caught.value.command_id == "never-answered"
    assert client.waiting == 0


def _unreadable_results(command_ids: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Two results the client cannot read, for the given command ids: a kill switch's
    duplicate whose ``first_result`` breaks the schema, and an event of an unknown type."""
    duplicate = orjson.loads((EXAMPLES / "cancel-duplicate-of-kill-switch.json").read_bytes())
    duplicate["command_id"] = command_ids[0]
    duplicate["first_result"]["reason"] = 12345  # a reason is a string or null, never a number
    unknown = orjson.loads((EXAMPLES / "strategy-canceled-um-algo.json").read_bytes())
    unknown.update(command_id=command_ids[1], type="strategy.amended")
    return [
        (b"desk-2:BTCUSDT", orjson.dumps(duplicate)),
        (b"desk-2:BTCUSDT", orjson.dumps(unknown)),
    ]


async def test_an_unreadable_result_fails_its_caller_at_once_not_by_timeout(
    broker: Broker, topics: Topics, client: CancelClient
) -> None:
    # No worker reads this commands topic: the only answers are the two records below,
    # written where the worker writes its results, naming the commands' ids.
    ids = ("kill-retry-1", "algo-unknown-type")
    calls = [
        asyncio.create_task(
            client.cancel_all("desk-2", "UM", "BTCUSDT", command_id=ids[0], timeout=120)
        ),
        asyncio.create_task(
            client.cancel(
                "desk-2", "UM", symbol="BTCUSDT", algo_id=7, command_id=ids[1], timeout=120
            )
        ),
    ]
    await until(lambda: client.waiting == 2, "both calls waiting")
    await produce(broker.bootstrap, topics.results, _unreadable_results(ids))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    duplicate, unknown = outcomes
    assert isinstance(duplicate, ResultUnreadableError), duplicate
    assert duplicate.command_id == ids[0]
    assert duplicate.event["type"] == "cancel.duplicate"
    assert "first_result" in duplicate.problem and "12345" in duplicate.problem
    assert orjson.loads(duplicate.raw) == duplicate.event
    assert isinstance(unknown, ResultUnreadableError), unknown
    assert unknown.command_id == ids[1]
    assert "unknown result type 'strategy.amended'" in unknown.problem
    assert client.waiting == 0


async def test_a_thousand_concurrent_cancels_share_one_reader(
    client: CancelClient, worker: None, sim: SimControl
) -> None:
    orders = sim.seed(
        [{"account": f"desk-{i % 5}", "kind": "algo", "symbol": "ADAUSDT"} for i in range(1000)]
    )
    calls = [
        client.cancel(f"desk-{i % 5}", "UM", symbol="ADAUSDT", algo_id=o["algo_id"], timeout=120)
        for i, o in enumerate(orders)
    ]
    results = await asyncio.gather(*calls)
    assert all(isinstance(r, StrategyCanceled) for r in results)
    assert [r.strategy.algo_id for r in results if isinstance(r, StrategyCanceled)] == [
        o["algo_id"] for o in orders
    ]
    # One results reader for all of them: the client holds one consumer, with every
    # partition of the results topic assigned to it, and no call is left waiting.
    assert client.waiting == 0
    consumer = client._results._consumer
    assert len(consumer.assignment()) == 3


async def test_producer_keys_and_consumer_types(
    broker: Broker, topics: Topics, worker: None, sim: SimControl
) -> None:
    (algo,) = sim.seed([{"account": "desk-3", "kind": "algo", "symbol": "LTCUSDT"}])
    results = ResultConsumer(broker.bootstrap, topics.results, from_beginning=True)
    await results.start()
    try:
        async with CommandProducer(
            broker.bootstrap,
            topics.commands,
            source="risk-7",
            producer_id=TEST_PRODUCER_ID,
            private_key=TEST_PRODUCER_KEY,
        ) as producer:
            first = await producer.cancel("desk-3", "UM", symbol="LTCUSDT", algo_id=algo["algo_id"])
            second = await producer.cancel_all("desk-3", "UM", "LTCUSDT", reason="flatten")
        # Not a result event: skipped by the reader, never handed out as raw JSON.
        await produce(broker.bootstrap, topics.results, [(b"x", b'{"hello": 1}')])
        seen: dict[str, Any] = {}
        async with asyncio.timeout(30):
            async for result in results:
                seen[result.command_id or ""] = result
                if {first, second} <= seen.keys():
                    break
    finally:
        await results.stop()
    assert isinstance(seen[first], StrategyCanceled)
    assert isinstance(seen[second], StrategiesCanceled)
    # Keyed account:symbol, algo cancels too, so a kill switch is ordered with its symbol's
    # single cancels: one key, one partition, the results in command order.
    assert seen[second].raw["origin"]["key"] == "desk-3:LTCUSDT"
    assert seen[first].raw["origin"]["key"] == "desk-3:LTCUSDT"
    assert seen[first].raw["origin"]["partition"] == seen[second].raw["origin"]["partition"]
    assert seen[first].raw["origin"]["offset"] < seen[second].raw["origin"]["offset"]
    assert seen[first].symbol == seen[second].symbol == "LTCUSDT"
    assert seen[second].raw["command_source"] == "risk-7"
    assert seen[second].raw["command_reason"] == "flatten"


def test_parse_result_refuses_what_is_not_a_result() -> None:
    for raw in (None, b"not json", b"[]", orjson.dumps({"type": "strategy.canceled"})):
        with pytest.raises(ValueError, match=r"\w"):
            parse_result(raw)
    # A record naming a command id says which, and why it cannot be read.
    for _, raw in _unreadable_results(("a", "b")):
        with pytest.raises(ResultUnreadableError) as caught:
            parse_result(raw)
        assert caught.value.command_id in ("a", "b") and caught.value.raw == raw
    for example in sorted(EXAMPLES.glob("*.json")):
        assert parse_result(example.read_bytes()).raw["command_id"] is not None, example


def test_the_client_keys_every_command_account_symbol_algo_cancels_too() -> None:
    algo = build_command("desk-a", "UM", symbol="BTCUSDT", client_algo_id="stop-1")
    kill = build_command("desk-a", "UM", symbol="BTCUSDT", all_on_symbol=True)
    assert key_of(algo) == key_of(kill) == b"desk-a:BTCUSDT"
    assert orjson.loads(checked_command(algo))["symbol"] == "BTCUSDT"
    # The client asks for the symbol; the worker validates it like any other ...
    with pytest.raises(InvalidCommandError, match="symbol: required by the client"):
        checked_command(build_command("desk-a", "UM", algo_id=5))
    with pytest.raises(InvalidCommandError, match="symbol"):
        checked_command(build_command("desk-a", "UM", symbol="btcusdt", algo_id=5))
    # ... and still takes an algo cancel without one from producers that do not send it.
    decoded = decode(orjson.dumps(build_command("desk-a", "UM", algo_id=5)))
    assert isinstance(decoded, Command) and decoded.symbol is None
    decoded = decode(orjson.dumps(algo))
    assert isinstance(decoded, Command) and decoded.symbol == "BTCUSDT"
    refused = decode(orjson.dumps({**algo, "symbol": "BTCUSDT&x=1"}))
    assert isinstance(refused, InvalidCommand) and refused.detail.startswith("symbol")


def test_send_all_builds_a_kill_switch() -> None:
    from worker.cli.send import build_command as send_command  # noqa: PLC0415

    command = send_command(account="desk-1", market="UM", symbol="BTCUSDT", all=True)
    assert command["scope"] == "symbol" and command["symbol"] == "BTCUSDT"
    assert not {"strategy_id", "client_strategy_id", "algo_id", "client_algo_id"} & command.keys()
    assert command["source"] == "cancel-worker send"
    with pytest.raises(ValueError, match="--symbol"):
        send_command(account="desk-1", market="UM", all=True)
    with pytest.raises(ValueError, match="no order id"):
        send_command(account="desk-1", market="UM", symbol="BTCUSDT", algo_id=5, all=True)


def test_the_library_defaults_to_the_worker_s_topics() -> None:
    """A producer and a reader left at their defaults meet a worker left at its own."""
    from worker import client  # noqa: PLC0415
    from worker.settings import Settings  # noqa: PLC0415

    assert client.DEFAULT_COMMANDS_TOPIC == Settings().commands_topic == "papi.cancel.commands"
    assert client.DEFAULT_RESULTS_TOPIC == Settings().results_topic == "papi.cancel.results"
