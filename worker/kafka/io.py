"""Kafka adapters: aiokafka consumer and producer, the at-least-once and exactly-once sinks,
topic admin, and the TLS/SASL options every Kafka client built from settings gets
(:func:`security_options`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.producer import sender as aiokafka_sender
from cryptography import x509

from worker import metrics
from worker.kafka.fencing import (
    Committed,
    GroupFencedError,
    MemberSource,
    NeedsNewerBrokerError,
    commit_offsets_as_member,
    stable_committed_with_metadata,
)
from worker.kafka.pipeline import (
    Flush,
    FlushError,
    InRecord,
    OutRecord,
    Partition,
    Pipeline,
    TakeOverRefusedError,
    decode_ahead,
)
from worker.settings import (
    KAFKA_SASL_PROTOCOLS,
    KAFKA_TLS_PROTOCOLS,
    Settings,
    SettingsError,
    env_name,
)

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 4 * 1024 * 1024  # the dead-letter copy of a large poison record must fit
# A broker that verifies transactions (Kafka 3.6+, on by default) answers a produce or an
# offset commit that races the previous transaction's markers with a retriable error
# (NOT_ENOUGH_REPLICAS, COORDINATOR_NOT_AVAILABLE), and the client waits its retry backoff,
# 100 ms by default: measured paced, 12 % of the transactions took over 100 ms. 20 ms is
# the wait the Java client and aiokafka itself use for the same race on AddPartitionsToTxn.
TRANSACTIONAL_RETRY_BACKOFF_MS = 20
# A transaction begun right after a commit meets the same race at its first AddPartitionsToTxn:
# the coordinator answers CONCURRENT_TRANSACTIONS until the previous transaction's markers
# are written (2-5 ms on a loopback broker), and aiokafka then waits a fixed 20 ms
# (``BACKOFF_OVERRIDE``, Java's ``ADD_PARTITIONS_RETRY_BACKOFF_MS``). Under steady load every
# transaction begins so, and pays those 20 ms in its results' latency: measured back to back,
# a transaction took 22.4 ms at the median with 20 ms and 4.5 ms with 2 ms. So the first
# ``CONCURRENT_RETRIES_SHORT`` refusals in a row wait ``CONCURRENT_BACKOFF_S``, later ones
# aiokafka's own 20 ms: markers stuck behind an unavailable partition meet at most 50
# requests a second from a member, as from a Java client.
CONCURRENT_BACKOFF_S = 0.002
CONCURRENT_RETRIES_SHORT = 10


def security_options(settings: Settings) -> dict[str, Any]:
    """The TLS and SASL keyword arguments of every Kafka client built from ``settings``:
    ``security_protocol`` always; an ``ssl_context`` (the CA, the client certificate and its
    key loaded; certificates required, host names verified) for SSL and SASL_SSL;
    ``sasl_mechanism``, ``sasl_plain_username`` and ``sasl_plain_password`` for
    SASL_PLAINTEXT and SASL_SSL. The one place these options are built: every consumer,
    producer and admin client of the product passes them (a test reads the code to hold
    that). Raises :class:`~worker.settings.SettingsError` when the TLS material cannot be
    loaded (a CA file that holds no certificate, a wrong key password, a key that does not
    belong to the certificate); secrets are never in the message."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in KAFKA_TLS_PROTOCOLS:
        options["ssl_context"] = _tls_context(
            settings.kafka_ssl_cafile,
            settings.kafka_ssl_certfile,
            settings.kafka_ssl_keyfile,
            settings.kafka_ssl_key_password,
        )
    if protocol in KAFKA_SASL_PROTOCOLS:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


@functools.lru_cache(maxsize=8)
def _tls_context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None, password: str
) -> ssl.SSLContext:
    """One context per TLS configuration, shared by the clients (a context with the system's
    CAs takes a while to build, and an exactly-once take-over starts a producer per partition)."""
    from aiokafka.helpers import create_ssl_context  # noqa: PLC0415 - only with TLS

    asked: list[bool] = []

    def key_password() -> bytes:
        # Called only for an encrypted key. Always given, so that OpenSSL never prompts on
        # a terminal for a password that was not configured.
        asked.append(True)
        return password.encode()

    try:
        context: ssl.SSLContext = create_ssl_context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError is an OSError too
        problem = exc.strerror if not isinstance(exc, ssl.SSLError) else "no PEM certificate in it"
        raise SettingsError(
            f"{env_name('kafka_ssl_cafile')}: cannot load the CA from {cafile}: {problem}"
        ) from None
    if certfile is not None:
        try:
            context.load_cert_chain(certfile, keyfile, key_password)
        except OSError as exc:
            raise SettingsError(
                _cert_chain_problem(exc, certfile, keyfile, bool(asked), bool(password))
            ) from None
    return context


