"""Frozen settings, read once at start-up.

Every setting has an environment variable ``CANCEL_WORKER_<NAME>`` and may also come from a
TOML file given with ``--config`` (keys in lower case, same names). Precedence, lowest first:
defaults, the TOML file, the environment. Nothing else in the package reads ``os.environ``.

Configuration is checked before anything starts: an unknown ``CANCEL_WORKER_*`` variable or
TOML key (with a did-you-mean), a value of the wrong kind, a number out of its range or
settings that cannot work together raise :class:`SettingsError`, whose message names the
variable, the value and what is allowed.

Secrets (:data:`SECRETS`) are never shown: not in ``repr``, not in an error message.
:func:`resolve_settings` also says where each value came from (``cancel-worker config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

ENV_PREFIX = "CANCEL_WORKER_"
DELIVERY_MODES = ("exactly_once", "at_least_once")
LOG_FORMATS = ("text", "json")
# The standard logging level names (a fixed list: libraries may register more at import time).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")
MIN_DEADLETTER_BYTES = 8192  # worker.processor refuses less with its default key bound
# The producer's max_request_size and the consumer's fetch size (worker.kafka.io.MAX_RECORD_BYTES,
# kept equal by a test): a command or dead-letter copy above it can never be sent or read.
MAX_KAFKA_RECORD_BYTES = 4 * 1024 * 1024
# Kafka broker defaults: group.min.session.timeout.ms / group.max.session.timeout.ms (a broker
# refuses to let a member join outside them) and transaction.max.timeout.ms.
MIN_SESSION_TIMEOUT_MS = 6_000
MAX_SESSION_TIMEOUT_MS = 1_800_000
MAX_TRANSACTION_TIMEOUT_MS = 900_000
MAX_RECV_WINDOW_MS = 60_000  # the exchange refuses a larger recvWindow
INT32_MAX = 2**31 - 1  # Kafka protocol timeouts are 32-bit
_PRODUCER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # worker.producers.PRODUCER_ID
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
# Kafka client security (aiokafka's security_protocol and sasl_mechanism values).
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
KAFKA_SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
KAFKA_TLS_FILES = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
SECRETS = frozenset({"kafka_ssl_key_password", "kafka_sasl_password"})
"""Settings whose values are never shown (``repr``, messages, ``cancel-worker config``)."""

# Where a value came from, lowest precedence first (``cancel-worker config`` prints it).
SOURCE_DEFAULT = "default"
SOURCE_FILE = "file"
SOURCE_ENV = "env"
SOURCE_OVERRIDE = "override"

# CANCEL_WORKER_* environment names that are not settings, accepted and ignored (any other
# unknown CANCEL_WORKER_* name is a configuration error). Nothing in this repository sets or
# reads such a name (tests, demo, bench, deploy/ and the Makefile use setting names only);
# what is left are the service links Kubernetes puts into every pod of a namespace that has a
# Service named "cancel-worker": CANCEL_WORKER_SERVICE_HOST, CANCEL_WORKER_SERVICE_PORT,
# CANCEL_WORKER_SERVICE_PORT_<PORT NAME>, CANCEL_WORKER_PORT and
# CANCEL_WORKER_PORT_<N>_<PROTOCOL>[_PROTO|_PORT|_ADDR].
OTHER_ENV_NAMES = re.compile(
    r"CANCEL_WORKER_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)?)"
)


class SettingsError(ValueError):
    """A setting is missing, unknown, of the wrong kind or out of its range."""


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "cancel-worker"
    commands_topic: str = "papi.cancel.commands"
    results_topic: str = "papi.cancel.results"
    deadletter_topic: str = "papi.cancel.deadletter"
    client_id: str = "cancel-worker"
    papi_url: str = "https://papi.binance.com"
    time_url: str = "https://fapi.binance.com/fapi/v1/time"
    # PAPI_URL and TIME_URL must be https (the API keys and the exchange's answers travel
    # over them) unless their host is loopback, or this is true (a simulator on another host).
    allow_insecure_exchange: bool = False
    accounts_file: Path | None = None
    # Who may write commands (worker.producers): every command must be signed by a producer
    # of this file and name only what it is entitled to. Without the file the worker refuses
    # to start unless require_signed_commands is false (any writer of the commands topic
    # may then cancel any account).
    producers_file: Path | None = None
    require_signed_commands: bool = True
    # The producer side (the client library's from_settings, send, replay's re-signing):
    # this process's producer id and its Ed25519 private key (PEM).
    producer_id: str = ""
    producer_key_file: Path | None = None
    # Delivery: "exactly_once" (results and offsets in one Kafka transaction per input
    # partition) or "at_least_once" (publish, then commit: a crash can repeat results).
    delivery: str = "exactly_once"
    transactional_id_prefix: str = ""  # empty: the group id
    transaction_timeout_ms: int = 300_000
    # Exactly-once: the shortest time from the start of one transaction of an input
    # partition to the next (0: as soon as results are ready); Kafka Streams' exactly-once
    # commit interval. Fewer transactions, less broker work, a little later results.
    transaction_interval_ms: int = 0
    kafka_request_timeout_ms: int = 30_000
    # Kafka TLS and SASL, for every Kafka client (worker.kafka.io.security_options). TLS
    # files are PEM; without a CA file the system's CAs verify the brokers.
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None  # a client certificate (mutual TLS)
    kafka_ssl_keyfile: Path | None = None  # its private key, if not in the certificate file
    kafka_ssl_key_password: str = field(default="", repr=False)
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    # Pipeline
    max_in_flight: int = 256
    max_buffered_per_partition: int = 1000
    max_command_bytes: int = 64 * 1024
    deadletter_max_bytes: int = 1_000_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_records: int = 500
    shutdown_grace_s: float = 10.0
    revoke_grace_s: float = 2.0
    commit_timeout_s: float = 2.0
    # Duplicate-command window: a command id with a final result completed less than this
    # long ago gets cancel.duplicate instead of a second request (0 turns it off); rebuilt
    # at start from the results topic.
    dedup_window_ms: int = 3_600_000
    dedup_max_entries: int = 1_000_000
    # HTTP and retries
    http_timeout_s: float = 5.0
    http_connect_timeout_s: float = 2.0
    http_max_connections: int = 64
    recv_window_ms: int = 5_000
    max_attempts: int = 4
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    default_deadline_ms: int = 30_000
    reconcile_budget_ms: int = 5_000
    # A command issued longer ago than this (by its issued_at, on the exchange clock) is
    # expired without a request: a replay or an offset reset must not re-run hour-old
    # cancels (replay --restamp re-runs old commands on purpose). 0 turns it off.
    max_command_age_ms: int = 600_000
    # Exchange clock
    clock_refresh_s: float = 60.0
    # Rate governor (the exchange's limits; lower them to leave room for other clients)
    rate_weight_limit: int = 6000
    rate_weight_window_ms: int = 60_000
    rate_order_limit: int = 1200
    rate_order_window_ms: int = 60_000
    rate_guard_ms: int = 250
    # Caps on the exchange's stops: a longer (or unreadable) Retry-After or ban is taken as
    # this long, then one request probes before the IP opens again.
    rate_max_pause_ms: int = 60_000
    rate_max_ban_ms: int = 300_000
    # Status queries reconciling a cancel: at most this share of RATE_WEIGHT_LIMIT per
    # account per weight window.
    rate_reconcile_weight_share: float = 0.1
    # Observability
    metrics_port: int = 0  # also serves /healthz and /readyz
    metrics_host: str = "127.0.0.1"
    # /healthz fails when the fetch loop has not come round, or one flush has been under
    # way, for longer than this (the pipeline is wedged).
    health_stall_s: float = 60.0
    log_level: str = "INFO"
    log_format: str = "text"

    def check(self) -> Settings:
        """Raise :class:`SettingsError` for values no worker can run with."""
        _check_kinds(self)
        for name, bound in RANGES.items():
            bound.check(name, getattr(self, name))
        _check_text(self)
        _check_relations(self)
        _check_kafka_security(self)
        _check_producer(self)
        return self


def env_name(name: str) -> str:
    """A setting's environment variable: ``max_in_flight`` → ``CANCEL_WORKER_MAX_IN_FLIGHT``."""
    return f"{ENV_PREFIX}{name.upper()}"


