"""Fair budgets through the whole worker: one desk's flood against another desk's cancels.

desk-0 (desk "a") floods cancels of order ids the exchange does not know (each a DELETE
answered "unknown order", then status queries: 3 weight), keyed by account and symbol as
producers key them, while desk-1 (desk "b") sends real cancels and one kill switch, paced.
The IP weight limit is small (the simulator's and the worker's alike), so that the flood
alone would spend every window. One round is desk-1's run alone, then the same run under the
flood, each on fresh topics with a fresh worker (in this process, so that its governor's
figures can be read).

Figures per run: desk-1's latencies, from its command record's timestamp to the exchange's
answer to the request that canceled it (``cancel_ms``) and to its result record's timestamp
(``result_ms``: when the worker wrote it, into its open transaction or into the next flush's
if one was under way) and to the moment a read_committed reader in this process read it
(``seen_ms``: the transaction committed, as a desk's consumer sees it); how long the
governor held each desk's requests; how many of desk-0's commands were answered when
desk-1's last result was visible.

``.venv/bin/python -m tests.bench.fairness`` runs ``--rounds`` rounds (400 desk-1 cancels
each, on a broker and simulator of its own) and prints desk-1's p50/p99 with and without
the flood and their ratio per round; tests/test_fairness.py runs one round of 50 on the
session's broker and checks the behaviour (who was held, and that desk-1's results did not
wait for the flood).

The flood's records are all buffered (``MAX_BUFFERED_PER_PARTITION`` above the flood): a
partition whose buffer is full is paused at the consumer, which holds every record behind
it on that partition, whichever account it names (docs/guarantees.md says so among
its limits).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from tests.support import (
    SimControl,
    Topics,
    check_result_event,
    command,
    fresh_topics,
    produce,
    running_worker,
    signed,
    topic_consumer,
    worker_settings,
    write_accounts,
)
from worker.tools.devstack import start_broker, start_sim
from worker.tools.sim.app import UM_SYMBOLS

DESK_A, DESK_B = "desk-0", "desk-1"
FLOOD = 2_000
KILL_ORDERS = 5
LIMIT = 150  # the IP's weight per window, at the simulator and in the worker
WINDOW_MS = 1_000
PACE_S = 0.1  # between two of desk-1's commands
SYMBOLS = sorted(UM_SYMBOLS)
KILL_SYMBOL = SYMBOLS[-1]  # desk-1's single cancels are on the other symbols
UNKNOWN_ID = 9_000_000_000  # far above any id the simulator gives


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.5 * len(ordered)) - 1)]


@dataclass
class Run:
    """One of desk-1's runs, with or without the flood."""

    flood: bool
    cancel_ms: list[float]  # command record → the exchange's answer that canceled it
    result_ms: list[float]  # command record → its result record
    seen_ms: list[float]  # command record → its result read (committed)
    held: dict[str, int]  # the governor's holds per account
    held_s: dict[str, float]  # and their time
    waits: dict[str, int]  # the governor's holds per reason
    desk_a_requests: int
    desk_a_answered: int  # desk-0's results visible when desk-1's last one was
    weight_429: int
    banned: int
    busiest_window: int
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("events",)}
        for name in ("cancel_ms", "result_ms", "seen_ms"):
            values = out.pop(name)
            out[name] = {"p50": p50(values), "p99": p99(values), "max": max(values)}
        return out


