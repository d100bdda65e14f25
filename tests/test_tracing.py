"""Tracing (worker/tracing.py, docs/tracing.md): a command's trace from its record's
``traceparent`` to its result's, through the real worker, broker and simulator.

The worker's spans are read from the SDK's in-memory exporter (the worker runs in this event
loop); one worker process exports to the console (``OTEL_TRACES_EXPORTER=console``) and one
runs with ``opentelemetry`` made unimportable, as without the extra.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.support import (
    HMAC_ACCOUNTS,
    SimControl,
    check_result_event,
    command,
    consume,
    events_of,
    fresh_topics,
    running_worker,
    signed,
    worker_env,
    worker_settings,
)
from worker import tracing
from worker.client import CancelClient
from worker.core.timeutil import now_ms
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, RetryPolicy
from worker.kafka.pipeline import InRecord
from worker.processor import CommandProcessor, record_bytes
from worker.tools.devstack import REPO, Broker, cli_argv, start_worker
from worker.tools.sim.faults import SERVICE_UNAVAILABLE, UNKNOWN_503

HTTP_ROUTES = {"DELETE", "GET"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The worker's (and the client's) spans, kept in memory for the test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def _parent() -> tuple[int, int, bytes]:
    """A producer's trace: its trace id, span id and traceparent header."""
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01".encode()


def _header(record: Any, name: str) -> bytes | None:
    values = [v for n, v in record.headers or () if n == name]
    assert len(values) <= 1, f"{name} appears {len(values)} times"
    return values[0] if values else None


def _of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def _tree(spans: Sequence[ReadableSpan], root_parent: int) -> ReadableSpan:
    """The one span whose parent is ``root_parent``; every other span descends from it."""
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.parent is not None and s.parent.span_id == root_parent]
    assert len(roots) == 1, [s.name for s in roots]
    for span in spans:
        node = span
        while node is not roots[0]:
            assert node.parent is not None, f"{span.name} is not under the command's span"
            node = by_id[node.parent.span_id]
    return roots[0]


def _under(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
        key=lambda s: s.start_time or 0,
    )


