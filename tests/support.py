"""Helpers shared by the integration and end-to-end tests (no fakes: real broker, real sim)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker.app import Worker, load_worker_accounts
from worker.core.contracts import RESULT_SCHEMA, load_schema, result_validator
from worker.core.timeutil import now_ms
from worker.kafka.fencing import MemberSource
from worker.kafka.io import MAX_RECORD_BYTES, TransactionalSink, ensure_topics, make_consumer
from worker.kafka.pipeline import Partition
from worker.producers import signed_headers, stanza
from worker.settings import ENV_PREFIX, Settings
from worker.tools.devstack import REPO, cli_argv, write_private_key
from worker.tools.sim.app import SimConfig

HMAC_ACCOUNTS = {
    f"desk-{i}": (f"key-desk-{i}-" + "k" * 40, f"secret-desk-{i}-" + "s" * 40) for i in range(5)
}


# The tests' producer: every command a test publishes is signed with this key (a fixed test
# key, so that every process of a session signs alike), and the producers file written next
# to every accounts file entitles it to every account and to kill switches. The worker runs
# in its default mode: commands must be signed.
TEST_PRODUCER_ID = "tests"
TEST_PRODUCER_KEY = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"cancel-worker tests producer (not a secret)").digest()
)
PRODUCERS_FILE_NAME = "producers.toml"
PRODUCER_KEY_FILE_NAME = "tests-producer.key"


def write_producer_key(path: Path, key: Ed25519PrivateKey) -> Path:
    """``key`` as a PEM file, mode 0600."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def write_producers(directory: Path, *extra: str) -> Path:
    """The producers file of ``directory``: the tests' producer (every account, kill
    switches), plus ``extra`` tables; and the tests' producer key beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    write_producer_key(directory / PRODUCER_KEY_FILE_NAME, TEST_PRODUCER_KEY)
    tables = [stanza(TEST_PRODUCER_ID, TEST_PRODUCER_KEY, ["*"], kill_switch=True), *extra]
    path = directory / PRODUCERS_FILE_NAME
    path.write_text("\n".join(tables))
    return path


def signed(value: bytes | None) -> list[tuple[str, bytes]]:
    """The headers the tests' producer sends with ``value``."""
    return signed_headers(TEST_PRODUCER_ID, TEST_PRODUCER_KEY, value)


