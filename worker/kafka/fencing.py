"""Transactions fenced by the consumer group (KIP-447), which aiokafka 0.14 lacks.

Exactly-once needs two things from the broker that aiokafka does not ask for:

* ``TxnOffsetCommit`` v3 carries the committing member's generation and member id. The
  group coordinator refuses the offsets of a member that is no longer in the group's
  current generation (a member paused past its session timeout, or cut off from the
  coordinator), so its transaction aborts and nothing it published is ever read. With it,
  one transactional producer per member is safe: the producer no longer has to be tied to
  an input partition to be fenced.
* ``OffsetFetch`` v7 with ``require_stable``: while a transaction that commits a partition's
  offset is still open, the coordinator answers ``UNSTABLE_OFFSET_COMMIT`` instead of the
  older offset, so a new owner never starts from a position the open transaction is about
  to move.

Both need a broker of Kafka 2.5 or later. The request classes follow Kafka's message
definitions (``TxnOffsetCommitRequest.json``, ``OffsetFetchRequest.json``); both versions are
"flexible" (compact strings and arrays, tagged fields).
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.client import CoordinationType
from aiokafka.producer.sender import Sender, TxnOffsetCommitHandler
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.transaction import TxnOffsetCommitResponse_v0
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from worker.kafka.pipeline import Partition

# Kafka's error codes that aiokafka 0.14 has no class for, or that matter here by number.
NOT_COORDINATOR = 16
COORDINATOR_NOT_AVAILABLE = 15
COORDINATOR_LOAD_IN_PROGRESS = 14
ILLEGAL_GENERATION = 22
UNKNOWN_MEMBER_ID = 25
REBALANCE_IN_PROGRESS = 27
FENCED_INSTANCE_ID = 82
UNSTABLE_OFFSET_COMMIT = 88
NOT_A_MEMBER_ANY_MORE = {ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID}
COORDINATOR_MOVED = {NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE}
NO_OFFSET = -1

STABLE_FETCH_BACKOFF_S = (0.01, 0.2)  # first and longest wait while a transaction is open
STABLE_FETCH_PATIENCE_S = 5.0  # then fail the take-over, which the pipeline retries


def refusal_for(missing: Sequence[str]) -> str:
    """Why exactly-once cannot run on a broker that lacks the ``missing`` requests."""
    return (
        f"exactly-once delivery needs {', '.join(missing)} (KIP-447: a broker of Kafka 2.5 "
        "or later), which the broker does not offer; upgrade it, or set "
        "DELIVERY=at_least_once"
    )


class NeedsNewerBrokerError(kafka_errors.IncompatibleBrokerVersion):  # type: ignore[misc]
    def __init__(self, missing: str) -> None:
        super().__init__(refusal_for([missing]))


class GroupFencedError(kafka_errors.KafkaError):  # type: ignore[misc]
    """The group coordinator refused the transaction's offsets: this member is not in the
    group's current generation (its partitions belong to another member now)."""

    retriable = False


class OffsetsUnstableError(kafka_errors.KafkaError):  # type: ignore[misc]
    """A transaction that commits these partitions' offsets is still open."""

    retriable = True


# -- the two requests ---------------------------------------------------------------------------


def _tags() -> tuple[str, Any]:
    return ("tags", TaggedFields)


def _per_topic(*partition_fields: tuple[str, Any]) -> tuple[str, Any]:
    """Kafka's ``topics`` array: per topic, its name and its ``partitions`` array."""
    return (
        "topics",
        CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(*partition_fields, _tags())),
            _tags(),
        ),
    )


class TxnOffsetCommitResponse_v3(Response):  # type: ignore[misc]  # noqa: N801 - Kafka's names
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        _per_topic(("partition_index", Int32), ("error_code", Int16)),
        _tags(),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):  # type: ignore[misc]  # noqa: N801
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        _per_topic(
            ("partition_index", Int32),
            ("committed_offset", Int64),
            ("committed_leader_epoch", Int32),
            ("committed_metadata", CompactString("utf-8")),
        ),
        _tags(),
    )


class GroupTxnOffsetCommitRequest(Request[TxnOffsetCommitRequest_v3]):  # type: ignore[misc]
    API_KEY = 28

    def __init__(self, *fields: Any) -> None:
        self._fields = fields

    def build(self, request_struct_class: type[TxnOffsetCommitRequest_v3]) -> Any:
        return request_struct_class(*self._fields)

    def prepare(self, versions: dict[int, tuple[int, int]]) -> Any:
        return self.build(_offered(versions, TxnOffsetCommitRequest_v3))


class OffsetFetchResponse_v7(Response):  # type: ignore[misc]  # noqa: N801
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        _per_topic(
            ("partition_index", Int32),
            ("committed_offset", Int64),
            ("committed_leader_epoch", Int32),
            ("metadata", CompactString("utf-8")),
            ("error_code", Int16),
        ),
        ("error_code", Int16),
        _tags(),
    )


class OffsetFetchRequest_v7(RequestStruct):  # type: ignore[misc]  # noqa: N801
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                _tags(),
            ),
        ),
        ("require_stable", Boolean),
        _tags(),
    )