def _num(value: float) -> str:
    """A number as people write it: 6000, 0.05, 1800000."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _show(value: object) -> str:
    """A value for a message: numbers as written, text quoted (and cut) on one line."""
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return repr(value)


@dataclass(frozen=True)
class Range:
    """Where a number may lie: ``low`` (inclusive unless ``open_low``) up to ``high``."""

    low: float
    high: float | None = None
    open_low: bool = False  # "more than low": 0 for durations where zero cannot work
    why: str = ""  # who imposes the bound, said after the range

    def allowed(self) -> str:
        low = _num(self.low)
        if self.high is None:
            return f"more than {low}" if self.open_low else f"{low} or more"
        if self.open_low:
            return f"more than {low} and at most {_num(self.high)}"
        return f"{low}..{_num(self.high)}"

    def check(self, name: str, value: float) -> None:
        if value < self.low or (self.open_low and value == self.low):
            if self.low == 0 and not self.open_low:
                problem = "must not be negative"
            elif self.low == 0 or (self.low == 1 and not self.open_low):
                problem = "must be positive"
            else:
                problem = f"must be {'more than' if self.open_low else 'at least'} {_num(self.low)}"
        elif self.high is not None and value > self.high:
            problem = f"must be at most {_num(self.high)}"
        else:
            return
        why = f"; {self.why}" if self.why else ""
        raise SettingsError(
            f"{env_name(name)} {problem}: got {_show(value)} (allowed: {self.allowed()}){why}"
        )


POSITIVE = Range(0, open_low=True)  # zero cannot work
NON_NEGATIVE = Range(0)  # zero means "off" or "none"
ONE_OR_MORE = Range(1)

# Every numeric setting and its range; the relations between settings are checked after.
RANGES: dict[str, Range] = {
    "transaction_timeout_ms": Range(
        1, MAX_TRANSACTION_TIMEOUT_MS, why="Kafka broker default transaction.max.timeout.ms"
    ),
    "transaction_interval_ms": Range(0, 60_000),
    "kafka_request_timeout_ms": Range(1, INT32_MAX),
    "max_in_flight": ONE_OR_MORE,
    "max_buffered_per_partition": ONE_OR_MORE,
    "max_command_bytes": Range(
        1, MAX_KAFKA_RECORD_BYTES, why="the largest record the worker's Kafka clients move"
    ),
    "deadletter_max_bytes": Range(
        MIN_DEADLETTER_BYTES,
        MAX_KAFKA_RECORD_BYTES,
        why="a dead-letter copy holds a key of up to 4096 bytes plus the origin headers, "
        "and must fit in the largest record the worker's Kafka clients move",
    ),
    "session_timeout_ms": Range(
        MIN_SESSION_TIMEOUT_MS,
        MAX_SESSION_TIMEOUT_MS,
        why="Kafka broker defaults group.min.session.timeout.ms, group.max.session.timeout.ms",
    ),
    "heartbeat_interval_ms": ONE_OR_MORE,
    "max_poll_records": ONE_OR_MORE,
    "shutdown_grace_s": NON_NEGATIVE,
    "revoke_grace_s": NON_NEGATIVE,
    "commit_timeout_s": POSITIVE,
    "dedup_window_ms": NON_NEGATIVE,
    "dedup_max_entries": ONE_OR_MORE,
    "http_timeout_s": POSITIVE,
    "http_connect_timeout_s": POSITIVE,
    "http_max_connections": ONE_OR_MORE,
    "recv_window_ms": Range(1, MAX_RECV_WINDOW_MS, why="the exchange refuses a larger recvWindow"),
    "max_attempts": ONE_OR_MORE,
    "backoff_initial_s": POSITIVE,
    "backoff_max_s": POSITIVE,
    "default_deadline_ms": ONE_OR_MORE,
    "reconcile_budget_ms": NON_NEGATIVE,
    "max_command_age_ms": NON_NEGATIVE,
    "clock_refresh_s": POSITIVE,
    "rate_weight_limit": ONE_OR_MORE,
    "rate_weight_window_ms": ONE_OR_MORE,
    "rate_order_limit": ONE_OR_MORE,
    "rate_order_window_ms": ONE_OR_MORE,
    "rate_guard_ms": NON_NEGATIVE,
    "rate_max_pause_ms": ONE_OR_MORE,
    "rate_max_ban_ms": ONE_OR_MORE,
    "rate_reconcile_weight_share": Range(0, 1, open_low=True),
    "metrics_port": Range(0, 65535, why="0 turns the metrics endpoint off"),
    "health_stall_s": POSITIVE,
}


def _check_kinds(s: Settings) -> None:
    """Numbers must be numbers (and finite): settings may also be built in code."""
    for f in fields(s):
        value = getattr(s, f.name)
        if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise SettingsError(f"{env_name(f.name)} must be a whole number: got {_show(value)}")
        if f.type == "float":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise SettingsError(f"{env_name(f.name)} must be a number: got {_show(value)}")
            if not math.isfinite(value):
                raise SettingsError(
                    f"{env_name(f.name)} must be a finite number: got {_show(value)}"
                )
        if f.type == "bool" and not isinstance(value, bool):
            raise SettingsError(f"{env_name(f.name)} must be true or false: got {_show(value)}")
        if f.type == "str" and not isinstance(value, str):
            shown = f"a {type(value).__name__}" if f.name in SECRETS else _show(value)
            raise SettingsError(f"{env_name(f.name)} must be text: got {shown}")


def _one_of(name: str, value: str, allowed: Iterable[str], *, fold: bool = False) -> None:
    """``value`` must be one of ``allowed`` (``fold``: in any case, listed in lower case)."""
    choices = list(allowed)
    if (value.upper() if fold else value) not in choices:
        listed = ", ".join(c.lower() for c in choices) if fold else ", ".join(choices)
        raise SettingsError(
            f"{env_name(name)} must be one of {listed}{' (any case)' if fold else ''}: "
            f"got {_show(value)}"
        )


def _check_text(s: Settings) -> None:
    for name in ("bootstrap_servers", "group_id", "client_id", "metrics_host"):
        if not getattr(s, name).strip():
            raise SettingsError(f"{env_name(name)} must not be empty")
    for server in s.bootstrap_servers.split(","):
        host, colon, port = server.strip().rpartition(":")
        if not server.strip() or (colon and (not host or not port.isdigit())):
            raise SettingsError(
                f"{env_name('bootstrap_servers')} must be a comma-separated list of host:port: "
                f"got {_show(s.bootstrap_servers)}"
            )
        if colon and not 0 < int(port) <= 65535:
            raise SettingsError(
                f"{env_name('bootstrap_servers')}: port {port} of {_show(server.strip())} "
                "must be between 1 and 65535"
            )
    topics = ("commands_topic", "results_topic", "deadletter_topic")
    for name in topics:
        topic = getattr(s, name)
        if not _TOPIC_NAME.fullmatch(topic) or topic in {".", ".."}:
            raise SettingsError(
                f"{env_name(name)} must be a Kafka topic name (1 to 249 of A-Z a-z 0-9 . _ -): "
                f"got {_show(topic)}"
            )
    for i, first in enumerate(topics):
        for second in topics[i + 1 :]:
            if getattr(s, first) == getattr(s, second):
                raise SettingsError(
                    f"{env_name(first)} and {env_name(second)} must be different topics: "
                    f"both are {_show(getattr(s, first))}"
                )
    for name in ("papi_url", "time_url"):
        url = getattr(s, name)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"{env_name(name)} must be an http(s) URL: got {_show(url)}")
        if insecure_exchange_url(url) and not s.allow_insecure_exchange:
            raise SettingsError(
                f"{env_name(name)} must be https (API keys and the exchange's answers travel "
                f"over it): got {_show(url)}; plain http only to a loopback host (127.0.0.0/8, "
                f"::1, localhost) or with {env_name('allow_insecure_exchange')}=true"
            )
    _one_of("delivery", s.delivery, DELIVERY_MODES)
    _one_of("log_format", s.log_format, LOG_FORMATS)
    _one_of("log_level", s.log_level, LOG_LEVELS, fold=True)


def _check_producer(s: Settings) -> None:
    """This process's producer identity: an id with a key file, or neither."""
    if s.producer_id and not _PRODUCER_ID.fullmatch(s.producer_id):
        raise SettingsError(
            f"{env_name('producer_id')} must be 1 to 64 of A-Z a-z 0-9 . _ - "
            f"(it is sent in the x-producer header): got {_show(s.producer_id)}"
        )
    if bool(s.producer_id) != (s.producer_key_file is not None):
        given, missing = (
            ("producer_id", "producer_key_file")
            if s.producer_id
            else ("producer_key_file", "producer_id")
        )
        raise SettingsError(
            f"{env_name(given)} is set without {env_name(missing)}: a producer signs with "
            "its id and its key together"
        )


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a URL's host name, brackets removed) is this machine: ``localhost``
    or an address in 127.0.0.0/8 or ::1 (an IPv4-mapped 127.x too)."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def insecure_exchange_url(url: str) -> bool:
    """Whether ``url`` is plain http to a host that is not loopback: what
    ALLOW_INSECURE_EXCHANGE must allow, and ``cancel-worker check`` warns about."""
    parts = urlsplit(url)
    return parts.scheme == "http" and not is_loopback_host(parts.hostname)