def _http(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return sorted(
        (s for s in spans if s.kind == SpanKind.CLIENT and s.name.split()[0] in HTTP_ROUTES),
        key=lambda s: s.start_time or 0,
    )


def _no_secrets(spans: Sequence[ReadableSpan], api_keys: Sequence[str]) -> None:
    """No attribute of any span holds a query string, a signature or an API key."""
    for span in spans:
        for name, value in (span.attributes or {}).items():
            text = str(value)
            assert "?" not in text and "signature" not in text.lower(), (span.name, name, text)
            assert "timestamp=" not in text, (span.name, name, text)
            assert not any(key in text for key in api_keys), (span.name, name)


@pytest.mark.integration
async def test_a_commands_trace_through_retries_and_a_reconciliation(
    broker: Broker, sim: SimControl, accounts_file: Path, spans: InMemorySpanExporter
) -> None:
    """A command with a traceparent: a 503 "not executed" (retried), then a 503 -1000 the
    exchange applied (ambiguous: reconciled by query). Its result carries the same trace,
    and every span the worker made for it descends from the producer's span: one per HTTP
    attempt, numbered, the reconciliation with its queries under it."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    (order,) = sim.seed([{"account": "desk-1", "market": "UM", "symbol": "BTCUSDT"}])
    cmd = command("desk-1", order)
    trace_id, parent_span, traceparent = _parent()
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        backoff_initial_s=0.02,
        backoff_max_s=0.1,
    )
    since = sim.last_seq()
    sim.script(
        {"status": 503, "msg": SERVICE_UNAVAILABLE, "body": "json", "method": "DELETE"},
        {"status": 503, "code": -1000, "msg": UNKNOWN_503, "apply": True, "method": "DELETE"},
    )
    value = orjson.dumps(cmd)
    headers = [*signed(value), ("traceparent", traceparent), ("tracestate", b"risk=7")]
    async with running_worker(settings):
        await _produce(broker.bootstrap, topics.commands, b"desk-1:BTCUSDT", value, headers)
        (record,) = await consume(broker.bootstrap, topics.results, 1)
    (event,) = events_of([record])
    assert event["type"] == "strategy.canceled" and event["confirmed_by"] == "query", event

    # The result continues the command's trace, with its tracestate.
    result_parent = _header(record, "traceparent")
    assert result_parent is not None and tracing.trace_id_of(record.headers) == f"{trace_id:032x}"
    assert _header(record, "tracestate") == b"risk=7"

    mine = _of_trace(spans, trace_id)
    command_span = _tree(mine, parent_span)
    assert command_span.name == f"process {topics.commands}"
    assert command_span.kind == SpanKind.CONSUMER
    attributes = dict(command_span.attributes or {})
    assert attributes["messaging.system"] == "kafka"
    assert attributes["messaging.destination.name"] == topics.commands
    assert attributes["messaging.destination.partition.id"] == str(record.partition)
    assert attributes["messaging.kafka.offset"] == 0
    assert attributes["messaging.kafka.message.key"] == "desk-1:BTCUSDT"
    assert attributes["messaging.consumer.group.name"] == settings.group_id
    assert attributes[tracing.COMMAND_ID] == cmd["command_id"]
    assert attributes[tracing.RESULT_TYPE] == "strategy.canceled"

    names = [s.name for s in _under(mine, command_span)]
    assert names[0] == tracing.VALIDATE and names[-1] == f"create {topics.results}", names
    create = next(s for s in mine if s.name == f"create {topics.results}")
    assert create.kind == SpanKind.PRODUCER
    # The result's traceparent is the creation span's context.
    assert result_parent.decode().split("-")[2] == f"{create.context.span_id:016x}"

    # Each HTTP attempt: the same requests the simulator received for this order.
    http = _http(mine)
    requests = [r for r in sim.requests(since) if str(order["strategy_id"]) in str(r["params"])]
    assert [(s.attributes or {})["http.request.method"] for s in http] == [
        r["method"] for r in requests
    ]
    cancels = [s for s in http if s.name.startswith("DELETE")]
    assert [dict(s.attributes or {}).get(tracing.ATTEMPT) for s in cancels] == [1, 2]
    first, second = (dict(s.attributes or {}) for s in cancels)
    assert first["http.response.status_code"] == 503 and tracing.BINANCE_CODE not in first
    assert second["http.response.status_code"] == 503 and second[tracing.BINANCE_CODE] == -1000
    assert second["http.request.resend_count"] == 1
    assert first["url.template"] == "/papi/v1/um/conditional/order"
    assert first[tracing.ROUTE] == "um_conditional"
    # Each attempt waited on the governor first, under the command's span.
    governor = [s for s in mine if s.name == tracing.GOVERNOR_WAIT]
    assert len(governor) == len(http)
    # The reconciliation, with its status queries under it.
    (reconcile,) = [s for s in mine if s.name == tracing.RECONCILE]
    queries = _under(mine, reconcile)
    assert [q.name for q in queries if q.kind == SpanKind.CLIENT]
    assert all(q.name.startswith("GET ") for q in queries if q.kind == SpanKind.CLIENT)
    assert {s.name for s in http if s.name.startswith("GET")} <= {q.name for q in queries}
    assert dict(reconcile.attributes or {})["cancel_worker.finding"] == "found"
    _no_secrets(mine, [key for key, _ in HMAC_ACCOUNTS.values()])


@pytest.mark.integration
async def test_each_command_under_a_fault_profile_is_its_own_trace(
    broker: Broker, sim: SimControl, accounts_file: Path, spans: InMemorySpanExporter
) -> None:
    """Under the unknown-503 profile (ambiguous answers, some applied): each command's
    spans form one tree under its own producer span, with one span per request the
    simulator received for its order; a command without a traceparent starts its own
    trace, which its result carries."""
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    orders = sim.seed([{"account": f"desk-{i % 3}", "kind": "algo"} for i in range(6)])
    commands = [command(f"desk-{i % 3}", o) for i, o in enumerate(orders)]
    parents = [_parent() for _ in commands[:-1]]  # the last one has none
    since = sim.last_seq()
    sim.configure(profile="unknown-503", seed=7)
    settings = worker_settings(
        broker.bootstrap,
        topics,
        sim.url,
        accounts_file,
        max_attempts=10,
        backoff_initial_s=0.02,
        backoff_max_s=0.2,
    )
    async with running_worker(settings):
        producer = _Producer(broker.bootstrap)
        await producer.start()
        try:
            for i, cmd in enumerate(commands):
                value = orjson.dumps(cmd)
                extra = [("traceparent", parents[i][2])] if i < len(parents) else []
                await producer.send(
                    topics.commands, f"k{i}".encode(), value, [*signed(value), *extra]
                )
        finally:
            await producer.stop()
        records = await consume(broker.bootstrap, topics.results, len(commands), timeout_s=90)
    sim.reset()
    assert len(records) == len(commands)
    by_command = {orjson.loads(r.value)["command_id"]: r for r in records}
    assert all(e["type"] == "strategy.canceled" for e in events_of(records))
    log = sim.requests(since)
    reconciled = 0
    for cmd, (trace_id, parent_span, _) in zip(commands, parents, strict=False):
        record = by_command[cmd["command_id"]]
        assert tracing.trace_id_of(record.headers) == f"{trace_id:032x}"
        mine = _of_trace(spans, trace_id)
        _tree(mine, parent_span)
        requests = [r for r in log if str(cmd["algo_id"]) in str(r["params"])]
        assert len(_http(mine)) == len(requests), (cmd["command_id"], requests)
        reconciled += sum(s.name == tracing.RECONCILE for s in mine)
    assert reconciled, "the profile led to no reconciliation"
    # Without a traceparent: a trace of its own, whose root is the command's span.
    last = by_command[commands[-1]["command_id"]]
    own = tracing.trace_id_of(last.headers)
    assert own is not None and own not in {f"{t:032x}" for t, _, _ in parents}
    (root,) = [s for s in _of_trace(spans, int(own, 16)) if s.parent is None]
    assert root.name == f"process {topics.commands}"


@pytest.mark.integration
async def test_the_clients_cancel_spans_the_round_trip(
    broker: Broker, sim: SimControl, accounts_file: Path, spans: InMemorySpanExporter
) -> None:
    """``CancelClient.cancel`` in an application's trace: its round-trip span, the send
    span under it whose context the command carries, the worker's spans under that."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    (order,) = sim.seed([{"account": "desk-2", "market": "UM", "symbol": "ETHUSDT"}])
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    provider_tracer = tracing._client_tracer()
    assert provider_tracer is not None
    async with (
        running_worker(settings),
        CancelClient.from_settings(settings) as client,
    ):
        with provider_tracer.start_as_current_span("risk check") as app_span:
            result = await client.cancel(
                "desk-2", "UM", symbol="ETHUSDT", strategy_id=order["strategy_id"], timeout=30
            )
    check_result_event(dict(result.raw))
    assert result.raw["type"] == "strategy.canceled"
    app = app_span.get_span_context()
    mine = [s for s in _of_trace(spans, app.trace_id) if s.context.span_id != app.span_id]
    round_trip = _tree(mine, app.span_id)
    assert round_trip.name == f"cancel {topics.commands}" and round_trip.kind == SpanKind.CLIENT
    assert dict(round_trip.attributes or {})[tracing.RESULT_TYPE] == "strategy.canceled"
    (send,) = _under(mine, round_trip)
    assert send.name == f"send {topics.commands}" and send.kind == SpanKind.PRODUCER
    (process,) = _under(mine, send)
    assert process.name == f"process {topics.commands}"
    assert len(_http(mine)) == 1


# -- worker processes -------------------------------------------------------------------------

BLOCK_OPENTELEMETRY = """\
import importlib.abc
import sys


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, _Blocked())
"""


def _console_spans(lines: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        if line.startswith('{"name"'):
            out.append(json.loads(line))
    return out


@pytest.mark.e2e
async def test_worker_processes_with_the_console_exporter_and_without_the_extra(
    broker: Broker, sim: SimControl, accounts_file: Path, tmp_path: Path
) -> None:
    """Two worker processes side by side, both with OTEL_TRACES_EXPORTER=console: one
    prints its spans (one JSON object a line), children of the command's traceparent; the
    other cannot import opentelemetry (as without the extra), says so once, and answers the
    same command all the same, without a traceparent on its result."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_OPENTELEMETRY)
    runs = []
    for traced in (True, False):
        topics = await fresh_topics(broker.bootstrap, partitions=1)
        (order,) = sim.seed([{"account": "desk-3", "market": "UM", "symbol": "BTCUSDT"}])
        settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
        env = {**worker_env(settings), "OTEL_TRACES_EXPORTER": "console"}
        env["OTEL_SERVICE_NAME"] = "cancel-worker-test"
        if not traced:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        runs.append((traced, topics, order, start_worker(env)))
    try:
        for _, _, _, process in runs:
            await asyncio.to_thread(process.wait_for_line, "partitions assigned", 60)
        sent = []
        for _, topics, order, _ in runs:
            trace_id, span_id, traceparent = _parent()
            value = orjson.dumps(command("desk-3", order))
            await _produce(
                broker.bootstrap,
                topics.commands,
                b"desk-3:BTCUSDT",
                value,
                [*signed(value), ("traceparent", traceparent)],
            )
            sent.append((trace_id, span_id))
        results = [await consume(broker.bootstrap, t.results, 1) for _, t, _, _ in runs]
    finally:
        codes = [await asyncio.to_thread(p.stop) for _, _, _, p in runs]
    assert codes == [0, 0]
    (traced_result,), (plain_result,) = results
    assert [e["type"] for e in events_of([traced_result, plain_result])] == [
        "strategy.canceled",
        "strategy.canceled",
    ]
    (trace_id, span_id), _ = sent
    assert tracing.trace_id_of(traced_result.headers) == f"{trace_id:032x}"
    assert _header(plain_result, "traceparent") is None

    traced_process, plain_process = runs[0][3], runs[1][3]
    printed = _console_spans(traced_process.lines)
    mine = [s for s in printed if s["context"]["trace_id"] == f"0x{trace_id:032x}"]
    (process_span,) = [s for s in mine if s["parent_id"] == f"0x{span_id:016x}"]
    assert process_span["name"].startswith("process ")
    assert process_span["resource"]["attributes"]["service.name"] == "cancel-worker-test"
    names = collections.Counter(s["name"] for s in mine)
    assert names["DELETE /papi/v1/um/conditional/order"] == 1, names
    assert names[tracing.VALIDATE] == 1 and names[tracing.GOVERNOR_WAIT] == 1
    assert not _console_spans(plain_process.lines)
    warnings = [line for line in plain_process.lines if "otel extra is not installed" in line]
    assert len(warnings) == 1, plain_process.output()


# -- the processor alone ----------------------------------------------------------------------


async def test_trace_headers_keep_a_result_within_its_bound(spans: InMemorySpanExporter) -> None:
    """A tracestate too long to copy is left off the result; the smallest bound leaves
    room for traceparent; a refused (unsigned) command's result carries the trace too;
    a malformed traceparent starts a new trace."""
    async with PapiClient("http://127.0.0.1:9", clock=now_ms) as client:  # never reached
        executor = CancelExecutor(client, {}, RetryPolicy(), now_ms)
        value = orjson.dumps(
            {
                "command_id": "c-1",
                "account": "nobody",
                "market": "UM",
                "symbol": "BTCUSDT",
                "strategy_id": 7,
                "issued_at": now_ms(),
            }
        )
        trace_id, _, traceparent = _parent()
        long_state = ("a=" + "x" * 600).encode()
        key = b"k" * 4096
        processor = CommandProcessor(
            executor,
            results_topic="res",
            deadletter_topic="dlq",
            max_command_bytes=65_536,
            deadletter_max_bytes=4096 + 4096,
            clock=now_ms,
        )
        headers = (("traceparent", traceparent), ("tracestate", long_state))
        (result,) = await processor(InRecord("cmd", 0, 5, key, value, headers))
        assert tracing.trace_id_of(result.headers) == f"{trace_id:032x}"
        assert [n for n, _ in result.headers] == ["type", "traceparent"]
        assert record_bytes(result) <= 4096 + 4096

        bad = (("traceparent", b"00-zz-11-01"),)
        (result,) = await processor(InRecord("cmd", 0, 6, b"k", value, bad))
        fresh = tracing.trace_id_of(result.headers)
        assert fresh is not None and fresh != f"{trace_id:032x}"

    from worker.producers import Producers  # noqa: PLC0415

    refusing = CommandProcessor(
        executor,
        results_topic="res",
        deadletter_topic="dlq",
        max_command_bytes=65_536,
        clock=now_ms,
        producers=Producers({}),
    )
    dead, result = await refusing(
        InRecord("cmd", 0, 7, b"k", value, (("traceparent", traceparent),))
    )
    assert orjson.loads(result.value)["reason"] == "unauthorized"
    assert tracing.trace_id_of(result.headers) == f"{trace_id:032x}"
    assert dict(dead.headers)["traceparent"] == traceparent  # the copy keeps the command's
    validate = [s for s in spans.get_finished_spans() if s.name == tracing.VALIDATE]
    assert dict(validate[-1].attributes or {})[tracing.ERROR_TYPE] == "unauthorized"


def test_exporters_asked_for_by_the_environment() -> None:
    assert tracing.wanted({}) == []
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ["console", "otlp"]
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}
    assert tracing.wanted(disabled) == []
    assert not tracing.configure({})  # nothing asked: off, nothing imported or set
    assert not tracing.ON


# -- helpers -------------------------------------------------------------------------------------


class _Producer:
    def __init__(self, bootstrap: str) -> None:
        from aiokafka import AIOKafkaProducer  # noqa: PLC0415

        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        await self._producer.send_and_wait(topic, value, key=key, headers=list(headers))


async def _produce(
    bootstrap: str, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
) -> None:
    producer = _Producer(bootstrap)
    await producer.start()
    try:
        await producer.send(topic, key, value, headers)
    finally:
        await producer.stop()


@pytest.mark.parametrize("mode", ["absent", "disabled"])
def test_untraced_processor_path_never_imports_opentelemetry(mode: str) -> None:
    """The processor path (tests/bench/tracing_cost.py's, a hundred cancels) without the
    extra, and with it but no OTEL_* variable: it runs, and opentelemetry is not imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.tracing_cost",
            "--child",
            mode,
            "--commands",
            "200",
            "--batch",
            "100",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    figure = json.loads(out.stdout.strip().splitlines()[-1])
    assert figure["mode"] == mode and figure["otel"] is False


@pytest.mark.e2e
def test_the_demo_prints_the_kill_switchs_trace() -> None:
    """``cancel-worker demo --trace``: the kill switch's trace as a tree, the client's round
    trip and send spans over the worker's, its HTTP attempts and the result's creation."""
    done = subprocess.run(
        cli_argv("demo", "--trace"), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    head, _, tree = out.partition("Trace ")
    assert "worker exit code       0 (clean)" in head, out
    lines = tree.splitlines()
    assert "of the kill switch (demo-kill-1)" in lines[0], out
    depth = {line.split()[0]: len(line) - len(line.lstrip()) for line in lines[1:] if line}
    assert depth["cancel"] < depth["send"] < depth["process"] < depth["create"], out
    assert any("DELETE /papi/v1/um/algo/allOpenOrders" in line for line in lines), out
    worker = [line for line in lines if "cancel-worker" in line]
    assert any(line.split()[0] == "GET" and "status_code=200" in line for line in worker), out
    assert any("demo-client" in line for line in lines), out
