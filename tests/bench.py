"""``make bench``: throughput and latency of the worker on the real broker and simulator.

Starts its own broker and simulator process, runs the worker in this process, sends
``--commands`` cancel commands over ``--keys`` keys and reports: wall time, commands per
second, and per-command latency from the worker's receipt to its durable result, and from
the producer's send to the result's arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from tests.support import (
    SimControl,
    command,
    fresh_topics,
    produce,
    running_worker,
    worker_settings,
    write_accounts,
)
from worker.devstack import start_broker, start_sim


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(commands: int, keys: int, in_flight: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="cancel-worker-bench-"))
    print("starting broker and simulator ...", flush=True)
    broker = start_broker(work / "kafka")
    accounts = write_accounts(work / "secrets")
    sim_proc, url = start_sim(accounts)
    sim = SimControl(url)
    try:
        topics = await fresh_topics(broker.bootstrap, partitions=6)
        specs = [
            {
                "account": f"desk-{i % 5}",
                "market": "UM",
                "symbol": ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")[i % keys % 4],
            }
            for i in range(commands)
        ]
        orders = sim.seed(specs)
        batch = []
        for i, (spec, order) in enumerate(zip(specs, orders, strict=True)):
            cmd = command(spec["account"], order, command_id=f"b{i:06d}")
            batch.append((f"key-{i % keys}".encode(), orjson.dumps(cmd)))
        settings = worker_settings(broker.bootstrap, topics, url, accounts, max_in_flight=in_flight)
        consumer = AIOKafkaConsumer(
            topics.results, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        async with running_worker(settings) as worker:
            print(
                f"sending {commands} commands over {keys} keys (max in flight {in_flight})",
                flush=True,
            )
            sent_at = time.time() * 1000
            started = time.monotonic()
            await produce(broker.bootstrap, topics.commands, batch)
            worker_ms: list[float] = []
            e2e_ms: list[float] = []
            while len(worker_ms) < commands:
                got = await consumer.getmany(timeout_ms=500)
                for records in got.values():
                    for r in records:
                        event = orjson.loads(r.value)
                        worker_ms.append(event["completed_at"] - event["received_at"])
                        e2e_ms.append(r.timestamp - sent_at)
                print(f"\r  results {len(worker_ms)}/{commands}", end="", flush=True)
                if time.monotonic() - started > 600:
                    raise RuntimeError("bench did not finish in 10 minutes")
            wall = time.monotonic() - started
            governor = worker.governor.stats
        await consumer.stop()
        print()
        print(f"wall time                 {wall:.2f} s")
        print(f"throughput                {commands / wall:.0f} commands/s")
        print(
            f"worker latency ms         p50 {statistics.median(worker_ms):.1f}  "
            f"p99 {pct(worker_ms, 0.99):.1f}  max {max(worker_ms):.1f}"
        )
        print(
            f"send-to-result ms (batch) p50 {statistics.median(e2e_ms):.0f}  max {max(e2e_ms):.0f}"
        )
        print(
            f"rate governor waits       {governor.waits or 'none'} "
            f"({governor.waited_s:.1f} s in all)"
        )
    finally:
        sim.close()
        sim_proc.stop()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    asyncio.run(bench(args.commands, args.keys, args.in_flight))


if __name__ == "__main__":
    main()
