"""Re-publishing commands after an incident (``cancel-worker replay``).

A replay reads a bounded range of the commands topic or of the dead-letter topic and
publishes each record again, to the commands topic, for the worker to process once more.

Contracts:

* **Bounded.** The end offsets of the source partitions are captured when the replay starts
  (``read_committed``: the last stable offsets); nothing at or past them is read, so a
  replay always ends, even while producers keep writing.
* **Faithful copies.** A replayed record keeps its key and its headers (for a dead-letter
  record that includes ``x-source-topic``/``x-source-partition``/``x-source-offset`` and
  ``x-error``) and gains ``x-replayed-from: <topic>:<partition>:<offset>`` and
  ``x-replayed-at: <ms>``. A record replayed before keeps its earlier ``x-replayed-*``
  headers too; the last one is this replay's. The value is sent byte for byte, unless it
  is re-stamped. The key chooses the target partition (the producer's partitioner), so a
  key's records stay together with the commands producers send for that key.
* **Never lost, never guessed.** The producer is idempotent with ``acks=all`` and every
  send is acknowledged before the replay reports it as published.
* **Skip what is done.** With ``skip_processed`` a command whose ``command_id`` already has
  a final result (:data:`FINAL_RESULT_TYPES`) on the results topic is not published, and a
  ``command_id`` is published at most once per replay. The results are read once, when the
  replay starts: run it while the worker is caught up on the range (or stopped), or a
  result still on its way is not seen.
* **Anything else goes back as it was.** A record whose value is not a JSON object with a
  string ``command_id`` (poison) is published unchanged, also when re-stamping was asked
  (it is then counted as not re-stamped); the worker refuses it again, as it should.

Signatures: a copy sent byte for byte keeps the headers it had, its producer's ``x-producer``
and ``x-signature`` included, and the worker verifies it as it verified the original. A copy
whose bytes change (re-stamped, ``expires_in_ms``, a re-drive) is signed anew with the
operator's producer key (``PRODUCER_ID``/``PRODUCER_KEY_FILE``), whose headers replace the
original's; the worker checks that producer's entitlements like anyone's. Without that key
such a run is refused before anything is read (unless ``REQUIRE_SIGNED_COMMANDS=false``,
when the copies go unsigned); a dry run needs no key.

Re-stamping (``restamp``) sets ``issued_at`` to now and moves ``expires_at``, when present,
by the same amount; ``expires_in_ms`` sets ``expires_at`` to now plus that. Re-stamp only
commands that never reached the exchange (expired ones, say): the executor compares an
order's cancel time with ``issued_at``, so a re-stamped command whose order an earlier
delivery did cancel reports ``already_closed`` instead of ``strategy.canceled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import click
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from worker.core import redrive
from worker.core.timeutil import now_ms
from worker.kafka.io import make_producer, security_options
from worker.kafka.topic_reader import (
    STALL_TIMEOUT_S,
    MissingTopicError,
    ReadStalledError,
    ResultsReader,
    cluster_topics,
    json_object,
    read_ranges,
    reader_consumer,
)
from worker.processor import TRUNCATED_FROM_HEADER
from worker.producers import ProducerKeyError, Signer, without_signature
from worker.settings import Settings

log = logging.getLogger(__name__)

FINAL_RESULT_TYPES = frozenset({"strategy.canceled", "cancel.failed", "strategies.canceled"})
"""Result types that close a command. ``cancel.duplicate`` is not one of them."""

SOURCES = ("commands", "deadletter")
REPLAYED_FROM = "x-replayed-from"
REPLAYED_AT = "x-replayed-at"
ACK_BATCH = 500  # sends in flight before waiting for their acks

Headers = list[tuple[str, bytes | None]]


class ReplayArgumentError(ValueError):
    """The replay cannot be served as asked (bad range, unknown topic or partition)."""


class ReplayError(RuntimeError):
    """Kafka failed during a replay; the message says how many records were published."""


def parse_time(text: str) -> int:
    """Milliseconds since the epoch from ``text``: digits (already ms) or ISO-8601.

    An ISO-8601 time without an offset is taken as UTC. Raises :class:`ValueError`."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text[:40]!r} is neither milliseconds since the epoch nor an ISO-8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ms = int(when.timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"{text[:40]!r} is before the epoch")
    return ms


