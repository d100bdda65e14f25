"""Wiring: settings → accounts → PAPI client → executor → Kafka → pipeline, with signals.

Exit codes (``ExitCode``): 0 clean stop, 1 fatal runtime error, 2 configuration error,
3 forced stop (second signal during shutdown), 4 stopped with work abandoned (commands still
running at the shutdown bound were cancelled, or results could not be made durable in
time; their records are read again by the next owner; or a commit was cut short and its
outcome could not be learnt: its results are not sent again, the next owner starts from
whatever it stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import platform
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Final, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition

from worker import metrics
from worker.core.timeutil import now_ms
from worker.exchange.accounts import AccountsError, Credentials, load_accounts
from worker.exchange.clock import ExchangeClock
from worker.exchange.governor import GovernorSettings, RateGovernor
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, RetryPolicy
from worker.kafka import logs as kafka_logs
from worker.kafka.dedup import ResultsFeed, SeenCommands
from worker.kafka.fencing import exactly_once_refusal, group_member
from worker.kafka.io import (
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
from worker.kafka.pipeline import Partition, Pipeline, ResultSink, RunReport, TakeOverRefusedError
from worker.ops import Check, OpsServer
from worker.processor import CommandProcessor
from worker.producers import Producers, ProducersError, load_producers
from worker.settings import Settings

log = logging.getLogger(__name__)

# A take-over failing longer than this makes the worker not ready (its partitions wait).
TAKE_OVER_FAILING_S = 10.0


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
        max_command_age_ms=settings.max_command_age_ms,
    )


def governor_from(settings: Settings) -> GovernorSettings:
    return GovernorSettings(
        weight_limit=settings.rate_weight_limit,
        weight_window_ms=settings.rate_weight_window_ms,
        order_limit=settings.rate_order_limit,
        order_window_ms=settings.rate_order_window_ms,
        guard_ms=settings.rate_guard_ms,
        max_pause_ms=settings.rate_max_pause_ms,
        max_ban_ms=settings.rate_max_ban_ms,
        reconcile_weight_share=settings.rate_reconcile_weight_share,
    )


def build_version() -> str:
    try:
        return version("cancel-worker")
    except PackageNotFoundError:
        return "unknown"


def consumer_offsets(
    consumer: AIOKafkaConsumer,
) -> dict[Partition, tuple[int | None, int | None]]:
    """Per assigned partition: its end (the last stable offset, as ``read_committed`` reads;
    known once a fetch has returned for it) and the consumer's fetch position; None where
    not known yet."""
    out: dict[Partition, tuple[int | None, int | None]] = {}
    for tp in consumer.assignment():
        end = consumer.last_stable_offset(tp)
        if end is None or end < 0:
            end = consumer.highwater(tp)
        out[(tp.topic, tp.partition)] = (end, _fetch_position(consumer, tp))
    return out


def _fetch_position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    # consumer.position() waits for a position when there is none; a scrape must not.
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
    except (AttributeError, KeyError, TypeError):
        return None
    if state is None or not state.has_valid_position:
        return None
    return int(state.position)


def _group_coordinator_known(consumer: AIOKafkaConsumer) -> bool:
    coordinator = getattr(consumer, "_coordinator", None)
    return getattr(coordinator, "coordinator_id", None) is not None


def load_worker_producers(settings: Settings) -> Producers | None:
    """The producers whose signed commands the worker takes (:mod:`worker.producers`), or
    None when commands are not verified: only with ``REQUIRE_SIGNED_COMMANDS=false`` and no
    producers file, said at WARNING. A missing or broken file is a :class:`ConfigError`."""
    if settings.producers_file is None:
        if settings.require_signed_commands:
            raise ConfigError(
                "CANCEL_WORKER_PRODUCERS_FILE is not set: every command must be signed by a "
                "producer of that file (docs/security.md); set "
                "CANCEL_WORKER_REQUIRE_SIGNED_COMMANDS=false to take unsigned commands"
            )
        log.warning(
            "commands are not verified (CANCEL_WORKER_REQUIRE_SIGNED_COMMANDS=false and no "
            "CANCEL_WORKER_PRODUCERS_FILE): any writer of the commands topic %s can cancel "
            "any account's orders",
            settings.commands_topic,
        )
        return None
    try:
        return load_producers(settings.producers_file)
    except ProducersError as exc:
        raise ConfigError(str(exc)) from exc


FROM_SETTINGS: Final = "from settings"


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


# Net new container objects between two young collections (CPython's default: 700).
YOUNG_COLLECTION_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Once started: what start-up made (modules, schemas, clients) is collected once and
    then left out of every later collection (``gc.freeze``), as the CPython docs advise for
    long-running processes. Every full collection used to walk it, a pause every cancel in
    hand waited out. Measured over a 20,000-command burst, with the duplicate window's
    entries also made invisible to the collector (``worker.kafka.dedup``): the objects a full
    collection walks, 135,000 → 2,000; full collections, 0.34 s → 0.10 s of CPU.

    Young collections run every :data:`YOUNG_COLLECTION_THRESHOLD` net new objects
    instead of every 700. A cancel in flight lives for the exchange's answer (20 ms and
    more), longer than 700 allocations take in a burst, so nearly everything it made was
    walked by a young collection and again by a middle one, then freed by its reference
    count anyway. With the exchange's answers freed as soon as they are read (no
    reference cycle: ``worker.exchange.papi.PapiClient._send``), measured over 10,000-command
    bursts at 20 ms (two runs each): the collector's CPU 634 and 646 ms → 206 and 179 ms
    (about 45 µs a command); the longest young collection 11 to 13 ms → 14 to 29 ms, in
    bursts whose latencies are seconds of queueing. Paced at 100/s, 4 young collections in
    30 s (the longest 5.5 ms) instead of 68 young and 6 middle ones (3.4 and 4.4 ms)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


class Worker:
    """The running worker. ``async with Worker(...)`` starts Kafka and HTTP; ``run`` serves."""

    def __init__(
        self,
        settings: Settings,
        accounts: Mapping[str, Credentials],
        producers: Producers | Literal["from settings"] | None = FROM_SETTINGS,
    ) -> None:
        """``producers``: as :func:`load_worker_producers` returns them (loaded from the
        settings when not given)."""
        verified = load_worker_producers(settings) if isinstance(producers, str) else producers
        kafka_logs.install()  # the first join's coordinator lookup is not an ERROR
        self.settings = settings
        self._accounts = accounts
        self.clock = ExchangeClock(settings.time_url, refresh_s=settings.clock_refresh_s)
        self.governor = RateGovernor(
            governor_from(settings),
            self.clock.now,
            {alias: creds.reserved_weight_share for alias, creds in accounts.items()},
        )
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
            producers=verified,
            group=settings.group_id,
        )
        self._consumer = make_consumer(settings)
        # The shared producer publishes in at-least-once mode; in exactly-once mode the
        # member has one transactional producer, fenced by its group generation
        # (TransactionalSink).
        self._producer = make_producer(settings)
        self._transactions: TransactionalSink | None = None
        self._stack = contextlib.AsyncExitStack()
        sink: ResultSink
        if settings.delivery == "exactly_once":
            consumer = self._consumer
            self._transactions = sink = TransactionalSink(settings, lambda: group_member(consumer))
        else:
            sink = AtLeastOnceSink(self._producer, self._consumer)
        self.pipeline = Pipeline(
            ConsumerSource(self._consumer, require_stable=settings.delivery == "exactly_once"),
            sink,
            self._processor,
            max_in_flight=settings.max_in_flight,
            max_buffered=settings.max_buffered_per_partition,
            shutdown_grace_s=settings.shutdown_grace_s,
            revoke_grace_s=settings.revoke_grace_s,
            commit_timeout_s=settings.commit_timeout_s,
            flush_interval_s=settings.transaction_interval_ms / 1000 if self._transactions else 0.0,
        )

    async def __aenter__(self) -> Worker:
        # Each part is closed in reverse order of opening, each close bounded and logged,
        # and a failing close never skips the next (close_all). Closing the consumer leaves
        # the group (its revocation flushes through the transactional producers, so they
        # close after it); HTTP and the clock close last.
        stack = contextlib.AsyncExitStack()
        closers = self._closers()
        stack.push_async_callback(closers.close_all)
        try:
            await self.clock.start()
            await wait_for_kafka(self.settings)
            await self._producer.start()
            await self._consumer.start()
            await self._check_cluster()
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

    async def _check_cluster(self) -> None:
        """The topics exist; in exactly-once mode, the broker offers what it needs."""
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
        if self._transactions is not None:
            refusal = exactly_once_refusal(self._consumer._client)
            if refusal is not None:
                raise ConfigError(f"{self.settings.bootstrap_servers}: {refusal}")

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def _closers(self) -> _Closers:
        """The close steps of the parts made in ``__init__``, registered before any of them
        starts: a client left unclosed after a failed start leaks its connections."""
        closers = _Closers(self.settings.commit_timeout_s + 5)
        closers.add("clock", self.clock.aclose)
        closers.add("http client", self._client.aclose)
        if self._transactions is not None:
            closers.add("transactional producers", self._transactions.close)
        closers.add("producer", self._producer.stop)
        closers.add("consumer", self._consumer.stop)
        return closers

    async def discard(self) -> None:
        """Close the clients of a worker that is not going to start."""
        await self._closers().close_all()

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

    # -- probes (worker.ops.Probes) ----------------------------------------------------------

    def liveness(self) -> Sequence[Check]:
        """Alive: the loop answers (this runs in it), and neither the fetch loop nor a
        flush has stalled for ``HEALTH_STALL_S``. Starting and stopping are not stalls."""
        pipeline = self.pipeline
        checks = [Check("event_loop", True, "answering")]
        if pipeline.loop_at is None:
            checks.append(Check("fetch_loop", True, "not started yet"))
        elif pipeline.stopping:
            checks.append(Check("fetch_loop", True, "stopping"))
        else:
            checks.append(
                self._stall_check("fetch_loop", pipeline.loop_at, "came round {:.1f}s ago")
            )
        if pipeline.flush_since is None:
            checks.append(Check("flush", True, "none under way"))
        else:
            checks.append(self._stall_check("flush", pipeline.flush_since, "under way for {:.1f}s"))
        return checks

    def _stall_check(self, name: str, since: float, detail: str) -> Check:
        """``name`` is wedged when ``since`` (monotonic) is more than HEALTH_STALL_S ago."""
        stall = self.settings.health_stall_s
        elapsed = time.monotonic() - since
        if elapsed <= stall:
            return Check(name, True, detail.format(elapsed))
        return Check(
            name, False, f"{detail.format(elapsed)}, more than HEALTH_STALL_S ({stall:g}s): wedged"
        )

    def readiness(self) -> Sequence[Check]:
        """Ready: serving, in a healthy group, Kafka and the exchange reachable, and the
        exchange clock synced recently.

        An IP ban does not make a worker unready: the exchange bans the egress IP, which
        every pod behind it shares, and no restart, eviction or rescheduling lifts it, so
        failing readiness would only stall rollouts and drains (``maxUnavailable: 0``) for
        the ban's length. It is reported in the ``exchange`` check's detail and in
        ``cancel_worker_exchange_banned_until_timestamp_seconds``."""
        pipeline = self.pipeline
        checks: list[Check] = []
        if pipeline.loop_at is None:
            checks.append(Check("running", False, "starting"))
        elif pipeline.stopping:
            checks.append(Check("running", False, "stopping"))
        else:
            checks.append(Check("running", True, "fetching"))
        checks.append(self._group_check())
        if not pipeline.kafka_reachable_now:
            checks.append(Check("kafka", False, "results cannot be published or committed"))
        elif not pipeline.publishing_now:
            checks.append(Check("kafka", False, "results wait on Kafka: not published yet"))
        else:
            checks.append(Check("kafka", True, "reachable"))
        checks.append(self._partitions_check())
        now = self.clock.now()
        banned = self.governor.banned_until_ms - now
        if banned > 0:
            detail = f"IP banned for {banned / 1000:.1f}s more (on the IP: no restart lifts it)"
            checks.append(Check("exchange", True, detail))
        elif not self._client.reachability.reachable:
            checks.append(Check("exchange", False, "refusing connections"))
        else:
            paused = self.governor.paused_until_ms - now
            detail = f"reachable; 429 pause for {paused / 1000:.1f}s" if paused > 0 else "reachable"
            checks.append(Check("exchange", True, detail))
        checks.append(self._clock_check())
        return checks

    def _group_check(self) -> Check:
        """In the group: partitions assigned, or joined (a generation) with its coordinator
        known (a member with no partition: more members than partitions, or a rebalance
        under way). Knowing the coordinator is not being in the group: at start, the first
        join can still be refused (the coordinator's partition is being loaded or moved,
        and aiokafka looks it up again), so a worker is not ready before its first join
        has completed, and its readiness goes from 503 to 200 once."""
        consumer = self._consumer
        assigned = len(consumer.assignment())
        if assigned:
            return Check("group", True, f"{assigned} partition(s) assigned")
        member = group_member(consumer)
        if not member.joined:
            return Check("group", False, "joining the group")
        if not _group_coordinator_known(consumer):
            return Check("group", False, "no group coordinator")
        return Check("group", True, f"in the group (generation {member.generation}), no partition")

    def _partitions_check(self) -> Check:
        """The partitions in hand are processed: none fenced (dropped until the group
        assigns it again) and no take-over failing for long."""
        pipeline = self.pipeline
        fenced = sorted(pipeline.fenced)
        if fenced:
            names = ", ".join(f"{t}[{p}]" for t, p in fenced)
            return Check("partitions", False, f"fenced, records dropped until re-assigned: {names}")
        failing_s = pipeline.take_over_failing_s
        if failing_s > TAKE_OVER_FAILING_S:
            return Check(
                "partitions", False, f"taking over partitions has failed for {failing_s:.0f}s"
            )
        return Check("partitions", True, "processed")

    def _clock_check(self) -> Check:
        synced = self.clock.synced_at_ms
        if synced is None:
            return Check("clock", False, f"never read from {self.settings.time_url}")
        age_s = (time.time() * 1000 - synced) / 1000
        limit_s = 3 * self.clock.refresh_s
        offset = self.clock.offset_ms
        if age_s > limit_s:
            return Check("clock", False, f"last read {age_s:.0f}s ago (more than {limit_s:g}s)")
        return Check("clock", True, f"offset {offset:+d} ms, read {age_s:.0f}s ago")

    def refresh_metrics(self) -> None:
        """Set the gauges that are read from live state (before each scrape)."""
        pipeline = self.pipeline
        metrics.OLDEST_IN_FLIGHT.set(pipeline.oldest_in_hand_s())
        offsets = consumer_offsets(self._consumer)
        in_hand = pipeline.in_hand_from()
        metrics.ASSIGNED_PARTITIONS.set(len(offsets))
        metrics.CONSUMER_LAG.clear()
        for (topic, partition), (end, fetched) in sorted(offsets.items()):
            if end is None:
                continue
            label = str(partition)
            if fetched is not None:
                metrics.CONSUMER_LAG.labels(topic, label, "fetched").set(max(0, end - fetched))
            done_to = in_hand.get((topic, partition), fetched)
            if done_to is not None:
                metrics.CONSUMER_LAG.labels(topic, label, "committed").set(max(0, end - done_to))
        metrics.GOVERNOR_WEIGHT_USED.set(self.governor.weight_used())
        metrics.GOVERNOR_WEIGHT_LIMIT.set(self.governor.weight_limit)
        now = self.clock.now()
        for gauge, until in (
            (metrics.BANNED_UNTIL, self.governor.banned_until_ms),
            (metrics.PAUSED_UNTIL, self.governor.paused_until_ms),
        ):
            gauge.set(until / 1000 if until > now else 0)
        metrics.CLOCK_OFFSET.set(self.clock.offset_ms / 1000)
        synced = self.clock.synced_at_ms
        metrics.CLOCK_SYNCED_AT.set(0 if synced is None else synced / 1000)


def disable_core_dumps() -> None:
    """No core file, ever: it would hold every account's secret and private key in clear.
    (The hard limit too, so nothing in the process can raise it again.)"""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        log.warning("core dumps could not be disabled: %s", exc)


async def serve(settings: Settings) -> ExitCode:
    """Run until SIGTERM/SIGINT; a second signal exits at once with ``ExitCode.FORCED``."""
    disable_core_dumps()  # before any secret is read
    try:
        accounts = load_worker_accounts(settings)
        producers = load_worker_producers(settings)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)  # noqa: TRY400 - the message is the whole story
        return ExitCode.CONFIG
    metrics.BUILD_INFO.labels(build_version(), platform.python_version()).set(1)
    worker = Worker(settings, accounts, producers)
    ops: OpsServer | None = None
    if settings.metrics_port:
        # Up before Kafka is: liveness passes and readiness says "starting" meanwhile.
        # A port that cannot be bound raises OSError here (the CLI reports it, exit 2).
        ops = OpsServer(settings.metrics_host, settings.metrics_port, worker)
        try:
            await ops.start()
        except OSError:
            await worker.discard()  # its clients were made, never started
            raise
    try:
        return await _serve(settings, worker, len(accounts))
    finally:
        if ops is not None:
            await ops.close()


async def _serve(settings: Settings, worker: Worker, accounts: int) -> ExitCode:
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    signals = 0
    stopped_while_starting = False

    def on_signal(signame: str) -> None:
        nonlocal signals, stopped_while_starting
        signals += 1
        if signals > 1:
            log.error("%s again: exiting at once with code %d", signame, ExitCode.FORCED)
            os._exit(ExitCode.FORCED)
        if worker.pipeline.loop_at is None and starting is not None:
            # Still starting (waiting for Kafka, say): nothing is in hand; stop starting.
            log.info("%s while starting: stopping", signame)
            stopped_while_starting = True
            starting.cancel()
        else:
            log.info("%s: stopping (fetch stops, in-flight finish, commit)", signame)
            worker.stop()

    # Installed before anything starts, so a stop while Kafka is awaited is honoured too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        async with worker:
            log.info(
                "worker started: group=%s commands=%s results=%s papi=%s accounts=%d",
                settings.group_id,
                settings.commands_topic,
                settings.results_topic,
                settings.papi_url,
                accounts,
            )
            # From here a signal stops the pipeline instead of cancelling this task.
            starting = None
            settle_garbage_collector()
            report = await worker.run()
    except asyncio.CancelledError:
        if not stopped_while_starting:
            raise
        log.info("worker stopped before it started")
        return ExitCode.OK
    except ConfigError as exc:
        log.error("configuration error: %s", exc)  # noqa: TRY400 - the message is the whole story
        return ExitCode.CONFIG
    except TakeOverRefusedError as exc:
        log.error("worker stopped: %s", exc)  # noqa: TRY400 - the message is the whole story
        return ExitCode.FATAL
    except Exception:
        log.exception("worker stopped on a fatal error")
        return ExitCode.FATAL
    if report.abandoned or report.unflushed or report.in_doubt:
        log.error(
            "worker stopped with work abandoned: %d command(s) cancelled while running, "
            "%d result(s) not made durable; their records will be read again; %d result(s) "
            "whose commit was cut short, outcome unknown: not sent again, the next owner "
            "starts from whatever it stored (exit %d)",
            report.abandoned,
            report.unflushed,
            report.in_doubt,
            ExitCode.ABANDONED,
        )
        return ExitCode.ABANDONED
    log.info("worker stopped cleanly after %d command(s)", report.processed)
    return ExitCode.OK
