"""examples/java/CancelExample.java against the real broker, a running worker and the
simulator: a producer key made by `cancel-worker keygen`, a command signed and published by
the Kafka Java client, its result read back read_committed."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import orjson
import pytest

from tests.support import (
    SimControl,
    check_result_event,
    fresh_topics,
    run_cli,
    running_worker,
    worker_settings,
)
from worker.tools.devstack import REPO, Broker

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "java" / "CancelExample.java"
LIBS = REPO / "examples" / "java" / "target" / "libs"
PRODUCER = "risk-engine-java"
ACCOUNT = "desk-4"
SYMBOL = "SOLUSDT"


async def run_example(*args: str, timeout_s: float = 90) -> tuple[int, str, str]:
    """The example from its source file (Java's single-file launcher), in this event loop's
    background, so the worker in the same loop keeps running."""
    java = shutil.which("java")
    assert java is not None, "java (17 or later) is not on PATH"
    assert any(LIBS.glob("kafka-clients-*.jar")), f"no {LIBS}: run `make java-example`"
    process = await asyncio.create_subprocess_exec(
        java,
        "-cp",
        f"{LIBS}/*",
        str(EXAMPLE),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_java_example_cancels_a_seeded_order(
    broker: Broker, sim: SimControl, accounts_file: Path, tmp_path: Path
) -> None:
    # The producer's key pair and its [producers.<id>] table, as an operator makes them.
    keygen = run_cli(
        "keygen", "--out", str(tmp_path), "--producer", PRODUCER, "--account", ACCOUNT, env={}
    )
    assert keygen.returncode == 0, keygen.stderr
    producers_file = tmp_path / "producers.toml"
    producers_file.write_text(keygen.stdout)

    topics = await fresh_topics(broker.bootstrap, partitions=3)
    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, producers_file=producers_file
    )
    (order,) = sim.seed([{"account": ACCOUNT, "market": "UM", "symbol": SYMBOL}])
    async with running_worker(settings):
        code, out, err = await run_example(
            "--bootstrap", broker.bootstrap,
            "--commands-topic", topics.commands,
            "--results-topic", topics.results,
            "--producer-id", PRODUCER,
            "--key-file", str(tmp_path / f"{PRODUCER}.key"),
            "--account", ACCOUNT,
            "--market", "UM",
            "--symbol", SYMBOL,
            "--strategy-id", str(order["strategy_id"]),
        )  # fmt: skip
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    event = orjson.loads(out.strip().splitlines()[-1])
    check_result_event(event)
    assert event["type"] == "strategy.canceled", event
    assert event["strategy"]["strategy_id"] == order["strategy_id"]
    assert event["strategy"]["status"] == "CANCELED"
    assert event["producer"] == PRODUCER  # the worker verified the Java signature
    assert event["command_source"] == "java-example"
    assert event["origin"]["topic"] == topics.commands
    assert event["origin"]["key"] == f"{ACCOUNT}:{SYMBOL}"
    assert sim.orders()[order["strategy_id"]]["status"] == "CANCELED"
