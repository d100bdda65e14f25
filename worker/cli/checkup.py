"""``cancel-worker check``: is this configuration ready to run the worker?

Each check gives one :class:`CheckResult` (ok or not, and a one-line detail), in this order:

* **settings**: loaded (the CLI refuses bad ones before this, exit code 2), and from where;
* **exchange tls** (only when it applies): a WARNING that ``papi_url`` or ``time_url`` is plain
  http to a host that is not loopback, as ``ALLOW_INSECURE_EXCHANGE`` allows;
* **broker**: a Kafka admin client, with the TLS/SASL options
  (:func:`worker.kafka.io.security_options`), gets the cluster's metadata within a short
  bound;
* **topics**: the commands, results and dead-letter topics exist (created first with
  ``create_topics``), with their partition counts;
* **account <alias>**: each account's key loads (HMAC secret, Ed25519 or RSA private key);
  an accounts file that cannot be read at all is one **accounts** result;
* **exchange clock**: ``time_url`` answers; the offset of the local clock and the round
  trip, which fails when the offset is more than half of ``recv_window_ms``;
* **ping <alias>** (only when asked): one signed, read-only request of weight 1 per account
  (``GET /papi/v1/um/algo/openAlgoOrders?symbol=BTCUSDT``): ok, or the exchange's error
  code and message (-2015 for a key it does not know, -1022 for a wrong secret).

``skip`` (the CLI's ``--skip``) leaves broker, topics, accounts or clock checks out: a job
that only creates the topics need not reach the exchange. When Kafka refuses, the detail is
the cause aiokafka logs (its exceptions only say it could not bootstrap).

No detail ever holds a key, a secret, a signature or the user information of a URL. A
check that raises something unforeseen fails with the error's name, it does not stop the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from worker.cli.config_report import redact_url_credentials
from worker.core.errors import ExchangeError, NoAnswerError, NotSentError, PapiError
from worker.core.routes import encode_params
from worker.core.timeutil import now_ms
from worker.exchange.accounts import AccountsError, Credentials, load_each_account
from worker.exchange.clock import ClockSyncError, ExchangeClock
from worker.exchange.papi import PapiClient
from worker.kafka.fencing import exactly_once_refusal
from worker.kafka.io import ensure_topics, security_options
from worker.kafka.topic_reader import cluster_topics
from worker.producers import ProducersError, load_producers
from worker.settings import (
    SOURCE_ENV,
    SOURCE_FILE,
    SOURCE_OVERRIDE,
    Settings,
    env_name,
    insecure_exchange_url,
)

KAFKA_TIMEOUT_S = 5.0
"""How long the broker (and then the topics) may take to answer, by default."""

PING_PATH = "/papi/v1/um/algo/openAlgoOrders"
PING_PARAMS = (("symbol", "BTCUSDT"),)  # weight 1 with a symbol (40 without)

KEY_KINDS = {"hmac": "HMAC secret", "ed25519": "Ed25519 private key", "rsa": "RSA private key"}


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Report:
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def lines(self) -> list[str]:
        """One line per check (``ok``/``FAIL``, name, detail), then the summary."""
        width = max(len(r.name) for r in self.results)
        lines = [
            f"{'ok' if r.ok else 'FAIL':<4}  {r.name:<{width}}  {r.detail}" for r in self.results
        ]
        return [*lines, self.summary()]

    def summary(self) -> str:
        failed = [r.name for r in self.results if not r.ok]
        total = len(self.results)
        if not failed:
            return f"summary: all {total} checks ok"
        return f"summary: {len(failed)} of {total} checks failed: {', '.join(failed)}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _why(exc: BaseException) -> str:
    """An exception in a detail line: its class and, if it says more, its message."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


class _KafkaErrors(logging.Handler):
    """The last connection error aiokafka logs: its exceptions only say "Unable to bootstrap",
    the cause (authentication failed, connection closed) is in its log. Only ERROR records
    are kept; aiokafka logs the SASL exchange itself at DEBUG, never seen here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = " ".join(record.getMessage().split())


@contextlib.contextmanager
def _kafka_errors() -> Iterator[_KafkaErrors]:
    """Catch aiokafka's ERROR records for the duration (they are not printed meanwhile)."""
    logger = logging.getLogger("aiokafka")
    handler = _KafkaErrors()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _kafka_cause(exc: BaseException, logged: str | None, settings: Settings) -> str:
    """Why a Kafka client could not connect, with no password in it."""
    if logged is None:
        cause = _why(exc)
    else:
        cause = re.sub(r'^Unable connect to "[^"]*": ', "", logged)
        if "closed" in cause:
            cause += (
                f" (the broker hung up: does {env_name('kafka_security_protocol')} match its "
                "listener, and does it accept the client certificate?)"
            )
    for secret in (settings.kafka_sasl_password, settings.kafka_ssl_key_password):
        if secret:
            cause = cause.replace(secret, "<redacted>")
    return cause