def _cert_chain_problem(
    exc: OSError, certfile: Path, keyfile: Path | None, encrypted: bool, has_password: bool
) -> str:
    """What went wrong loading the client certificate and key (OpenSSL only says "PEM lib")."""
    key_name = env_name("kafka_ssl_keyfile" if keyfile is not None else "kafka_ssl_certfile")
    key_path = keyfile if keyfile is not None else certfile
    if not isinstance(exc, ssl.SSLError):
        return f"cannot read {certfile} or {key_path}: {exc.strerror}"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return (
            f"{key_name}: the private key in {key_path} does not belong to the certificate "
            f"in {certfile} ({env_name('kafka_ssl_certfile')})"
        )
    if encrypted:
        if not has_password:
            return (
                f"{key_name}: the private key in {key_path} is encrypted: "
                f"set {env_name('kafka_ssl_key_password')}"
            )
        return (
            f"{env_name('kafka_ssl_key_password')} does not decrypt the private key in "
            f"{key_path} ({key_name}): wrong password"
        )
    try:
        x509.load_pem_x509_certificates(Path(certfile).read_bytes())
    except (OSError, ValueError):
        return f"{env_name('kafka_ssl_certfile')}: no PEM certificate in {certfile}"
    return f"{key_name}: no PEM private key in {key_path}"


def make_producer(settings: Settings, **extra: object) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-producer",
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        max_request_size=MAX_RECORD_BYTES,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **security_options(settings),
        **extra,
    )


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-consumer",
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=settings.max_poll_records,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        max_partition_fetch_bytes=MAX_RECORD_BYTES,
        fetch_max_bytes=4 * MAX_RECORD_BYTES,
        **security_options(settings),
    )


def _tp(part: Partition) -> TopicPartition:
    return TopicPartition(part[0], part[1])


# Refusals no retry can change: the cluster's ACLs do not let this worker's principal use
# its group, its topics or its transactional ids.
REFUSED = (
    TransactionalIdAuthorizationFailed,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)


def refusal(exc: BaseException, what: str) -> TakeOverRefusedError:
    """A take-over's permanent refusal (``exc``, one of :data:`REFUSED`) in one line."""
    return TakeOverRefusedError(
        f"{what} refused by the cluster ({type(exc).__name__}): grant this worker's principal "
        "the ACLs docs/security.md lists (group, topics, transactional ids) and restart it"
    )