@dataclass(frozen=True)
class ReplayRequest:
    """What to replay. Offsets are per partition (so they need ``partition``); the end
    offset and ``until_ms`` are exclusive. Give offsets or times, not both; neither means
    everything up to the end offsets captured at start."""

    from_topic: str = "commands"
    partition: int | None = None
    start_offset: int | None = None
    end_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    skip_processed: bool = False
    restamp: bool = False
    expires_in_ms: int | None = None
    dry_run: bool = False
    # ``--failed [REASON...]``: None when not asked; the reasons named (empty: the default set).
    failed: tuple[str, ...] | None = None

    def check(self) -> ReplayRequest:
        """Raise :class:`ReplayArgumentError` for a request no broker state can make valid."""
        if self.from_topic not in SOURCES:
            raise ReplayArgumentError(
                f"unknown source {self.from_topic!r}: use {' or '.join(SOURCES)}"
            )
        by_offset = self.start_offset is not None or self.end_offset is not None
        by_time = self.since_ms is not None or self.until_ms is not None
        if by_offset and by_time:
            raise ReplayArgumentError(
                "give offsets (--start-offset/--end-offset) or times (--since/--until), not both"
            )
        if by_offset and self.partition is None:
            raise ReplayArgumentError(
                "offsets belong to one partition: give --partition with --start-offset/--end-offset"
            )
        for name in ("partition", "start_offset", "end_offset", "since_ms", "until_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ReplayArgumentError(f"{name.replace('_', ' ')} must not be negative")
        if (
            self.start_offset is not None
            and self.end_offset is not None
            and self.end_offset < self.start_offset
        ):
            raise ReplayArgumentError(
                f"end offset {self.end_offset} is before start offset {self.start_offset}"
                " (the end offset is exclusive)"
            )
        if (
            self.since_ms is not None
            and self.until_ms is not None
            and self.until_ms < self.since_ms
        ):
            raise ReplayArgumentError(
                f"--until ({self.until_ms}) is before --since ({self.since_ms})"
            )
        if self.expires_in_ms is not None and self.expires_in_ms <= 0:
            raise ReplayArgumentError("--expires-in-ms must be positive")
        if self.failed is not None:
            try:
                redrive.selected_reasons(self.failed)
            except ValueError as exc:
                raise ReplayArgumentError(f"--failed: {exc}") from None
            if self.from_topic != "commands":
                raise ReplayArgumentError(
                    "--failed re-drives failed cancels from the commands topic; dead letters "
                    "never had a cancel to re-drive"
                )
            if self.restamp:
                raise ReplayArgumentError(
                    "--failed keeps issued_at (so a cancel that did land is recognised); "
                    "use --expires-in-ms to give re-driven commands a deadline, not --restamp"
                )
        return self

    @property
    def selects_processed(self) -> bool:
        """Whether the results topic is read first (``--skip-processed`` or ``--failed``)."""
        return self.skip_processed or self.failed is not None

    @property
    def redrive_reasons(self) -> frozenset[str]:
        return frozenset() if self.failed is None else redrive.selected_reasons(self.failed)

    @property
    def restamping(self) -> bool:
        return self.restamp or self.expires_in_ms is not None

    def source_topic(self, settings: Settings) -> str:
        return (
            settings.deadletter_topic
            if self.from_topic == "deadletter"
            else settings.commands_topic
        )


@dataclass(frozen=True)
class PlannedRecord:
    """One source record and what the replay does (or, on a dry run, would do) with it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    command_id: str | None
    publish: bool
    action: str  # "publish", "publish unchanged (not a command)", "skip: ..."

    def describe(self) -> str:
        key = "-" if self.key is None else self.key.decode("utf-8", "backslashreplace")[:80]
        cid = self.command_id if self.command_id is not None else "-"
        where = f"{self.topic}[{self.partition}]@{self.offset}"
        return f"{where} key={key} command_id={cid}: {self.action}"


@dataclass
class ReplaySummary:
    """What a replay read and did. ``published`` counts acknowledged records (0 on a dry run);
    ``selected`` counts the records that are (or on a dry run would be) published."""

    source_topic: str
    target_topic: str
    ranges: dict[int, tuple[int, int]]  # partition -> [start, end) offsets
    dry_run: bool
    read: int = 0
    selected: int = 0
    published: int = 0
    skipped_processed: int = 0
    skipped_repeated: int = 0
    not_commands: int = 0
    restamped: int = 0
    not_restamped: int = 0
    redriven: int = 0
    redriving: bool = False  # --failed was asked: the line says how many were re-driven
    planned: list[PlannedRecord] = field(default_factory=list)  # every record read: dry run only

    def line(self) -> str:
        """The one-line summary the CLI prints last."""
        counts = (
            f"read {self.read}, "
            + (f"would publish {self.selected}" if self.dry_run else f"published {self.published}")
            + f", skipped as processed {self.skipped_processed}"
            + f", skipped as repeated {self.skipped_repeated}"
            + f", not a command (sent as is) {self.not_commands}"
            + f", restamped {self.restamped}"
        )
        if self.not_restamped:
            counts += f", not restamped {self.not_restamped}"
        if self.redriving:
            counts += f", {'would re-drive' if self.dry_run else 're-driven'} {self.redriven}"
        ranges = ", ".join(f"[{p}]@{s}..{e}" for p, (s, e) in sorted(self.ranges.items()))
        head = "dry run (nothing sent)" if self.dry_run else "replayed"
        return f"{head} {self.source_topic} {ranges or '(empty)'} -> {self.target_topic}: {counts}"


class ReplayObserver(Protocol):
    """Progress of a replay, for a console or a test."""

    def started(self, total: int) -> None:
        """The range holds at most ``total`` records (aborted ones and markers are not read)."""

    def record(self, planned: PlannedRecord) -> None:
        """One source record was read and dealt with."""

    def finished(self) -> None:
        """Every publish was acknowledged (or the replay failed)."""


class ConsoleReport:
    """Dry run: one line per record on stdout. Otherwise: a progress bar on stderr."""

    def __init__(self, *, dry_run: bool) -> None:
        self._dry_run = dry_run
        self._stack = contextlib.ExitStack()
        self._bar: Any = None

    def started(self, total: int) -> None:
        if not self._dry_run and total:
            self._bar = self._stack.enter_context(
                click.progressbar(length=total, label="replaying", file=sys.stderr)
            )

    def record(self, planned: PlannedRecord) -> None:
        if self._dry_run:
            click.echo(planned.describe())
        elif self._bar is not None:
            self._bar.update(1)

    def finished(self) -> None:
        self._stack.close()
        self._bar = None


def _partitions(topics: Mapping[str, list[int]], topic: str) -> list[int]:
    """The topic's partitions; :class:`ReplayArgumentError` when it does not exist."""
    parts = topics.get(topic)
    if not parts:
        raise ReplayArgumentError(
            f"topic {topic!r} does not exist (cancel-worker check --create-topics makes them)"
        )
    return parts


@dataclass(frozen=True, slots=True)
class LastResult:
    """The latest final result of a command id on the results topic."""

    type: str
    reason: str | None
    origin: redrive.RecordAt | None  # where its command was read
    completed_at: int

    def describe(self) -> str:
        kind = self.type if self.reason is None else f"{self.type}/{self.reason}"
        if self.origin is None:
            return kind
        o = self.origin
        return f"{kind} of {o.topic}[{o.partition}]@{o.offset}"


def _last_result(event: Mapping[str, Any]) -> LastResult | None:
    kind = event.get("type")
    if kind not in FINAL_RESULT_TYPES:
        return None
    reason = event.get("reason") if kind == "cancel.failed" else None
    completed = event.get("completed_at")
    return LastResult(
        str(kind),
        reason if isinstance(reason, str) else None,
        redrive.origin_of(event.get("origin")),
        completed if type(completed) is int else 0,
    )


async def final_results(
    bootstrap: str, results_topic: str, *, since_ms: int | None = None, **kafka: Any
) -> dict[str, LastResult]:
    """The latest final result (:data:`FINAL_RESULT_TYPES`) of every ``command_id`` on the
    topic: the last in topic order (a command id's results share its key, so its
    partition), the later ``completed_at`` across partitions.

    Reads every partition of ``results_topic`` from the beginning (or, with ``since_ms``,
    from the first record at or after that time) up to the end offsets captured when it
    starts, ``read_committed`` (results of aborted transactions do not count), without a
    consumer group (:class:`~worker.kafka.topic_reader.ResultsReader`). Records that are not JSON
    objects, and results of any other type (``cancel.duplicate`` included), are ignored.
    Raises :class:`ReplayArgumentError` when the topic does not exist, :class:`ReplayError`
    when the read stalls, and aiokafka's ``KafkaError`` when the cluster cannot be
    reached. ``kafka``: more client options (TLS, SASL: ``security_options``)."""
    reader = ResultsReader(
        bootstrap, results_topic, client_id="cancel-worker-replay-results", **kafka
    )
    found: dict[str, tuple[int, LastResult]] = {}
    try:
        await reader.start()
        async for result in reader.read_since(since_ms):
            last = _last_result(result.event)
            command_id = result.event.get("command_id")
            if last is None or not isinstance(command_id, str):
                continue
            before = found.get(command_id)
            if (
                before is None
                or before[0] == result.partition
                or last.completed_at >= before[1].completed_at
            ):
                found[command_id] = (result.partition, last)
    except MissingTopicError as exc:
        raise ReplayArgumentError(
            f"{exc} (cancel-worker check --create-topics makes them)"
        ) from exc
    except ReadStalledError as exc:
        raise ReplayError(str(exc)) from exc
    finally:
        await reader.stop()
    log.info("read the final results of %d command id(s) from %s", len(found), results_topic)
    return {command_id: last for command_id, (_, last) in found.items()}


async def final_result_ids(
    bootstrap: str, results_topic: str, *, since_ms: int | None = None, **kafka: Any
) -> set[str]:
    """The ``command_id`` of every final result on the topic (see :func:`final_results`)."""
    return set(await final_results(bootstrap, results_topic, since_ms=since_ms, **kafka))


def restamp(
    command: dict[str, Any], now: int, *, shift: bool, expires_in_ms: int | None
) -> dict[str, Any] | None:
    """A re-stamped copy of ``command``, or None when it has no integer ``issued_at`` to
    move. ``shift``: ``issued_at`` becomes ``now`` and ``expires_at`` (if any) moves by the
    same amount; ``expires_in_ms``: ``expires_at`` becomes ``now + expires_in_ms``."""
    issued = command.get("issued_at")
    if type(issued) is not int:
        return None
    out = dict(command)
    if shift:
        out["issued_at"] = now
        expires = command.get("expires_at")
        if type(expires) is int:
            out["expires_at"] = expires + (now - issued)
    if expires_in_ms is not None:
        out["expires_at"] = now + expires_in_ms
    return out


async def _ranges(
    consumer: AIOKafkaConsumer, request: ReplayRequest, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, tuple[int, int]]:
    """``[start, end)`` per partition, inside the offsets that exist now."""
    firsts: dict[TopicPartition, int] = await consumer.beginning_offsets(list(tps))
    lasts: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))  # captured once
    starts = dict(firsts)
    ends = dict(lasts)
    if request.start_offset is not None or request.end_offset is not None:
        for tp in tps:
            if request.start_offset is not None:
                if request.start_offset < firsts[tp]:
                    log.warning(
                        "%s[%d]: offsets before %d are gone (retention); starting there",
                        tp.topic,
                        tp.partition,
                        firsts[tp],
                    )
                starts[tp] = max(request.start_offset, firsts[tp])
            if request.end_offset is not None:
                ends[tp] = min(request.end_offset, lasts[tp])
    for bound, target in ((request.since_ms, starts), (request.until_ms, ends)):
        if bound is None:
            continue
        found = await consumer.offsets_for_times(dict.fromkeys(tps, bound))
        for tp in tps:
            at = found[tp]
            target[tp] = lasts[tp] if at is None else min(at.offset, lasts[tp])
    return {tp: (min(starts[tp], ends[tp]), ends[tp]) for tp in tps}