def _desk_b_commands(sim: SimControl, real: int) -> tuple[list[dict[str, Any]], set[int]]:
    """desk-1's commands (the kill switch among the single cancels) and its orders' ids."""
    singles = sim.seed(
        [
            {"account": DESK_B, "market": "UM", "symbol": SYMBOLS[i % (len(SYMBOLS) - 1)]}
            for i in range(real)
        ]
    )
    swept = sim.seed([{"account": DESK_B, "market": "UM", "symbol": KILL_SYMBOL}] * KILL_ORDERS)
    commands = [command(DESK_B, o) for o in singles]
    kill = {
        "command_id": f"fair-kill-{time.time_ns()}",
        "account": DESK_B,
        "market": "UM",
        "symbol": KILL_SYMBOL,
        "scope": "symbol",
        "issued_at": 0,
    }
    commands.insert(real // 2, kill)
    return commands, {int(o["strategy_id"]) for o in singles + swept}


def _flood() -> list[tuple[bytes, bytes]]:
    records = []
    for i in range(FLOOD):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        cmd = command(
            DESK_A,
            {
                "kind": "conditional",
                "market": "UM",
                "symbol": symbol,
                "strategy_id": UNKNOWN_ID + i,
            },
        )
        records.append((f"{DESK_A}:{symbol}".encode(), orjson.dumps(cmd)))
    return records


async def _send_paced(bootstrap: str, topic: str, commands: list[dict[str, Any]]) -> dict[str, int]:
    """Publish one command every PACE_S; return each command id's record timestamp (ms)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    sent: dict[str, int] = {}
    try:
        for cmd in commands:
            cmd["issued_at"] = time.time_ns() // 1_000_000
            value = orjson.dumps(cmd)
            key = f"{cmd['account']}:{cmd.get('symbol', '')}".encode()
            metadata = await (await producer.send(topic, value, key=key, headers=signed(value)))
            sent[cmd["command_id"]] = metadata.timestamp
            await asyncio.sleep(PACE_S)
    finally:
        await producer.stop()
    return sent


class _Results:
    """Reads the results topic in the background: each desk-1 result with its record's
    timestamp, and how many of desk-0's results were visible when the last desk-1 one came."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = topic_consumer(bootstrap, topic)
        self.wanted: set[str] = set()
        self.found: dict[str, tuple[dict[str, Any], int, int]] = {}
        self.desk_a = 0
        self.desk_a_when_done: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()

    async def __aenter__(self) -> _Results:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    event = orjson.loads(record.value)
                    check_result_event(event)
                    if event["account"] == DESK_A:
                        self.desk_a += 1
                    elif event["command_id"] in self.wanted:
                        seen = time.time_ns() // 1_000_000
                        self.found[event["command_id"]] = (event, record.timestamp, seen)
            if self.desk_a_when_done is None and self.done:
                self.desk_a_when_done = self.desk_a
                self._done.set()

    @property
    def done(self) -> bool:
        return bool(self.wanted) and self.wanted <= set(self.found)

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout_s)


def _cancel_times(requests: list[dict[str, Any]], desk_b: list[dict[str, Any]]) -> dict[str, int]:
    """When the exchange answered the request that canceled each of desk-1's commands (ms):
    the single cancel's DELETE of its order, the kill switch's first cancel-all."""
    by_order: dict[int, int] = {}
    kill_at: int | None = None
    for r in requests:
        if r["account"] != DESK_B or r["method"] != "DELETE" or r["status"] != 200:
            continue
        if r["path"].endswith("allOpenOrders"):
            kill_at = r["at"] if kill_at is None else min(kill_at, r["at"])
        elif "strategyId" in (r["params"] or {}):
            by_order.setdefault(int(r["params"]["strategyId"]), r["at"])
    out: dict[str, int] = {}
    for cmd in desk_b:
        at = kill_at if cmd.get("scope") else by_order.get(cmd.get("strategy_id", -1))
        if at is not None:
            out[cmd["command_id"]] = at
    return out


async def _requests(sim: SimControl, since: int) -> list[dict[str, Any]]:
    """The simulator's request log, read off the event loop: the worker runs in this loop,
    and a blocking read of a long log would count as its latency."""
    return await asyncio.to_thread(sim.requests, since)


