"""``cancel-worker demo``: the whole product on this machine, from nothing.

Starts a single-node Kafka broker (deploy/kafka/kafka.sh), the PAPI simulator and the worker
as separate processes, sends a mixed batch of commands, prints each command's result, then
shuts everything down. Accounts use the three key kinds (HMAC, Ed25519, RSA).

Commands go out through the client library (:mod:`worker.client`), as a risk engine would
send them: valid ones through ``CommandProducer`` (checked before they leave), the kill
switch through ``CancelClient.cancel_all`` (request/reply), results read back as typed
results through ``ResultConsumer``. The deliberately bad ones, which the library refuses,
are written raw, as a producer without it could. Every command is signed by the demo's
producer (a key made at start, entitled to every account and to kill switches), but one
sent unsigned, which the worker refuses as ``unauthorized``.

With ``--trace`` (the ``otel`` extra installed): the kill switch's trace, printed at the end as
a tree: the client's round trip and send spans (this process) and the worker's spans for the
command, which the worker prints with the console exporter (``OTEL_TRACES_EXPORTER=console``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
from aiokafka import AIOKafkaProducer

from worker import tracing
from worker.client import (
    CancelClient,
    CommandProducer,
    InvalidCommandError,
    ResultConsumer,
    checked_command,
    key_of,
)
from worker.core.timeutil import now_ms
from worker.kafka.io import MAX_RECORD_BYTES, ensure_topics
from worker.producers import Signer, generate, stanza
from worker.tools.devstack import (
    REPO,
    Broker,
    Process,
    start_broker,
    start_sim,
    start_worker,
    write_private_key,
)

DEMO_DIR = REPO / ".local" / "demo"
TOPICS = {
    "commands": "papi.cancel.commands",
    "results": "papi.cancel.results",
    "deadletter": "papi.cancel.deadletter",
}


SEED_ORDERS: list[dict[str, Any]] = [
    {
        "account": "desk-a",
        "market": "UM",
        "symbol": "BTCUSDT",
        "quantity": "0.250",
        "stop_price": "61000.50",
    },
    {
        "account": "desk-b",
        "market": "CM",
        "symbol": "BTCUSD_PERP",
        "quantity": "12",
        "client_strategy_id": "hedge/btc-1",
    },
    {"account": "desk-c", "kind": "algo", "symbol": "ETHUSDT"},
    {
        "account": "desk-a",
        "market": "UM",
        "symbol": "ETHUSDT",
        "type": "TRAILING_STOP_MARKET",
        "activate_price": "3900.00",
        "price_rate": "0.8",
    },
    {"account": "desk-a", "market": "UM", "symbol": "SOLUSDT"},
    *({"account": "desk-c", "kind": "algo", "symbol": "DOGEUSDT"} for _ in range(3)),
]
KILL_SWITCH: tuple[str, Literal["UM", "CM"], str] = ("desk-c", "UM", "DOGEUSDT")
PRODUCER_ID = "demo"
UNSIGNED = "unsigned (no producer key)"


def progress(text: str | None) -> None:
    """One updating line on a terminal, one line per update otherwise; None ends it."""
    if sys.stdout.isatty():
        print("\r" + text if text is not None else "", end="" if text else "\n", flush=True)
    elif text is not None:
        print(text, flush=True)


def step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def write_demo_producers(directory: Path) -> Path:
    """The demo's producer: a key made here (``cancel-worker keygen`` does the same), and the
    producers file that lets it name every account and send kill switches."""
    _, key = generate(directory, PRODUCER_ID)
    path = directory / "producers.toml"
    path.write_text(
        "# The demo's producer, generated for the local stack only.\n"
        + stanza(PRODUCER_ID, key, ["*"], kill_switch=True)
    )
    return path


def write_demo_accounts(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_private_key(directory / "desk-b.pem", "ed25519")
    write_private_key(directory / "desk-c.pem", "rsa")
    path = directory / "accounts.toml"
    path.write_text(
        "# Demo credentials, generated for the local simulator only.\n"
        '[accounts.desk-a]\napi_key = "demo-key-desk-a-0000000000000000"\n'
        'secret = "demo-secret-desk-a-000000000000000000000000000000"\n\n'
        '[accounts.desk-b]\napi_key = "demo-key-desk-b-0000000000000000"\n'
        'private_key_file = "desk-b.pem"\n\n'
        '[accounts.desk-c]\napi_key = "demo-key-desk-c-0000000000000000"\n'
        'private_key_file = "desk-c.pem"\n'
    )
    return path


def build_batch(seeded: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | bytes]]:
    """(label, command) for the mixed batch; bytes for a record that is not even JSON."""
    um, cm, algo, trail = seeded
    now = now_ms()

    def cmd(cid: str, account: str, **fields: Any) -> dict[str, Any]:
        return {"command_id": cid, "account": account, "issued_at": now, "source": "demo", **fields}

    rows: list[tuple[str, dict[str, Any] | bytes]] = [
        (
            "UM conditional, HMAC",
            cmd(
                "demo-um-1",
                "desk-a",
                market="UM",
                symbol="BTCUSDT",
                strategy_id=um["strategy_id"],
                reason="drawdown",
            ),
        ),
        (
            "CM conditional, Ed25519",
            cmd(
                "demo-cm-1",
                "desk-b",
                market="CM",
                symbol="BTCUSD_PERP",
                client_strategy_id=cm["client_strategy_id"],
            ),
        ),
        (
            "UM algo, RSA",
            cmd("demo-algo-1", "desk-c", market="UM", symbol="ETHUSDT", algo_id=algo["algo_id"]),
        ),
        (
            "UM trailing stop",
            cmd(
                "demo-um-2",
                "desk-a",
                market="UM",
                symbol="ETHUSDT",
                strategy_id=trail["strategy_id"],
            ),
        ),
        (
            "unknown order",
            cmd("demo-gone-1", "desk-c", market="UM", symbol="ETHUSDT", algo_id=123456789),
        ),
        ("unknown account", cmd("demo-acct-1", "desk-z", market="UM", symbol="BTCUSDT", algo_id=1)),
        (
            "already expired",
            cmd(
                "demo-exp-1",
                "desk-a",
                market="UM",
                symbol="BTCUSDT",
                strategy_id=um["strategy_id"],
                expires_at=now - 1000,
            ),
        ),
        (
            "invalid: two ids",
            cmd("demo-bad-1", "desk-a", market="UM", symbol="BTCUSDT", strategy_id=1, algo_id=2),
        ),
        (
            "invalid: symbol with &",
            cmd("demo-bad-2", "desk-a", market="UM", symbol="BTCUSDT&strategyId=1", strategy_id=1),
        ),
        ("undecodable bytes", b"\x00\x01 this is not JSON"),
        (
            UNSIGNED,
            cmd("demo-unsigned-1", "desk-a", market="UM", symbol="BTCUSDT", strategy_id=1),
        ),
    ]
    return rows


async def produce(bootstrap: str, batch: list[tuple[str, dict[str, Any] | bytes]]) -> None:
    """Valid commands through the library's producer, signed; the rest raw (the library
    refuses them: that is the point of showing what the worker does with them), signed by
    hand but for the one sent as an unsigned producer would."""
    raw = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=MAX_RECORD_BYTES
    )
    signer = Signer.of(PRODUCER_ID, DEMO_DIR / "secrets" / f"{PRODUCER_ID}.key")
    async with CommandProducer(
        bootstrap, TOPICS["commands"], producer_id=signer.producer_id, private_key=signer.key
    ) as producer:
        await raw.start()
        try:
            for label, body in batch:
                if isinstance(body, bytes):
                    await raw.send_and_wait(
                        TOPICS["commands"],
                        body,
                        key=b"desk-a:BTCUSDT",
                        headers=signer.headers(body),
                    )
                    continue
                value = orjson.dumps(body)
                if label == UNSIGNED:
                    await raw.send_and_wait(TOPICS["commands"], value, key=key_of(body))
                    continue
                try:
                    checked_command(body)
                except InvalidCommandError:
                    await raw.send_and_wait(
                        TOPICS["commands"], value, key=key_of(body), headers=signer.headers(value)
                    )
                else:
                    await producer.publish(body)
        finally:
            await raw.stop()


async def collect(bootstrap: str, expected: int, timeout_s: float) -> list[dict[str, Any]]:
    """The results as the library reads them (typed, read_committed); their events kept."""
    events: list[dict[str, Any]] = []
    async with ResultConsumer(bootstrap, TOPICS["results"], from_beginning=True) as results:
        progress(f"      results: 0/{expected}")
        try:
            async with asyncio.timeout(timeout_s):
                async for result in results:
                    events.append(dict(result.raw))
                    progress(f"      results: {len(events)}/{expected}")
                    if len(events) >= expected:
                        break
        except TimeoutError:
            pass
        finally:
            progress(None)
    return events


async def kill_switch(bootstrap: str) -> dict[str, Any]:
    """One kill switch, request/reply: publish and wait for its result."""
    async with CancelClient(
        bootstrap,
        commands_topic=TOPICS["commands"],
        results_topic=TOPICS["results"],
        source="demo",
        producer_id=PRODUCER_ID,
        private_key=DEMO_DIR / "secrets" / f"{PRODUCER_ID}.key",
    ) as client:
        account, market, symbol = KILL_SWITCH
        result = await client.cancel_all(
            account, market, symbol, timeout=60, command_id="demo-kill-1", reason="flatten"
        )
    return dict(result.raw)


def describe(event: dict[str, Any]) -> tuple[str, str]:
    if event["type"] == "strategies.canceled":
        routes = ", ".join(f"{r['route']} {r['outcome']}" for r in event["routes"])
        return "CANCELED", f"{len(event['strategies'])} orders on {event['symbol']} ({routes})"
    if event["type"] == "strategy.canceled":
        s = event["strategy"]
        ident = s["strategy_id"] or s["algo_id"]
        qty = f" qty {s['orig_qty']}" if s["orig_qty"] else ""
        return "CANCELED", f"order {ident}{qty} status {s['status']}"
    exchange = event.get("exchange")
    code = f" [{exchange['http_status']} {exchange['code']}]" if exchange else ""
    text = event.get("hint") or event["detail"]
    return event["reason"], f"{text}{code}"


UNDECODABLE = "(undecodable)"


def print_table(labels: dict[str, str], events: list[dict[str, Any]]) -> None:
    """One row per result, in the order the commands were sent."""
    header = ("command", "what", "route", "result", "tries", "ms", "detail")
    order = list(labels)
    rows = []
    for e in sorted(events, key=lambda e: order.index(e["command_id"] or UNDECODABLE)):
        result, detail = describe(e)
        cid = e["command_id"] or UNDECODABLE
        rows.append(
            (
                cid,
                labels.get(cid, ""),
                e.get("route") or "-",
                result,
                str(e["attempts"]),
                str(e["completed_at"] - e["received_at"]),
                detail if len(detail) <= 70 else detail[:67] + "...",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<" + str(w) + "}" for w in widths)
    print(line.format(*header).rstrip())
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row).rstrip())


def demo_env(
    broker: Broker, sim_url: str, accounts: Path, *, trace: bool = False
) -> dict[str, str]:
    """The worker's settings for the demo, as CANCEL_WORKER_* variables (and, to trace,
    the OTEL_* variables of the console exporter)."""
    otel = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "cancel-worker"}
    return (otel if trace else {}) | {
        "CANCEL_WORKER_PRODUCERS_FILE": str(accounts.parent / "producers.toml"),
        "CANCEL_WORKER_BOOTSTRAP_SERVERS": broker.bootstrap,
        "CANCEL_WORKER_PAPI_URL": sim_url,
        "CANCEL_WORKER_TIME_URL": f"{sim_url}/fapi/v1/time",
        "CANCEL_WORKER_ACCOUNTS_FILE": str(accounts),
        "CANCEL_WORKER_GROUP_ID": "cancel-worker-demo",
        "CANCEL_WORKER_COMMANDS_TOPIC": TOPICS["commands"],
        "CANCEL_WORKER_RESULTS_TOPIC": TOPICS["results"],
        "CANCEL_WORKER_DEADLETTER_TOPIC": TOPICS["deadletter"],
        # A short session so the demo's group forms fast; revocation fits well inside it.
        "CANCEL_WORKER_SESSION_TIMEOUT_MS": "6000",
        "CANCEL_WORKER_HEARTBEAT_INTERVAL_MS": "1000",
        "CANCEL_WORKER_REVOKE_GRACE_S": "1",
        "CANCEL_WORKER_COMMIT_TIMEOUT_S": "1.5",
    }


def send_batches(
    broker: Broker, control: httpx.Client, seeded: list[dict[str, Any]], total: int
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Send the mixed batch, then retire the UM conditional route and send one more, then a
    kill switch."""
    batch = build_batch(seeded[:4])
    step(
        5,
        total,
        f"sending a mixed batch of {len(batch)} commands, then one more after "
        "retiring the UM conditional route in the simulator, then a kill switch ...",
    )
    asyncio.run(produce(broker.bootstrap, batch))
    labels: dict[str, str] = {}
    for label, body in batch:
        labels[body["command_id"] if isinstance(body, dict) else UNDECODABLE] = label
    events = asyncio.run(collect(broker.bootstrap, len(batch), 60))
    control.post("/_sim/config", content=orjson.dumps({"um_conditional_enabled": False}))
    late = {
        "command_id": "demo-um-3",
        "account": "desk-a",
        "market": "UM",
        "symbol": "SOLUSDT",
        "strategy_id": seeded[4]["strategy_id"],
        "issued_at": now_ms(),
        "source": "demo",
    }
    labels["demo-um-3"] = "UM conditional, route retired"
    asyncio.run(produce(broker.bootstrap, [(labels["demo-um-3"], late)]))
    labels["demo-kill-1"] = "kill switch: all on DOGEUSDT"
    asyncio.run(kill_switch(broker.bootstrap))
    events = asyncio.run(collect(broker.bootstrap, len(batch) + 2, 60))
    return labels, events


