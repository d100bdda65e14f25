"""Exactly-once on a real three-node cluster while each node is SIGKILLed in turn.

The harness starts its own KRaft cluster (worker/tools/devstack.py ``start_cluster``: three
nodes that are each broker and controller, Kafka 3.9.1, or the release named by
``TEST_CLUSTER_KAFKA_VERSION``, e.g. 4.4.0); every topic, the internal ones too,
has three replicas and ``min.insync.replicas`` 2. A worker process answers a steady stream of
signed commands while each node in turn is SIGKILLed (no shutdown: the partitions it led,
the group or transaction coordinator it may have been, and a controller vote go with it),
left down past the cluster's session timeout (it is fenced and leaves every ISR), started
again, and the cluster is let heal (every partition on three in-sync replicas) before the next
kill. Then a ``read_committed`` reader sees exactly one result per command, each key's results
in its commands' order, and the simulator's book agrees with every result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support import SimControl, Topics, signed, worker_env, worker_settings
from tests.test_delivery import (
    check_exactly_once_in_order,
    fast_limits,
    key_of,
    results_so_far,
    seed_commands,
    wait_for_results,
)
from worker.tools.devstack import (
    DEFAULT_KAFKA_VERSION,
    Cluster,
    Process,
    start_cluster,
    start_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.cluster]

NODES = 3
VERSION = os.environ.get("TEST_CLUSTER_KAFKA_VERSION", DEFAULT_KAFKA_VERSION)
INTERNAL = ("__consumer_offsets", "__transaction_state")
DOWN_S = 8.0  # at least this long down, under the stream (and until it is fenced everywhere)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("cluster"), NODES, version=VERSION)
    try:
        yield c
    finally:
        c.stop()


async def every_node_registered(bootstrap: str, timeout_s: float = 60) -> None:
    """Until the cluster's metadata names all its nodes and a controller: a node answers
    before the others have registered, and an admin client that starts then has no
    controller to send CreateTopics to."""
    deadline = time.monotonic() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            described = await admin.describe_cluster()
        finally:
            await admin.close()
        if len(described["brokers"]) == NODES and described["controller_id"] >= 0:
            return
        assert time.monotonic() < deadline, f"the cluster did not come up: {described}"
        await asyncio.sleep(0.5)


async def create_topics(bootstrap: str, partitions: int) -> Topics:
    tag = f"{time.monotonic_ns():x}"[-10:]
    topics = Topics(f"cmd-{tag}", f"res-{tag}", f"dlq-{tag}")
    await every_node_registered(bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        config = {"min.insync.replicas": "2"}
        await admin.create_topics(
            [
                NewTopic(topics.commands, partitions, NODES, topic_configs=config),
                NewTopic(topics.results, partitions, NODES, topic_configs=config),
                NewTopic(topics.deadletter, 1, NODES, topic_configs=config),
            ]
        )
    finally:
        await admin.close()
    return topics


@dataclass(frozen=True)
class State:
    """The cluster as its metadata says: the live nodes, and each partition's leader,
    replicas and in-sync replicas (of the topics asked for and the internal ones)."""

    nodes: set[int]
    partitions: dict[str, tuple[int, list[int], list[int]]]

    def problems(self) -> list[str]:
        """What keeps the cluster from full health: a node missing, or a partition without
        a leader or with fewer than three in-sync replicas."""
        out = [] if len(self.nodes) == NODES else [f"nodes {sorted(self.nodes)}"]
        for name, (leader, replicas, isr) in self.partitions.items():
            if leader < 0 or len(replicas) != NODES or len(isr) != NODES:
                out.append(f"{name}: leader {leader}, replicas {replicas}, in sync {isr}")
        return out


async def cluster_state(bootstrap: str, topics: list[str]) -> State:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        nodes = {b["node_id"] for b in (await admin.describe_cluster())["brokers"]}
        partitions = {}
        for topic in await admin.describe_topics([*topics, *INTERNAL]):
            if topic["error_code"] and topic["topic"] in INTERNAL:
                continue  # not created (yet)
            for p in topic["partitions"]:
                partitions[f"{topic['topic']}-{p['partition']}"] = (
                    p["leader"],
                    list(p["replicas"]),
                    list(p["isr"]),
                )
        return State(nodes, partitions)
    finally:
        await admin.close()


async def wait_state(
    bootstrap: str, topics: list[str], problems: Callable[[State], list[str]], timeout_s: float
) -> None:
    """Poll the cluster's state until ``problems`` finds none."""
    deadline = time.monotonic() + timeout_s
    found: list[str] = ["not asked yet"]
    while time.monotonic() < deadline:
        try:
            found = problems(await cluster_state(bootstrap, topics))
        except Exception as exc:  # noqa: BLE001 - a node that is still starting
            found = [repr(exc)]
        if not found:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"not so after {timeout_s}s: {found[:8]}")