class _Plan:
    """Decides, record by record, what to publish (pure; no I/O)."""

    def __init__(
        self,
        request: ReplayRequest,
        processed: Mapping[str, LastResult],
        summary: ReplaySummary,
        clock: Callable[[], int],
        signer: Signer | None = None,
    ) -> None:
        self._signer = signer
        self._request = request
        self._processed = processed
        self._reasons = request.redrive_reasons
        self._summary = summary
        self._clock = clock
        self._sent_ids: set[str] = set()

    def _redrive(
        self, command: dict[str, Any], last: LastResult, origin: redrive.RecordAt, now: int
    ) -> tuple[bytes, str, Headers]:
        """A re-drive of ``command``, whose latest result ``last`` is a selected failure of
        the command read at ``origin``: the value to send, the dry run's line and the
        re-drive headers."""
        self._summary.redriven += 1
        expires_in_ms = self._request.expires_in_ms
        value = orjson.dumps(redrive.redrive_value(command, now, expires_in_ms))
        action = f"re-drive (last result {last.describe()})"
        if "expires_at" in command or expires_in_ms is not None:
            action += ", expires_at moved"
        extra: Headers = [
            (redrive.REDRIVE_OF, origin.header()),
            (redrive.REDRIVE_REASON, (last.reason or "").encode()),
        ]
        return value, action, extra

    def _signed(self, record: Any, headers: Headers, value: bytes | None) -> Headers:
        """A copy's headers: the original signature kept on the same bytes; on new bytes,
        which it cannot hold for, replaced by the operator's."""
        if value is record.value:
            return headers
        headers = without_signature(headers)
        if self._signer is None:
            return headers
        return [*headers, *self._signer.headers(value)]

    def decide(self, record: Any) -> tuple[PlannedRecord, bytes | None, Headers]:
        """What to do with one source record: the plan, and the value and headers to send."""
        request, summary = self._request, self._summary
        summary.read += 1
        now = self._clock()
        value: bytes | None = record.value
        command = json_object(value)
        command_id = command.get("command_id") if command is not None else None
        if not isinstance(command_id, str):
            command_id = None
        last = self._processed.get(command_id) if command_id is not None else None
        # Where the failure to re-drive was read, when the latest result is one selected.
        target = (
            last.origin
            if last is not None and redrive.may_redrive(last.type, last.reason, self._reasons)
            else None
        )
        publish, action = True, "publish"
        extra: Headers = []
        if command_id is None:
            summary.not_commands += 1
            action = "publish unchanged (not a command)"
            if request.restamping:
                summary.not_restamped += 1
                action += ", not restamped"
        elif request.selects_processed and command_id in self._sent_ids:
            summary.skipped_repeated += 1
            publish, action = False, "skip (command_id already replayed in this run)"
        elif target is not None and command is not None and last is not None:
            value, action, extra = self._redrive(command, last, target, now)
        elif request.selects_processed and last is not None:
            summary.skipped_processed += 1
            publish, action = False, _skip_processed(last)
        elif request.restamping and command is not None:
            stamped = restamp(
                command, now, shift=request.restamp, expires_in_ms=request.expires_in_ms
            )
            if stamped is None:
                summary.not_restamped += 1
                action = "publish unchanged (no integer issued_at), not restamped"
            else:
                summary.restamped += 1
                value = orjson.dumps(stamped)
                action = "publish restamped"
        elif request.selects_processed:
            action = "publish (no final result yet)"
        headers: Headers = [(k, None if v is None else bytes(v)) for k, v in record.headers or ()]
        if publish:
            summary.selected += 1
            if command_id is not None:
                self._sent_ids.add(command_id)
            if any(k == TRUNCATED_FROM_HEADER for k, _ in headers):
                action += " (a truncated dead-letter copy: the whole record is at x-source-*)"
            headers = self._signed(record, _copy_headers(record, headers, now, extra), value)
        planned = PlannedRecord(
            record.topic, record.partition, record.offset, record.key, command_id, publish, action
        )
        if request.dry_run:
            summary.planned.append(planned)
        return planned, value, headers


