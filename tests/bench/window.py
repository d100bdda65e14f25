"""The duplicate window under a flood: refused commands and distinct valid ones through one
worker process, its peak memory against the documented bound, whether it kept answering, and
how long a restart takes to rebuild the window from the results topic.

``.venv/bin/python -m tests.bench.window`` runs the full size docs/duplicate-window.md
reports (1,000,000 refused, 300,000 valid) on a broker and simulator of its own;
tests/test_dedup.py runs the same :func:`measure` scaled down on the session's.

The stream interleaves, for every 13 records, 10 refused and 3 valid:

* refused, in turn: an invalid record claiming a command id (``{"command_id": ...}``,
  signed), a signed command naming an account the worker does not know
  (``unknown_account``), and a well-formed command without a signature (``unauthorized``).
  None costs a request; none may be remembered.
* valid: signed cancels of algo ids the exchange does not know, for the five test accounts:
  each is a DELETE answered -2011 and a status query, then ``not_found``, remembered.

Every command id is 64 characters (the window's worst case). The producer keeps at most
``AHEAD`` records ahead of the results, so commands are fresh when taken up
(``MAX_COMMAND_AGE_MS``). Then the worker is stopped, a new one started on the same topics,
and its log's "duplicate window rebuilt" line gives the rebuild's time and entry count; a
repeat of the first valid command must then be a duplicate, and the same id with other
content an ``id_conflict``, both without a request.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from tests.bench.measure import peak_rss_mb
from tests.support import (
    HMAC_ACCOUNTS,
    SimControl,
    Topics,
    cancel_requests,
    fresh_topics,
    signed,
    topic_consumer,
    worker_env,
    worker_settings,
    write_accounts,
)
from worker.core.timeutil import now_ms
from worker.kafka.dedup import ENTRY_BYTES_MAX, WORKER_BASE_BYTES
from worker.settings import Settings
from worker.tools.devstack import Process, cli_argv, start_broker, start_sim

UNLIMITED = 1_000_000_000
AHEAD = 20_000
ACCOUNTS = sorted(HMAC_ACCOUNTS)[:5]
MIB = 1024 * 1024
_REBUILT = re.compile(
    r"duplicate window rebuilt: (\d+) result\(s\) .* in ([0-9.]+)s; (\d+) command id\(s\)"
)


@dataclasses.dataclass
class Figures:
    refused: int
    valid: int
    results: int
    by_outcome: dict[str, int]
    wall_s: float
    results_per_s: float
    longest_silence_s: float
    """The longest time without any result while commands were waiting for one."""
    peak_rss_mib: float
    bound_mib: float
    """WORKER_BASE_BYTES + ENTRY_BYTES_MAX x the valid commands (the entries remembered)."""
    rebuild_results: int
    rebuild_s: float
    rebuild_entries: int
    rebuild_peak_rss_mib: float
    repeat_type: str
    conflict_reason: str
    requests_after_restart: int

    def table(self) -> str:
        rows = [
            ("commands", f"{self.refused:,} refused + {self.valid:,} valid"),
            ("results", f"{self.results:,} ({self.results_per_s:,.0f}/s, {self.wall_s:.0f} s)"),
            ("outcomes", ", ".join(f"{k} {v:,}" for k, v in sorted(self.by_outcome.items()))),
            ("longest silence while waiting", f"{self.longest_silence_s:.2f} s"),
            ("peak RSS (VmHWM)", f"{self.peak_rss_mib:.0f} MiB"),
            ("documented bound", f"{self.bound_mib:.0f} MiB"),
            (
                "restart: window rebuilt",
                f"{self.rebuild_entries:,} entries from {self.rebuild_results:,} results "
                f"in {self.rebuild_s:.1f} s",
            ),
            ("restart: peak RSS", f"{self.rebuild_peak_rss_mib:.0f} MiB"),
            (
                "after restart",
                f"repeat {self.repeat_type}, other content {self.conflict_reason}, "
                f"{self.requests_after_restart} request(s)",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _id(prefix: str, i: int) -> str:
    return f"{prefix}-{i:0{63 - len(prefix)}d}"  # 64 characters


def _valid(i: int, issued_at: int) -> dict[str, Any]:
    return {
        "command_id": _id("v", i),
        "account": ACCOUNTS[i % len(ACCOUNTS)],
        "market": "UM",
        "symbol": "BTCUSDT",
        "algo_id": 9_000_000_000 + i,  # unknown to the exchange
        "issued_at": issued_at,
    }


def _record(n: int, issued_at: int) -> tuple[bytes, bytes, list[tuple[str, bytes]] | None]:
    """Record ``n`` of the stream: (key, value, headers)."""
    block, slot = divmod(n, 13)
    if slot < 3:
        command = _valid(block * 3 + slot, issued_at)
        value = orjson.dumps(command)
        return f"{command['account']}:BTCUSDT".encode(), value, signed(value)
    r = block * 10 + slot - 3
    kind = r % 3
    if kind == 0:
        value = orjson.dumps({"command_id": _id("claim", r)})
        return b"hostile", value, signed(value)
    command = _valid(r, issued_at) | {"command_id": _id("r", r)}
    if kind == 1:
        command["account"] = f"no-such-desk-{r % 50}"
        value = orjson.dumps(command)
        return b"hostile", value, signed(value)
    return b"hostile", orjson.dumps(command), None  # unsigned


def counts(total: int) -> tuple[int, int]:
    valid = sum(min(3, max(0, total - b * 13)) for b in range((total + 12) // 13))
    return total - valid, valid


async def _start_worker(settings: Settings) -> Process:
    proc = Process("worker", cli_argv("run"), env=worker_env(settings))
    deadline = time.monotonic() + 600
    while not any("taken over, processing" in line for line in proc.lines):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(proc.lines[-40:])
            proc.stop(timeout_s=10)
            raise RuntimeError(f"the worker did not start; output:\n{tail}")
        await asyncio.sleep(0.05)
    return proc


async def measure(
    bootstrap: str,
    sim: SimControl,
    accounts_file: Path,
    total: int,
    *,
    progress: bool = False,
) -> Figures:
    """Run the stream of ``total`` records through one worker, restart it, and measure."""
    sim.configure(weight_limit=UNLIMITED, order_limit=UNLIMITED)
    topics: Topics = await fresh_topics(bootstrap, partitions=3)
    settings = worker_settings(
        bootstrap,
        topics,
        sim.url,
        accounts_file,
        rate_weight_limit=UNLIMITED,
        rate_order_limit=UNLIMITED,
    )
    refused, valid = counts(total)
    worker = await _start_worker(settings)
    try:
        started = time.monotonic()
        stream = await _run_stream(bootstrap, topics, total, worker, progress)
        wall_s = time.monotonic() - started
        peak = peak_rss_mb(worker.proc.pid)
    finally:
        worker.stop(timeout_s=60)
    again = await _start_worker(settings)
    try:
        rebuilt = next(m for line in again.lines if (m := _REBUILT.search(line)))
        since = sim.last_seq()
        first = _valid(0, now_ms())
        other = first | {"algo_id": 1}
        checks = await _produce_and_wait(bootstrap, topics, [first, other])
        rebuild_peak = peak_rss_mb(again.proc.pid)
    finally:
        again.stop(timeout_s=60)
    return Figures(
        refused=refused,
        valid=valid,
        results=stream["results"],
        by_outcome=stream["by_outcome"],
        wall_s=wall_s,
        results_per_s=stream["results"] / wall_s,
        longest_silence_s=stream["silence"],
        peak_rss_mib=peak,
        bound_mib=(WORKER_BASE_BYTES + ENTRY_BYTES_MAX * valid) / MIB,
        rebuild_results=int(rebuilt.group(1)),
        rebuild_s=float(rebuilt.group(2)),
        rebuild_entries=int(rebuilt.group(3)),
        rebuild_peak_rss_mib=rebuild_peak,
        repeat_type=checks[0].get("type", "?"),
        conflict_reason=str(checks[1].get("reason")),
        requests_after_restart=len(cancel_requests(sim, since)),
    )


async def _run_stream(
    bootstrap: str, topics: Topics, total: int, worker: Process, progress: bool
) -> dict[str, Any]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )
    consumer = topic_consumer(bootstrap, topics.results)
    await producer.start()
    await consumer.start()
    by_outcome: dict[str, int] = {}
    results = 0
    silence = 0.0
    try:
        sent = 0
        last_result = time.monotonic()
        last_said = last_result
        while results < total:
            if len(worker.lines) > 10_000:  # its log, kept short (a line per refusal)
                del worker.lines[:-1_000]
            if worker.proc.poll() is not None:
                tail = "\n".join(worker.lines[-40:])
                raise RuntimeError(f"the worker stopped; output:\n{tail}")
            if sent < total and sent - results < AHEAD:
                issued_at = now_ms()
                batch_end = min(total, sent + 2_000)
                for n in range(sent, batch_end):
                    key, value, headers = _record(n, issued_at)
                    await producer.send(topics.commands, value, key=key, headers=headers)
                sent = batch_end
            batches = await consumer.getmany(timeout_ms=50, max_records=5_000)
            now = time.monotonic()
            got = sum(len(r) for r in batches.values())
            if got:
                silence = max(silence, now - last_result)
                last_result = now
            elif results >= sent:
                last_result = now  # nothing is waiting: not a silence
            for records in batches.values():
                for record in records:
                    event = orjson.loads(record.value)
                    outcome = f"{event['type']}/{event.get('reason') or '-'}"
                    by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
            results += got
            if progress and now - last_said >= 10:
                last_said = now
                print(
                    f"  {results:,}/{total:,} results, worker RSS peak "
                    f"{peak_rss_mb(worker.proc.pid):.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await producer.stop()
        await consumer.stop()
    return {"results": results, "by_outcome": by_outcome, "silence": silence}


async def _produce_and_wait(
    bootstrap: str, topics: Topics, commands: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Publish ``commands`` (signed) and return their results, in the commands' order."""
    consumer = topic_consumer(bootstrap, topics.results)
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=50)
        parts = sorted(consumer.assignment())
        for tp, end in (await consumer.end_offsets(parts)).items():
            consumer.seek(tp, end)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for command in commands:
                value = orjson.dumps(command)
                key = f"{command['account']}:BTCUSDT".encode()
                await producer.send_and_wait(topics.commands, value, key=key, headers=signed(value))
        finally:
            await producer.stop()
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while len(seen) < len(commands) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                seen.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    by_offset = sorted(seen, key=lambda e: int(e["origin"]["offset"]))
    return by_offset + [{}] * (len(commands) - len(by_offset))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.window")
    parser.add_argument("--refused", type=int, default=1_000_000)
    parser.add_argument("--valid", type=int, default=300_000)
    parser.add_argument("--out", type=Path, default=Path(".bench/window.json"))
    args = parser.parse_args(argv)
    total = args.refused + args.valid
    if counts(total) != (args.refused, args.valid):
        parser.error("--refused and --valid must be in the stream's ratio, 10 to 3")
    work = Path(tempfile.mkdtemp(prefix="cancel-worker-window-"))
    broker = sim_proc = None
    try:
        print("window bench: starting broker and simulator ...", file=sys.stderr, flush=True)
        broker = start_broker(work / "kafka")
        accounts_file = write_accounts(work / "secrets")
        sim_proc, sim_url = start_sim(accounts_file)
        sim = SimControl(sim_url)
        figures = asyncio.run(measure(broker.bootstrap, sim, accounts_file, total, progress=True))
        sim.close()
    finally:
        if sim_proc is not None:
            sim_proc.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(dataclasses.asdict(figures), option=orjson.OPT_INDENT_2))
    print(figures.table())
    print(f"figures in {args.out}")


if __name__ == "__main__":
    main()
