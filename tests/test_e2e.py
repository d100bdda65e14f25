"""End to end: ``cancel-worker run`` and ``cancel-worker sim`` as real processes."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support import (
    SimControl,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    worker_env,
    worker_settings,
)
from worker.tools.devstack import Broker, cli_argv, start_worker

pytestmark = pytest.mark.e2e


async def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = {}
        for p in range(partitions):
            out[p] = await consumer.committed(TopicPartition(topic, p)) or 0
        return out
    finally:
        await consumer.stop()


async def test_processes_end_to_end_with_cli_send_and_clean_sigterm(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    cm, algo, um = sim.seed(
        [
            {"account": "desk-2", "market": "CM", "symbol": "ETHUSD_PERP"},
            {"account": "desk-rsa", "kind": "algo", "symbol": "ETHUSDT"},
            {"account": "desk-ed", "market": "UM", "symbol": "SOLUSDT"},
        ]
    )
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    env = worker_env(settings)
    worker = start_worker(env)
    try:
        sends = [
            [
                "--account",
                "desk-2",
                "--market",
                "CM",
                "--symbol",
                "ETHUSD_PERP",
                "--strategy-id",
                str(cm["strategy_id"]),
                "--command-id",
                "cli-cm",
            ],
            [
                "--account",
                "desk-rsa",
                "--market",
                "UM",
                "--symbol",
                "ETHUSDT",
                "--algo-id",
                str(algo["algo_id"]),
                "--command-id",
                "cli-algo",
            ],
            [
                "--account",
                "desk-ed",
                "--market",
                "UM",
                "--symbol",
                "SOLUSDT",
                "--client-strategy-id",
                um["client_strategy_id"],
                "--command-id",
                "cli-um",
            ],
        ]
        for args in sends:
            done = subprocess.run(
                cli_argv("send", *args),
                env={**env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert "sent to" in done.stdout
        # send refuses an invalid command (exit 2); a producer without the check can send it.
        bad = b'{"command_id": "cli-bad", "account": "desk-2", "market": "UM"}'
        refused = subprocess.run(
            cli_argv("send", "--json", bad.decode()),
            env={**env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        await produce(broker.bootstrap, topics.commands, [(b"desk-2:UM", bad)])
        results = {
            e["command_id"]: e
            for e in events_of(await consume(broker.bootstrap, topics.results, 4))
        }
    finally:
        code = worker.stop()
    assert code == 0, worker.output()
    assert "worker stopped cleanly" in worker.output()
    assert results["cli-cm"]["type"] == "strategy.canceled"
    assert results["cli-cm"]["route"] == "cm_conditional"
    assert results["cli-algo"]["type"] == "strategy.canceled"
    assert results["cli-um"]["strategy"]["client_strategy_id"] == um["client_strategy_id"]
    assert results["cli-bad"]["reason"] == "invalid_command"
    # Clean shutdown committed everything it published.
    committed = await _committed(broker.bootstrap, settings.group_id, topics.commands, 2)
    assert sum(committed.values()) == 4
    # Secrets never reach the logs.
    out = worker.output()
    for secret_word in ("secret-desk", "key-desk", "BEGIN PRIVATE KEY", "signature="):
        assert secret_word not in out


async def test_sigkill_mid_stream_then_restart_every_command_gets_a_result(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    total = 600
    specs = [
        {
            "account": f"desk-{i % 5}",
            "market": "UM" if i % 2 else "CM",
            "symbol": "BTCUSDT" if i % 2 else "BTCUSD_PERP",
        }
        for i in range(total)
    ]
    orders = sim.seed(specs)
    commands = [
        command(s["account"], o, command_id=f"kill-{i:04d}")
        for i, (s, o) in enumerate(zip(specs, orders, strict=True))
    ]
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file, max_in_flight=8)
    env = worker_env(settings)

    async def feed() -> None:
        for start in range(0, total, 20):
            chunk = commands[start : start + 20]
            await produce(
                broker.bootstrap,
                topics.commands,
                [(f"{c['account']}:{c.get('symbol')}".encode(), orjson.dumps(c)) for c in chunk],
            )
            await asyncio.sleep(0.05)

    feeder = asyncio.create_task(feed())
    first = start_worker(env)
    kill_point = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = len(
                await consume(
                    broker.bootstrap, topics.results, 1 << 30, timeout_s=0.3, validate=False
                )
            )
            if seen >= 120:
                kill_point = seen
                break
        first.kill()  # SIGKILL: no drain, no commit, no goodbye
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    assert 0 < kill_point < total, "the kill must land mid-stream"
    await feeder

    second = start_worker(env)
    try:
        out = await consume(broker.bootstrap, topics.results, total, timeout_s=120)
        ids = {e["command_id"] for e in events_of(out)}
        deadline = time.monotonic() + 60
        while len(ids) < total and time.monotonic() < deadline:
            out = await consume(broker.bootstrap, topics.results, len(out) + 1, timeout_s=2)
            ids = {e["command_id"] for e in events_of(out)}
    finally:
        assert second.stop() == 0, second.output()

    results = events_of(out)
    per_command: dict[str, list[dict[str, object]]] = collections.defaultdict(list)
    for e in results:
        per_command[str(e["command_id"])].append(e)
    assert set(per_command) == {c["command_id"] for c in commands}  # none lost
    # Ground truth: every order was canceled exactly once at the exchange ...
    order_ids = {o.get("strategy_id") or o.get("algo_id") for o in orders}
    cancels = collections.Counter(
        c["order_id"] for c in sim.cancels() if c["order_id"] in order_ids
    )
    assert len(cancels) == total and set(cancels.values()) == {1}
    # ... and a repeat after the crash gives the answer the command would have had once: the
    # order was canceled after the command was issued, so it is this command's cancel,
    # confirmed by query. Only the one real cancel is confirmed by the cancel's own answer.
    for cid, evs in per_command.items():
        assert sum(e.get("confirmed_by") == "cancel" for e in evs) <= 1, cid
        for e in evs:
            assert e["type"] == "strategy.canceled", e
    repeated = sum(len(evs) - 1 for evs in per_command.values())
    assert repeated < 100  # only what was in flight or uncommitted at the kill repeats


def test_demo_runs_end_to_end() -> None:
    """`make demo` runs this command; it must work from nothing and print a readable table."""
    done = subprocess.run(
        cli_argv("demo"), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "[7/7]" in out
    for needle in (
        "CANCELED",
        "not_found",
        "unknown_account",
        "expired",
        "invalid_command",
        "unauthorized",  # the command sent without a producer's signature
        "route_retired",
        "worker exit code       0 (clean)",
        "exchange cancels       7",  # 4 single cancels and a kill switch's 3 orders
        "strategies.canceled=1",
        "3 orders on DOGEUSDT (um_algo done, um_conditional retired)",
    ):
        assert needle in out, out
