"""``cancel-worker send`` and ``cancel-worker results`` through the real CLI, against the
session's broker, the simulator and a running worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import (
    PRODUCER_KEY_FILE_NAME,
    TEST_PRODUCER_ID,
    SimControl,
    Topics,
    _check_results,
    events_of,
    fresh_topics,
    open_um_orders,
    read_to_end,
    run_cli,
    running_worker,
    worker_env,
    worker_settings,
)
from worker.core.contracts import result_validator
from worker.settings import ENV_PREFIX, Settings
from worker.tools.devstack import REPO, Broker, cli_argv

pytestmark = pytest.mark.integration


@pytest.fixture
async def topics(broker: Broker) -> Topics:
    return await fresh_topics(broker.bootstrap, partitions=3)


@pytest.fixture
def settings(broker: Broker, topics: Topics, sim: SimControl, accounts_file: Path) -> Settings:
    return worker_settings(broker.bootstrap, topics, sim.url, accounts_file)


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[None]:
    async with running_worker(settings):
        yield


async def cli(*args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own interpreter (in a thread: a worker may share this loop)."""
    return await asyncio.to_thread(run_cli, *args, env=worker_env(settings))


def valid_event(line: str) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(line)
    errors = [e.message for e in result_validator().iter_errors(event)]
    assert not errors, f"result violates the schema: {errors} in {event}"
    return event


async def results_on_topic(settings: Settings) -> list[dict[str, Any]]:
    records = await read_to_end(settings.bootstrap_servers, settings.results_topic)
    _check_results(records)
    return events_of(records)


async def test_send_refuses_an_invalid_command_and_publishes_nothing(
    settings: Settings,
) -> None:
    refused = [
        # The operator's kill switch with a lowercase symbol: the worker would refuse it.
        ("--account", "desk-0", "--market", "UM", "--symbol", "ethusdt", "--all"),
        # An algo cancel without its symbol: it could not be keyed account:symbol.
        ("--account", "desk-0", "--market", "UM", "--algo-id", "5"),
        ("--account", "desk-0", "--market", "CM", "--symbol", "BTCUSD_PERP"),  # no id
        ("--json", '{"command_id": "x", "account": "desk-0", "market": "UM"}'),
        ("--json", "not json"),
    ]
    reasons = {
        0: "symbol: failed 'pattern' ('ethusdt' does not match",
        1: "symbol: required by the client",
        2: "exactly one of strategy_id",
        3: "'issued_at' is a required property",
        4: "--json is not valid JSON",
    }
    for i, args in enumerate(refused):
        done = await cli("send", *args, settings=settings)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stdout == ""
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("invalid command: ") and reasons[i] in line, line
    # The same with --wait: refused before anything waits.
    done = await cli("send", *refused[0], "--wait", settings=settings)
    assert done.returncode == 2 and "ethusdt" in done.stderr
    assert await read_to_end(settings.bootstrap_servers, settings.commands_topic) == []