async def measure(
    bootstrap: str, sim: SimControl, accounts_file: Path, *, flood: bool, real: int
) -> Run:
    """desk-1's run of ``real`` cancels and one kill switch, with or without desk-0's flood.
    The caller sets the simulator's weight limit (:data:`LIMIT` per :data:`WINDOW_MS`)."""
    topics: Topics = await fresh_topics(bootstrap, partitions=4)
    desk_b, orders = _desk_b_commands(sim, real)
    settings = worker_settings(
        bootstrap,
        topics,
        sim.url,
        accounts_file,
        rate_weight_limit=LIMIT,
        rate_weight_window_ms=WINDOW_MS,
        rate_guard_ms=20,
        # Reconciliation uncapped: at the default cap the flood throttles itself (its status
        # queries wait for desk-0's next window) and never fills a window; uncapped, the
        # fair shares alone must keep desk-1's latency.
        rate_reconcile_weight_share=1.0,
        max_buffered_per_partition=FLOOD + real + 10,
        shutdown_grace_s=1.0,
    )
    since = sim.last_seq()
    if flood:
        await produce(bootstrap, topics.commands, _flood())
    async with _Results(bootstrap, topics.results) as results, running_worker(settings) as worker:
        if flood:  # the flood is under way: desk-0's requests are reaching the exchange
            for _ in range(200):
                seen = await _requests(sim, since)
                if sum(r["account"] == DESK_A for r in seen) >= LIMIT:
                    break
                await asyncio.sleep(0.05)
        # One unmeasured command first, in both runs: the worker's first fetch and the
        # exchange clock's first reading are not what is compared.
        warm = command(DESK_B, sim.seed([{"account": DESK_B, "market": "UM"}])[0])
        await _send_paced(bootstrap, topics.commands, [warm])
        for _ in range(300):
            if _cancel_times(await _requests(sim, since), [warm]):
                break
            await asyncio.sleep(0.05)
        results.wanted = {c["command_id"] for c in desk_b}
        sent = await _send_paced(bootstrap, topics.commands, desk_b)
        await results.wait(timeout_s=60)
        stats = worker.governor.stats
        held, held_s = dict(stats.held_by_account), dict(stats.held_s_by_account)
        waits = dict(stats.waits)
        desk_a_answered = (
            results.desk_a if results.desk_a_when_done is None else results.desk_a_when_done
        )
        found = dict(results.found)
    requests = await _requests(sim, since)
    canceled = _cancel_times(requests, desk_b)
    assert set(canceled) == set(sent), f"{len(canceled)} of {len(sent)} desk-1 commands canceled"
    assert set(found) == set(sent), f"{len(found)} of {len(sent)} desk-1 results visible"
    book = sim.orders()
    assert {book[i]["status"] for i in orders} == {"CANCELED"}
    return Run(
        flood=flood,
        cancel_ms=[float(canceled[c] - sent[c]) for c in sent],
        result_ms=[float(found[c][1] - sent[c]) for c in sent],
        seen_ms=[float(found[c][2] - sent[c]) for c in sent],
        held=held,
        held_s=held_s,
        waits=waits,
        desk_a_requests=sum(r["account"] == DESK_A for r in requests),
        desk_a_answered=desk_a_answered,
        weight_429=sum(r["status"] == 429 for r in requests),
        banned=sum(r["status"] == 418 for r in requests),
        busiest_window=max(
            collections.Counter(r["at"] // WINDOW_MS for r in requests).values(), default=0
        ),
        events=[found[c][0] for c in sent],
    )


async def _rounds(bootstrap: str, sim: SimControl, accounts_file: Path, args: Any) -> list[Any]:
    sim.configure(weight_limit=LIMIT, weight_window_ms=WINDOW_MS)
    out = []
    for n in range(args.rounds):
        pair = {}
        for flood in (False, True):
            print(
                f"fairness bench: round {n + 1}/{args.rounds}, "
                f"{'with' if flood else 'without'} the flood ...",
                file=sys.stderr,
                flush=True,
            )
            pair[flood] = await measure(bootstrap, sim, accounts_file, flood=flood, real=args.real)
        out.append(pair)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.fairness")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--real", type=int, default=400, help="desk-1's cancels per run")
    parser.add_argument("--out", type=Path, default=Path(".bench/fairness.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cancel-worker-fairness-"))
    broker = sim_proc = None
    try:
        print("fairness bench: starting broker and simulator ...", file=sys.stderr, flush=True)
        broker = start_broker(work / "kafka")
        accounts_file = write_accounts(work / "secrets")
        sim_proc, sim_url = start_sim(accounts_file)
        sim = SimControl(sim_url)
        rounds = asyncio.run(_rounds(broker.bootstrap, sim, accounts_file, args))
        sim.close()
    finally:
        if sim_proc is not None:
            sim_proc.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    print(
        "| round | desk-1 to the exchange p50 / p99 ms, alone | with the flood | p99 ratio "
        "| desk-1 result p50 / p99 ms, alone | with the flood | p99 ratio "
        "| desk-1 result read p50 / p99 ms, alone | with the flood | p99 ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, pair in enumerate(rounds, 1):
        alone, flooded = pair[False], pair[True]
        row = {"alone": alone.summary(), "flood": flooded.summary()}
        for name in ("cancel_ms", "result_ms", "seen_ms"):
            row[f"{name}_p99_ratio"] = p99(getattr(flooded, name)) / p99(getattr(alone, name))
        rows.append(row)
        print(
            f"| {n} | {p50(alone.cancel_ms):.0f} / {p99(alone.cancel_ms):.0f} "
            f"| {p50(flooded.cancel_ms):.0f} / {p99(flooded.cancel_ms):.0f} "
            f"| {row['cancel_ms_p99_ratio']:.2f} "
            f"| {p50(alone.result_ms):.0f} / {p99(alone.result_ms):.0f} "
            f"| {p50(flooded.result_ms):.0f} / {p99(flooded.result_ms):.0f} "
            f"| {row['result_ms_p99_ratio']:.2f} "
            f"| {p50(alone.seen_ms):.0f} / {p99(alone.seen_ms):.0f} "
            f"| {p50(flooded.seen_ms):.0f} / {p99(flooded.seen_ms):.0f} "
            f"| {row['seen_ms_p99_ratio']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps({"rounds": rows}, option=orjson.OPT_INDENT_2))
    print(f"figures in {args.out}")


if __name__ == "__main__":
    main()
