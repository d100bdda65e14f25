"""The operator's commands: ``cancel-worker send`` publishes one command (and, with
``--wait``, waits for its result); ``cancel-worker results`` looks results up by command id
or follows them as they come.

``send`` checks a command exactly as the client library does (the worker's own decoder,
plus a ``symbol`` on every command) before anything is published, and keys it
``account:symbol``. Both commands read the results topic ``read_committed`` and print each
result as one readable line (or the event as published, one JSON object per line).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.errors import KafkaConnectionError, KafkaError

from worker.client import (
    CancelDuplicate,
    CancelFailed,
    ClientError,
    CommandProducer,
    InvalidCommandError,
    Result,
    ResultConsumer,
    ResultError,
    ResultUnreadableError,
    StrategiesCanceled,
    Strategy,
    StrategyCanceled,
    checked_command,
    parse_result,
)
from worker.client import build_command as _build
from worker.kafka.io import security_options
from worker.kafka.topic_reader import (
    MissingTopicError,
    ReadStalledError,
    ResultsReader,
    cluster_topics,
)
from worker.settings import Settings

SOURCE = "cancel-worker send"

# Exit codes of ``send --wait`` (and ``results``); 2 (invalid command, configuration) is
# the CLI's. docs/commands.md lists them.
EXIT_CANCELED = 0  # strategy.canceled, or strategies.canceled with complete: true
EXIT_NOT_CANCELED = 1  # cancel.failed, an incomplete kill switch, an unreadable result
EXIT_NO_RESULT = 5  # no result in time (send --wait), or not on the topic (results)
EXIT_DUPLICATE = 6  # cancel.duplicate: the id was answered before, nothing was sent


class KafkaUnavailableError(RuntimeError):
    """Kafka failed (unreachable, a topic missing, a read that stalled): one line."""


def build_command(**fields: Any) -> dict[str, Any]:
    """Assemble a command from CLI options (not yet checked: :func:`check` does).
    ``all``: the kill switch (``scope: "symbol"``) on ``symbol``."""
    if not fields.get("account") or not fields.get("market"):
        raise ValueError("--account and --market are required (or pass --json)")
    if fields.get("all"):
        if not fields.get("symbol"):
            raise ValueError("--all needs --symbol: it cancels every open order on one symbol")
        named = ("strategy_id", "client_strategy_id", "algo_id", "client_algo_id")
        if any(fields.get(n) is not None for n in named):
            raise ValueError("--all cancels every order on the symbol: give no order id")
    return _build(
        fields["account"],
        fields["market"],
        symbol=fields.get("symbol"),
        strategy_id=fields.get("strategy_id"),
        client_strategy_id=fields.get("client_strategy_id"),
        algo_id=fields.get("algo_id"),
        client_algo_id=fields.get("client_algo_id"),
        all_on_symbol=bool(fields.get("all")),
        command_id=fields.get("command_id") or None,
        expires_in_ms=fields.get("expires_in_ms"),
        reason=fields.get("reason"),
        source=SOURCE,
    )


def parse_json_command(payload: str) -> dict[str, Any]:
    """The command given as JSON; :class:`InvalidCommandError` when it is not an object."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidCommandError(f"--json is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidCommandError(f"command must be a JSON object, got {type(obj).__name__}")
    return obj


def check(command: Mapping[str, Any]) -> bytes:
    """The command as published, or :class:`InvalidCommandError` with the reason (the
    client library's check: the worker's decoder, and a symbol on every command)."""
    return checked_command(command)


# -- printing ----------------------------------------------------------------------------------


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _order(strategy: Strategy) -> str:
    ident = strategy.strategy_id or strategy.algo_id
    client = strategy.client_strategy_id or strategy.client_algo_id
    kind = "algo" if strategy.algo_id or strategy.client_algo_id else "strategy"
    named = f"{kind} {ident}" if ident is not None else kind
    if client:
        named += f" ({client})"
    return named


def describe(result: Result) -> str:
    """One readable line: what happened to the command, and where and when."""
    head = f"{result.command_id} {result.account} {result.market} {result.symbol or '-'}:"
    retried = result.raw.get("retry_of")
    if isinstance(retried, Mapping):
        at = retried.get("origin") or {}
        head += (
            f" re-drive of {retried.get('type')}/{retried.get('reason')} at "
            f"{at.get('topic')}[{at.get('partition')}]@{at.get('offset')}:"
        )
    took = f"attempts {result.attempts}, {result.completed_at - result.received_at} ms"
    if isinstance(result, StrategyCanceled):
        s = result.strategy
        qty = f", qty {s.orig_qty}" if s.orig_qty is not None else ""
        return (
            f"{head} canceled {_order(s)} on {result.route}, status {s.status}{qty} "
            f"(confirmed by {result.confirmed_by}); {took}"
        )
    if isinstance(result, StrategiesCanceled):
        routes = ", ".join(
            f"{r.route} {r.outcome}" + (f" ({r.reason})" if r.reason else "") for r in result.routes
        )
        return (
            f"{head} kill switch {'complete' if result.complete else 'INCOMPLETE'}: "
            f"canceled {len(result.strategies)}, closed otherwise "
            f"{len(result.closed_otherwise)}, still open {len(result.still_open)}, unknown "
            f"{len(result.unknown)}; routes: {routes or '-'}; {took}"
        )
    if isinstance(result, CancelFailed):
        exchange = result.exchange
        answer = (
            f" [exchange {exchange.http_status} {exchange.code} {exchange.msg}]"
            if exchange is not None
            else ""
        )
        hint = f"; hint: {result.hint}" if result.hint else ""
        status = f"; order {result.order_status}" if result.order_status else ""
        return f"{head} FAILED {result.reason}: {result.detail}{answer}{status}{hint}; {took}"
    first = result.first_result
    origin = first.get("origin") or {}
    was = str(first.get("type")) + (f" {first['reason']}" if first.get("reason") else "")
    return (
        f"{head} duplicate: this command id was answered before ({was}, completed "
        f"{_when(int(first.get('completed_at') or 0))}, command at {origin.get('topic')}"
        f"[{origin.get('partition')}]@{origin.get('offset')}); no request was sent"
    )