def run_demo(*, keep: bool = False, verbose: bool = False, trace: bool = False) -> int:
    total = 7
    echo = sys.stderr if verbose else None
    client_spans = start_tracing() if trace else None
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    started = time.monotonic()
    step(1, total, "starting a single-node Kafka broker (KRaft) on loopback ...")
    broker: Broker = start_broker(DEMO_DIR / "kafka")
    procs: list[Process] = []
    try:
        print(f"      broker at {broker.bootstrap}")
        accounts = write_demo_accounts(DEMO_DIR / "secrets")
        write_demo_producers(DEMO_DIR / "secrets")
        step(2, total, "starting the PAPI simulator (HMAC, Ed25519 and RSA accounts) ...")
        sim, sim_url = start_sim(accounts, echo=echo)
        procs.append(sim)
        print(f"      simulator at {sim_url}")
        asyncio.run(
            ensure_topics(
                broker.bootstrap,
                {TOPICS["commands"]: 3, TOPICS["results"]: 3, TOPICS["deadletter"]: 1},
            )
        )
        control = httpx.Client(base_url=sim_url, timeout=10)
        seeded = control.post("/_sim/orders", content=orjson.dumps({"orders": SEED_ORDERS})).json()[
            "orders"
        ]
        step(3, total, f"seeded {len(seeded)} open orders in the simulator's book")

        env = demo_env(broker, sim_url, accounts, trace=client_spans is not None)
        step(4, total, "starting the worker (cancel-worker run) ...")
        worker = start_worker(env, echo=echo)
        procs.insert(0, worker)
        worker.wait_for_line("partitions assigned", 60)

        labels, events = send_batches(broker, control, seeded, total)

        step(6, total, "results on the results topic:")
        print()
        print_table(labels, events)
        print()
        step(7, total, "stopping the worker (SIGTERM), the simulator and the broker ...")
        code = worker.stop()  # the worker exports the spans it still holds as it exits
        procs.remove(worker)
        summary(
            events, code, control.get("/_sim/cancels").json()["cancels"], time.monotonic() - started
        )
        if client_spans is not None:
            print_trace(client_spans(), console_spans(worker.lines))
        control.close()
        return 0 if code == 0 and len(events) == len(labels) else 1
    finally:
        for proc in procs:
            proc.stop()
        broker.stop()
        if not keep:
            shutil.rmtree(DEMO_DIR, ignore_errors=True)