def _check_relations(s: Settings) -> None:
    # A member that spends longer than the session timeout in a rebalance callback is
    # expelled, and the group rebalances again: revocation must fit well inside it.
    revoke_ms = (s.revoke_grace_s + s.commit_timeout_s) * 1000
    if revoke_ms > s.session_timeout_ms / 2:
        raise SettingsError(
            f"{env_name('revoke_grace_s')} + {env_name('commit_timeout_s')} "
            f"({revoke_ms / 1000:g}s) must be at most half of "
            f"{env_name('session_timeout_ms')} ({s.session_timeout_ms} ms)"
        )
    if s.heartbeat_interval_ms * 3 > s.session_timeout_ms:
        raise SettingsError(
            f"{env_name('heartbeat_interval_ms')} must be at most a third of "
            f"{env_name('session_timeout_ms')}: got {s.heartbeat_interval_ms} with a "
            f"session timeout of {s.session_timeout_ms} (allowed: 1..{s.session_timeout_ms // 3})"
        )
    # A JoinGroup request is answered only when the group has formed, which may take up to
    # the session (rebalance) timeout; a shorter request timeout gives up on every rebalance.
    if s.kafka_request_timeout_ms <= s.session_timeout_ms:
        raise SettingsError(
            f"{env_name('kafka_request_timeout_ms')} must be more than "
            f"{env_name('session_timeout_ms')}: got {s.kafka_request_timeout_ms} with a "
            f"session timeout of {s.session_timeout_ms}"
        )
    if s.max_buffered_per_partition < s.max_poll_records:
        raise SettingsError(
            f"{env_name('max_buffered_per_partition')} must be at least "
            f"{env_name('max_poll_records')} ({s.max_poll_records}): "
            f"got {s.max_buffered_per_partition}"
        )
    # One flush may legitimately wait a whole Kafka request timeout; that is not a stall.
    if s.health_stall_s * 1000 <= s.kafka_request_timeout_ms:
        raise SettingsError(
            f"{env_name('health_stall_s')} must be more than "
            f"{env_name('kafka_request_timeout_ms')} ({s.kafka_request_timeout_ms} ms): "
            f"got {_num(s.health_stall_s)}"
        )
    if s.backoff_initial_s > s.backoff_max_s:
        raise SettingsError(
            f"{env_name('backoff_initial_s')} must be at most {env_name('backoff_max_s')} "
            f"({_num(s.backoff_max_s)}): got {_num(s.backoff_initial_s)}"
        )
    # A request within the guard of a window boundary counts in both neighbours; a guard
    # wider than half a window would skip the window in between.
    for window in ("rate_weight_window_ms", "rate_order_window_ms"):
        if s.rate_guard_ms * 2 > getattr(s, window):
            raise SettingsError(
                f"{env_name('rate_guard_ms')} must be at most half of {env_name(window)} "
                f"({getattr(s, window)}): got {s.rate_guard_ms}"
            )