# -- settings ----------------------------------------------------------------------------------


def settings_result(sources: Mapping[str, str], config_file: Path | None) -> CheckResult:
    counts = {s: sum(1 for v in sources.values() if v == s) for s in set(sources.values())}
    parts = [f"{counts.get(SOURCE_ENV, 0)} from the environment"]
    if config_file is not None:
        parts.append(f"{counts.get(SOURCE_FILE, 0)} from {config_file}")
    if counts.get(SOURCE_OVERRIDE):
        parts.append(f"{counts[SOURCE_OVERRIDE]} from the command line")
    return CheckResult("settings", True, f"loaded: {', '.join(parts)}, the rest defaults")


# -- Kafka -------------------------------------------------------------------------------------


def exchange_tls_result(settings: Settings) -> CheckResult | None:
    """A warning (the check passes) when the exchange is reached over plain http to a host
    that is not loopback; None when both URLs are https or loopback."""
    insecure = [
        name for name in ("papi_url", "time_url") if insecure_exchange_url(getattr(settings, name))
    ]
    if not insecure:
        return None
    urls = ", ".join(
        f"{env_name(name)}={redact_url_credentials(getattr(settings, name))}" for name in insecure
    )
    return CheckResult(
        "exchange tls",
        True,
        f"WARNING: plain http to the exchange ({urls}; "
        f"{env_name('allow_insecure_exchange')}=true): API keys travel in clear and answers "
        "can be forged on the way; for a simulator only",
    )


def _where(settings: Settings) -> str:
    return f"{settings.bootstrap_servers} ({settings.kafka_security_protocol})"


async def check_broker(settings: Settings, timeout_s: float) -> CheckResult:
    """The cluster answers a metadata request within ``timeout_s``."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-check",
        request_timeout_ms=max(1, int(timeout_s * 1000)),
        **security_options(settings),
    )
    started = time.monotonic()
    with _kafka_errors() as logged:
        try:
            await asyncio.wait_for(admin.start(), timeout_s)
            left = max(0.001, timeout_s - (time.monotonic() - started))
            cluster: dict[str, Any] = await asyncio.wait_for(admin.describe_cluster(), left)
        except TimeoutError:
            return CheckResult(
                "broker", False, f"no answer from {_where(settings)} within {timeout_s:g}s"
            )
        except (KafkaError, OSError) as exc:
            cause = _kafka_cause(exc, logged.last, settings)
            return CheckResult("broker", False, f"cannot reach {_where(settings)}: {cause}")
        else:
            refusal = (
                exactly_once_refusal(admin._client) if settings.delivery == "exactly_once" else None
            )
        finally:
            await admin.close()
    if refusal is not None:
        return CheckResult("broker", False, f"{_where(settings)}: {refusal}")
    took_ms = (time.monotonic() - started) * 1000
    brokers = len(cluster.get("brokers") or [])
    return CheckResult(
        "broker",
        True,
        f"{_where(settings)} answered in {took_ms:.0f} ms: {_plural(brokers, 'broker')}, "
        f"cluster {cluster.get('cluster_id') or '?'}",
    )


def wanted_topics(settings: Settings, partitions: int) -> dict[str, int]:
    """The worker's topics and the partitions each gets when created."""
    return {
        settings.commands_topic: partitions,
        settings.results_topic: partitions,
        settings.deadletter_topic: 1,
    }


async def check_topics(
    settings: Settings, timeout_s: float, *, create: bool, partitions: int
) -> CheckResult:
    """The three topics exist (created first if asked), with their partition counts."""
    wanted = wanted_topics(settings, partitions)
    request_ms = max(1, int(timeout_s * 1000))
    with _kafka_errors() as logged:
        return await _topics_result(settings, wanted, timeout_s, request_ms, create, logged)


async def _topics_result(
    settings: Settings,
    wanted: Mapping[str, int],
    timeout_s: float,
    request_ms: int,
    create: bool,
    logged: _KafkaErrors,
) -> CheckResult:
    try:
        if create:
            await asyncio.wait_for(
                ensure_topics(settings.bootstrap_servers, wanted, **security_options(settings)),
                timeout_s,
            )
        topics = await asyncio.wait_for(
            cluster_topics(
                settings.bootstrap_servers,
                request_ms,
                f"{settings.client_id}-check",
                **security_options(settings),
            ),
            timeout_s,
        )
    except TimeoutError:
        return CheckResult(
            "topics", False, f"no answer from {_where(settings)} within {timeout_s:g}s"
        )
    except (KafkaError, OSError) as exc:
        action = "create" if create else "list"
        cause = _kafka_cause(exc, logged.last, settings)
        return CheckResult("topics", False, f"cannot {action} the topics: {cause}")
    present = [
        f"{name} ({_plural(len(topics[name]), 'partition')})" for name in wanted if name in topics
    ]
    missing = [name for name in wanted if name not in topics]
    if missing:
        detail = f"missing on {settings.bootstrap_servers}: {', '.join(missing)}"
        if present:
            detail += f"; present: {', '.join(present)}"
        return CheckResult(
            "topics", False, f"{detail} (cancel-worker check --create-topics makes them)"
        )
    return CheckResult("topics", True, ", ".join(present))