def _skip_processed(last: LastResult) -> str:
    """The dry run's line for a command left out because it has a final result."""
    action = f"skip (already has a final result: {last.describe()})"
    if redrive.may_redrive(last.type, last.reason, redrive.REDRIVE_DEFAULT):
        action += "; re-drive it with --failed"
    elif redrive.may_redrive(last.type, last.reason, redrive.REDRIVE_ON_REQUEST):
        action += f"; re-drive it with --failed {last.reason} once its cause is fixed"
    return action


def _copy_headers(record: Any, headers: Headers, now: int, extra: Headers) -> Headers:
    """A copy's headers: the source's, less the re-drive headers of an earlier copy (only
    this replay's claim counts), plus where it was replayed from and when, and ``extra``."""
    kept = [h for h in headers if h[0] not in (redrive.REDRIVE_OF, redrive.REDRIVE_REASON)]
    return [
        *kept,
        (REPLAYED_FROM, f"{record.topic}:{record.partition}:{record.offset}".encode()),
        (REPLAYED_AT, str(now).encode()),
        *extra,
    ]


def _operator_signer(settings: Settings, request: ReplayRequest) -> Signer | None:
    """The operator's producer identity, which signs the copies whose bytes change; a run
    that would change bytes without one is refused (see the module docstring)."""
    if settings.producer_id and settings.producer_key_file is not None:
        try:
            return Signer.of(settings.producer_id, settings.producer_key_file)
        except ProducerKeyError as exc:
            raise ReplayArgumentError(str(exc)) from None
    changes = request.restamping or request.failed is not None
    if changes and not request.dry_run and settings.require_signed_commands:
        what = "re-drives" if request.failed is not None else "re-stamps"
        raise ReplayArgumentError(
            f"this replay {what} commands, which changes their bytes and so their signature: "
            "set CANCEL_WORKER_PRODUCER_ID and CANCEL_WORKER_PRODUCER_KEY_FILE (or "
            "--producer-id and --producer-key-file) to an operator producer of the worker's "
            "producers file, entitled to the accounts replayed"
        )
    return None


