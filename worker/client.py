"""A client for the worker's two topics: what a risk engine, a tool or a test needs.

* :class:`CommandProducer` builds commands from typed arguments, checks them against the
  command schema before they leave (a bad command raises :class:`InvalidCommandError` here,
  not a ``cancel.failed`` later), keys them ``account:symbol`` (so that a kill switch is
  ordered with the single cancels of its symbol: every command carries its symbol, algo
  cancels too, where the exchange does not need it) and publishes with an idempotent
  producer. It returns the command id.
* :class:`ResultConsumer` is an async iterator of typed results (:class:`StrategyCanceled`,
  :class:`StrategiesCanceled`, :class:`CancelFailed`, :class:`CancelDuplicate`), read
  ``read_committed`` so that an exactly-once worker's aborted writes are never seen.
* :class:`CancelClient` is request/reply over the two: ``await client.cancel(...,
  timeout=5)`` publishes and waits for that command's result. Every call shares one results
  reader (assigned every partition, positioned at the end when the client starts), so a
  thousand concurrent calls cost one consumer. A result that does not come in time raises
  :class:`CancelTimeoutError` (the command may still be executed: its result will be on the
  topic).

Results are parsed against the result schema; one that does not match it raises
:class:`ResultError` from :func:`parse_result` and is skipped (and logged) by
:class:`ResultConsumer`'s iterator. A record the client cannot read that carries the command
id a :class:`CancelClient` call is waiting for fails that call at once with
:class:`ResultUnreadableError` (the record and why it is unreadable), never with a timeout.
Money stays a decimal string.

Commands are signed (``producer_id`` and ``private_key``: headers ``x-producer`` and
``x-signature``, the Ed25519 signature of the record value), as a worker with a producers
file requires (docs/security.md). Extra keyword arguments of all three go to
aiokafka (TLS, SASL, client id). Each also has ``from_settings(settings)``: the worker's
cluster, topics and TLS/SASL options (``worker.kafka.io.security_options``), and the
producer's id and key (``PRODUCER_ID``, ``PRODUCER_KEY_FILE``), from the same
``CANCEL_WORKER_*`` settings.

Example (a risk engine; docs/client.md has one that runs as pasted)::

    async with CancelClient(
        "127.0.0.1:9092", producer_id="risk-7", private_key="/run/secrets/risk-7.key"
    ) as client:
        result = await client.cancel_all("desk-a", "UM", "BTCUSDT", timeout=5)
        if isinstance(result, StrategiesCanceled):
            print([s.strategy.algo_id or s.strategy.strategy_id for s in result.strategies])
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Literal, Self

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import RecordMetadata
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jsonschema.exceptions import best_match

from worker import tracing
from worker.core.commands import InvalidCommand, decode
from worker.core.contracts import RESULT_SCHEMA, fast_check, result_validator
from worker.core.timeutil import now_ms
from worker.kafka.io import security_options
from worker.kafka.topic_reader import cluster_topics
from worker.producers import Signer
from worker.settings import Settings

log = logging.getLogger(__name__)

# The worker's own defaults: a client left at its defaults talks to a worker left at its own.
DEFAULT_COMMANDS_TOPIC = Settings.commands_topic
DEFAULT_RESULTS_TOPIC = Settings.results_topic
Market = Literal["UM", "CM"]


class ClientError(Exception):
    """Base of the client's errors."""


class InvalidCommandError(ClientError, ValueError):
    """The command would be refused by the worker; nothing was published."""


class ResultError(ClientError, ValueError):
    """A record on the results topic that is not a result event of the schema."""


class ResultUnreadableError(ResultError):
    """A record on the results topic that names a command id but is not a result event this
    client can read (it fails the result schema, or its type is unknown).

    A :class:`CancelClient` call waiting for ``command_id`` gets this error as soon as the
    record is read, not a :class:`CancelTimeoutError`: the worker answered, and the answer
    is here, in ``event`` (the parsed JSON object) and ``raw`` (the record value), with
    ``problem`` saying what is wrong with it."""

    def __init__(self, command_id: str | None, raw: bytes, event: Any, problem: str) -> None:
        super().__init__(f"result for command {command_id} is unreadable: {problem}")
        self.command_id = command_id
        self.raw = raw
        self.event = event
        self.problem = problem