def _check_kafka_security(s: Settings) -> None:
    """The Kafka TLS and SASL settings: values, files, and what goes with what. Loading the
    TLS material itself (a CA that is not a certificate, a wrong key password) is checked
    where the clients' options are built, ``worker.kafka.io.security_options``."""
    protocol_name = env_name("kafka_security_protocol")
    _one_of("kafka_security_protocol", s.kafka_security_protocol, KAFKA_SECURITY_PROTOCOLS)
    _one_of("kafka_sasl_mechanism", s.kafka_sasl_mechanism, KAFKA_SASL_MECHANISMS)
    protocol = s.kafka_security_protocol
    if protocol not in KAFKA_TLS_PROTOCOLS:
        for name in (*KAFKA_TLS_FILES, "kafka_ssl_key_password"):
            if getattr(s, name):
                raise SettingsError(
                    f"{env_name(name)} is set, but {protocol_name} is {protocol}: "
                    "TLS settings need SSL or SASL_SSL"
                )
    if protocol not in KAFKA_SASL_PROTOCOLS:
        for name in ("kafka_sasl_username", "kafka_sasl_password"):
            if getattr(s, name):
                raise SettingsError(
                    f"{env_name(name)} is set, but {protocol_name} is {protocol}: "
                    "SASL settings need SASL_PLAINTEXT or SASL_SSL"
                )
    else:
        for name in ("kafka_sasl_username", "kafka_sasl_password"):
            if not getattr(s, name):
                raise SettingsError(
                    f"{protocol_name} {protocol} needs {env_name('kafka_sasl_username')} and "
                    f"{env_name('kafka_sasl_password')}: {env_name(name)} is not set"
                )
    if s.kafka_ssl_certfile is None:
        for name in ("kafka_ssl_keyfile", "kafka_ssl_key_password"):
            if getattr(s, name):
                raise SettingsError(
                    f"{env_name(name)} needs {env_name('kafka_ssl_certfile')}: "
                    "the key belongs to a client certificate"
                )
    for name in KAFKA_TLS_FILES:
        path = getattr(s, name)
        if path is None:
            continue
        try:
            with Path(path).open("rb") as file:
                file.read(1)
        except OSError as exc:
            raise SettingsError(
                f"{env_name(name)}: cannot read {path}: {exc.strerror or exc}"
            ) from None