class ConsumerSource:
    """Adapts the consumer to the pipeline's :class:`~worker.kafka.pipeline.RecordSource`."""

    def __init__(self, consumer: AIOKafkaConsumer, *, require_stable: bool = True) -> None:
        self._consumer = consumer
        # Exactly-once reads positions with require_stable (OffsetFetch v7, Kafka 2.5+);
        # at-least-once falls back to the plain committed offsets on older brokers.
        self._require_stable = require_stable
        self._stable_missing = False

    async def fetch(self, timeout_ms: int) -> Sequence[InRecord]:
        try:
            batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        except REFUSED as exc:  # the group (joining it) or the topic (reading it)
            group = self._consumer._group_id
            raise refusal(exc, f"consuming as a member of the group {group!r}") from exc
        out: list[InRecord] = []
        for records in batches.values():
            out.extend(
                InRecord(
                    r.topic,
                    r.partition,
                    r.offset,
                    r.key,
                    r.value,
                    tuple((k, None if v is None else bytes(v)) for k, v in (r.headers or ())),
                )
                for r in records
            )
        return out

    def owns(self, part: Partition) -> bool:
        return _tp(part) in self._consumer.assignment()

    def pause(self, parts: Sequence[Partition]) -> None:
        owned = self._consumer.assignment()
        self._consumer.pause(*(tp for tp in map(_tp, parts) if tp in owned))

    def resume(self, parts: Sequence[Partition]) -> None:
        owned = self._consumer.assignment()
        self._consumer.resume(*(tp for tp in map(_tp, parts) if tp in owned))

    def rejoin(self) -> None:
        coordinator = self._consumer._coordinator
        if coordinator is not None:
            coordinator.request_rejoin()

    async def rewind(self, parts: Sequence[Partition]) -> dict[Partition, frozenset[int]]:
        try:
            committed = await self._committed(parts)
        except REFUSED as exc:
            raise refusal(exc, f"reading the committed offsets of {list(parts)}") from exc
        positions = {_tp(p): None if c is None else c.offset for p, c in committed.items()}
        never = [tp for tp, offset in positions.items() if offset is None]
        if never:  # nothing committed yet: from the beginning (auto_offset_reset=earliest)
            positions.update(await self._consumer.beginning_offsets(never))
        skips = {
            p: decode_ahead(c.offset, c.metadata) for p, c in committed.items() if c is not None
        }
        owned = self._consumer.assignment()
        # No await from here on: the caller drops what was read before, atomically.
        for tp, offset in positions.items():
            if tp in owned and offset is not None:
                self._consumer.seek(tp, offset)
        return skips

    async def _committed(self, parts: Sequence[Partition]) -> dict[Partition, Committed | None]:
        """Read with require_stable (never a position an open transaction is replacing);
        without it where the broker lacks OffsetFetch v7 and delivery is at-least-once."""
        if not self._stable_missing:
            try:
                return await stable_committed_with_metadata(self._consumer, parts)
            except NeedsNewerBrokerError:
                if self._require_stable:
                    raise
                self._stable_missing = True
                log.info(
                    "the broker has no OffsetFetch v7 (Kafka before 2.5): reading committed "
                    "positions without require_stable (at-least-once needs none)"
                )
        found = await self._consumer._coordinator.fetch_committed_offsets(list(map(_tp, parts)))
        out: dict[Partition, Committed | None] = {}
        for part in parts:
            c = found.get(_tp(part))
            out[part] = None if c is None or c.offset < 0 else Committed(c.offset, c.metadata)
        return out


COMMITTING = "committing the transaction"
"""The start of the DEBUG line written as a flush sends its commit (what a fault test waits
for to pause the broker while the commit is under way)."""

_SHORTENED: list[Callable[..., Any]] = []  # aiokafka's own handle_response, once replaced


def shorten_concurrent_transactions_backoff() -> bool:
    """Make aiokafka retry the first AddPartitionsToTxn refused with CONCURRENT_TRANSACTIONS
    after ``CONCURRENT_BACKOFF_S`` for ``CONCURRENT_RETRIES_SHORT`` refusals in a row, then
    after its own wait (see ``CONCURRENT_BACKOFF_S``). Once per process (every transactional
    producer of the process gets it, the worker's own and any other); idempotent, even once
    something else has wrapped the handler since. False (and a warning) when the aiokafka in
    use has no such handler: transactions then work as before, with 20 ms between a commit
    and a transaction begun at once after it."""
    if _SHORTENED:
        return True
    handler = getattr(aiokafka_sender, "AddPartitionsToTxnHandler", None)
    override = getattr(aiokafka_sender, "BACKOFF_OVERRIDE", None)
    original = getattr(handler, "handle_response", None)
    if handler is None or not isinstance(override, float) or original is None:
        log.warning(
            "aiokafka has no AddPartitionsToTxn backoff to shorten: a transaction begun "
            "right after a commit waits aiokafka's own backoff"
        )
        return False

    def handle_response(self: Any, resp: Any) -> Any:
        backoff = original(self, resp)
        sender = self._sender
        if backoff is not override:  # success, or another error: its own wait
            sender._cancel_worker_concurrent_refusals = 0
            return backoff
        refusals = getattr(sender, "_cancel_worker_concurrent_refusals", 0) + 1
        sender._cancel_worker_concurrent_refusals = refusals
        if refusals > CONCURRENT_RETRIES_SHORT:
            return backoff
        return CONCURRENT_BACKOFF_S

    _SHORTENED.append(original)
    handler.handle_response = handle_response
    return True


