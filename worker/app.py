"""Wiring: settings → accounts → PAPI client → executor → Kafka → pipeline, with signals.

Exit codes (``ExitCode``): 0 clean stop, 1 fatal runtime error, 2 configuration error,
3 forced stop (second signal during shutdown), 4 stopped with work abandoned (commands still
running at the shutdown bound were cancelled, or results could not be made durable in
time; their records are read again by the next owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import start_http_server

from worker.accounts import AccountsError, Credentials, load_accounts
from worker.clock import ExchangeClock
from worker.dedup import ResultsFeed, SeenCommands
from worker.executor import CancelExecutor, RetryPolicy
from worker.governor import GovernorSettings, RateGovernor
from worker.kafka_io import (
    AtLeastOnceSink,
    ConsumerSource,
    PipelineRebalanceListener,
    TransactionalSink,
    make_consumer,
    make_producer,
    missing_topics,
    wait_for_kafka,
    watch_kafka,
)
from worker.papi import PapiClient
from worker.pipeline import Pipeline, ResultSink, RunReport
from worker.processor import CommandProcessor
from worker.settings import Settings
from worker.timeutil import now_ms

log = logging.getLogger(__name__)


class ExitCode(enum.IntEnum):
    OK = 0
    FATAL = 1
    CONFIG = 2
    FORCED = 3
    ABANDONED = 4


class ConfigError(RuntimeError):
    pass


def policy_from(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        backoff_initial_s=settings.backoff_initial_s,
        backoff_max_s=settings.backoff_max_s,
        default_deadline_ms=settings.default_deadline_ms,
        recv_window_ms=settings.recv_window_ms,
        reconcile_budget_ms=settings.reconcile_budget_ms,
    )


def governor_from(settings: Settings) -> GovernorSettings:
    return GovernorSettings(
        weight_limit=settings.rate_weight_limit,
        weight_window_ms=settings.rate_weight_window_ms,
        order_limit=settings.rate_order_limit,
        order_window_ms=settings.rate_order_window_ms,
        guard_ms=settings.rate_guard_ms,
    )


def load_worker_accounts(settings: Settings) -> dict[str, Credentials]:
    if settings.accounts_file is None:
        raise ConfigError("CANCEL_WORKER_ACCOUNTS_FILE is not set")
    try:
        return load_accounts(settings.accounts_file)
    except AccountsError as exc:
        raise ConfigError(str(exc)) from exc


class _Closers:
    """Close steps, run in reverse order of registration; each bounded in time and logged
    when it fails, and none skipped because one before it failed."""

    def __init__(self, bound_s: float) -> None:
        self._bound_s = bound_s
        self._steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def add(self, name: str, close: Callable[[], Awaitable[None]]) -> None:
        self._steps.append((name, close))

    async def close_all(self) -> None:
        while self._steps:
            name, close = self._steps.pop()
            try:
                await asyncio.wait_for(close(), self._bound_s)
            except TimeoutError:
                log.warning(
                    "closing the %s took longer than %.1fs; left behind", name, self._bound_s
                )
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - close the rest
                log.warning("closing the %s failed: %r", name, exc)


class Worker:
    """The running worker. ``async with Worker(...)`` starts Kafka and HTTP; ``run`` serves."""

    def __init__(self, settings: Settings, accounts: Mapping[str, Credentials]) -> None:
        self.settings = settings
        self._accounts = accounts
        self.clock = ExchangeClock(settings.time_url, refresh_s=settings.clock_refresh_s)
        self.governor = RateGovernor(governor_from(settings), self.clock.now)
        self._client = PapiClient(
            settings.papi_url,
            clock=self.clock.now,
            timeout_s=settings.http_timeout_s,
            connect_timeout_s=settings.http_connect_timeout_s,
            max_connections=settings.http_max_connections,
            governor=self.governor,
        )
        executor = CancelExecutor(
            self._client,
            accounts,
            policy_from(settings),
            self.clock.now,
            resync_clock=self.clock.resync,
            clock_generation=lambda: self.clock.generation,
        )
        # The duplicate-command window, rebuilt from the results topic in __aenter__.
        self.seen: SeenCommands | None = None
        self._dedup: ResultsFeed | None = None
        if settings.dedup_window_ms > 0:
            self.seen = SeenCommands(settings.dedup_window_ms, settings.dedup_max_entries)
            self._dedup = ResultsFeed(self.seen, settings)
        self._processor = CommandProcessor(
            executor,
            results_topic=settings.results_topic,
            deadletter_topic=settings.deadletter_topic,
            max_command_bytes=settings.max_command_bytes,
            deadletter_max_bytes=settings.deadletter_max_bytes,
            clock=now_ms,
            seen=self.seen,
        )
        self._consumer = make_consumer(settings)
        # The shared producer publishes in at-least-once mode; in exactly-once mode each
        # input partition gets a transactional producer of its own (TransactionalSink).
        self._producer = make_producer(settings)
        self._transactions: TransactionalSink | None = None
        self._stack = contextlib.AsyncExitStack()
        sink: ResultSink
        if settings.delivery == "exactly_once":
            self._transactions = sink = TransactionalSink(settings)
        else:
            sink = AtLeastOnceSink(self._producer, self._consumer)
        self.pipeline = Pipeline(
            ConsumerSource(self._consumer),
            sink,
            self._processor,
            max_in_flight=settings.max_in_flight,
            max_buffered=settings.max_buffered_per_partition,
            shutdown_grace_s=settings.shutdown_grace_s,
            revoke_grace_s=settings.revoke_grace_s,
            commit_timeout_s=settings.commit_timeout_s,
        )

    async def __aenter__(self) -> Worker:
        # Each part is closed in reverse order of opening, each close bounded and logged,
        # and a failing close never skips the next (close_all). Closing the consumer leaves
        # the group (its revocation flushes through the transactional producers, so they
        # close after it); HTTP and the clock close last.
        stack = contextlib.AsyncExitStack()
        bound = self.settings.commit_timeout_s + 5
        closers = _Closers(bound)
        stack.push_async_callback(closers.close_all)
        try:
            await self.clock.start()
            closers.add("clock", self.clock.aclose)
            closers.add("http client", self._client.aclose)
            await wait_for_kafka(self.settings.bootstrap_servers)
            if self._transactions is not None:
                closers.add("transactional producers", self._transactions.close)
            await self._producer.start()
            closers.add("producer", self._producer.stop)
            await self._consumer.start()
            closers.add("consumer", self._consumer.stop)
            await self._check_topics()
            if self._dedup is not None:
                await self._dedup.start()  # before the first command is read
                closers.add("duplicate window", self._dedup.stop)
            self._consumer.subscribe(
                [self.settings.commands_topic], listener=PipelineRebalanceListener(self.pipeline)
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def _check_topics(self) -> None:
        wanted = [
            self.settings.commands_topic,
            self.settings.results_topic,
            self.settings.deadletter_topic,
        ]
        absent = await missing_topics(self._consumer, wanted)
        if absent:
            raise ConfigError(
                f"topic(s) missing on {self.settings.bootstrap_servers}: "
                f"{', '.join(absent)} (create them, or run 'cancel-worker "
                "check --create-topics')"
            )

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def run(self) -> RunReport:
        watch = asyncio.create_task(watch_kafka(self._producer, self.pipeline), name="kafka-watch")
        try:
            return await self.pipeline.run()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    def stop(self) -> None:
        self.pipeline.stop()


async def serve(settings: Settings) -> ExitCode:
    """Run until SIGTERM/SIGINT; a second signal exits at once with ``ExitCode.FORCED``."""
    try:
        accounts = load_worker_accounts(settings)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)  # noqa: TRY400 - the message is the whole story
        return ExitCode.CONFIG
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    loop = asyncio.get_running_loop()
    try:
        async with Worker(settings, accounts) as worker:
            signals = 0

            def on_signal(signame: str) -> None:
                nonlocal signals
                signals += 1
                if signals == 1:
                    log.info("%s: stopping (fetch stops, in-flight finish, commit)", signame)
                    worker.stop()
                else:
                    log.error("%s again: exiting at once with code %d", signame, ExitCode.FORCED)
                    os._exit(ExitCode.FORCED)

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig.name)
            log.info(
                "worker started: group=%s commands=%s results=%s papi=%s accounts=%d",
                settings.group_id,
                settings.commands_topic,
                settings.results_topic,
                settings.papi_url,
                len(accounts),
            )
            report = await worker.run()
    except ConfigError as exc:
        log.error("configuration error: %s", exc)  # noqa: TRY400 - the message is the whole story
        return ExitCode.CONFIG
    except Exception:
        log.exception("worker stopped on a fatal error")
        return ExitCode.FATAL
    if report.abandoned or report.unflushed:
        log.error(
            "worker stopped with work abandoned: %d command(s) cancelled while running, "
            "%d result(s) not made durable; their records will be read again (exit %d)",
            report.abandoned,
            report.unflushed,
            ExitCode.ABANDONED,
        )
        return ExitCode.ABANDONED
    log.info("worker stopped cleanly after %d command(s)", report.processed)
    return ExitCode.OK
