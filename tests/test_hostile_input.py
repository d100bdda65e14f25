"""Hostile input: thousands of random and malformed records through the whole pipeline.

Invariants, whatever arrives: no crash; exactly one result per record; a dead-letter copy
for every invalid one; offsets committed to the end; and no request to the exchange built
from anything but a validated command.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.memory_ports import MemoryLog, MemorySink, MemorySource
from tests.support import (
    SimControl,
    consume,
    events_of,
    fresh_topics,
    produce,
    running_worker,
    worker_settings,
    write_accounts,
)
from worker.core.timeutil import now_ms
from worker.exchange.accounts import load_accounts
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, RetryPolicy
from worker.kafka.pipeline import Pipeline
from worker.processor import CommandProcessor
from worker.tools.devstack import Broker
from worker.tools.sim.app import SimConfig
from worker.tools.sim.server import running_sim, state_from_accounts

ACCOUNTS = load_accounts(write_accounts(Path(tempfile.mkdtemp(prefix="hostile-"))))
SAFE_PARAM = {
    "symbol": re.compile(r"[A-Z0-9_]{1,32}"),
    "strategyId": re.compile(r"[1-9][0-9]{0,18}"),
    "algoId": re.compile(r"[1-9][0-9]{0,18}"),
    "newClientStrategyId": re.compile(r"[.A-Z:/a-z0-9_-]{1,36}"),
    "clientAlgoId": re.compile(r"[.A-Z:/a-z0-9_-]{1,36}"),
    "recvWindow": re.compile(r"[0-9]{1,5}"),
    "timestamp": re.compile(r"[0-9]{13}"),
}

field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["UM", "CM", "BTCUSDT", "BTC&x=1", "a=b", "desk-0", "BTCUSD_PERP", "x" * 70]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
command_like = st.fixed_dictionaries(
    {
        "command_id": st.text(alphabet="abc-_:.1", min_size=1, max_size=12),
        "account": st.sampled_from(["desk-0", "desk-1", "desk-ed", "nobody"]),
        "market": st.sampled_from(["UM", "CM"]),
        "issued_at": st.just(1_795_260_000_000),
    },
    optional={
        "symbol": field_values | st.sampled_from(["BTCUSDT", "BTCUSD_PERP"]),
        "strategy_id": field_values | st.integers(1, 10**12),
        "client_strategy_id": field_values,
        "algo_id": field_values | st.integers(1, 10**12),
        "client_algo_id": field_values,
        "expires_at": field_values,
        "extra": field_values,
    },
)
payloads = st.one_of(
    st.binary(max_size=200),
    command_like.map(lambda v: json.dumps(v).encode()),  # stdlib: big ints, Infinity too
    st.recursive(field_values, lambda c: st.lists(c, max_size=3), max_leaves=5).map(
        lambda v: json.dumps(v).encode()
    ),
    st.none(),
)
records_strategy = st.lists(
    st.tuples(
        st.one_of(st.none(), st.binary(max_size=20)),
        payloads,
        st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=20)), max_size=3),
    ),
    min_size=1,
    max_size=40,
)


async def _run_pipeline(
    raw: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
) -> tuple[MemorySink, list[dict[str, Any]]]:
    state = state_from_accounts(ACCOUNTS, SimConfig())
    async with running_sim(state) as url, PapiClient(url, clock=now_ms, timeout_s=2) as client:
        executor = CancelExecutor(client, ACCOUNTS, RetryPolicy(max_attempts=1), now_ms)
        processor = CommandProcessor(
            executor,
            results_topic="res",
            deadletter_topic="dlq",
            max_command_bytes=4096,
            clock=now_ms,
        )
        log = MemoryLog()
        for i, (key, value, headers) in enumerate(raw):
            log.append(("cmd", i % 2), key, value, headers)
        source, sink = MemorySource(log, batch=7), MemorySink(log)
        pipeline = Pipeline(source, sink, processor, max_in_flight=8)
        source.assign([("cmd", 0), ("cmd", 1)])
        pipeline.on_assigned([("cmd", 0), ("cmd", 1)])
        task = asyncio.create_task(pipeline.run())
        while pipeline.processed < len(raw) and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        pipeline.stop()
        await asyncio.wait_for(task, 10)
        return sink, list(state.requests)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records_strategy)
def test_pipeline_accounts_for_every_hostile_record(
    raw: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
) -> None:
    sink, requests = asyncio.run(_run_pipeline(raw))
    results = [r for r in sink.published if r.topic == "res"]
    dead = [r for r in sink.published if r.topic == "dlq"]
    events = [orjson.loads(r.value) for r in results]
    origins = sorted((e["origin"]["partition"], e["origin"]["offset"]) for e in events)
    assert origins == sorted((i % 2, i // 2) for i in range(len(raw)))  # one result each
    invalid = [e for e in events if e.get("reason") == "invalid_command"]
    assert len(dead) == len(invalid)  # and the raw bytes of every invalid one are kept
    expected_commits = {
        ("cmd", p): (sum(1 for i in range(len(raw)) if i % 2 == p) - 1) + 1
        for p in (0, 1)
        if any(i % 2 == p for i in range(len(raw)))
    }
    assert sink.log.committed == expected_commits
    for request in requests:  # every request the exchange saw was built from checked values
        params = request["params"] or {}
        for name, value in params.items():
            assert name in SAFE_PARAM and SAFE_PARAM[name].fullmatch(value), (name, value)


@pytest.mark.integration
async def test_hostile_records_on_the_real_broker(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    rng = random.Random(20261121)
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    valid_orders = sim.seed([{"account": "desk-0", "kind": "algo"} for _ in range(50)])
    records: list[tuple[bytes | None, bytes | None]] = []
    for i in range(600):
        kind = rng.randrange(6)
        key = None if rng.random() < 0.2 else rng.randbytes(rng.randrange(1, 12))
        if kind == 0:
            value: bytes | None = rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:
            order = valid_orders[i % 50]
            value = orjson.dumps(
                {
                    "command_id": f"h{i}",
                    "account": "desk-0",
                    "market": "UM",
                    "algo_id": order["algo_id"],
                    "issued_at": now_ms(),
                }
            )
        elif kind == 2:  # well-formed JSON, hostile fields (stdlib json: big ints too)
            value = json.dumps(
                {
                    "command_id": f"h{i}",
                    "account": "desk-0",
                    "market": "UM",
                    "symbol": rng.choice(["BTC&a=b", "btc", "B" * 40, "BTCUSDT", "BTC=1"]),
                    "strategy_id": rng.choice([1, "1", 1.5, -1, 2**70, None, True]),
                    "issued_at": now_ms(),
                }
            ).encode()
        elif kind == 3:
            value = None
        elif kind == 4:
            value = b"{" * rng.randrange(1, 2000)
        else:
            value = orjson.dumps([rng.random() for _ in range(rng.randrange(5))])
        if key is None and value is None:
            key = b"k"  # Kafka needs one of the two
        records.append((key, value))
    since = sim.last_seq()
    settings_ = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings_) as worker:
        await produce(broker.bootstrap, topics.commands, records)
        results = events_of(
            await consume(broker.bootstrap, topics.results, len(records), timeout_s=120)
        )
        assert not worker.pipeline.stopping  # still running after all of it
    assert len(results) == len(records)
    assert len({(e["origin"]["partition"], e["origin"]["offset"]) for e in results}) == 600
    invalid = [e for e in results if e.get("reason") == "invalid_command"]
    dead = await consume(broker.bootstrap, topics.deadletter, len(invalid), validate=False)
    assert len(dead) == len(invalid) > 0
    for request in sim.requests(since):
        for name, value in (request["params"] or {}).items():
            assert SAFE_PARAM[name].fullmatch(value), (name, value)