class CancelTimeoutError(ClientError, TimeoutError):
    """No result for ``command_id`` in time. The command was published and may still be
    executed; its result will be on the results topic."""

    def __init__(self, command_id: str, timeout: float) -> None:
        super().__init__(f"no result for command {command_id} within {timeout:g}s")
        self.command_id = command_id


# -- typed results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Strategy:
    """An order as the result reports it (the schema's ``strategy``); decimals are strings."""

    strategy_id: int | None
    client_strategy_id: str | None
    algo_id: int | None
    client_algo_id: str | None
    status: str | None  # always set on a StrategyCanceled; a kill switch's unknown may lack it
    order_type: str | None
    side: str | None
    position_side: str | None
    orig_qty: str | None
    price: str | None
    stop_price: str | None
    activate_price: str | None
    price_rate: str | None
    time_in_force: str | None
    working_type: str | None
    reduce_only: bool | None
    price_protect: bool | None
    book_time: int | None
    update_time: int | None
    self_trade_prevention_mode: str | None
    good_till_date: int | None
    price_match: str | None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Strategy:
        return cls(**{f.name: obj[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class ExchangeAnswer:
    http_status: int
    code: int | None
    msg: str | None

    @classmethod
    def of(cls, obj: Mapping[str, Any] | None) -> ExchangeAnswer | None:
        return None if obj is None else cls(obj["http_status"], obj["code"], obj["msg"])


@dataclass(frozen=True, slots=True)
class ListedStrategy:
    """An order a kill switch listed, with its route."""

    route: str
    strategy: Strategy


@dataclass(frozen=True, slots=True)
class RouteResult:
    """What one route of a kill switch met (``done``, ``unconfirmed``, ``retired``, ``failed``)."""

    route: str
    outcome: str
    listed: int
    reason: str | None
    detail: str | None
    exchange: ExchangeAnswer | None


@dataclass(frozen=True, slots=True)
class _Common:
    command_id: str | None
    account: str | None
    market: str | None
    symbol: str | None
    attempts: int
    received_at: int
    completed_at: int
    raw: Mapping[str, Any]  # the event as published


@dataclass(frozen=True, slots=True)
class StrategyCanceled(_Common):
    route: str
    strategy: Strategy
    confirmed_by: str


@dataclass(frozen=True, slots=True)
class StrategiesCanceled(_Common):
    complete: bool
    routes: tuple[RouteResult, ...]
    strategies: tuple[ListedStrategy, ...]  # went from NEW to CANCELED
    closed_otherwise: tuple[ListedStrategy, ...]
    still_open: tuple[ListedStrategy, ...]
    unknown: tuple[ListedStrategy, ...]


@dataclass(frozen=True, slots=True)
class CancelFailed(_Common):
    reason: str
    detail: str
    route: str | None
    exchange: ExchangeAnswer | None
    order_status: str | None
    hint: str | None
    routes: tuple[RouteResult, ...] = ()  # a kill switch's routes


@dataclass(frozen=True, slots=True)
class CancelDuplicate(_Common):
    first_result: Mapping[str, Any]


Result = StrategyCanceled | StrategiesCanceled | CancelFailed | CancelDuplicate

_is_result = fast_check(RESULT_SCHEMA)


def _listed(items: list[dict[str, Any]]) -> tuple[ListedStrategy, ...]:
    return tuple(ListedStrategy(x["route"], Strategy.of(x["strategy"])) for x in items)


def _routes(items: list[dict[str, Any]]) -> tuple[RouteResult, ...]:
    return tuple(
        RouteResult(
            r["route"],
            r["outcome"],
            r["listed"],
            r["reason"],
            r["detail"],
            ExchangeAnswer.of(r["exchange"]),
        )
        for r in items
    )


_KINDS = ("strategy.canceled", "strategies.canceled", "cancel.failed", "cancel.duplicate")


def _problem(event: Any) -> str:
    """What is wrong with an event the compiled check refused, briefly."""
    if isinstance(event, dict) and event.get("type") not in _KINDS:
        return f"unknown result type {str(event.get('type'))[:60]!r}"
    error = best_match(result_validator().iter_errors(event))
    if error is None:
        return "refused by the compiled schema check"
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message[:200]}"


def parse_result(raw: bytes | None) -> Result:
    """A typed result from a results-topic record value; :class:`ResultError` if it is not
    one (the schema is the contract), :class:`ResultUnreadableError` when the record is a
    JSON object naming a ``command_id`` (a call waiting for that id learns why)."""
    if raw is None:
        raise ResultError("empty record")
    try:
        event: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ResultError(f"not JSON: {exc}") from exc
    if not _is_result(event) or event.get("type") not in _KINDS:
        problem = _problem(event)
        command_id = event.get("command_id") if isinstance(event, dict) else None
        if isinstance(command_id, str):
            raise ResultUnreadableError(command_id, raw, event, problem)
        raise ResultError(f"not a result event of the schema ({problem}): {raw[:200]!r}")
    common = {
        "command_id": event["command_id"],
        "account": event["account"],
        "market": event["market"],
        "symbol": event["symbol"],
        "attempts": event["attempts"],
        "received_at": event["received_at"],
        "completed_at": event["completed_at"],
        "raw": event,
    }
    kind = event["type"]
    if kind == "strategy.canceled":
        return StrategyCanceled(
            **common,
            route=event["route"],
            strategy=Strategy.of(event["strategy"]),
            confirmed_by=event["confirmed_by"],
        )
    if kind == "strategies.canceled":
        return StrategiesCanceled(
            **common,
            complete=event["complete"],
            routes=_routes(event["routes"]),
            strategies=_listed(event["strategies"]),
            closed_otherwise=_listed(event["closed_otherwise"]),
            still_open=_listed(event["still_open"]),
            unknown=_listed(event["unknown"]),
        )
    if kind == "cancel.failed":
        return CancelFailed(
            **common,
            reason=event["reason"],
            detail=event["detail"],
            route=event["route"],
            exchange=ExchangeAnswer.of(event["exchange"]),
            order_status=event["order_status"],
            hint=event["hint"],
            routes=_routes(event.get("routes") or []),
        )
    return CancelDuplicate(**common, first_result=event["first_result"])


# -- commands ----------------------------------------------------------------------------------


def build_command(
    account: str,
    market: str,
    *,
    symbol: str | None = None,
    strategy_id: int | None = None,
    client_strategy_id: str | None = None,
    algo_id: int | None = None,
    client_algo_id: str | None = None,
    all_on_symbol: bool = False,
    command_id: str | None = None,
    expires_in_ms: int | None = None,
    reason: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """A command as the worker reads it, not yet checked (:func:`checked_command` checks).
    ``all_on_symbol``: the kill switch (``scope: "symbol"``) instead of one order."""
    issued_at = now_ms()
    command: dict[str, Any] = {
        "command_id": command_id or f"c-{uuid.uuid4().hex[:24]}",
        "account": account,
        "market": market,
        "issued_at": issued_at,
        "symbol": symbol,
        "strategy_id": strategy_id,
        "client_strategy_id": client_strategy_id,
        "algo_id": algo_id,
        "client_algo_id": client_algo_id,
        "scope": "symbol" if all_on_symbol else None,
        "expires_at": issued_at + expires_in_ms if expires_in_ms is not None else None,
        "reason": reason,
        "source": source,
    }
    return {k: v for k, v in command.items() if v is not None}


def checked_command(command: Mapping[str, Any]) -> bytes:
    """The command as bytes, or :class:`InvalidCommandError` with the worker's own reason.
    Beyond the worker's rules, the client asks for ``symbol`` on every command (algo cancels
    included, where the exchange does not use it): commands are keyed ``account:symbol``."""
    value = orjson.dumps(command)
    decoded = decode(value)
    if isinstance(decoded, InvalidCommand):
        raise InvalidCommandError(decoded.detail)
    if decoded.symbol is None:
        raise InvalidCommandError(
            "symbol: required by the client on every command, algo cancels too (the "
            "exchange ignores it there): commands are keyed account:symbol, so that a "
            "kill switch is ordered with the single cancels of its symbol"
        )
    return value


PrivateKey = Ed25519PrivateKey | str | os.PathLike[str]
"""A producer's signing key: the key, or the path of its PEM file."""


def _signer(producer_id: str | None, private_key: PrivateKey | None) -> Signer | None:
    if (producer_id is None) != (private_key is None):
        raise ValueError("give producer_id and private_key together (or neither: unsigned)")
    if producer_id is None or private_key is None:
        return None
    return Signer.of(producer_id, private_key)


def key_of(command: Mapping[str, Any]) -> bytes:
    """``account:symbol``: a kill switch and the single cancels of its symbol share a key,
    so a partition, so an order."""
    return f"{command['account']}:{command['symbol']}".encode()


class CommandProducer:
    """Publishes checked commands with an idempotent producer (acks=all)."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str = DEFAULT_COMMANDS_TOPIC,
        *,
        source: str | None = None,
        producer_id: str | None = None,
        private_key: PrivateKey | None = None,
        **kafka: Any,
    ) -> None:
        """``producer_id`` and ``private_key`` (an Ed25519 private key object, or the path
        of its PEM file): every command is signed with them (headers ``x-producer`` and
        ``x-signature``), as a worker with a producers file requires; give both or neither.
        ``kafka``: passed to :class:`aiokafka.AIOKafkaProducer` (TLS, SASL, client id)."""
        self.topic = topic
        self.source = source  # the commands' ``source`` field
        self.signer = _signer(producer_id, private_key)
        tracing.available()  # the API imported now (if installed), not at the first publish
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
            **kafka,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, source: str | None = None, **kafka: Any) -> Self:
        """A producer to the worker's commands topic, on its cluster, with its TLS and SASL
        options (``kafka`` adds to them or overrides them), signing as ``PRODUCER_ID`` with
        ``PRODUCER_KEY_FILE`` when they are set."""
        return cls(
            settings.bootstrap_servers,
            settings.commands_topic,
            source=source,
            producer_id=settings.producer_id or None,
            private_key=settings.producer_key_file,
            **(security_options(settings) | kafka),
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def publish(self, command: Mapping[str, Any]) -> str:
        """Publish a command dict (checked first); returns its command id."""
        await self.publish_record(command)
        return str(command["command_id"])

    async def publish_record(self, command: Mapping[str, Any]) -> RecordMetadata:
        """Publish a command dict (checked first); returns where it was written."""
        value = checked_command(command)
        headers = self.signer.headers(value) if self.signer is not None else []
        key = key_of(command)
        # In a trace (the application's, or cancel()'s round trip): the command's send span,
        # whose context the worker continues (traceparent/tracestate headers).
        with tracing.client_send(self.topic, key) as trace:
            return await self._producer.send_and_wait(
                self.topic, value, key=key, headers=[*headers, *trace] or None
            )

    async def cancel(
        self,
        account: str,
        market: Market,
        *,
        symbol: str,
        strategy_id: int | None = None,
        client_strategy_id: str | None = None,
        algo_id: int | None = None,
        client_algo_id: str | None = None,
        command_id: str | None = None,
        expires_in_ms: int | None = None,
        reason: str | None = None,
    ) -> str:
        """Cancel one order (exactly one identifier). ``symbol`` is the order's symbol, algo
        orders' too: it keys the command (the algo route does not send it)."""
        return await self.publish(
            build_command(
                account,
                market,
                symbol=symbol,
                strategy_id=strategy_id,
                client_strategy_id=client_strategy_id,
                algo_id=algo_id,
                client_algo_id=client_algo_id,
                command_id=command_id,
                expires_in_ms=expires_in_ms,
                reason=reason,
                source=self.source,
            )
        )

    async def cancel_all(
        self,
        account: str,
        market: Market,
        symbol: str,
        *,
        command_id: str | None = None,
        expires_in_ms: int | None = None,
        reason: str | None = None,
    ) -> str:
        """The kill switch: every open order of ``account`` on ``symbol``."""
        return await self.publish(
            build_command(
                account,
                market,
                symbol=symbol,
                all_on_symbol=True,
                command_id=command_id,
                expires_in_ms=expires_in_ms,
                reason=reason,
                source=self.source,
            )
        )


# -- results -----------------------------------------------------------------------------------


class ResultConsumer:
    """Typed results from the results topic, ``read_committed``.

    With a ``group_id`` it is a member of that consumer group (committing as it goes, from the
    earliest uncommitted result); without one it reads every partition, from the beginning
    (``from_beginning``) or from the end as of :meth:`start`.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str = DEFAULT_RESULTS_TOPIC,
        *,
        group_id: str | None = None,
        from_beginning: bool = False,
        **kafka: Any,
    ) -> None:
        self.topic = topic
        self._bootstrap = bootstrap_servers
        self._kafka = kafka
        self._group = group_id
        self._from_beginning = from_beginning
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            isolation_level="read_committed",
            enable_auto_commit=group_id is not None,
            auto_offset_reset="earliest" if from_beginning or group_id else "latest",
            **kafka,
        )
        self.skipped = 0  # records that were not result events

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        group_id: str | None = None,
        from_beginning: bool = False,
        **kafka: Any,
    ) -> Self:
        """A reader of the worker's results topic, on its cluster, with its TLS and SASL
        options (``kafka`` adds to them or overrides them)."""
        return cls(
            settings.bootstrap_servers,
            settings.results_topic,
            group_id=group_id,
            from_beginning=from_beginning,
            **(security_options(settings) | kafka),
        )

    async def start(self) -> None:
        await self._consumer.start()
        if self._group is not None:
            self._consumer.subscribe([self.topic])
            return
        try:
            partitions = (await cluster_topics(self._bootstrap, 30_000, **self._kafka)).get(
                self.topic
            )
        except BaseException:
            await self._consumer.stop()
            raise
        if not partitions:
            await self._consumer.stop()
            raise ClientError(f"topic {self.topic!r} not found")
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        if self._from_beginning:
            await self._consumer.seek_to_beginning(*assigned)
        else:
            await self._consumer.seek_to_end(*assigned)
            for tp in assigned:  # pin the end now: results published after start are seen
                await self._consumer.position(tp)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __aiter__(self) -> AsyncIterator[Result]:
        return self._results()

    async def _results(self) -> AsyncIterator[Result]:
        async for item in self.records():
            if not isinstance(item, ResultError):
                yield item

    async def records(self) -> AsyncIterator[Result | ResultError]:
        """Every record as it comes: a typed result, or the :class:`ResultError` (a
        :class:`ResultUnreadableError` when it names a command id) that says why it is not
        one. Unreadable records are counted in ``skipped`` and logged here."""
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        yield parse_result(record.value)
                    except ResultError as exc:
                        self.skipped += 1
                        log.warning(
                            "%s[%d]@%d skipped: %s",
                            record.topic,
                            record.partition,
                            record.offset,
                            exc,
                        )
                        yield exc


class CancelClient:
    """Request/reply: publish a command, wait for its result (see the module docstring)."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        commands_topic: str = DEFAULT_COMMANDS_TOPIC,
        results_topic: str = DEFAULT_RESULTS_TOPIC,
        source: str | None = "cancel-worker client",
        producer_id: str | None = None,
        private_key: PrivateKey | None = None,
        **kafka: Any,
    ) -> None:
        """``producer_id`` and ``private_key``: as :class:`CommandProducer` signs with them."""
        self.producer = CommandProducer(
            bootstrap_servers,
            commands_topic,
            source=source,
            producer_id=producer_id,
            private_key=private_key,
            **kafka,
        )
        self._results = ResultConsumer(bootstrap_servers, results_topic, **kafka)
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, source: str | None = "cancel-worker client", **kafka: Any
    ) -> Self:
        """A client of the worker's commands and results topics, on its cluster, with its TLS
        and SASL options (``kafka`` adds to them or overrides them), signing as
        ``PRODUCER_ID`` with ``PRODUCER_KEY_FILE`` when they are set."""
        return cls(
            settings.bootstrap_servers,
            commands_topic=settings.commands_topic,
            results_topic=settings.results_topic,
            source=source,
            producer_id=settings.producer_id or None,
            private_key=settings.producer_key_file,
            **(security_options(settings) | kafka),
        )

    async def start(self) -> None:
        await self._results.start()  # positioned before anything is published
        try:
            await self.producer.start()
        except BaseException:
            await self._results.stop()
            raise
        self._reader = asyncio.create_task(self._read(), name="cancel-client-results")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        await self.producer.stop()
        await self._results.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def waiting(self) -> int:
        """Calls waiting for their result."""
        return len(self._waiting)

    async def _read(self) -> None:
        try:
            async for item in self._results.records():
                if isinstance(item, ResultError) and not isinstance(item, ResultUnreadableError):
                    continue  # names no command: nobody waits for it
                future = self._waiting.get(item.command_id or "")
                if future is None or future.done():
                    continue
                if isinstance(item, ResultUnreadableError):
                    future.set_exception(item)
                else:
                    future.set_result(item)
        except Exception as exc:  # the reader died: every waiting call learns why
            log.exception("results reader stopped")
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ClientError(f"results reader stopped: {exc!r}"))
            raise

    async def request(self, command: Mapping[str, Any], timeout: float) -> Result:  # noqa: ASYNC109 - the reply's deadline is the API
        """Publish ``command`` and wait for its result."""
        if self._reader is None:
            raise ClientError("the client is not started")
        command_id = str(command["command_id"])
        if command_id in self._waiting:
            raise InvalidCommandError(f"command {command_id} is already waiting for its result")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        attributes = {
            "messaging.system": "kafka",
            "messaging.destination.name": self.producer.topic,
            tracing.COMMAND_ID: command_id,
            tracing.ACCOUNT: str(command.get("account")),
        }
        # The round trip, publish to result, in a span (with the otel extra and a tracer
        # provider set by the application); the command carries its context.
        with tracing.client_span(f"cancel {self.producer.topic}", attributes) as span:
            try:
                await self.producer.publish(command)
                result = await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                raise CancelTimeoutError(command_id, timeout) from None
            finally:
                del self._waiting[command_id]
            span.set_attribute(tracing.RESULT_TYPE, str(result.raw.get("type")))
            if isinstance(result, CancelFailed):
                span.set_attribute(tracing.RESULT_REASON, result.reason)
            return result

    async def cancel(
        self,
        account: str,
        market: Market,
        *,
        timeout: float,  # noqa: ASYNC109 - the reply's deadline is the API
        symbol: str,
        strategy_id: int | None = None,
        client_strategy_id: str | None = None,
        algo_id: int | None = None,
        client_algo_id: str | None = None,
        command_id: str | None = None,
        expires_in_ms: int | None = None,
        reason: str | None = None,
    ) -> Result:
        """Cancel one order and wait up to ``timeout`` seconds for the result. ``symbol``
        is the order's symbol, algo orders' too: it keys the command, so that the cancel is
        ordered with a kill switch on that symbol (the algo route does not send it)."""
        return await self.request(
            build_command(
                account,
                market,
                symbol=symbol,
                strategy_id=strategy_id,
                client_strategy_id=client_strategy_id,
                algo_id=algo_id,
                client_algo_id=client_algo_id,
                command_id=command_id,
                expires_in_ms=expires_in_ms,
                reason=reason,
                source=self.producer.source,
            ),
            timeout,
        )

    async def cancel_all(
        self,
        account: str,
        market: Market,
        symbol: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the reply's deadline is the API
        command_id: str | None = None,
        expires_in_ms: int | None = None,
        reason: str | None = None,
    ) -> Result:
        """The kill switch on ``symbol``; waits up to ``timeout`` seconds for the result."""
        return await self.request(
            build_command(
                account,
                market,
                symbol=symbol,
                all_on_symbol=True,
                command_id=command_id,
                expires_in_ms=expires_in_ms,
                reason=reason,
                source=self.producer.source,
            ),
            timeout,
        )