class AtLeastOnceSink:
    """Publish with acks=all and wait for every ack; then commit consumer offsets.

    A failure between the two repeats the batch: results can be duplicated, never lost."""

    def __init__(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer) -> None:
        self._producer = producer
        self._consumer = consumer

    async def flush(self, batches: Mapping[Partition, Flush]) -> None:
        # send() enqueues in call order (so per-partition order is kept); then wait for acks.
        futures = [
            await _send(self._producer, r) for batch in batches.values() for r in batch.records
        ]
        await asyncio.gather(*futures)
        await self._consumer.commit({_tp(p): (b.position, b.metadata) for p, b in batches.items()})

    async def assigned(self, parts: Sequence[Partition]) -> None:
        """Nothing to take over: offsets are committed through the group."""

    async def revoked(self, parts: Sequence[Partition]) -> None:
        """Nothing to let go of."""


FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)


class SinkClosedError(RuntimeError):
    """A producer was asked of a transactional sink that is closed."""


class TransactionalSink:
    """Exactly-once: one transactional producer per member, one transaction per flush for
    every partition in it: the results and the consumer offsets, both or neither.

    Results are sent into the open transaction as they complete (:meth:`stage`, begun by
    the first of them), and a flush sends what was not staged, the offsets, and commits.
    The broker's work for a transaction is so spread over the interval instead of done
    all at once at its end, where it slowed every request to the broker meanwhile (the
    commands being read included): measured, the flush's transaction about half as long.

    Fencing has two parts (KIP-447, :mod:`worker.kafka.fencing`):

    * The offsets are committed with the member's group generation (``TxnOffsetCommit``
      v3). A member that lost its partitions without knowing it (paused past its session
      timeout) has its offsets refused, so its transaction aborts and nothing it published
      is read; and a new owner reads committed positions with ``require_stable``, so it
      never starts from a position that an open transaction is about to move.
    * A member that died leaves its transaction open. Every ``transactional.id`` is named
      after an input partition, ``<prefix>-<topic>-<partition>``: a member's producer takes
      the id of the lowest partition it owns, and on every take-over the new owner of a
      partition starts a producer with that partition's id (the producer it works with, or
      one it stops at once). Any id a previous member used is so taken by the member that
      owns its partition now, which aborts what was left open without waiting for the
      transaction timeout. (The ids are those of the earlier producer-per-partition design:
      a member of that version still running is fenced the same way.)

    A producer whose transaction failed (not fenced) is stopped, and the next flush starts
    a new one with the same ``transactional.id``, which aborts what the old one left open.
    aiokafka cannot be trusted to recover by itself: when its sender task dies (seen during
    a broker outage) the producer is left in FATAL_ERROR, refusing every later transaction.
    A producer stopped for any other reason (a rebalance, the close) aborts its open
    transaction first, so that staged results never hold back the results topic's readers
    until the transaction timeout.
    """

    def __init__(
        self,
        settings: Settings,
        member: MemberSource,
        *,
        producer_factory: Callable[[str], AIOKafkaProducer] | None = None,
    ) -> None:
        shorten_concurrent_transactions_backoff()
        self._settings = settings
        self._member = member
        self._group_id = settings.group_id
        self._prefix = settings.transactional_id_prefix or settings.group_id
        self._factory = producer_factory or (
            lambda tid: make_producer(
                settings,
                transactional_id=tid,
                transaction_timeout_ms=settings.transaction_timeout_ms,
                retry_backoff_ms=TRANSACTIONAL_RETRY_BACKOFF_MS,
            )
        )
        self._owned: set[Partition] = set()
        self._producer: AIOKafkaProducer | None = None
        self._producer_for: Partition | None = None  # whose transactional.id it has
        self._closed = False
        # The open transaction: its number, whether the producer has begun it, the records
        # staged per partition, those still to send, the sends' acks, a staging failure.
        self._transaction = 0
        self._open = False
        self._staged: dict[Partition, int] = {}
        self._to_send: deque[OutRecord] = deque()
        self._acks: list[asyncio.Future[Any]] = []
        self._sender: asyncio.Task[None] | None = None
        self._staging_failed: Exception | None = None
        self._flushing = False
        # A commit cut short after EndTxn was sent: its task (on the producer that sent it,
        # which is kept) and the partitions whose outcome it decides (see settle).
        self._committing: asyncio.Task[None] | None = None
        self._committing_parts: frozenset[Partition] = frozenset()

    def transactional_id(self, part: Partition) -> str:
        return f"{self._prefix}-{part[0]}-{part[1]}"

    @property
    def transaction(self) -> int:
        """The open transaction's number. It changes whenever a transaction ends (committed,
        aborted, or its producer stopped): records staged before are no longer in it."""
        return self._transaction

    @property
    def accepting(self) -> bool:
        return (
            self._producer is not None
            and not self._flushing
            and self._staging_failed is None
            and self._committing is None  # a commit in doubt: no new transaction yet
        )

    def stage(self, part: Partition, records: Sequence[OutRecord]) -> bool:
        """Send a partition's next completed results into the open transaction, ahead of
        the flush that commits them with the partition's position; they follow, in order,
        those staged for it before. Whether they were staged: if not (no producer yet, the
        partition not taken over, a flush under way), the flush sends them."""
        producer = self._producer
        if producer is None or not self.accepting or part not in self._owned:
            return False
        if not records:
            return True
        self._to_send.extend(records)
        self._staged[part] = self._staged.get(part, 0) + len(records)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_staged(producer), name="stage")
        return True

    async def _send_staged(self, producer: AIOKafkaProducer) -> None:
        try:
            if not self._open:
                await producer.begin_transaction()
                self._open = True
            while self._to_send:
                r = self._to_send.popleft()
                ack = await _send(producer, r)
                ack.add_done_callback(_retrieve)  # read at the flush, or dropped with it
                self._acks.append(ack)
        except Exception as exc:  # noqa: BLE001 - the flush fails with it, the records resent
            self._staging_failed = exc

    def _end_transaction(self) -> None:
        """Whatever was staged is no longer in a transaction of this sink."""
        self._transaction += 1
        self._open = False
        self._staged.clear()
        self._to_send.clear()
        self._acks = []
        self._staging_failed = None

    async def assigned(self, parts: Sequence[Partition]) -> None:
        """Own the partitions: the producer gets the lowest one's id, and every other new
        partition's id is taken once and let go (aborting whatever a previous owner left
        open under it). All at once; any failure fails the take-over, which is retried."""
        self._refuse_if_closed()
        self._owned.update(parts)
        lowest = min(self._owned)
        if self._producer_for != lowest or any(p in self._staged for p in parts):
            await self._stop_producer(abort=True)
        jobs = [self._fence(p) for p in set(parts) if p != lowest]
        if self._producer is None:
            jobs.append(self._start(lowest))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancellation
        failed = [o for o in outcomes if isinstance(o, Exception)]
        for exc in failed:
            if isinstance(exc, REFUSED):
                raise refusal(exc, f"taking the transactional ids of {list(parts)}") from exc
        if failed:
            raise failed[0]

    async def _started(self, part: Partition) -> AIOKafkaProducer:
        self._refuse_if_closed()
        producer = self._factory(self.transactional_id(part))
        try:
            await producer.start()  # init_transactions: fences the id's previous user
            self._refuse_if_closed()  # closed meanwhile: nothing would ever stop it
        except BaseException:
            await _stop_quietly(producer, self._settings.commit_timeout_s)
            raise
        return producer

    async def _start(self, part: Partition) -> AIOKafkaProducer:
        producer = await self._started(part)
        commit_offsets_as_member(producer, self._member)
        self._producer, self._producer_for = producer, part
        return producer

    async def _fence(self, part: Partition) -> None:
        await _stop_quietly(await self._started(part), self._settings.commit_timeout_s)

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise SinkClosedError("no producer: the sink is closed")

    async def revoked(self, parts: Sequence[Partition]) -> None:
        """Let go of the partitions; the producer too when its id's partition goes (its
        new owner takes that id). Called after the partitions' last flush; results of
        theirs staged since are aborted with the transaction, never committed."""
        self._owned.difference_update(parts)
        if self._producer_for in parts or not self._owned or any(p in self._staged for p in parts):
            await self._stop_producer(abort=True)

    async def _stop_producer(self, *, abort: bool = False) -> None:
        """Stop the producer; with ``abort``, abort its open transaction first."""
        producer, self._producer, self._producer_for = self._producer, None, None
        sender, self._sender = self._sender, None
        committing = self._committing
        if committing is not None and not committing.done():
            committing.cancel()  # its outcome cannot be learnt any more (settle says so)
        was_open = self._open
        self._end_transaction()
        if sender is not None and not sender.done():
            sender.cancel()
            await asyncio.wait([sender])
        if producer is not None:
            timeout_s = self._settings.commit_timeout_s
            if abort and was_open:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.abort_transaction(), timeout_s)
            await _stop_quietly(producer, timeout_s)

    @property
    def in_doubt(self) -> frozenset[Partition]:
        """The partitions of a flush cut short after its EndTxn(COMMIT) was sent."""
        return self._committing_parts if self._committing is not None else frozenset()

    async def settle(self) -> bool:
        """The outcome of the commit cut short, learnt on the producer that sent it (as
        Java's ``commitTransaction`` contract says: after a timeout the commit may still
        complete; retry it, never send its content in another transaction). True when it
        committed; raises when it cannot be learnt (failed, or its producer stopped)."""
        task = self._committing
        if task is None:
            return True
        bound_s = self._settings.commit_timeout_s + self._settings.kafka_request_timeout_ms / 1000
        await asyncio.wait([task], timeout=bound_s)  # neither cancels it nor is cancelled
        self._committing, self._committing_parts = None, frozenset()
        if not task.done():
            task.cancel()
            await self._stop_producer()
            raise TimeoutError(f"no answer to the commit within {bound_s:.1f}s")
        if task.cancelled():
            raise RuntimeError("the producer that sent the commit was stopped before its answer")
        exc = task.exception()
        if exc is not None:
            await self._stop_producer()
            raise RuntimeError(f"the commit failed: {exc!r}")
        metrics.TRANSACTIONS.labels("committed").inc()
        return True

    def _commit_sent(self) -> bool:
        return self._committing is not None

    async def flush(self, batches: Mapping[Partition, Flush]) -> None:
        """One transaction for every partition's batch: all of it is stored, or none. The
        batches hold every partition with staged records, each from its first staged one."""
        if self._committing is not None:
            raise RuntimeError("a commit cut short is still in doubt: settle it first")
        producer = self._producer
        if producer is None:  # every flush tries again until a producer starts
            if not self._owned:
                raise RuntimeError(f"no producer for {list(batches)}: not taken over yet")
            producer = await self._start(min(self._owned))
        self._flushing = True
        try:
            await self._commit(producer, batches)
        except Exception as exc:
            metrics.TRANSACTIONS.labels("failed").inc()
            # Fenced, its id is another member's; otherwise the next flush starts a new
            # producer under the same id, which aborts what this one left open.
            await self._stop_producer()
            if isinstance(exc, (*FENCED, GroupFencedError)):
                # Another member took a partition's id, or the group has a generation
                # without this member: a rebalance is under way or done, and whatever is
                # assigned next is taken over afresh. Until then, nothing is published.
                lost = sorted(self._owned | set(batches))
                self._owned.clear()
                raise FlushError(f"fenced: {exc!r}", lost=lost) from exc
            raise FlushError(f"the transaction failed: {exc!r}") from exc
        except BaseException:  # cancelled (a bounded flush ran out of time)
            if self._commit_sent():
                # EndTxn was sent: the commit may still complete. Keep the producer to
                # learn its outcome (settle); its content is never sent again meanwhile.
                self._committing_parts = frozenset(batches)
                self._end_transaction()
            else:
                # Not committing: abort, so that readers of the results are not held by
                # the open transaction until a take-over fences the id.
                await self._stop_producer(abort=True)
            raise
        finally:
            self._flushing = False
            if self._producer is producer:
                self._end_transaction()
        metrics.TRANSACTIONS.labels("committed").inc()

    async def _commit(self, producer: AIOKafkaProducer, batches: Mapping[Partition, Flush]) -> None:
        """The transaction's rest: what was not staged, the offsets, the commit."""
        sender = self._sender
        if sender is not None:
            await asyncio.wait([sender])  # a cancelled one is not this flush's cancel
            if sender.cancelled():
                raise RuntimeError("staging was stopped")
        if self._staging_failed is not None:
            raise self._staging_failed
        for part, count in self._staged.items():
            if part not in batches or len(batches[part].records) < count:
                raise RuntimeError(f"{part}: {count} record(s) staged are not in the flush")
        if not self._open:
            await producer.begin_transaction()
            self._open = True
        acks = self._acks
        for part, batch in batches.items():
            for r in batch.records[self._staged.get(part, 0) :]:
                acks.append(await _send(producer, r))
        # The records acknowledged before the offsets join the transaction: a produce that a
        # broker verifying transactions (Kafka 3.6+) checks with the coordinator while
        # AddOffsetsToTxn changes the transaction is refused (NOT_ENOUGH_REPLICAS, retried
        # after the producer's 20 ms backoff); one round trip less concurrency saves that.
        await asyncio.gather(*acks)
        await producer.send_offsets_to_transaction(
            {_tp(p): (b.position, b.metadata) for p, b in batches.items()}, self._group_id
        )
        # EndTxn(COMMIT): from here the outcome is the broker's; a cut short leaves it in
        # doubt (flush, settle). The task runs on whether or not this flush is cancelled.
        log.debug("%s: %d partition(s), EndTxn(COMMIT)", COMMITTING, len(batches))
        task = self._committing = asyncio.ensure_future(producer.commit_transaction())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():  # not this flush's cancel: its producer was stopped
                self._committing = None
            raise
        except BaseException:  # the commit failed: nothing of it is stored
            self._committing = None
            raise
        self._committing = None

    async def close(self) -> None:
        """Stop the producer; a producer still starting is stopped as its start ends."""
        self._closed = True
        self._owned.clear()
        await self._stop_producer(abort=True)