def _did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _coerce(name: str, type_name: object, raw: object) -> object:
    """Convert a TOML or environment value to the field's type (annotations are strings here)."""
    label = env_name(name)
    if type_name == "bool":
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in BOOL_WORDS:
            return BOOL_WORDS[word]
        raise SettingsError(f"{label} must be true or false: got {_show(str(raw))}")
    if isinstance(raw, bool | dict | list):
        raise SettingsError(f"{label}: expected a single value, got a {type(raw).__name__}")
    text = str(raw).strip()
    if type_name in ("int", "float"):
        try:
            number: float | None = int(text) if type_name == "int" else float(text)
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            kind = "a whole number" if type_name == "int" else "a finite number"
            raise SettingsError(f"{label}: cannot read {_show(text)} as {kind}")
        return number
    if type_name == "Path | None":
        return Path(text) if text else None
    return text


def _from_file(config_file: Path, known: Mapping[str, object]) -> dict[str, object]:
    try:
        data = tomllib.loads(config_file.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read config file {config_file}: {exc}") from exc
    values: dict[str, object] = {}
    for key, raw in data.items():
        name = key.lower()
        if name not in known:
            hint = _did_you_mean(name, known)
            if name.startswith(ENV_PREFIX.lower()) and name[len(ENV_PREFIX) :] in known:
                hint = f"; did you mean {name[len(ENV_PREFIX) :]}? (keys have no prefix here)"
            raise SettingsError(f"config file {config_file}: unknown setting {key!r}{hint}")
        values[name] = _coerce(name, known[name], raw)
    return values


def resolve_settings(
    environ: Mapping[str, str], config_file: Path | None = None, **overrides: object
) -> tuple[Settings, dict[str, str]]:
    """Build settings from defaults, an optional TOML file, the environment, then overrides
    (each wins over the ones before it), and say where each value came from: every field's
    name maps to :data:`SOURCE_DEFAULT`, :data:`SOURCE_FILE`, :data:`SOURCE_ENV` or
    :data:`SOURCE_OVERRIDE`. The one place that decides precedence."""
    known = {f.name: f.type for f in fields(Settings)}
    sources = dict.fromkeys(known, SOURCE_DEFAULT)
    values = _from_file(config_file, known) if config_file is not None else {}
    sources.update(dict.fromkeys(values, SOURCE_FILE))
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in known:
            values[name] = _coerce(name, known[name], raw)
            sources[name] = SOURCE_ENV
        elif not OTHER_ENV_NAMES.fullmatch(key):
            hint = _did_you_mean(name.upper(), (n.upper() for n in known), ENV_PREFIX)
            raise SettingsError(f"unknown environment variable {key}{hint}")
    for field_name, value in overrides.items():
        if value is not None:
            values[field_name] = _coerce(field_name, known[field_name], value)
            sources[field_name] = SOURCE_OVERRIDE
    settings = dataclasses.replace(Settings(), **values).check()  # type: ignore[arg-type]
    return settings, sources


def load_settings(
    environ: Mapping[str, str], config_file: Path | None = None, **overrides: object
) -> Settings:
    """Build settings from defaults, an optional TOML file, the environment, then overrides."""
    return resolve_settings(environ, config_file, **overrides)[0]
