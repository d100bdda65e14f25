"""What tracing costs the processor path: ``python -m tests.bench.tracing_cost``.

One command at a time through the real :class:`~worker.processor.CommandProcessor`,
:class:`~worker.executor.CancelExecutor` and :class:`~worker.exchange.papi.PapiClient` (HMAC
signing, the answer from an in-memory transport: an algo cancel's ``{"complete": true}``),
in three modes, each in a fresh interpreter:

* ``absent``: ``opentelemetry`` cannot be imported (as without the ``otel`` extra);
* ``disabled``: the extra installed, no ``OTEL_*`` variable (the default);
* ``enabled``: spans recorded by the SDK, with a batch processor and an exporter that
  drops them (what the worker pays for its own spans, before any export).

Modes alternate in ``--rounds`` rounds, so that a change in the machine's load meets them
all; each round's figure is the median CPU time per command (the event loop thread's,
in µs) of its batches: CPU time, since the machine's other work moves wall time more
than the difference measured. Printed: the median
over rounds per mode, and the ratios to ``absent``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODES = ("absent", "disabled", "enabled")


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")


def _enable_dropping() -> None:
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from worker import tracing  # noqa: PLC0415

    class Dropping(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    tracing.enable(provider)


async def _measure(commands: int, batch: int) -> list[float]:
    import httpx  # noqa: PLC0415
    import orjson  # noqa: PLC0415

    from tests.support import write_accounts  # noqa: PLC0415
    from worker.core.timeutil import now_ms  # noqa: PLC0415
    from worker.exchange.accounts import load_accounts  # noqa: PLC0415
    from worker.exchange.papi import PapiClient  # noqa: PLC0415
    from worker.executor import CancelExecutor, RetryPolicy  # noqa: PLC0415
    from worker.kafka.pipeline import InRecord  # noqa: PLC0415
    from worker.processor import CommandProcessor  # noqa: PLC0415

    answer = orjson.dumps({"complete": True})

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    with tempfile.TemporaryDirectory() as tmp:
        accounts = load_accounts(write_accounts(Path(tmp)))
    async with PapiClient(
        "http://exchange.invalid", clock=now_ms, transport=httpx.MockTransport(handler)
    ) as client:
        executor = CancelExecutor(client, {"desk-0": accounts["desk-0"]}, RetryPolicy(), now_ms)
        processor = CommandProcessor(
            executor,
            results_topic="res",
            deadletter_topic="dlq",
            max_command_bytes=65_536,
            clock=now_ms,
            group="bench",
        )
        parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        figures: list[float] = []
        for n in range(commands // batch):
            records = [
                InRecord(
                    "cmd",
                    0,
                    n * batch + i,
                    b"desk-0:ETHUSDT",
                    orjson.dumps(
                        {
                            "command_id": f"c-{n}-{i}",
                            "account": "desk-0",
                            "market": "UM",
                            "symbol": "ETHUSDT",
                            "algo_id": 1000 + i,
                            "issued_at": now_ms(),
                        }
                    ),
                    (("traceparent", parent),),
                )
                for i in range(batch)
            ]
            started = time.thread_time()
            for record in records:
                (result,) = await processor(record)
                if b"strategy.canceled" not in result.value:
                    raise AssertionError(result.value)
            figures.append((time.thread_time() - started) / batch * 1e6)
        return figures[1:]  # the first batch warms up


def child(mode: str, commands: int, batch: int) -> None:
    if mode == "absent":
        sys.meta_path.insert(0, _Blocked())
    elif mode == "enabled":
        _enable_dropping()
    figures = asyncio.run(_measure(commands, batch))
    imported = "opentelemetry" in sys.modules
    print(json.dumps({"mode": mode, "us": statistics.median(figures), "otel": imported}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--commands", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.commands, args.batch)
        return
    rounds: dict[str, list[float]] = {mode: [] for mode in MODES}
    imported: dict[str, bool] = {}
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run(
                [
                    *(sys.executable, "-m", "tests.bench.tracing_cost", "--child", mode),
                    *("--commands", str(args.commands), "--batch", str(args.batch)),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            figure = json.loads(out.stdout.strip().splitlines()[-1])
            rounds[mode].append(figure["us"])
            imported[mode] = figure["otel"]
    base = statistics.median(rounds["absent"])
    print(f"processor path, CPU µs per command (median of {args.rounds} rounds)")
    for mode in MODES:
        value = statistics.median(rounds[mode])
        spread = f"{min(rounds[mode]):.1f}-{max(rounds[mode]):.1f}"
        print(
            f"  {mode:<9} {value:7.1f}  (rounds {spread})  ratio to absent {value / base:.3f}"
            f"  opentelemetry imported: {imported[mode]}"
        )


if __name__ == "__main__":
    main()