async def _send(producer: AIOKafkaProducer, record: OutRecord) -> asyncio.Future[Any]:
    """Enqueue the record (in call order); the future is its acknowledgement."""
    ack: asyncio.Future[Any] = await producer.send(
        record.topic, record.value, key=record.key, headers=list(record.headers)
    )
    return ack


def _retrieve(ack: asyncio.Future[Any]) -> None:
    if not ack.cancelled():
        ack.exception()


async def _stop_quietly(producer: AIOKafkaProducer, timeout_s: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), timeout_s)


class PipelineRebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        parts = [(tp.topic, tp.partition) for tp in revoked]
        if parts:
            log.info("partitions revoked: %s", parts)
            await self._pipeline.on_revoked(parts)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        parts = [(tp.topic, tp.partition) for tp in assigned]
        log.info("partitions assigned: %s", parts)
        self._pipeline.on_assigned(parts)


async def wait_for_kafka(settings: Settings, *, max_delay_s: float = 5.0) -> None:
    """Return once the cluster answers; while it does not, say so once and retry.

    A worker started while Kafka is down waits for it instead of exiting (and crash-looping)."""
    bootstrap = settings.bootstrap_servers
    delay, said = 0.2, False
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=5000, **security_options(settings)
        )
        try:
            await admin.start()
            await admin.list_topics()
        except KafkaError as exc:
            if not said:
                log.warning("Kafka unreachable at %s (%s); waiting for it", bootstrap, exc)
                said = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
            continue
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        if said:
            log.warning("Kafka reachable at %s", bootstrap)
        return


async def watch_kafka(
    producer: AIOKafkaProducer, pipeline: Pipeline, *, interval_s: float = 2.0
) -> None:
    """Ask the cluster for metadata every ``interval_s``; tell the pipeline when Kafka
    stops or starts answering, so an outage is reported even while nothing is published."""
    while True:
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), interval_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            pipeline.kafka_unreachable(exc)
        else:
            pipeline.kafka_reachable()
        await asyncio.sleep(interval_s)


async def ensure_topics(bootstrap: str, topics: Mapping[str, int], **kafka: Any) -> None:
    """Create the topics (name → partitions) that do not exist yet. ``kafka``: more client
    options (:func:`security_options` for a cluster named by settings)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, partitions, 1)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile: fine
                await admin.create_topics(wanted)
    finally:
        await admin.close()


async def missing_topics(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[str]:
    present = await consumer.topics()
    return [t for t in topics if t not in present]