async def test_send_wait_prints_the_result_and_exits_by_outcome(
    settings: Settings, worker: None, sim: SimControl
) -> None:
    preexisting = open_um_orders(sim.orders(), "desk-1", "XRPUSDT")  # other tests' leftovers
    algo, other, cm = sim.seed(
        [
            {"account": "desk-1", "kind": "algo", "symbol": "XRPUSDT"},
            {"account": "desk-1", "kind": "algo", "symbol": "XRPUSDT"},
            {"account": "desk-1", "market": "CM", "symbol": "ETHUSD_PERP", "quantity": "7"},
        ]
    )
    base = ("send", "--account", "desk-1", "--wait", "60")
    done = await cli(
        *base,
        *("--market", "UM", "--symbol", "XRPUSDT", "--algo-id", str(algo["algo_id"])),
        *("--command-id", "send-algo-1"),
        settings=settings,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("send-algo-1 desk-1 UM XRPUSDT: canceled algo ")
    assert "on um_algo, status CANCELED (confirmed by cancel)" in done.stdout
    assert "sent to " in done.stderr and "waiting up to 60s" in done.stderr

    # --raw: the event as published (the same command id again: a duplicate, exit 6).
    done = await cli(
        *base,
        "--raw",
        *("--market", "UM", "--symbol", "XRPUSDT", "--algo-id", str(algo["algo_id"])),
        *("--command-id", "send-algo-1"),
        settings=settings,
    )
    assert done.returncode == 6, done.stderr
    duplicate = valid_event(done.stdout)
    assert duplicate["type"] == "cancel.duplicate"
    assert duplicate["first_result"]["type"] == "strategy.canceled"

    done = await cli(
        *base,
        *("--market", "CM", "--symbol", "ETHUSD_PERP", "--strategy-id", str(cm["strategy_id"])),
        settings=settings,
    )
    assert done.returncode == 0, done.stderr
    assert ", qty 7 " in done.stdout  # the decimal string as the exchange gave it

    # The same order again: it is closed, so the cancel fails (exit 1).
    done = await cli(
        *base,
        *("--market", "CM", "--symbol", "ETHUSD_PERP", "--strategy-id", str(cm["strategy_id"])),
        settings=settings,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED already_closed" in done.stdout

    # The kill switch on the symbol: the other algo order goes, complete (exit 0).
    done = await cli(
        *base, "--market", "UM", "--symbol", "XRPUSDT", "--all", "--raw", settings=settings
    )
    assert done.returncode == 0, done.stderr
    swept = valid_event(done.stdout)
    assert swept["type"] == "strategies.canceled" and swept["complete"] is True
    assert {
        s["strategy"]["algo_id"] or s["strategy"]["strategy_id"] for s in swept["strategies"]
    } == {other["algo_id"]} | preexisting
    # Keyed account:symbol like the single cancels of that symbol: the same partition.
    events = await results_on_topic(settings)
    keys = {e["origin"]["key"] for e in events if e["symbol"] == "XRPUSDT"}
    assert keys == {"desk-1:XRPUSDT"}
    assert len({e["origin"]["partition"] for e in events if e["symbol"] == "XRPUSDT"}) == 1


async def test_send_wait_without_a_worker_says_so_with_exit_5(settings: Settings) -> None:
    done = await cli(
        "send",
        *("--account", "desk-2", "--market", "UM", "--symbol", "BTCUSDT", "--algo-id", "9"),
        *("--command-id", "nobody-reads-1", "--wait", "0.5"),
        settings=settings,
    )
    assert done.returncode == 5, done.stdout + done.stderr
    assert done.stdout == ""
    assert "no result for command nobody-reads-1 within 0.5s" in done.stderr
    assert "cancel-worker results --command-id nobody-reads-1" in done.stderr
    # It was published, keyed account:symbol.
    (record,) = await read_to_end(settings.bootstrap_servers, settings.commands_topic)
    assert record.key == b"desk-2:BTCUSDT"
    assert orjson.loads(record.value)["source"] == "cancel-worker send"


@pytest.mark.parametrize(
    "args",
    [
        ("send", "--account", "d", "--market", "UM", "--symbol", "BTCUSDT", "--algo-id", "1"),
        ("send", "--account", "d", "--market", "UM", "--symbol", "BTCUSDT", "--all", "--wait"),
        ("results", "--command-id", "x"),
        ("results", "--follow"),
    ],
    ids=lambda a: "-".join(a[:1] + a[-1:]),
)
def test_an_unreachable_broker_is_one_line(args: tuple[str, ...], accounts_file: Path) -> None:
    # Nothing listens on port 9.
    signing = {
        f"{ENV_PREFIX}PRODUCER_ID": TEST_PRODUCER_ID,
        f"{ENV_PREFIX}PRODUCER_KEY_FILE": str(accounts_file.parent / PRODUCER_KEY_FILE_NAME),
    }
    done = run_cli(*args, env={f"{ENV_PREFIX}BOOTSTRAP_SERVERS": "127.0.0.1:9", **signing})
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("Error: cannot reach Kafka at 127.0.0.1:9: "), line


async def test_a_missing_topic_is_one_line(settings: Settings) -> None:
    env = worker_env(settings) | {f"{ENV_PREFIX}COMMANDS_TOPIC": "no-such-topic"}
    done = await asyncio.to_thread(
        run_cli, "send", "--account", "d", "--market", "UM", "--symbol", "B", "--all", env=env
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: topic 'no-such-topic' does not exist (cancel-worker check --create-topics "
        f"makes the worker's topics) at {settings.bootstrap_servers}"
    ]


async def test_results_looks_up_and_follows_by_command_id(
    settings: Settings, worker: None, sim: SimControl
) -> None:
    first, second = sim.seed(
        [
            {"account": "desk-3", "market": "UM", "symbol": "SOLUSDT", "quantity": "1.5"},
            {"account": "desk-3", "market": "UM", "symbol": "SOLUSDT"},
        ]
    )

    def send_args(order: dict[str, Any], command_id: str) -> tuple[str, ...]:
        return (
            *("send", "--account", "desk-3", "--market", "UM", "--symbol", "SOLUSDT"),
            *("--strategy-id", str(order["strategy_id"]), "--command-id", command_id),
        )

    done = await cli(*send_args(first, "lookup-1"), "--wait", settings=settings)
    assert done.returncode == 0, done.stdout + done.stderr

    done = await cli("results", "--command-id", "lookup-1", settings=settings)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("lookup-1 desk-3 UM SOLUSDT: canceled strategy ")
    assert ", qty 1.5 " in line

    done = await cli(
        "results", "--command-id", "lookup-1", "--command-id", "never-sent", "--json",
        settings=settings,
    )  # fmt: skip
    assert done.returncode == 5
    (line,) = done.stdout.splitlines()
    assert valid_event(line)["command_id"] == "lookup-1"
    assert done.stderr.strip() == f"no result for command never-sent on {settings.results_topic}"

    # --follow: waits for a result that is not there yet, prints it and ends.
    follower = await asyncio.create_subprocess_exec(
        *cli_argv("results", "--follow", "--command-id", "follow-1", "--json"),
        cwd=REPO,
        env={**run_env(), **worker_env(settings)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        ended = asyncio.create_task(follower.communicate())
        await asyncio.sleep(1.0)  # let it read to the end first; either way it must find it
        assert not ended.done(), ended.result()
        done = await cli(*send_args(second, "follow-1"), settings=settings)
        assert done.returncode == 0 and "sent to " in done.stdout
        out, err = await asyncio.wait_for(ended, 60)
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    assert follower.returncode == 0, err
    (line,) = out.decode().splitlines()
    event = valid_event(line)
    assert event["command_id"] == "follow-1" and event["type"] == "strategy.canceled"
    assert len(await results_on_topic(settings)) == 2


def run_env() -> dict[str, str]:
    """This environment without any CANCEL_WORKER_* setting (as ``run_cli`` does)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def test_send_without_a_producer_to_sign_as_publishes_nothing() -> None:
    """A secure worker refuses unsigned commands: send says so before it connects (nothing
    listens on port 9: a send that tried to publish would fail on Kafka instead)."""
    args = ("send", "--account", "d", "--market", "UM", "--symbol", "BTCUSDT", "--algo-id", "1")
    done = run_cli(*args, env={f"{ENV_PREFIX}BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("no producer to sign as: give --producer-id"), line
    # --unsigned is the explicit way round it (for a worker that takes unsigned commands).
    done = run_cli(*args, "--unsigned", env={f"{ENV_PREFIX}BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert done.returncode == 1 and "cannot reach Kafka" in done.stderr, done.stderr