# -- accounts ----------------------------------------------------------------------------------


def check_accounts(settings: Settings) -> tuple[list[CheckResult], dict[str, Credentials]]:
    """One result per account (or one for a file that cannot be read), and the accounts that
    loaded."""
    path = settings.accounts_file
    if path is None:
        return [CheckResult("accounts", False, f"{env_name('accounts_file')} is not set")], {}
    try:
        each = load_each_account(path)
    except AccountsError as exc:
        return [CheckResult("accounts", False, str(exc))], {}
    results: list[CheckResult] = []
    loaded: dict[str, Credentials] = {}
    for alias, outcome in each.items():
        name = f"account {alias}"
        if isinstance(outcome, AccountsError):
            detail = str(outcome).removeprefix(f"account {alias!r}: ")
            results.append(CheckResult(name, False, f"{detail} (in {path})"))
            continue
        loaded[alias] = outcome
        kind = KEY_KINDS.get(outcome.key_kind, outcome.key_kind)
        results.append(CheckResult(name, True, f"{kind} loaded"))
    return results, loaded


def check_producers(settings: Settings, accounts: Collection[str] = ()) -> list[CheckResult]:
    """The producers file as the worker loads it at start (one result for a file that cannot
    be used), then one result per producer: its keys, what it may name. ``accounts``: the
    aliases of the accounts file, to name the entitlements no account matches."""
    path = settings.producers_file
    if path is None:
        if settings.require_signed_commands:
            return [
                CheckResult(
                    "producers",
                    False,
                    f"{env_name('producers_file')} is not set: the worker will not start "
                    f"(every command must be signed; {env_name('require_signed_commands')}"
                    "=false takes unsigned commands)",
                )
            ]
        return [
            CheckResult(
                "producers",
                True,
                f"WARNING: commands are not verified ({env_name('require_signed_commands')}"
                "=false, no producers file): any writer of the commands topic can cancel any "
                "account",
            )
        ]
    try:
        producers = load_producers(path)
    except ProducersError as exc:
        return [CheckResult("producers", False, str(exc))]
    results = [CheckResult("producers", True, f"{len(producers)} loaded from {path}")]
    for producer in producers:
        detail = producer.describe()
        unknown = sorted((producer.accounts or frozenset()) - set(accounts)) if accounts else []
        if unknown:
            detail += f" (no such account in the accounts file: {', '.join(unknown)})"
        results.append(CheckResult(f"producer {producer.id}", True, detail))
    return results


# -- the exchange ------------------------------------------------------------------------------


def clock_verdict(offset_ms: int, round_trip_ms: int, recv_window_ms: int) -> CheckResult:
    """The exchange clock's offset from the local one, judged against the receive window: a
    request is refused (-1021) when it arrives more than ``recvWindow`` after its timestamp,
    so a local clock off by more than half of it is a clock to fix (NTP), even though the
    worker signs with the exchange's time as it estimates it."""
    said = f"offset {offset_ms:+d} ms, round trip {round_trip_ms} ms"
    half = recv_window_ms / 2
    if abs(offset_ms) > half:
        return CheckResult(
            "exchange clock",
            False,
            f"{said}: the offset is more than half of {env_name('recv_window_ms')} "
            f"({half:g} ms); set this host's clock right (NTP)",
        )
    return CheckResult(
        "exchange clock", True, f"{said} (within half of the {recv_window_ms} ms receive window)"
    )


async def check_clock(settings: Settings) -> tuple[CheckResult, int]:
    """Read ``time_url`` once; the result and the offset to sign with (0 when unread)."""
    clock = ExchangeClock(settings.time_url, timeout_s=settings.http_timeout_s)
    try:
        await clock.sync()
    except ClockSyncError as exc:
        return CheckResult("exchange clock", False, redact_url_credentials(str(exc))), 0
    finally:
        await clock.aclose()
    verdict = clock_verdict(clock.offset_ms, clock.round_trip_ms or 0, settings.recv_window_ms)
    return verdict, clock.offset_ms


