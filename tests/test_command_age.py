"""MAX_COMMAND_AGE_MS on the real broker and simulator: an old command read again sends
nothing; ``replay --failed`` is how an operator re-runs it on purpose."""

from __future__ import annotations

import asyncio
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
    run_cli,
    running_worker,
    worker_env,
    worker_settings,
)
from worker.core.timeutil import now_ms
from worker.tools.devstack import Broker

pytestmark = pytest.mark.integration


async def test_a_command_past_its_age_is_expired_unsent_and_a_redrive_runs_it(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    assert settings.max_command_age_ms == 600_000  # the default, not a test's setting
    (order,) = sim.seed([{"account": "desk-0", "kind": "algo", "symbol": "BTCUSDT"}])
    # Issued eleven minutes ago, no expires_at: a replay of an old record, say.
    old = command("desk-0", order, symbol="BTCUSDT", issued_at=now_ms() - 11 * 60_000)
    since = sim.last_seq()
    async with running_worker(settings):
        start = now_ms()
        await produce(broker.bootstrap, topics.commands, [(b"desk-0:BTCUSDT", orjson.dumps(old))])
        (first,) = events_of(await consume(broker.bootstrap, topics.results, 1))
        assert (first["type"], first["reason"], first["attempts"]) == (
            "cancel.failed",
            "expired",
            0,
        )
        assert "MAX_COMMAND_AGE_MS" in first["detail"]
        assert cancel_requests(sim, since) == []
        assert sim.orders()[order["algo_id"]]["status"] == "NEW"

        done = await asyncio.to_thread(
            run_cli,
            "replay",
            "--since",
            str(start - 1000),
            "--failed",
            env=worker_env(settings),
        )
        assert done.returncode == 0, done.stderr
        results = events_of(await consume(broker.bootstrap, topics.results, 2))
        assert [r["type"] for r in results] == ["cancel.failed", "strategy.canceled"]
        assert results[1]["retry_of"]["reason"] == "expired"
    assert sim.orders()[order["algo_id"]]["status"] == "CANCELED"