def failed_over(node_id: int) -> Callable[[State], list[str]]:
    """The node is fenced: gone from the metadata, leading nothing and in no ISR, while
    every partition has a leader and min.insync.replicas (2) in sync."""

    def problems(state: State) -> list[str]:
        out = [] if state.nodes == set(range(1, NODES + 1)) - {node_id} else [f"{state.nodes}"]
        for name, (leader, _, isr) in state.partitions.items():
            if leader < 0 or leader == node_id or node_id in isr or len(isr) != NODES - 1:
                out.append(f"{name}: leader {leader}, in sync {isr}")
        return out

    return problems


async def feed_until(
    stop: asyncio.Event,
    bootstrap: str,
    topic: str,
    commands: list[dict[str, Any]],
    per_s: int,
) -> int:
    """Produce the commands as a steady stream (chunks of 20), signed, through one
    idempotent producer (a retry after a leader's death must not write a command twice),
    until ``stop`` is set or they run out; returns how many were written."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    sent = 0
    try:
        for start in range(0, len(commands), 20):
            if stop.is_set():
                break
            chunk = commands[start : start + 20]
            futures = []
            for c in chunk:
                value = orjson.dumps(c)
                futures.append(
                    await producer.send(topic, value, key=key_of(c), headers=signed(value))
                )
            await asyncio.gather(*futures)
            sent += len(chunk)
            await asyncio.sleep(len(chunk) / per_s)
    finally:
        await producer.stop()
    return sent


async def partitions(bootstrap: str) -> list[str]:
    return list((await cluster_state(bootstrap, [])).partitions)


async def answered(bootstrap: str, topic: str) -> int:
    return len({e["command_id"] for e in await results_so_far(bootstrap, topic)})


async def test_each_node_killed_in_turn_leaves_exactly_one_result_per_command(
    cluster: Cluster, sim: SimControl, accounts_file: Path
) -> None:
    bootstrap = cluster.bootstrap
    topics = await create_topics(bootstrap, partitions=6)
    names = [topics.commands, topics.results, topics.deadletter]
    total = 6000
    orders, commands = seed_commands(sim, total, keys=30, prefix="node")
    settings = worker_settings(bootstrap, topics, sim.url, accounts_file, **fast_limits(sim))
    worker: Process = start_worker(worker_env(settings))
    stop = asyncio.Event()
    feeder: asyncio.Task[int] | None = None
    progress: list[tuple[int, int, int]] = []  # node, answered when killed, answered healed
    try:
        worker.wait_for_line("partitions assigned", 60)
        feeder = asyncio.create_task(feed_until(stop, bootstrap, topics.commands, commands, 40))
        await wait_for_results(bootstrap, topics.results, 100, 60, [worker])
        await wait_state(bootstrap, names, State.problems, 30)
        assert set(INTERNAL) <= {name.rpartition("-")[0] for name in await partitions(bootstrap)}
        for node in cluster.nodes:
            at_kill = await answered(bootstrap, topics.results)
            node.kill()
            killed_at = time.monotonic()
            await wait_state(bootstrap, names, failed_over(node.node_id), 60)
            await asyncio.sleep(max(0.0, killed_at + DOWN_S - time.monotonic()))
            assert worker.proc.poll() is None, worker.output()[-3000:]
            node.restart()
            await wait_state(bootstrap, names, State.problems, 90)
            # The stream goes on through the failover: more commands answered since the kill.
            await wait_for_results(bootstrap, topics.results, at_kill + 100, 90, [worker])
            progress.append((node.node_id, at_kill, await answered(bootstrap, topics.results)))
            assert not feeder.done(), "the stream ran out before every node had been killed"
        stop.set()
        fed = await feeder
        await wait_for_results(bootstrap, topics.results, fed, 120, [worker])
        assert worker.proc.poll() is None
    finally:
        stop.set()
        if feeder is not None and not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    assert [n for n, _, _ in progress] == [1, 2, 3]
    events = await results_so_far(bootstrap, topics.results)
    check_exactly_once_in_order(events, commands[:fed], orders[:fed], sim)
