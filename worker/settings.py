"""Frozen settings, read once at start-up.

Every setting has an environment variable ``CANCEL_WORKER_<NAME>`` and may also come from a
TOML file given with ``--config`` (keys in lower case, same names). Precedence, lowest first:
defaults, the TOML file, the environment. Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "CANCEL_WORKER_"
DELIVERY_MODES = ("exactly_once", "at_least_once")
MIN_DEADLETTER_BYTES = 8192  # worker.processor refuses less with its default key bound


class SettingsError(ValueError):
    """A setting is missing or has a value of the wrong kind."""


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
    accounts_file: Path | None = None
    # Delivery: "exactly_once" (results and offsets in one Kafka transaction per input
    # partition) or "at_least_once" (publish, then commit: a crash can repeat results).
    delivery: str = "exactly_once"
    transactional_id_prefix: str = ""  # empty: the group id
    transaction_timeout_ms: int = 300_000
    kafka_request_timeout_ms: int = 30_000
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
    # Exchange clock
    clock_refresh_s: float = 60.0
    # Rate governor (the exchange's limits; lower them to leave room for other clients)
    rate_weight_limit: int = 6000
    rate_weight_window_ms: int = 60_000
    rate_order_limit: int = 1200
    rate_order_window_ms: int = 60_000
    rate_guard_ms: int = 250
    # Observability
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str = "text"

    def check(self) -> Settings:
        """Raise :class:`SettingsError` for values no worker can run with."""
        positive = (
            "max_in_flight",
            "max_command_bytes",
            "deadletter_max_bytes",
            "max_attempts",
            "recv_window_ms",
            "http_max_connections",
            "max_poll_records",
            "default_deadline_ms",
            "rate_weight_limit",
            "rate_weight_window_ms",
            "rate_order_limit",
            "rate_order_window_ms",
            "max_buffered_per_partition",
            "transaction_timeout_ms",
            "kafka_request_timeout_ms",
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "commit_timeout_s",
            "dedup_max_entries",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be positive")
        if self.recv_window_ms > 60_000:
            raise SettingsError(f"{ENV_PREFIX}RECV_WINDOW_MS must be at most 60000")
        for name in ("papi_url", "time_url"):
            if not str(getattr(self, name)).startswith(("http://", "https://")):
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be an http(s) URL")
        if self.deadletter_max_bytes < MIN_DEADLETTER_BYTES:
            # A dead-letter copy holds a key of up to 4096 bytes plus the origin headers.
            raise SettingsError(
                f"{ENV_PREFIX}DEADLETTER_MAX_BYTES must be at least {MIN_DEADLETTER_BYTES}"
            )
        if self.delivery not in DELIVERY_MODES:
            raise SettingsError(f"{ENV_PREFIX}DELIVERY must be one of {', '.join(DELIVERY_MODES)}")
        for name in ("shutdown_grace_s", "revoke_grace_s", "dedup_window_ms"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must not be negative")
        # A member that spends longer than the session timeout in a rebalance callback is
        # expelled, and the group rebalances again: revocation must fit well inside it.
        revoke_ms = (self.revoke_grace_s + self.commit_timeout_s) * 1000
        if revoke_ms > self.session_timeout_ms / 2:
            raise SettingsError(
                f"{ENV_PREFIX}REVOKE_GRACE_S + {ENV_PREFIX}COMMIT_TIMEOUT_S "
                f"({revoke_ms / 1000:g}s) must be at most half of "
                f"{ENV_PREFIX}SESSION_TIMEOUT_MS ({self.session_timeout_ms} ms)"
            )
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise SettingsError(
                f"{ENV_PREFIX}HEARTBEAT_INTERVAL_MS must be at most a third of "
                f"{ENV_PREFIX}SESSION_TIMEOUT_MS"
            )
        if self.max_buffered_per_partition < self.max_poll_records:
            raise SettingsError(
                f"{ENV_PREFIX}MAX_BUFFERED_PER_PARTITION must be at least "
                f"{ENV_PREFIX}MAX_POLL_RECORDS ({self.max_poll_records})"
            )
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"{ENV_PREFIX}LOG_FORMAT must be text or json")
        return self


def _coerce(name: str, type_name: object, raw: object) -> object:
    """Convert a TOML or environment value to the field's type (annotations are strings here)."""
    label = f"{ENV_PREFIX}{name.upper()}"
    if isinstance(raw, bool | dict | list):
        raise SettingsError(f"{label}: expected a scalar value")
    text = str(raw).strip()
    try:
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
    except ValueError as exc:
        raise SettingsError(f"{label}: cannot read {text[:40]!r} as {type_name}") from exc
    if type_name == "Path | None":
        return Path(text) if text else None
    return text


def load_settings(
    environ: Mapping[str, str], config_file: Path | None = None, **overrides: object
) -> Settings:
    """Build settings from defaults, an optional TOML file, the environment, then overrides."""
    values: dict[str, object] = {}
    known = {f.name: f.type for f in fields(Settings)}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read config file {config_file}: {exc}") from exc
        for key, raw in data.items():
            name = key.lower()
            if name not in known:
                raise SettingsError(f"config file {config_file}: unknown setting {key!r}")
            values[name] = _coerce(name, known[name], raw)
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in known:
                values[name] = _coerce(name, known[name], raw)
    for name, raw in overrides.items():
        if raw is not None:
            values[name] = _coerce(name, known[name], raw)
    return dataclasses.replace(Settings(), **values).check()  # type: ignore[arg-type]