async def replay(
    settings: Settings,
    request: ReplayRequest,
    *,
    observer: ReplayObserver | None = None,
    clock: Callable[[], int] = now_ms,
    stall_timeout_s: float = STALL_TIMEOUT_S,
) -> ReplaySummary:
    """Replay ``request`` from its source topic to ``settings.commands_topic``.

    Returns once every published record is acknowledged. Raises
    :class:`ReplayArgumentError` for a bad request (unknown topic or partition included)
    before anything is published, and :class:`ReplayError` when Kafka fails (the message
    says how many records were acknowledged before that)."""
    request.check()
    signer = _operator_signer(settings, request)
    source, target = request.source_topic(settings), settings.commands_topic
    try:
        topics = await cluster_topics(
            settings.bootstrap_servers,
            settings.kafka_request_timeout_ms,
            client_id="cancel-worker-replay-admin",
            **security_options(settings),
        )
    except KafkaError as exc:
        raise ReplayError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}") from exc
    partitions = _partitions(topics, source)
    _partitions(topics, target)
    if request.selects_processed:
        _partitions(topics, settings.results_topic)
    if request.partition is not None and request.partition not in partitions:
        raise ReplayArgumentError(
            f"partition {request.partition} does not exist: {source} has partitions "
            f"{', '.join(map(str, partitions))}"
        )
    consumer = reader_consumer(
        settings.bootstrap_servers,
        f"{settings.client_id}-replay",
        settings.kafka_request_timeout_ms,
        **security_options(settings),
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise ReplayError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}") from exc
    try:
        chosen = partitions if request.partition is None else [request.partition]
        tps = [TopicPartition(source, p) for p in chosen]
        ranges = await _ranges(consumer, request, tps)
        summary = ReplaySummary(
            source,
            target,
            {tp.partition: r for tp, r in ranges.items()},
            request.dry_run,
            redriving=request.failed is not None,
        )
        processed: dict[str, LastResult] = {}
        if request.selects_processed:
            processed = await final_results(
                settings.bootstrap_servers, settings.results_topic, **security_options(settings)
            )
        log.info(
            "replay %s -> %s ranges=%s dry_run=%s skip_processed=%s failed=%s",
            source,
            target,
            summary.ranges,
            request.dry_run,
            request.skip_processed,
            None if request.failed is None else ",".join(sorted(request.redrive_reasons)),
        )
        await _run(
            settings,
            request,
            consumer,
            ranges,
            summary,
            processed,
            observer,
            clock,
            stall_timeout_s,
            signer,
        )
    except KafkaError as exc:
        raise ReplayError(f"Kafka failed during the replay: {exc!r}") from exc
    finally:
        await consumer.stop()
    log.info("%s", summary.line())
    return summary