def _exchange_said(exc: PapiError) -> str:
    if isinstance(exc, ExchangeError):
        said = f"HTTP {exc.status}"
        if exc.code is not None:
            said += f", code {exc.code}"
        if exc.msg is not None:
            said += f": {exc.msg}"
        elif exc.text:
            said += f": {exc.text}"
        return f"the exchange refused it ({said})"
    if isinstance(exc, NotSentError):
        return f"not sent: {exc}"
    if isinstance(exc, NoAnswerError):
        return f"no answer: {exc}"
    return str(exc)


async def ping(client: PapiClient, creds: Credentials, recv_window_ms: int) -> CheckResult:
    """One signed read-only request of weight 1 for ``creds``'s account."""
    name = f"ping {creds.alias}"
    query = encode_params(PING_PARAMS)
    what = f"GET {PING_PATH}?{query}"
    started = time.monotonic()
    try:
        response = await client.signed(
            creds, "GET", PING_PATH, query, recv_window_ms=recv_window_ms
        )
    except PapiError as exc:
        return CheckResult(name, False, f"{what}: {_exchange_said(exc)}")
    took_ms = (time.monotonic() - started) * 1000
    listed = response.body if isinstance(response.body, list) else None
    orders = "" if listed is None else f", {_plural(len(listed), 'open algo order')}"
    return CheckResult(name, True, f"{what}: HTTP {response.status} in {took_ms:.0f} ms{orders}")


async def ping_accounts(
    settings: Settings, accounts: Mapping[str, Credentials], clock: Callable[[], int]
) -> list[CheckResult]:
    """:func:`ping` for every account at once, each with a fresh timestamp and signature."""
    if not accounts:
        return []
    async with PapiClient(
        settings.papi_url,
        clock=clock,
        timeout_s=settings.http_timeout_s,
        connect_timeout_s=settings.http_connect_timeout_s,
        max_connections=min(settings.http_max_connections, 8),
    ) as client:
        return list(
            await asyncio.gather(
                *(ping(client, creds, settings.recv_window_ms) for creds in accounts.values())
            )
        )


# -- all of them -------------------------------------------------------------------------------


async def _guarded(name: str, check: Awaitable[CheckResult]) -> CheckResult:
    try:
        return await check
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        return CheckResult(name, False, f"unexpected error: {_why(exc)}")


SKIPPABLE = ("broker", "topics", "accounts", "clock")
"""Checks that can be left out (``--skip``): a one-shot job that only creates the topics
need not reach the exchange."""


async def run_checks(
    settings: Settings,
    sources: Mapping[str, str],
    *,
    config_file: Path | None = None,
    create_topics: bool = False,
    partitions: int = 6,
    ping_exchange: bool = False,
    kafka_timeout_s: float = KAFKA_TIMEOUT_S,
    skip: Collection[str] = (),
) -> Report:
    """Every check, in order (see the module docstring), but those in ``skip``
    (:data:`SKIPPABLE`; ``accounts`` also leaves out the pings)."""
    unknown = set(skip) - set(SKIPPABLE)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}: choose from {', '.join(SKIPPABLE)}")
    results: list[CheckResult] = [settings_result(sources, config_file)]
    tls = exchange_tls_result(settings)
    if tls is not None:
        results.append(tls)
    broker: CheckResult | None = None
    if "broker" not in skip:
        broker = await _guarded("broker", check_broker(settings, kafka_timeout_s))
        results.append(broker)
    if "topics" not in skip:
        if broker is not None and not broker.ok:
            topics = CheckResult("topics", False, "not checked: the broker did not answer")
        else:
            topics = await _guarded(
                "topics",
                check_topics(
                    settings, kafka_timeout_s, create=create_topics, partitions=partitions
                ),
            )
        results.append(topics)
    accounts: dict[str, Credentials] = {}
    if "accounts" not in skip:
        account_results, accounts = check_accounts(settings)
        results += account_results
        results += check_producers(settings, accounts)
    offset_ms = 0
    if "clock" not in skip:
        try:
            clock_result, offset_ms = await check_clock(settings)
        except Exception as exc:  # noqa: BLE001 - as in _guarded
            clock_result = CheckResult("exchange clock", False, f"unexpected error: {_why(exc)}")
        results.append(clock_result)
    if ping_exchange:
        results += await _ping_all(settings, accounts, offset_ms)
    return Report(tuple(results))


async def _ping_all(
    settings: Settings, accounts: Mapping[str, Credentials], offset_ms: int
) -> Sequence[CheckResult]:
    def clock() -> int:
        return now_ms() + offset_ms

    try:
        return await ping_accounts(settings, accounts, clock)
    except Exception as exc:  # noqa: BLE001 - as in _guarded
        return [CheckResult(f"ping {a}", False, f"unexpected error: {_why(exc)}") for a in accounts]
