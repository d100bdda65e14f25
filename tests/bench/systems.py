"""The bench's reference systems, each run as its own process by the bench:

    python -m tests.bench.systems   (configuration in the BENCH_SYSTEM environment variable)

* ``kafka_floor`` — consume the commands, produce one result per command, commit: no HTTP.
  Batched and concurrent: the physical Kafka limit of a consume → produce pipeline.
* ``pipeline_floor`` — the same, with one HMAC-signed DELETE per command through a pool of
  keep-alive connections (:mod:`tests.bench.fasthttp`), requests prebuilt as bytes. No
  validation, no rate governor, no retries, no ordering: the physical limit of this
  pipeline on this machine.
* ``naive`` — what a first version looks like: one message at a time, the official Binance
  Portfolio Margin SDK (synchronous, in a thread so the consumer keeps its heartbeats) for
  the cancel, the result produced and the offset committed before the next message.

Each prints ``BENCH_READY`` once its consumer has its partitions, and stops on SIGTERM.
Result records are JSON with the ``command_id`` (how the bench matches them) and ``ok``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from tests.bench.fasthttp import HttpError, HttpPool

CONFIG_ENV = "BENCH_SYSTEM"
READY = "BENCH_READY"
RECV_WINDOW_MS = 5000
CANCEL_PATH = b"/papi/v1/um/algo/order"

Handler = Callable[[ConsumerRecord[bytes, bytes]], Coroutine[Any, Any, None]]


def consumer_for(config: dict[str, Any], **extra: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        config["commands_topic"],
        bootstrap_servers=config["bootstrap"],
        group_id=config["group_id"],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **extra,
    )


async def wait_assigned(consumer: AIOKafkaConsumer) -> list[Any]:
    """Join the group (no records are there yet), then say so."""
    early: list[Any] = []
    while not consumer.assignment():
        for records in (await consumer.getmany(timeout_ms=100)).values():
            early.extend(records)
    print(READY, flush=True)
    return early


def result(record: ConsumerRecord[bytes, bytes], ok: bool, **extra: Any) -> bytes:
    command_id = orjson.loads(record.value)["command_id"] if record.value else None
    return orjson.dumps(
        {"command_id": command_id, "ok": ok, "at_us": time.time_ns() // 1000, **extra}
    )


async def run_batched(
    config: dict[str, Any], handler_for: Callable[[AIOKafkaProducer], Handler], stop: asyncio.Event
) -> None:
    """Fetch in batches, handle every record of a batch concurrently, commit each batch once
    all its results are acknowledged (in batch order), without waiting before the next fetch."""
    # A short long-poll: with one broker and one fetch in flight per broker (aiokafka), a
    # partition's next records could otherwise wait for the others' 500 ms poll.
    consumer = consumer_for(config, max_poll_records=2000, fetch_max_wait_ms=20)
    producer = AIOKafkaProducer(bootstrap_servers=config["bootstrap"], acks="all", linger_ms=0)
    await producer.start()
    await consumer.start()
    handler = handler_for(producer)
    last_commit: asyncio.Task[None] | None = None

    async def commit_after(
        tasks: list[asyncio.Task[None]],
        offsets: dict[TopicPartition, int],
        before: asyncio.Task[None] | None,
    ) -> None:
        await asyncio.gather(*tasks)
        if before is not None:
            await before
        await consumer.commit(offsets)

    try:
        pending = await wait_assigned(consumer)
        while not stop.is_set():
            records = list(pending)
            pending = []
            for batch in (await consumer.getmany(timeout_ms=50)).values():
                records.extend(batch)
            if not records:
                continue
            tasks = [asyncio.create_task(handler(r)) for r in records]
            offsets: dict[TopicPartition, int] = {}
            for r in records:
                tp = TopicPartition(r.topic, r.partition)
                offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
            last_commit = asyncio.create_task(commit_after(tasks, offsets, last_commit))
    finally:
        if last_commit is not None:
            await asyncio.wait({last_commit}, timeout=5)
        await consumer.stop()
        await producer.stop()


def kafka_floor(config: dict[str, Any]) -> Callable[[AIOKafkaProducer], Handler]:
    results = config["results_topic"]

    def handler_for(producer: AIOKafkaProducer) -> Handler:
        async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
            await (await producer.send(results, result(record, ok=True), key=record.key))

        return handle

    return handler_for


class PrebuiltCancels:
    """Signed cancel requests as bytes: the request line's head and each account's headers
    are built once; per request only the query (algoId, recvWindow, timestamp) is signed.

    The signature is Binance's HMAC-SHA256 (as ``worker.exchange.signing.hmac_sha256_hex``): the
    lowercase hex digest of the exact query string under the secret, appended last."""

    def __init__(self, accounts: dict[str, tuple[str, str]], host_header: bytes) -> None:
        self._secrets = {alias: secret.encode() for alias, (_, secret) in accounts.items()}
        self._tails = {
            alias: b" HTTP/1.1\r\nHost: "
            + host_header
            + b"\r\nX-MBX-APIKEY: "
            + key.encode()
            + b"\r\n\r\n"
            for alias, (key, _) in accounts.items()
        }
        self._head = b"DELETE " + CANCEL_PATH + b"?"

    def build(self, account: str, algo_id: int) -> bytes:
        now = time.time_ns() // 1_000_000
        query = f"algoId={algo_id}&recvWindow={RECV_WINDOW_MS}&timestamp={now}".encode()
        signature = hmac.new(self._secrets[account], query, hashlib.sha256).hexdigest().encode()
        return self._head + query + b"&signature=" + signature + self._tails[account]


def pipeline_floor(config: dict[str, Any], pool: HttpPool) -> Callable[[AIOKafkaProducer], Handler]:
    results = config["results_topic"]
    cancels = PrebuiltCancels(
        {a: (k, s) for a, (k, s) in config["accounts"].items()}, pool.host_header
    )

    def handler_for(producer: AIOKafkaProducer) -> Handler:
        async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
            command = orjson.loads(record.value)
            try:
                status, _ = await pool.request(
                    cancels.build(command["account"], command["algo_id"])
                )
            except HttpError:
                status = 0
            value = orjson.dumps(
                {"command_id": command["command_id"], "ok": status == 200, "status": status}
            )
            await (await producer.send(results, value, key=record.key))

        return handle

    return handler_for


async def naive(config: dict[str, Any], stop: asyncio.Event) -> None:
    # Imported here: only this system pays for the SDK.
    from binance_common.configuration import ConfigurationRestAPI  # noqa: PLC0415
    from binance_sdk_derivatives_trading_portfolio_margin import (  # noqa: PLC0415
        derivatives_trading_portfolio_margin as sdk,
    )

    apis = {
        alias: sdk.DerivativesTradingPortfolioMargin(
            config_rest_api=ConfigurationRestAPI(
                api_key=key, api_secret=secret, base_path=config["papi_url"]
            )
        ).rest_api
        for alias, (key, secret) in config["accounts"].items()
    }
    consumer = consumer_for(config)
    producer = AIOKafkaProducer(bootstrap_servers=config["bootstrap"], acks="all")
    await producer.start()
    await consumer.start()
    try:
        await wait_assigned(consumer)
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100, max_records=1)
            for records in fetched.values():
                for record in records:
                    command = orjson.loads(record.value)
                    api = apis[command["account"]]
                    try:
                        answer = await asyncio.to_thread(
                            api.cancel_um_algo_order, algo_id=command["algo_id"]
                        )
                        ok, detail = bool(answer.data().complete), ""
                    except Exception as exc:  # noqa: BLE001 - a failed cancel is a result too
                        ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
                    value = orjson.dumps(
                        {"command_id": command["command_id"], "ok": ok, "detail": detail}
                    )
                    await producer.send_and_wait(config["results_topic"], value, key=record.key)
                    await consumer.commit(
                        {TopicPartition(record.topic, record.partition): record.offset + 1}
                    )
    finally:
        await consumer.stop()
        await producer.stop()


async def serve(config: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    system = config["system"]
    if system == "kafka_floor":
        await run_batched(config, kafka_floor(config), stop)
    elif system == "pipeline_floor":
        pool = HttpPool(config["papi_url"], int(config["connections"]))
        await pool.open()
        try:
            await run_batched(config, pipeline_floor(config, pool), stop)
        finally:
            pool.close()
    elif system == "naive":
        await naive(config, stop)
    else:
        raise SystemExit(f"unknown system {system!r}")


def main() -> None:
    asyncio.run(serve(orjson.loads(os.environ[CONFIG_ENV])))


if __name__ == "__main__":
    main()