async def _run(
    settings: Settings,
    request: ReplayRequest,
    consumer: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, tuple[int, int]],
    summary: ReplaySummary,
    processed: Mapping[str, LastResult],
    observer: ReplayObserver | None,
    clock: Callable[[], int],
    stall_timeout_s: float,
    signer: Signer | None = None,
) -> None:
    plan = _Plan(request, processed, summary, clock, signer)
    if observer is not None:
        observer.started(sum(end - start for start, end in ranges.values()))
    producer = None if request.dry_run else make_producer(settings)
    try:
        if producer is not None:
            await producer.start()
        pending: list[asyncio.Future[Any]] = []
        async for batch in read_ranges(consumer, ranges, stall_timeout_s):
            for record in batch:
                planned, value, headers = plan.decide(record)
                if producer is not None and planned.publish:
                    # send() enqueues in call order: per partition, copies keep source order.
                    pending.append(
                        await producer.send(
                            summary.target_topic, value, key=record.key, headers=headers
                        )
                    )
                if observer is not None:
                    observer.record(planned)
            if len(pending) >= ACK_BATCH:
                await _acked(pending, summary)
        await _acked(pending, summary)
    except KafkaError as exc:
        raise ReplayError(
            f"Kafka failed during the replay after {summary.published} record(s) were "
            f"published: {exc!r}"
        ) from exc
    except ReadStalledError as exc:
        raise ReplayError(f"{exc} (after {summary.published} record(s) were published)") from exc
    finally:
        if observer is not None:
            observer.finished()
        if producer is not None:
            await producer.stop()


async def _acked(pending: list[asyncio.Future[Any]], summary: ReplaySummary) -> None:
    """Wait for the acks of ``pending`` (cleared), counting them in ``summary.published``."""
    if not pending:
        return
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    pending.clear()
    summary.published += sum(1 for o in outcomes if not isinstance(o, BaseException))
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