def write_accounts(directory: Path) -> Path:
    """Five HMAC accounts, one Ed25519 and one RSA account (keys generated here); the
    producers file (:func:`write_producers`) beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    write_producers(directory)
    lines: list[str] = []
    for alias, (key, secret) in HMAC_ACCOUNTS.items():
        lines += [f"[accounts.{alias}]", f'api_key = "{key}"', f'secret = "{secret}"', ""]
    for alias, kind in (("desk-ed", "ed25519"), ("desk-rsa", "rsa")):
        write_private_key(directory / f"{alias}.pem", kind)
        (directory / f"{alias}.apikey").write_text(f"key-{alias}-" + "k" * 40 + "\n")
        lines += [
            f"[accounts.{alias}]",
            f'api_key_file = "{alias}.apikey"',
            f'private_key_file = "{alias}.pem"',
            "",
        ]
    path = directory / "accounts.toml"
    path.write_text("\n".join(lines))
    return path


class SimControl:
    """The simulator's /_sim control plane."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=10)

    def seed(self, orders: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        r = self._http.post("/_sim/orders", content=orjson.dumps({"orders": list(orders)}))
        r.raise_for_status()
        created: list[dict[str, Any]] = r.json()["orders"]
        return created

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._http.get(
            "/_sim/requests", params={"since": since}
        ).json()["requests"]
        return out

    def last_seq(self) -> int:
        last: int = self._http.get("/_sim/requests", params={"since": 1 << 62}).json()["last"]
        return last

    def cancels(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._http.get("/_sim/cancels").json()["cancels"]
        return out

    def configure(self, **changes: Any) -> dict[str, Any]:
        r = self._http.post("/_sim/config", content=orjson.dumps(changes))
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def reset(self) -> None:
        """Back to a healthy exchange with the real limits and nothing counted against them
        (the session shares one simulator: a test's weight, 429s or ban are not the next's)."""
        self.configure(**dataclasses.asdict(SimConfig()), reset_limits=True)
        self._http.post("/_sim/faults", content=orjson.dumps({"faults": [], "clear": True}))

    def script(self, *faults: dict[str, Any]) -> None:
        """Queue faults for the next signed requests, in order."""
        r = self._http.post("/_sim/faults", content=orjson.dumps({"faults": list(faults)}))
        r.raise_for_status()

    def orders(self) -> dict[int, dict[str, Any]]:
        """The book's ground truth: every order by id."""
        data = self._http.get("/_sim/orders").json()
        out = {o["strategy_id"]: o for o in data["conditional"]}
        out.update({o["algo_id"]: o for o in data["algo"]})
        return out

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = self._http.get("/_sim/stats").json()
        return out

    def settle(self) -> dict[str, int]:
        """Collect the simulator's garbage and keep what it holds out of later collections."""
        r = self._http.post("/_sim/settle")
        r.raise_for_status()
        out: dict[str, int] = r.json()
        return out

    def close(self) -> None:
        self._http.close()


@dataclass
class Topics:
    commands: str
    results: str
    deadletter: str


async def fresh_topics(bootstrap: str, partitions: int = 3) -> Topics:
    tag = uuid.uuid4().hex[:10]
    topics = Topics(f"cmd-{tag}", f"res-{tag}", f"dlq-{tag}")
    await ensure_topics(
        bootstrap, {topics.commands: partitions, topics.results: partitions, topics.deadletter: 1}
    )
    return topics


def command(account: str, order: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A valid command cancelling a seeded order (as returned by SimControl.seed)."""
    cmd: dict[str, Any] = {
        "command_id": extra.pop("command_id", f"c-{uuid.uuid4().hex[:20]}"),
        "account": account,
        "issued_at": now_ms(),
    }
    if order["kind"] == "algo":
        cmd.update(market="UM", algo_id=order["algo_id"])
    else:
        cmd.update(market=order["market"], symbol=order["symbol"], strategy_id=order["strategy_id"])
    cmd.update(extra)
    return cmd


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    *,
    sign: bool = True,
) -> None:
    """Publish ``records`` (key, value), each signed by the tests' producer unless ``sign``
    is False (a hostile producer's records)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=MAX_RECORD_BYTES, linger_ms=5
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=signed(value) if sign else None)
            for key, value in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def topic_consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    """A reader of every partition of ``topic`` from its beginning, ``read_committed``,
    without a group (nothing committed), taking records of any size the worker writes."""
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=MAX_RECORD_BYTES,
    )


async def consume(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0, *, validate: bool = True
) -> list[Any]:
    """Read records from the start of ``topic`` until ``expected`` arrived (or time runs out)."""
    consumer = topic_consumer(bootstrap, topic)
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                out.extend(records)
    finally:
        await consumer.stop()
    if validate and topic.startswith("res-"):
        # In a thread: a worker may share this event loop, and a thousand validations
        # (about a millisecond each) would stall its heartbeats past the session timeout.
        await asyncio.to_thread(_check_results, out)
    return out


# -- every result a test sees is checked against the schema ---------------------------------
#
# Events built in the test process are checked where they are built (tests/conftest.py wraps
# worker.core.events); results written by worker processes are checked where the tests read them:
# `consume` and `read_to_end` (every record the worker wrote) and `events_of` (every record).


@functools.cache
def _compiled_result_schema() -> Callable[[object], bool]:
    return jsonschema_rs.validator_for(load_schema(RESULT_SCHEMA)).is_valid


def _has_float(node: object) -> bool:
    if isinstance(node, float):
        return True
    if isinstance(node, dict):
        return any(_has_float(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_float(v) for v in node)
    return False


def result_schema_error(event: Any) -> str | None:
    """Why ``event`` is not a valid result event, or None when it is.

    The compiled validator answers first (a few microseconds, so that checking every event
    of a busy in-process worker costs it nothing measurable); the full validator, which
    reads integers strictly (the result schema has no other numbers, so any float is
    checked by it), says what is wrong."""
    if _compiled_result_schema()(event) and not _has_float(event):
        return None
    errors = sorted(result_validator().iter_errors(event), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    # `oneOf` hides the branch's own error: name the deepest one.
    worst = max(errors, key=lambda e: len(list(e.context or ())))
    deepest = min(worst.context or [worst], key=lambda e: -len(list(e.absolute_path)))
    where = "/".join(str(p) for p in deepest.absolute_path) or "(top)"
    return f"{deepest.message} at {where}"


def check_result_event(event: Any) -> None:
    """Fail (AssertionError) unless ``event`` is valid against the result schema."""
    problem = result_schema_error(event)
    assert problem is None, f"result event violates {RESULT_SCHEMA}: {problem}: {event!r}"


def written_by_the_worker(record: Any) -> bool:
    """Whether a record on a results topic is a result the worker wrote (every one carries
    a ``type`` header), or looks like one (a JSON object with a ``type`` or
    ``schema_version``), rather than a test's own bytes (some transaction tests write
    ``b"1"`` or ``b"zombie"`` to a results topic)."""
    if any(name == "type" for name, _ in record.headers or ()):
        return True
    try:
        value = orjson.loads(record.value)
    except (orjson.JSONDecodeError, TypeError):
        return False
    return isinstance(value, dict) and ("type" in value or "schema_version" in value)


def _check_results(records: Sequence[Any]) -> None:
    """Each record is a valid result event, and a ``type`` header (every result the worker
    writes has one; a test's stand-in for another member's may not) names its type."""
    for record in records:
        event = orjson.loads(record.value)
        check_result_event(event)
        types = [v for name, v in record.headers or () if name == "type"]
        assert types in ([], [event["type"].encode()]), f"type header {types} on a {event['type']}"


async def read_to_end(
    bootstrap: str, topic: str, timeout_s: float = 60.0, *, validate: bool = True
) -> list[Any]:
    """Every committed record of ``topic`` (read_committed), up to its end as of now; with
    ``validate``, every record the worker wrote there (:func:`written_by_the_worker`) is
    checked against the result schema."""
    consumer = topic_consumer(bootstrap, topic)
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise AssertionError(f"no partitions of {topic} assigned in time")
            await asyncio.sleep(0.05)
        parts = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end in time")
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                out.extend(records)
    finally:
        await consumer.stop()
    if validate:
        # In a thread, as in `consume`.
        await asyncio.to_thread(_check_results, [r for r in out if written_by_the_worker(r)])
    return out


def events_of(records: Sequence[Any]) -> list[dict[str, Any]]:
    """The result events of ``records``, each checked against the result schema."""
    out = [orjson.loads(r.value) for r in records]
    for event in out:
        check_result_event(event)
    return out


def open_um_orders(book: dict[int, dict[str, Any]], account: str, symbol: str) -> set[int]:
    """The NEW orders a UM kill switch on (account, symbol) would find: algo and UM conditional."""
    return {
        order_id
        for order_id, o in book.items()
        if o["account"] == account
        and o["symbol"] == symbol
        and o["status"] == "NEW"
        and ("algo_id" in o or o["market"] == "UM")
    }


def cancel_requests(sim: SimControl, since: int) -> list[dict[str, Any]]:
    return [r for r in sim.requests(since) if r["method"] == "DELETE"]


def worker_settings(
    bootstrap: str, topics: Topics, papi_url: str, accounts_file: Path, **overrides: Any
) -> Settings:
    secrets = accounts_file.parent
    if not (secrets / PRODUCERS_FILE_NAME).exists():
        write_producers(secrets)
    base: dict[str, Any] = {
        "producers_file": secrets / PRODUCERS_FILE_NAME,
        "producer_id": TEST_PRODUCER_ID,
        "producer_key_file": secrets / PRODUCER_KEY_FILE_NAME,
        "bootstrap_servers": bootstrap,
        "group_id": f"grp-{uuid.uuid4().hex[:8]}",
        "commands_topic": topics.commands,
        "results_topic": topics.results,
        "deadletter_topic": topics.deadletter,
        "papi_url": papi_url,
        "time_url": f"{papi_url}/fapi/v1/time",
        "accounts_file": accounts_file,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "revoke_grace_s": 1.0,
        "commit_timeout_s": 1.5,
    }
    base.update(overrides)
    return dataclasses.replace(Settings(), **base).check()


def worker_env(settings: Settings) -> dict[str, str]:
    """The same settings as CANCEL_WORKER_* variables, for a worker process."""
    env = {
        f"{ENV_PREFIX}{f.name.upper()}": str(getattr(settings, f.name))
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) is not None
    }
    env[f"{ENV_PREFIX}LOG_LEVEL"] = "INFO"
    return env


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """The real worker, in this event loop, against the real broker and simulator."""
    accounts = load_worker_accounts(settings)
    async with Worker(settings, accounts) as worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)


def run_cli(
    *args: str, env: Mapping[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """``cancel-worker`` in a fresh interpreter, with no CANCEL_WORKER_* setting but ``env``'s."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        cli_argv(*args),
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


async def until(
    condition: Callable[[], bool],
    what: str,
    timeout_s: float = 15.0,
    *,
    context: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` every 50 ms; fail naming ``what`` (and ``context()``, e.g. a
    process's output) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            detail = f":\n{context()}" if context is not None else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def in_group(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of the settings' group, subscribed to the commands topic, once it holds
    an assignment."""
    consumer = make_consumer(settings)
    consumer.subscribe([settings.commands_topic])
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            assert time.monotonic() < deadline, "no assignment"
            await consumer.getmany(timeout_ms=100)
        yield consumer
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def owning(
    settings: Settings, member: MemberSource, parts: Sequence[Partition]
) -> AsyncIterator[TransactionalSink]:
    """A transactional sink that has taken ``parts`` over, closed on the way out."""
    sink = TransactionalSink(settings, member)
    await sink.assigned(parts)
    try:
        yield sink
    finally:
        await sink.close()
