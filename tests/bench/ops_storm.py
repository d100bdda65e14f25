"""``python -m tests.bench.ops_storm [--seconds S] [--rate R]``: what a scrape storm costs the
event loop the operations endpoint shares with the cancels, for the endpoint as it is
(:class:`worker.ops.OpsServer`: uvicorn, cached body) and as it was (the hand-written server
of ``worker/ops.py`` at ``LEGACY_COMMIT``, rendering every scrape in the loop), side by side
with no storm at all.

One process: the server in its event loop, a registry of about the size of a busy worker's
(``--series`` histogram series: 70 make ~100 KB of text), and a probe task that sleeps 1 ms
at a time and records how late it woke up: the delay a cancel in hand would see. The storm is
:mod:`tests.bench.scrape_storm` in a process of its own, ``--rate`` scrapes a second, each
on a new connection. Printed per case: the loop's lateness p50/p99/max (ms) and the scrapes'
own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
from prometheus_client import REGISTRY, Histogram, generate_latest

from worker import ops
from worker.tools.devstack import REPO, free_port

LEGACY_COMMIT = "0eab2ea~1"  # the last worker/ops.py with the hand-written server


def legacy_ops() -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{LEGACY_COMMIT}:worker/ops.py"],  # noqa: S607
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "legacy_ops.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("legacy_ops", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["legacy_ops"] = module
    spec.loader.exec_module(module)
    return module


class Probes:
    def liveness(self) -> list[ops.Check]:
        return [ops.Check("event_loop", True, "answering")]

    def readiness(self) -> list[ops.Check]:
        return [ops.Check("kafka", True, "reachable")]

    def refresh_metrics(self) -> None:
        pass


def fill_registry(series: int) -> None:
    h = Histogram("bench_ops_storm_seconds", "filler", ["route", "status"])
    for i in range(series):
        h.labels(f"route_{i % 40}", str(200 + i // 40)).observe(0.01)


async def lateness(seconds: float) -> list[float]:
    out: list[float] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        out.append((time.perf_counter() - t0) * 1000 - 1.0)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def case(name: str, server: Any, rate: float, seconds: float) -> dict[str, Any]:
    storm = None
    if server is not None:
        await server.start()
        url = f"http://127.0.0.1:{server.port}/metrics"
        storm = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bench.scrape_storm",
            url,
            str(rate),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        assert storm.stdout is not None
        await storm.stdout.readline()  # started
    late = await lateness(seconds)
    scrapes: dict[str, Any] = {}
    if storm is not None:
        storm.terminate()
        out, _ = await storm.communicate()
        scrapes = orjson.loads(out.strip().splitlines()[-1])
        await server.close()
    return {
        "case": name,
        "loop_late_ms": {
            "p50": round(statistics.median(late), 3),
            "p99": round(pct(late, 0.99), 3),
            "max": round(max(late), 3),
        },
        "scrapes": scrapes,
    }


async def main(args: argparse.Namespace) -> None:
    fill_registry(args.series)
    body = generate_latest(REGISTRY)
    t0 = time.perf_counter()
    for _ in range(20):
        generate_latest(REGISTRY)
    render_ms = (time.perf_counter() - t0) / 20 * 1000
    print(f"registry: {len(body):,} bytes, one render {render_ms:.1f} ms", flush=True)
    legacy = legacy_ops()
    for rnd in range(args.rounds):
        for name, make in (
            ("no storm", lambda: None),
            ("hand-written server", lambda: legacy.OpsServer("127.0.0.1", free_port(), Probes())),
            ("uvicorn, cached", lambda: ops.OpsServer("127.0.0.1", free_port(), Probes())),
        ):
            result = await case(name, make(), args.rate, args.seconds)
            result["round"] = rnd + 1
            print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--series", type=int, default=70)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