class StableOffsetFetchRequest(Request[OffsetFetchRequest_v7]):  # type: ignore[misc]
    API_KEY = 9

    def __init__(self, group_id: str, topics: Mapping[str, Sequence[int]]) -> None:
        self._group_id = group_id
        self._topics: list[tuple[str, list[int], dict[int, bytes]]] = [
            (name, list(parts), {}) for name, parts in sorted(topics.items())
        ]

    def build(self, request_struct_class: type[OffsetFetchRequest_v7]) -> Any:
        return request_struct_class(self._group_id, self._topics, True, {})

    def prepare(self, versions: dict[int, tuple[int, int]]) -> Any:
        return self.build(_offered(versions, OffsetFetchRequest_v7))


# What exactly-once needs of the broker, with the names Kafka gives the requests.
NEEDED_REQUESTS: tuple[tuple[type[Any], str], ...] = (
    (TxnOffsetCommitRequest_v3, "TxnOffsetCommit"),
    (OffsetFetchRequest_v7, "OffsetFetch"),
)


def _name(struct: type[Any]) -> str:
    return next(f"{name} v{struct.API_VERSION}" for s, name in NEEDED_REQUESTS if s is struct)


def _covers(versions: Mapping[int, tuple[int, int]], struct: type[Any]) -> bool:
    low, high = versions.get(struct.API_KEY, (0, -1))
    return bool(low <= struct.API_VERSION <= high)


def _offered(versions: Mapping[int, tuple[int, int]], struct: type[Any]) -> type[Any]:
    """``struct``, if the broker's API versions cover it (one version, no fallback)."""
    if not _covers(versions, struct):
        raise NeedsNewerBrokerError(_name(struct))
    return struct


def missing_requests(versions: Mapping[int, tuple[int, int]]) -> list[str]:
    """The requests of :data:`NEEDED_REQUESTS` the broker's API versions (key → (min, max),
    as its ApiVersions answer says) do not cover."""
    return [_name(struct) for struct, _ in NEEDED_REQUESTS if not _covers(versions, struct)]


def broker_versions(client: Any) -> dict[int, tuple[int, int]]:
    """The API versions of a connected broker, from an aiokafka client that has started
    (each connection asks on connecting); empty if none is connected."""
    for conn in client._conns.values():
        if conn.connected() and conn._versions:
            return dict(conn._versions)
    return {}


def exactly_once_refusal(client: Any) -> str | None:
    """Why this cluster cannot give exactly-once delivery; None if it can."""
    missing = missing_requests(broker_versions(client))
    return refusal_for(missing) if missing else None


# -- the member a transaction commits for -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupMember:
    """What ``TxnOffsetCommit`` v3 checks against the group's current generation."""

    generation: int
    member_id: str
    instance_id: str | None = None

    @property
    def joined(self) -> bool:
        """A generation of -1 (not in the group now) would skip the broker's check."""
        return self.generation >= 0 and bool(self.member_id)


def group_member(consumer: AIOKafkaConsumer) -> GroupMember:
    """The consumer's current membership (aiokafka keeps it on its group coordinator)."""
    coordinator = consumer._coordinator
    if coordinator is None:
        return GroupMember(-1, "")
    return GroupMember(
        coordinator.generation, coordinator.member_id, coordinator._group_instance_id
    )


MemberSource = Callable[[], GroupMember]


def commit_offsets_as_member(producer: AIOKafkaProducer, member: MemberSource) -> None:
    """Make ``producer.send_offsets_to_transaction`` send ``TxnOffsetCommit`` v3 with the
    member's generation, as read when the request is made (a flush never spans a
    rebalance: partitions are revoked only after the flush under way has ended)."""
    sender: Sender = producer._sender
    sender._do_txn_offset_commit = functools.partial(_txn_offset_commit, sender, member)


async def _txn_offset_commit(
    sender: Sender,
    member: MemberSource,
    offsets: Mapping[TopicPartition, OffsetAndMetadata],
    group_id: str,
) -> None:
    """aiokafka's ``Sender._do_txn_offset_commit``, with the group-aware handler."""
    if not offsets:
        return
    try:
        node_id = await sender._find_coordinator(CoordinationType.GROUP, group_id)
    except kafka_errors.GroupAuthorizationFailedError as exc:
        sender._txn_manager.error_transaction(exc)
        return
    await _MemberTxnOffsetCommitHandler(sender, offsets, group_id, member).do(node_id)


