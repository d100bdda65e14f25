"""The bad day, end to end: an exchange incident shorter than the cancels' deadline costs
latency, not cancels; one longer than it fails them, and the runbook (docs/replay.md), run as its
commands are written, re-drives them until every order is canceled at the exchange.

Real parts: the session's Kafka broker and PAPI simulator process, the worker in this event
loop, and the runbook's commands as ``cancel-worker`` processes."""

from __future__ import annotations

import asyncio
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import (
    SimControl,
    command,
    fresh_topics,
    open_um_orders,
    produce,
    read_to_end,
    run_cli,
    running_worker,
    worker_env,
    worker_settings,
)
from worker.core.timeutil import now_ms
from worker.tools.devstack import Broker

pytestmark = pytest.mark.integration

RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "replay.md"
SINCE_IN_RUNBOOK = "2026-05-01T09:00:00Z"
UNTIL_IN_RUNBOOK = "2026-05-01T09:30:00Z"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT")


def runbook() -> list[list[str]]:
    """The commands of the runbook in docs/replay.md (its first ``sh`` block after the
    heading "Recover after an incident"), each as argv after ``cancel-worker``."""
    text = RUNBOOK.read_text()
    section = text[text.index("# Recover after an incident") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the runbook has no sh block"
    argvs = []
    for line in block.group(1).splitlines():
        if line.startswith("cancel-worker "):
            argvs.append(shlex.split(line)[1:])
    assert argvs, "the runbook names no command"
    return argvs


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _seed(sim: SimControl, count: int) -> list[dict[str, Any]]:
    """``count`` algo orders of desk-0 over several symbols (so several keys), each with
    its symbol."""
    specs = [
        {"account": "desk-0", "kind": "algo", "symbol": SYMBOLS[i % len(SYMBOLS)]}
        for i in range(count)
    ]
    return [
        {**order, "symbol": spec["symbol"]}
        for spec, order in zip(specs, sim.seed(specs), strict=True)
    ]


def _cancel(order: dict[str, Any], deadline_ms: int) -> tuple[bytes, bytes]:
    issued = now_ms()
    cmd = command("desk-0", order, symbol=order["symbol"], expires_at=issued + deadline_ms)
    return f"desk-0:{order['symbol']}".encode(), orjson.dumps(cmd)


async def _results(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in await read_to_end(bootstrap, topic)]


async def test_an_incident_costs_latency_and_the_runbook_recovers_what_outlasted_it(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    env = worker_env(settings)
    async with running_worker(settings):
        # -- 1. a 10 s incident under a stream of cancels with 30 s deadlines ----------------
        orders = _seed(sim, 24)
        first_seq = sim.last_seq()
        sim.configure(unavailable_for_ms=10_000)
        # The kill switch sweeps whatever is open on the symbol: other tests' leftovers too.
        preexisting = open_um_orders(sim.orders(), "desk-0", "DOGEUSDT")
        flat = sim.seed([{"account": "desk-0", "kind": "algo", "symbol": "DOGEUSDT"}] * 3)
        for i, order in enumerate(orders):  # a stream over about 2.4 s, into the incident
            await produce(broker.bootstrap, topics.commands, [_cancel(order, 30_000)])
            if i == len(orders) // 2:  # and a kill switch in the middle of it
                issued = now_ms()
                kill = {
                    "command_id": "kill-doge",
                    "account": "desk-0",
                    "market": "UM",
                    "symbol": "DOGEUSDT",
                    "scope": "symbol",
                    "issued_at": issued,
                    "expires_at": issued + 30_000,
                }
                await produce(
                    broker.bootstrap, topics.commands, [(b"desk-0:DOGEUSDT", orjson.dumps(kill))]
                )
            await asyncio.sleep(0.1)

        async def answered(count: int) -> bool:
            return len(await _results(broker.bootstrap, topics.results)) >= count

        deadline = asyncio.get_running_loop().time() + 60
        while not await answered(len(orders) + 1):
            assert asyncio.get_running_loop().time() < deadline, "the stream was not answered"
            await asyncio.sleep(0.5)
        results = await _results(broker.bootstrap, topics.results)
        refused = [r for r in sim.requests(first_seq) if r.get("status") == 503]
        assert len(refused) >= len(orders), "the incident did not meet the cancels"
        assert sorted(r["type"] for r in results) == ["strategies.canceled"] + [
            "strategy.canceled"
        ] * len(orders), [(r["type"], r.get("reason"), r.get("detail")) for r in results]
        (swept,) = [r for r in results if r["type"] == "strategies.canceled"]
        assert swept["complete"], swept
        assert {
            s["strategy"]["algo_id"] or s["strategy"]["strategy_id"] for s in swept["strategies"]
        } == {o["algo_id"] for o in flat} | preexisting
        assert max(r["attempts"] for r in results) > settings.max_attempts
        book = sim.orders()
        assert all(book[o["algo_id"]]["status"] == "CANCELED" for o in (*orders, *flat))
        first_phase = len(orders) + 1  # results so far: the cancels and the kill switch

        # -- 2. an incident longer than the deadline: the cancels fail ----------------------
        late = _seed(sim, 6)
        sim.configure(unavailable_for_ms=600_000)
        since = now_ms()
        late_cancels = [_cancel(o, 2_000) for o in late]
        late_ids = {orjson.loads(value)["command_id"] for _, value in late_cancels}
        await produce(broker.bootstrap, topics.commands, late_cancels)
        until_ms = now_ms() + 1
        deadline = asyncio.get_running_loop().time() + 60
        while not await answered(first_phase + len(late)):
            assert asyncio.get_running_loop().time() < deadline, "the failures never came"
            await asyncio.sleep(0.5)
        all_results = await _results(broker.bootstrap, topics.results)
        failures = [r for r in all_results if r["command_id"] in late_ids]
        assert [(r["type"], r["reason"]) for r in failures] == [
            ("cancel.failed", "exchange_unavailable")
        ] * len(late)
        failed_at = {r["command_id"]: r["origin"] for r in failures}
        book = sim.orders()
        assert all(book[o["algo_id"]]["status"] == "NEW" for o in late)
        sim.configure(unavailable_until_ms=0)  # the incident is over

        # -- 3. the runbook (docs/replay.md), as written ----------------------------------
        steps = runbook()
        times = {SINCE_IN_RUNBOOK: _iso(since), UNTIL_IN_RUNBOOK: _iso(until_ms)}

        async def run(argv: list[str]) -> str:
            args = [times.get(a, a) for a in argv]
            done = await asyncio.to_thread(run_cli, *args, env=env, timeout_s=120)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            return done.stdout

        dry_run, redrive, check_results, second_dry_run = steps
        assert "--dry-run" in dry_run and "--failed" in dry_run
        planned = await run(dry_run)
        lines = [line for line in planned.splitlines() if ": re-drive (" in line]
        assert len(lines) == len(late), planned
        assert all("cancel.failed/exchange_unavailable" in line for line in lines)
        assert planned.rstrip().endswith(f"would re-drive {len(late)}"), planned

        done = await run(redrive)
        assert done.rstrip().endswith(f"re-driven {len(late)}"), done

        async def redriven() -> list[dict[str, Any]]:
            return [r for r in await _results(broker.bootstrap, topics.results) if "retry_of" in r]

        deadline = asyncio.get_running_loop().time() + 60
        while len(await redriven()) < len(late):
            assert asyncio.get_running_loop().time() < deadline, "the re-drives were not answered"
            await asyncio.sleep(0.5)
        again = await redriven()
        assert {r["type"] for r in again} == {"strategy.canceled"}, again
        for result in again:
            retried = result["retry_of"]
            original = failed_at[result["command_id"]]
            assert retried["type"] == "cancel.failed"
            assert retried["reason"] == "exchange_unavailable"
            assert retried["origin"] == {k: original[k] for k in ("topic", "partition", "offset")}
            assert result["origin"]["offset"] != original["offset"] or (
                result["origin"]["partition"] != original["partition"]
            )
        book = sim.orders()
        assert all(book[o["algo_id"]]["status"] == "CANCELED" for o in late)

        shown = await run(check_results)
        for result in again:
            assert any(
                result["command_id"] in line and "re-drive of" in line
                for line in shown.splitlines()
            ), shown

        second = await run(second_dry_run)
        assert ": re-drive (" not in second, second
        assert second.rstrip().endswith("would re-drive 0"), second

        # An accidental repeat of the whole range (no selection): duplicates, no request.
        before = sim.last_seq()
        count = len(await _results(broker.bootstrap, topics.results))
        await run(["replay", "--since", _iso(since), "--until", _iso(until_ms)])
        deadline = asyncio.get_running_loop().time() + 60
        while not await answered(count + len(late)):
            assert asyncio.get_running_loop().time() < deadline, "the repeats were not answered"
            await asyncio.sleep(0.5)
        repeats = [
            r
            for r in await _results(broker.bootstrap, topics.results)
            if r["type"] == "cancel.duplicate"
        ]
        assert {r["command_id"] for r in repeats} == late_ids and len(repeats) == len(late)
        assert not [r for r in sim.requests(before) if r["method"] == "DELETE"]
