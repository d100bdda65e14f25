"""The duplicate-command window with the real broker and simulator: rebuilt from the results
topic when a worker starts, kept up to date from it while the worker runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.bench import window
from tests.support import (
    SimControl,
    Topics,
    cancel_requests,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    read_to_end,
    running_worker,
    until,
    worker_settings,
)
from worker.core import events, normalize
from worker.core.commands import Command, decode
from worker.core.events import Origin
from worker.core.routes import Route
from worker.core.timeutil import now_ms
from worker.tools.devstack import Broker

pytestmark = pytest.mark.integration

KEY = b"desk-0:UM"


def _algo_orders(sim: SimControl, count: int) -> list[dict[str, Any]]:
    return sim.seed([{"account": "desk-0", "kind": "algo", "symbol": "BTCUSDT"}] * count)


async def test_a_retry_after_a_restart_gets_the_first_outcome_and_sends_nothing(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The window is rebuilt from the results topic by a new worker: a producer retry of
    an answered command (same command, another offset) is a duplicate."""
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    (order,) = _algo_orders(sim, 1)
    cmd = orjson.dumps(command("desk-0", order))
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        await produce(broker.bootstrap, topics.commands, [(KEY, cmd)])
        (first,) = events_of(await consume(broker.bootstrap, topics.results, 1))
    assert first["type"] == "strategy.canceled", first

    since = sim.last_seq()
    async with running_worker(settings) as worker:  # a new process would do the same
        assert (
            worker.seen is not None
            and worker.seen.get(first["account"], first["command_id"]) is not None
        )
        await produce(broker.bootstrap, topics.commands, [(KEY, cmd)])
        results = events_of(await consume(broker.bootstrap, topics.results, 2))
    assert len(results) == 2 and results[0] == first
    duplicate = results[1]
    assert duplicate["type"] == "cancel.duplicate" and duplicate["attempts"] == 0
    assert duplicate["command_id"] == first["command_id"]
    assert duplicate["origin"]["offset"] == first["origin"]["offset"] + 1
    assert duplicate["first_result"] == {
        "type": "strategy.canceled",
        "reason": None,
        "route": "um_algo",
        "order_status": "CANCELED",
        "origin": {k: first["origin"][k] for k in ("topic", "partition", "offset")},
        "completed_at": first["completed_at"],
    }
    assert cancel_requests(sim, since) == []  # no second DELETE for the order
    assert len(await read_to_end(broker.bootstrap, topics.results)) == 2


async def test_records_read_again_after_their_results_were_published_get_nothing(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """At-least-once: a record whose result is on the results topic but whose offset was not
    committed is read again. A worker in a fresh group reads every record again, as after
    such a crash: the window says each was answered at that very record, so no request
    goes out and no second result appears."""
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    orders = _algo_orders(sim, 4)
    cmds = [command("desk-0", o) for o in orders]
    records = [(f"desk-0:{i}".encode(), orjson.dumps(c)) for i, c in enumerate(cmds)]
    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, delivery="at_least_once"
    )
    async with running_worker(settings):
        await produce(broker.bootstrap, topics.commands, records)
        first = events_of(await consume(broker.bootstrap, topics.results, len(cmds)))
    assert sorted(e["type"] for e in first) == ["strategy.canceled"] * len(cmds)

    since = sim.last_seq()
    again = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, delivery="at_least_once"
    )
    assert again.group_id != settings.group_id  # nothing committed: every record is read
    async with running_worker(again) as worker:
        await until(lambda: worker.pipeline.processed == len(cmds), "the records read again")
    assert cancel_requests(sim, since) == []
    after = events_of(await read_to_end(broker.bootstrap, topics.results))

    def by_id(e: dict[str, Any]) -> str:
        return str(e["command_id"])

    assert sorted(after, key=by_id) == sorted(first, key=by_id)  # partitions: any order


async def test_results_published_by_another_member_are_followed(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """A result that appears on the results topic while the worker runs (another member
    answered the command) closes the command id for this worker too."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    (order,) = _algo_orders(sim, 1)
    raw = command("desk-0", order)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings) as worker:
        answered = _result_from_another_member(raw, topics)
        await produce(broker.bootstrap, topics.results, [(KEY, orjson.dumps(answered))])
        seen = worker.seen
        assert seen is not None
        await until(
            lambda: seen.get(raw["account"], raw["command_id"]) is not None,
            "the result to be followed",
        )
        since = sim.last_seq()
        await produce(broker.bootstrap, topics.commands, [(KEY, orjson.dumps(raw))])
        results = events_of(await consume(broker.bootstrap, topics.results, 2))
    assert results[1]["type"] == "cancel.duplicate"
    assert results[1]["first_result"]["origin"] == {
        "topic": topics.commands,
        "partition": 0,
        "offset": 1_000,
    }
    assert cancel_requests(sim, since) == []


def _result_from_another_member(raw: dict[str, Any], topics: Topics) -> dict[str, Any]:
    """The strategy.canceled result another member would have published for ``raw``, read
    at an offset this worker never reads."""
    cmd = decode(orjson.dumps(raw))
    assert isinstance(cmd, Command)
    origin = Origin(topics.commands, 0, 1_000, KEY)
    strategy = normalize.from_algo_cancel(cmd)
    now = now_ms()
    return events.canceled(cmd, origin, Route.UM_ALGO, strategy, 1, now, now)


async def test_a_flood_of_refusals_and_distinct_commands_stays_bounded_and_answered(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """docs/duplicate-window.md's memory measurement (``python -m tests.bench.window``, 1,000,000
    refused and 300,000 valid) scaled down to 50,000 refused and 15,000 valid, through one
    worker process: every command answered, refusals never remembered (the window a restart
    rebuilds holds exactly the valid commands), peak RSS under the documented bound, and after
    the restart a repeat is a duplicate and the same id with other content an id_conflict,
    neither with a request."""
    try:
        figures = await window.measure(broker.bootstrap, sim, accounts_file, 65_000)
    finally:
        sim.reset()
    assert (figures.refused, figures.valid, figures.results) == (50_000, 15_000, 65_000)
    assert figures.by_outcome == {
        "cancel.failed/invalid_command": 16_667,
        "cancel.failed/unknown_account": 16_667,
        "cancel.failed/unauthorized": 16_666,
        "cancel.failed/not_found": 15_000,
    }
    assert figures.peak_rss_mib < figures.bound_mib
    assert figures.rebuild_results == 65_000 and figures.rebuild_entries == 15_000
    assert figures.rebuild_peak_rss_mib < figures.bound_mib
    assert (figures.repeat_type, figures.conflict_reason) == ("cancel.duplicate", "id_conflict")
    assert figures.requests_after_restart == 0