class _MemberTxnOffsetCommitHandler(TxnOffsetCommitHandler):  # type: ignore[misc]
    def __init__(
        self,
        sender: Sender,
        offsets: Mapping[TopicPartition, OffsetAndMetadata],
        group_id: str,
        member: MemberSource,
    ) -> None:
        super().__init__(sender, offsets, group_id)
        self._member = member

    def create_request(self) -> GroupTxnOffsetCommitRequest | None:
        txn_manager = self._sender._txn_manager
        member = self._member()
        by_topic: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = (
            collections.defaultdict(list)
        )
        for tp, offset in sorted(self._offsets.items()):
            by_topic[tp.topic].append((tp.partition, offset.offset, -1, offset.metadata, {}))
        return GroupTxnOffsetCommitRequest(
            txn_manager.transactional_id,
            self._group_id,
            txn_manager.producer_id,
            txn_manager.producer_epoch,
            member.generation,
            member.member_id,
            member.instance_id,
            [(topic, parts, {}) for topic, parts in by_topic.items()],
            {},
        )

    async def do(self, node_id: int) -> bool:
        if not self._member().joined:  # the broker would take the offsets unchecked
            _abort_with(
                self._sender._txn_manager,
                GroupFencedError("not a member of the group now: offsets not committed"),
            )
            return True
        return bool(await super().do(node_id))

    def handle_response(self, resp: TxnOffsetCommitResponse_v3) -> float | None:
        errors = [(t, p, code) for t, parts, _ in resp.topics for p, code, _ in parts]
        txn_manager = self._sender._txn_manager
        for topic, partition, code in errors:
            if code in NOT_A_MEMBER_ANY_MORE:
                _abort_with(
                    txn_manager,
                    GroupFencedError(
                        f"the group refused the offsets of {topic}[{partition}] "
                        f"({kafka_errors.for_code(code).__name__}): this member is not "
                        "in the group's current generation"
                    ),
                )
                return None
        # Everything else as aiokafka handles it: the errors are those of a v0 answer.
        as_v0 = TxnOffsetCommitResponse_v0(
            resp.throttle_time_ms,
            [(topic, [(p, code) for p, code, _ in parts]) for topic, parts, _ in resp.topics],
        )
        result: float | None = super().handle_response(as_v0)
        return result


def _abort_with(txn_manager: Any, exc: Exception) -> None:
    """Make the transaction abortable with ``exc``: the offsets' caller gets it (and the
    transaction is aborted there). aiokafka also sets it on a waiter nobody awaits once the
    transaction is aborted; it is marked seen here, so that it is not logged as lost."""
    txn_manager.error_transaction(exc)
    txn_manager._transaction_waiter.exception()


# -- the stable committed offsets ----------------------------------------------------------------


class Committed(NamedTuple):
    """A committed position and the metadata committed with it."""

    offset: int
    metadata: str


async def stable_committed(
    consumer: AIOKafkaConsumer,
    parts: Sequence[Partition],
    *,
    patience_s: float = STABLE_FETCH_PATIENCE_S,
) -> dict[Partition, int | None]:
    """The group's committed position of each partition (None: nothing committed), read
    with ``require_stable`` (:func:`stable_committed_with_metadata`)."""
    found = await stable_committed_with_metadata(consumer, parts, patience_s=patience_s)
    return {p: None if c is None else c.offset for p, c in found.items()}


async def stable_committed_with_metadata(
    consumer: AIOKafkaConsumer,
    parts: Sequence[Partition],
    *,
    patience_s: float = STABLE_FETCH_PATIENCE_S,
) -> dict[Partition, Committed | None]:
    """The group's committed position of each partition with its metadata (None: nothing
    committed), read with ``require_stable``: while a transaction that commits one of them
    is open, wait (with backoff, up to ``patience_s``) rather than read the position it is
    replacing."""
    coordinator = consumer._coordinator
    topics: dict[str, list[int]] = collections.defaultdict(list)
    for topic, partition in parts:
        topics[topic].append(partition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    delay, longest = STABLE_FETCH_BACKOFF_S
    while True:
        await coordinator.ensure_coordinator_known()
        node = coordinator.coordinator_id
        request = StableOffsetFetchRequest(coordinator.group_id, topics)
        response = await consumer._client.send(node, request)
        outcome = _read_offsets(response)
        if isinstance(outcome, dict):
            return {p: outcome.get(p) for p in parts}
        if outcome in COORDINATOR_MOVED:
            coordinator.coordinator_dead()
        elif outcome not in (COORDINATOR_LOAD_IN_PROGRESS, UNSTABLE_OFFSET_COMMIT):
            error = kafka_errors.for_code(outcome)
            raise error(f"fetching the committed offsets of {list(parts)}")
        if loop.time() + delay > deadline:
            if outcome == UNSTABLE_OFFSET_COMMIT:
                raise OffsetsUnstableError(
                    f"a transaction committing offsets of {list(parts)} is still open "
                    f"after {patience_s:.1f}s"
                )
            raise kafka_errors.for_code(outcome)(f"the group coordinator for {list(parts)}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, longest)


def _read_offsets(response: OffsetFetchResponse_v7) -> dict[Partition, Committed] | int:
    """The committed offsets and their metadata; or the first error code, when there is one."""
    if response.error_code:
        return int(response.error_code)
    offsets: dict[Partition, Committed] = {}
    for topic, partitions, _ in response.topics:
        for partition, offset, _epoch, metadata, code, _ in partitions:
            if code:
                return int(code)
            if offset != NO_OFFSET:
                offsets[(topic, partition)] = Committed(offset, metadata or "")
    return offsets