# -- --trace ---------------------------------------------------------------------------------

SpanJson = dict[str, Any]


def start_tracing() -> Any:
    """Record this process's spans (the client's) in memory; returns what gives them, as
    the console exporter's JSON. None, said, when the otel extra is not installed."""
    try:
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
            InMemorySpanExporter,
        )
    except ImportError:
        print("      --trace needs the otel extra (pip install 'cancel-worker[otel]'); skipped")
        return None
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "demo-client"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)

    def spans() -> list[SpanJson]:
        return [json.loads(span.to_json(indent=None)) for span in exporter.get_finished_spans()]

    return spans


def console_spans(lines: list[str]) -> list[SpanJson]:
    """The spans a process printed with the console exporter (one JSON object a line)."""
    out = []
    for line in lines:
        if line.startswith('{"name"'):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


_SHOWN = (
    "messaging.kafka.message.key",
    "messaging.kafka.offset",
    "http.response.status_code",
    "binance.code",
    tracing.ATTEMPT,
    tracing.RESULT_TYPE,
    tracing.RESULT_REASON,
)


def print_trace(client: list[SpanJson], worker: list[SpanJson]) -> None:
    """The kill switch's trace as a tree: its round trip in the client, the worker's spans."""
    roots = [s for s in client if s["name"].startswith("cancel ")]
    if not roots:
        print("no trace recorded for the kill switch")
        return
    trace_id = roots[-1]["context"]["trace_id"]
    spans = [s for s in [*client, *worker] if s["context"]["trace_id"] == trace_id]
    children: dict[str | None, list[SpanJson]] = {}
    for span in spans:
        children.setdefault(span["parent_id"], []).append(span)
    print()
    print(f"Trace {trace_id[2:]} of the kill switch (demo-kill-1), {len(spans)} spans:")

    def show(span: SpanJson, depth: int) -> None:
        ms = (_time(span["end_time"]) - _time(span["start_time"])) * 1000
        kind = span["kind"].removeprefix("SpanKind.")
        service = span["resource"]["attributes"].get("service.name", "")
        attributes = span["attributes"]
        shown = " ".join(
            f"{k.rsplit('.', 1)[-1]}={attributes[k]}" for k in _SHOWN if k in attributes
        )
        label = f"{'  ' * depth}{span['name']}"
        print(f"  {label:<58} {kind:<8} {ms:8.1f} ms  {service:<14} {shown}".rstrip())
        for child in sorted(children.get(span["context"]["span_id"], []), key=_start):
            show(child, depth + 1)

    show(roots[-1], 0)


def _time(stamp: str) -> float:
    from datetime import datetime  # noqa: PLC0415

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _start(span: SpanJson) -> float:
    return _time(span["start_time"])


def summary(
    events: list[dict[str, Any]], exit_code: int, cancels: list[Any], elapsed_s: float
) -> None:
    kinds = Counter(e["type"] if e["type"] != "cancel.failed" else e["reason"] for e in events)
    latencies = [e["completed_at"] - e["received_at"] for e in events]
    print()
    print("Summary")
    print(f"  commands sent          {len(events)}")
    print("  results                " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
    print(f"  exchange cancels       {len(cancels)} (simulator ground truth)")
    print(
        f"  latency ms             median {statistics.median(latencies):.0f}, max {max(latencies)}"
    )
    print(f"  worker exit code       {exit_code} ({'clean' if exit_code == 0 else 'NOT clean'})")
    print(f"  demo wall time         {elapsed_s:.1f}s")
