"""Where a worker's time goes between a fetch and its request, one command at a time:

    python -m tests.bench.stages OUT.json run      (``cancel-worker run``, with marks)

``make bench BENCH_ARGS="--stages DIR"`` starts the workers this way. Each mark notes the
wall clock and the event loop thread's CPU time (``perf_counter_ns``, ``thread_time_ns``):

* ``fetched``   — aiokafka's fetch task has decoded a response with records;
* ``handed``    — the worker's ``ConsumerSource.fetch`` returns them to the pipeline;
* ``started``   — the pipeline's task for a record begins;
* ``executing`` — the command is decoded, checked and de-duplicated; the executor starts;
* ``admitting`` — the client asks the rate governor;
* ``signing``   — admitted: the request is built and signed, and handed to httpx;
* ``sending``   — httpx hands it to the transport;
* ``written``   — the transport writes it to the socket.

At exit the marks go to ``OUT.json``. :func:`summarize` reads them back: for each fetch
that handed over one record (a paced run's usual case) the time between successive marks,
and from the first to the last, as p50 / p90 / p99 of wall and of CPU time, in µs. Wall
close to CPU means the time was the worker's own work; wall above CPU means it waited (for
a core, or behind other tasks).
"""

from __future__ import annotations

import atexit
import itertools
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
from aiokafka.consumer import fetcher

from tests.bench import measure
from worker import executor
from worker.cli.main import main as worker_main
from worker.exchange import papi, transport
from worker.kafka import io as kafka_io
from worker.kafka import pipeline

STAGES = ("fetched", "handed", "started", "executing", "admitting", "signing", "sending", "written")

Mark = tuple[str, int, int, int]  # stage, wall ns, thread CPU ns, records handed


def install(marks: list[Mark]) -> None:
    """Wrap the worker's and aiokafka's methods at each stage so that they append a mark."""
    wall, cpu = time.perf_counter_ns, time.thread_time_ns

    def mark(stage: str, records: int = 0) -> None:
        marks.append((stage, wall(), cpu(), records))

    def on_entry(cls: Any, name: str, stage: str) -> None:
        inner = getattr(cls, name)

        async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            mark(stage)
            return await inner(self, *args, **kwargs)

        setattr(cls, name, wrapped)

    decode = fetcher.Fetcher._proc_fetch_request

    async def fetch_request(self: Any, *args: Any) -> Any:
        has_records = await decode(self, *args)
        if has_records:
            mark("fetched")
        return has_records

    fetcher.Fetcher._proc_fetch_request = fetch_request  # type: ignore[method-assign]

    hand = kafka_io.ConsumerSource.fetch

    async def fetch(self: kafka_io.ConsumerSource, timeout_ms: int) -> Any:
        records = await hand(self, timeout_ms)
        if records:
            mark("handed", len(records))
        return records

    kafka_io.ConsumerSource.fetch = fetch  # type: ignore[method-assign]
    on_entry(pipeline.Pipeline, "_process", "started")
    on_entry(executor.CancelExecutor, "execute", "executing")
    on_entry(papi.PapiClient, "signed", "admitting")
    on_entry(papi.PapiClient, "_exchange", "signing")
    on_entry(transport.FastTransport, "handle_async_request", "sending")
    write_head = transport._Connection.write_head

    def written(self: transport._Connection, data: bytes) -> None:
        mark("written")
        write_head(self, data)

    transport._Connection.write_head = written  # type: ignore[method-assign]


def summarize(paths: Iterable[Path]) -> dict[str, Any]:
    """Per pair of successive stages: how many commands, and p50/p90/p99 of wall and CPU µs."""
    steps: dict[str, list[tuple[float, float]]] = {}
    for path in paths:
        marks: list[list[Any]] = orjson.loads(path.read_bytes())
        for i, (stage, *_, handed) in enumerate(marks):
            if stage != "handed" or handed != 1:
                continue
            chain = _chain(marks, i)
            if chain is None:
                continue
            for before, after in (*itertools.pairwise(STAGES), (STAGES[0], STAGES[-1])):
                (_, w0, c0, _), (_, w1, c1, _) = chain[before], chain[after]
                step = steps.setdefault(f"{before} → {after}", [])
                step.append(((w1 - w0) / 1000, (c1 - c0) / 1000))
    return {name: _figures(values) for name, values in steps.items()}


def _chain(marks: list[list[Any]], handed_at: int) -> dict[str, list[Any]] | None:
    """The marks of one record's path, from the fetch before it to its request's write."""
    chain: dict[str, list[Any]] = {"handed": marks[handed_at]}
    for earlier in reversed(marks[max(0, handed_at - 5) : handed_at]):
        if earlier[0] == "fetched":
            chain["fetched"] = earlier
            break
    for later in marks[handed_at + 1 : handed_at + 20]:
        if later[0] == "handed":
            break
        chain.setdefault(later[0], later)
        if later[0] == "written":
            break
    return chain if all(stage in chain for stage in STAGES) else None


def _figures(values: list[tuple[float, float]]) -> dict[str, Any]:
    def three(xs: list[float]) -> dict[str, float]:
        ordered = sorted(xs)
        return {f"p{q}": round(measure.nearest_rank(ordered, q / 100)) for q in (50, 90, 99)}

    return {
        "commands": len(values),
        "wall_us": three([w for w, _ in values]),
        "cpu_us": three([c for _, c in values]),
    }


def render(stages: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'stage':<24}  {'wall µs p50/p90/p99':>21}  {'CPU µs p50/p90/p99':>20}"]
    for name, f in stages.items():
        w, c = f["wall_us"], f["cpu_us"]
        lines.append(
            f"{name:<24}  {w['p50']:>5,} / {w['p90']:>5,} / {w['p99']:>5,}"
            f"  {c['p50']:>5,} / {c['p90']:>5,} / {c['p99']:>5,}"
        )
    return "\n".join(lines)


def main(argv: list[str], run_worker: Callable[[], None]) -> None:
    out = Path(argv[0])
    marks: list[Mark] = []
    install(marks)
    atexit.register(lambda: out.write_bytes(orjson.dumps(marks)))
    sys.argv = ["cancel-worker", *argv[1:]]
    run_worker()


if __name__ == "__main__":
    main(sys.argv[1:], worker_main)