def describe_unreadable(error: ResultError) -> str:
    """One line for a record that is not a readable result."""
    if isinstance(error, ResultUnreadableError):
        return (
            f"{error.command_id} UNREADABLE result: {error.problem}; as published: "
            f"{error.raw[:400].decode(errors='replace')}"
        )
    return f"- UNREADABLE record: {error}"


def exit_code(result: Result) -> int:
    if isinstance(result, StrategyCanceled):
        return EXIT_CANCELED
    if isinstance(result, StrategiesCanceled):
        return EXIT_CANCELED if result.complete else EXIT_NOT_CANCELED
    if isinstance(result, CancelDuplicate):
        return EXIT_DUPLICATE
    return EXIT_NOT_CANCELED


# -- Kafka -------------------------------------------------------------------------------------


def _kafka_failure(settings: Settings, exc: BaseException) -> KafkaUnavailableError:
    detail = " ".join((str(exc) or type(exc).__name__).split())
    if isinstance(exc, MissingTopicError):
        return KafkaUnavailableError(f"{detail} at {settings.bootstrap_servers}")
    if isinstance(exc, KafkaConnectionError):
        return KafkaUnavailableError(
            f"cannot reach Kafka at {settings.bootstrap_servers}: {detail}"
        )
    return KafkaUnavailableError(f"Kafka at {settings.bootstrap_servers} failed: {detail}")


@contextlib.asynccontextmanager
async def _kafka_errors(settings: Settings) -> AsyncIterator[None]:
    """Kafka's failures as one :class:`KafkaUnavailableError`; the rest as they are."""
    try:
        yield
    except InvalidCommandError:
        raise
    except (KafkaError, OSError, ClientError, MissingTopicError, ReadStalledError) as exc:
        raise _kafka_failure(settings, exc) from exc


async def publish(
    settings: Settings,
    command: Mapping[str, Any],
    *,
    wait_s: float | None = None,
    on_sent: Callable[[str], None] = lambda _: None,
) -> Result | None:
    """Publish ``command`` (checked first); ``on_sent`` gets where it was written.

    With ``wait_s``: the results topic is read from its end as of before the publish, and
    the command's result is returned; :class:`ResultUnreadableError` when the result names
    the command but cannot be read, None when no result came in time. Raises
    :class:`InvalidCommandError` before connecting and :class:`KafkaUnavailableError` when
    Kafka fails."""
    check(command)
    command_id = str(command["command_id"])
    async with _kafka_errors(settings):
        topics = await cluster_topics(
            settings.bootstrap_servers,
            settings.kafka_request_timeout_ms,
            client_id=f"{settings.client_id}-send",
            **security_options(settings),
        )
        for topic in (settings.commands_topic, settings.results_topic):
            if topic not in topics and (topic == settings.commands_topic or wait_s is not None):
                raise MissingTopicError(
                    f"topic {topic!r} does not exist (cancel-worker check --create-topics "
                    "makes the worker's topics)"
                )
        producer = CommandProducer.from_settings(settings, source=SOURCE)
        results = ResultConsumer.from_settings(settings) if wait_s is not None else None
        try:
            if results is not None:
                await results.start()  # positioned before the command is published
            await producer.start()
            meta = await producer.publish_record(command)
            on_sent(f"{meta.topic}[{meta.partition}]@{meta.offset}")
            if results is None or wait_s is None:
                return None
            try:
                async with asyncio.timeout(wait_s):
                    async for item in results.records():
                        if isinstance(item, ResultUnreadableError):
                            if item.command_id == command_id:
                                raise item
                        elif not isinstance(item, ResultError) and item.command_id == command_id:
                            return item
            except TimeoutError:
                return None
            return None  # pragma: no cover - the reader never ends
        finally:
            await producer.stop()
            if results is not None:
                await results.stop()


async def results(
    settings: Settings,
    command_ids: Collection[str],
    *,
    since_ms: int | None,
    follow: bool,
    emit: Callable[[dict[str, Any], Result | ResultError], None],
) -> set[str]:
    """Results for ``command_ids`` (every result when empty) from ``since_ms`` (or the
    beginning) to the topic's end; with ``follow``, then the new ones as they come, until
    every id asked for has one (forever when none were asked for). ``emit`` gets each
    event and its typed result (or why it cannot be read). Returns the ids found."""
    wanted = set(command_ids)
    found: set[str] = set()
    reader = ResultsReader(
        settings.bootstrap_servers,
        settings.results_topic,
        client_id=f"{settings.client_id}-results",
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **security_options(settings),
    )

    def take(event: dict[str, Any]) -> None:
        command_id = event.get("command_id")
        if wanted and command_id not in wanted:
            return
        try:
            item: Result | ResultError = parse_result(orjson.dumps(event))
        except ResultError as exc:
            item = exc
        if isinstance(command_id, str):
            found.add(command_id)
        emit(event, item)

    async with _kafka_errors(settings):
        try:
            await reader.start()
            async for record in reader.read_since(since_ms):
                take(record.event)
            if follow and not (wanted and wanted <= found):
                async for record in reader.follow():
                    take(record.event)
                    if wanted and wanted <= found:
                        break
        finally:
            await reader.stop()
    return found
