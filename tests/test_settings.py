"""Configuration that cannot work is refused before anything starts, in one line, exit code 2.

(a) a table of bad settings, each with the fragment its message must carry; every range and
every relation of ``Settings.check``; (b) did-you-mean for environment names, TOML keys and the
accounts file; (c) the real CLI, as a child process, with each bad configuration: exit code 2,
one readable line naming the setting, no traceback, before any Kafka connection (the broker
address points nowhere). Also: the project's own configurations still pass.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support import Topics, worker_env, worker_settings
from worker.cli.checkup import exchange_tls_result
from worker.exchange.accounts import FIELDS, AccountsError, load_accounts, load_each_account
from worker.producers import stanza
from worker.settings import (
    ENV_PREFIX,
    MAX_KAFKA_RECORD_BYTES,
    NON_NEGATIVE,
    POSITIVE,
    RANGES,
    Settings,
    SettingsError,
    env_name,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[1]
W = ENV_PREFIX

# -- (a) every check, table-driven ----------------------------------------------------------

BAD_ENV: list[tuple[str, dict[str, str], str]] = [
    # the cases of the issue
    (
        "http-timeout-zero",
        {f"{W}HTTP_TIMEOUT_S": "0"},
        f"{W}HTTP_TIMEOUT_S must be positive: got 0",
    ),
    (
        "shutdown-grace-negative",
        {f"{W}SHUTDOWN_GRACE_S": "-5"},
        f"{W}SHUTDOWN_GRACE_S must not be negative: got -5 (allowed: 0 or more)",
    ),
    ("clock-refresh-zero", {f"{W}CLOCK_REFRESH_S": "0"}, f"{W}CLOCK_REFRESH_S must be positive"),
    (
        "heartbeat-equals-session",
        {f"{W}HEARTBEAT_INTERVAL_MS": "10000"},
        f"{W}HEARTBEAT_INTERVAL_MS must be at most a third of {W}SESSION_TIMEOUT_MS: got 10000",
    ),
    (
        "heartbeat-above-session",
        {f"{W}HEARTBEAT_INTERVAL_MS": "20000", f"{W}SESSION_TIMEOUT_MS": "15000"},
        "(allowed: 1..5000)",
    ),
    (
        "misspelt-variable",
        {f"{W}MAX_INFLIGHT": "8"},
        f"unknown environment variable {W}MAX_INFLIGHT; did you mean {W}MAX_IN_FLIGHT?",
    ),
    (
        "log-level-unknown",
        {f"{W}LOG_LEVEL": "verbose"},
        f"{W}LOG_LEVEL must be one of debug, info, warning, warn, error, critical, fatal, "
        "notset (any case): got 'verbose'",
    ),
    (
        "session-below-broker-minimum",
        {f"{W}SESSION_TIMEOUT_MS": "500"},
        f"{W}SESSION_TIMEOUT_MS must be at least 6000: got 500 (allowed: 6000..1800000)",
    ),
    (
        "session-above-broker-maximum",
        {f"{W}SESSION_TIMEOUT_MS": "1800001", f"{W}KAFKA_REQUEST_TIMEOUT_MS": "2000000"},
        f"{W}SESSION_TIMEOUT_MS must be at most 1800000: got 1800001",
    ),
    # ranges
    ("in-flight-zero", {f"{W}MAX_IN_FLIGHT": "0"}, f"{W}MAX_IN_FLIGHT must be positive: got 0"),
    ("buffered-zero", {f"{W}MAX_BUFFERED_PER_PARTITION": "0"}, "MAX_BUFFERED_PER_PARTITION"),
    ("command-bytes-zero", {f"{W}MAX_COMMAND_BYTES": "0"}, f"{W}MAX_COMMAND_BYTES must be"),
    (
        "command-bytes-above-record",
        {f"{W}MAX_COMMAND_BYTES": str(MAX_KAFKA_RECORD_BYTES + 1)},
        f"{W}MAX_COMMAND_BYTES must be at most {MAX_KAFKA_RECORD_BYTES}",
    ),
    (
        "deadletter-bytes-small",
        {f"{W}DEADLETTER_MAX_BYTES": "4000"},
        f"{W}DEADLETTER_MAX_BYTES must be at least 8192: got 4000",
    ),
    (
        "deadletter-bytes-above-record",
        {f"{W}DEADLETTER_MAX_BYTES": str(MAX_KAFKA_RECORD_BYTES + 1)},
        f"{W}DEADLETTER_MAX_BYTES must be at most {MAX_KAFKA_RECORD_BYTES}",
    ),
    ("heartbeat-zero", {f"{W}HEARTBEAT_INTERVAL_MS": "0"}, f"{W}HEARTBEAT_INTERVAL_MS must be"),
    ("poll-records-zero", {f"{W}MAX_POLL_RECORDS": "0"}, f"{W}MAX_POLL_RECORDS must be positive"),
    ("revoke-grace-negative", {f"{W}REVOKE_GRACE_S": "-1"}, f"{W}REVOKE_GRACE_S must not be"),
    ("commit-timeout-zero", {f"{W}COMMIT_TIMEOUT_S": "0"}, f"{W}COMMIT_TIMEOUT_S must be positive"),
    (
        "dedup-window-negative",
        {f"{W}DEDUP_WINDOW_MS": "-1"},
        "DEDUP_WINDOW_MS must not be negative",
    ),
    ("dedup-entries-zero", {f"{W}DEDUP_MAX_ENTRIES": "0"}, "DEDUP_MAX_ENTRIES must be positive"),
    ("connect-timeout-zero", {f"{W}HTTP_CONNECT_TIMEOUT_S": "0"}, "HTTP_CONNECT_TIMEOUT_S must be"),
    ("connections-zero", {f"{W}HTTP_MAX_CONNECTIONS": "0"}, f"{W}HTTP_MAX_CONNECTIONS must be"),
    (
        "recv-window-zero",
        {f"{W}RECV_WINDOW_MS": "0"},
        f"{W}RECV_WINDOW_MS must be positive: got 0 (allowed: 1..60000)",
    ),
    (
        "recv-window-above-exchange",
        {f"{W}RECV_WINDOW_MS": "70000"},
        f"{W}RECV_WINDOW_MS must be at most 60000: got 70000 (allowed: 1..60000)",
    ),
    ("attempts-zero", {f"{W}MAX_ATTEMPTS": "0"}, f"{W}MAX_ATTEMPTS must be positive"),
    ("backoff-initial-zero", {f"{W}BACKOFF_INITIAL_S": "0"}, f"{W}BACKOFF_INITIAL_S must be"),
    ("backoff-max-negative", {f"{W}BACKOFF_MAX_S": "-1"}, f"{W}BACKOFF_MAX_S must be positive"),
    ("deadline-zero", {f"{W}DEFAULT_DEADLINE_MS": "0"}, f"{W}DEFAULT_DEADLINE_MS must be"),
    ("reconcile-negative", {f"{W}RECONCILE_BUDGET_MS": "-1"}, f"{W}RECONCILE_BUDGET_MS must not"),
    ("weight-limit-zero", {f"{W}RATE_WEIGHT_LIMIT": "0"}, f"{W}RATE_WEIGHT_LIMIT must be"),
    ("weight-window-zero", {f"{W}RATE_WEIGHT_WINDOW_MS": "0"}, f"{W}RATE_WEIGHT_WINDOW_MS must"),
    ("order-limit-zero", {f"{W}RATE_ORDER_LIMIT": "0"}, f"{W}RATE_ORDER_LIMIT must be"),
    ("order-window-zero", {f"{W}RATE_ORDER_WINDOW_MS": "0"}, f"{W}RATE_ORDER_WINDOW_MS must"),
    ("guard-negative", {f"{W}RATE_GUARD_MS": "-1"}, f"{W}RATE_GUARD_MS must not be negative"),
    ("metrics-port-negative", {f"{W}METRICS_PORT": "-1"}, f"{W}METRICS_PORT must not be negative"),
    (
        "metrics-port-too-big",
        {f"{W}METRICS_PORT": "70000"},
        f"{W}METRICS_PORT must be at most 65535: got 70000 (allowed: 0..65535)",
    ),
    ("txn-timeout-zero", {f"{W}TRANSACTION_TIMEOUT_MS": "0"}, f"{W}TRANSACTION_TIMEOUT_MS must"),
    (
        "txn-timeout-above-broker",
        {f"{W}TRANSACTION_TIMEOUT_MS": "900001"},
        f"{W}TRANSACTION_TIMEOUT_MS must be at most 900000: got 900001",
    ),
    ("kafka-request-zero", {f"{W}KAFKA_REQUEST_TIMEOUT_MS": "0"}, "KAFKA_REQUEST_TIMEOUT_MS must"),
    # values of the wrong kind
    ("int-not-a-number", {f"{W}MAX_IN_FLIGHT": "many"}, f"{W}MAX_IN_FLIGHT: cannot read 'many'"),
    ("int-with-fraction", {f"{W}MAX_IN_FLIGHT": "1.5"}, "as a whole number"),
    ("float-nan", {f"{W}SHUTDOWN_GRACE_S": "nan"}, f"{W}SHUTDOWN_GRACE_S: cannot read 'nan'"),
    ("float-inf", {f"{W}HTTP_TIMEOUT_S": "inf"}, "as a finite number"),
    ("float-empty", {f"{W}HTTP_TIMEOUT_S": ""}, f"{W}HTTP_TIMEOUT_S: cannot read ''"),
    # text
    ("delivery", {f"{W}DELIVERY": "maybe_once"}, f"{W}DELIVERY must be one of exactly_once"),
    ("log-format", {f"{W}LOG_FORMAT": "xml"}, f"{W}LOG_FORMAT must be one of text, json: got"),
    ("bootstrap-empty", {f"{W}BOOTSTRAP_SERVERS": " "}, f"{W}BOOTSTRAP_SERVERS must not be empty"),
    ("bootstrap-bad-port", {f"{W}BOOTSTRAP_SERVERS": "k:x"}, "list of host:port: got 'k:x'"),
    ("bootstrap-empty-item", {f"{W}BOOTSTRAP_SERVERS": "a:1,,b:2"}, "list of host:port"),
    ("bootstrap-no-host", {f"{W}BOOTSTRAP_SERVERS": ":9092"}, "list of host:port"),
    ("bootstrap-port-range", {f"{W}BOOTSTRAP_SERVERS": "k:70000"}, "between 1 and 65535"),
    ("group-empty", {f"{W}GROUP_ID": ""}, f"{W}GROUP_ID must not be empty"),
    ("client-id-empty", {f"{W}CLIENT_ID": ""}, f"{W}CLIENT_ID must not be empty"),
    ("metrics-host-empty", {f"{W}METRICS_HOST": ""}, f"{W}METRICS_HOST must not be empty"),
    ("topic-illegal", {f"{W}COMMANDS_TOPIC": "a topic"}, f"{W}COMMANDS_TOPIC must be a Kafka"),
    ("topic-dot", {f"{W}RESULTS_TOPIC": ".."}, f"{W}RESULTS_TOPIC must be a Kafka topic name"),
    ("topic-long", {f"{W}DEADLETTER_TOPIC": "t" * 250}, f"{W}DEADLETTER_TOPIC must be a Kafka"),
    (
        "topics-same",
        {f"{W}DEADLETTER_TOPIC": "papi.cancel.commands"},
        f"{W}COMMANDS_TOPIC and {W}DEADLETTER_TOPIC must be different topics",
    ),
    ("papi-url-scheme", {f"{W}PAPI_URL": "ftp://x"}, f"{W}PAPI_URL must be an http(s) URL"),
    ("time-url-no-host", {f"{W}TIME_URL": "https://"}, f"{W}TIME_URL must be an http(s) URL"),
    # Kafka TLS and SASL
    (
        "kafka-protocol-unknown",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "TLS"},
        f"{W}KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL: "
        "got 'TLS'",
    ),
    (
        "kafka-protocol-lower-case",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "ssl"},
        f"{W}KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL,",
    ),
    (
        "kafka-sasl-mechanism-unknown",
        {f"{W}KAFKA_SASL_MECHANISM": "GSSAPI"},
        f"{W}KAFKA_SASL_MECHANISM must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512: got 'GSSAPI'",
    ),
    (
        "kafka-sasl-without-username",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", f"{W}KAFKA_SASL_PASSWORD": "p"},
        f"{W}KAFKA_SECURITY_PROTOCOL SASL_PLAINTEXT needs {W}KAFKA_SASL_USERNAME and "
        f"{W}KAFKA_SASL_PASSWORD: {W}KAFKA_SASL_USERNAME is not set",
    ),
    (
        "kafka-sasl-without-password",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_SSL", f"{W}KAFKA_SASL_USERNAME": "u"},
        f"{W}KAFKA_SASL_PASSWORD is not set",
    ),
    (
        "kafka-sasl-credentials-without-sasl",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SASL_USERNAME": "u"},
        f"{W}KAFKA_SASL_USERNAME is set, but {W}KAFKA_SECURITY_PROTOCOL is SSL: "
        "SASL settings need SASL_PLAINTEXT or SASL_SSL",
    ),
    (
        "kafka-tls-file-without-tls",
        {f"{W}KAFKA_SSL_CAFILE": str(ROOT / "pyproject.toml")},
        f"{W}KAFKA_SSL_CAFILE is set, but {W}KAFKA_SECURITY_PROTOCOL is PLAINTEXT: "
        "TLS settings need SSL or SASL_SSL",
    ),
    (
        "kafka-key-password-without-tls",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", f"{W}KAFKA_SSL_KEY_PASSWORD": "x"},
        f"{W}KAFKA_SSL_KEY_PASSWORD is set, but {W}KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT",
    ),
    (
        "kafka-keyfile-without-certfile",
        {
            f"{W}KAFKA_SECURITY_PROTOCOL": "SSL",
            f"{W}KAFKA_SSL_KEYFILE": str(ROOT / "pyproject.toml"),
        },
        f"{W}KAFKA_SSL_KEYFILE needs {W}KAFKA_SSL_CERTFILE: the key belongs to a client "
        "certificate",
    ),
    (
        "kafka-key-password-without-certfile",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SSL_KEY_PASSWORD": "x"},
        f"{W}KAFKA_SSL_KEY_PASSWORD needs {W}KAFKA_SSL_CERTFILE",
    ),
    (
        "kafka-cafile-missing",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
        f"{W}KAFKA_SSL_CAFILE: cannot read /nonexistent/ca.pem: No such file or directory",
    ),
    (
        "kafka-certfile-a-directory",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SSL_CERTFILE": str(ROOT)},
        f"{W}KAFKA_SSL_CERTFILE: cannot read {ROOT}: Is a directory",
    ),
    # relations
    (
        "revoke-in-session",
        {f"{W}SESSION_TIMEOUT_MS": "6000"},
        f"{W}REVOKE_GRACE_S + {W}COMMIT_TIMEOUT_S (4s) must be at most half of",
    ),
    (
        "request-timeout-below-session",
        {f"{W}SESSION_TIMEOUT_MS": "60000", f"{W}KAFKA_REQUEST_TIMEOUT_MS": "30000"},
        f"{W}KAFKA_REQUEST_TIMEOUT_MS must be more than {W}SESSION_TIMEOUT_MS: got 30000",
    ),
    (
        "health-stall-within-a-request",
        {f"{W}HEALTH_STALL_S": "30"},
        f"{W}HEALTH_STALL_S must be more than {W}KAFKA_REQUEST_TIMEOUT_MS (30000 ms): got 30",
    ),
    (
        "buffered-below-poll",
        {f"{W}MAX_BUFFERED_PER_PARTITION": "10"},
        f"{W}MAX_BUFFERED_PER_PARTITION must be at least {W}MAX_POLL_RECORDS (500): got 10",
    ),
    (
        "backoff-initial-above-max",
        {f"{W}BACKOFF_INITIAL_S": "3"},
        f"{W}BACKOFF_INITIAL_S must be at most {W}BACKOFF_MAX_S (2): got 3",
    ),
    (
        "guard-wider-than-half-weight-window",
        {f"{W}RATE_GUARD_MS": "30001"},
        f"{W}RATE_GUARD_MS must be at most half of {W}RATE_WEIGHT_WINDOW_MS (60000): got 30001",
    ),
    (
        "guard-wider-than-half-order-window",
        {f"{W}RATE_ORDER_WINDOW_MS": "400"},
        f"{W}RATE_GUARD_MS must be at most half of {W}RATE_ORDER_WINDOW_MS (400): got 250",
    ),
]


@pytest.mark.parametrize(("env", "fragment"), [r[1:] for r in BAD_ENV], ids=[r[0] for r in BAD_ENV])
def test_bad_settings_are_refused_with_name_value_and_range(
    env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def _below(bound: Any) -> float:
    return bound.low if bound.open_low else bound.low - 1


@pytest.mark.parametrize("name", sorted(RANGES))
def test_every_range_names_the_variable_the_value_and_what_is_allowed(name: str) -> None:
    bound = RANGES[name]
    kind = next(f.type for f in dataclasses.fields(Settings) if f.name == name)
    bad = [_below(bound)] + ([bound.high + 1] if bound.high is not None else [])
    for value in bad:
        typed = int(value) if kind == "int" else float(value)
        with pytest.raises(SettingsError) as info:
            dataclasses.replace(Settings(), **{name: typed}).check()
        message = str(info.value)
        assert message.startswith(f"{env_name(name)} must ")
        shown = str(int(typed)) if float(typed).is_integer() else f"{typed:g}"
        assert f"got {shown} " in message
        assert f"(allowed: {bound.allowed()})" in message


def test_every_numeric_setting_has_a_range() -> None:
    numeric = {f.name for f in dataclasses.fields(Settings) if f.type in ("int", "float")}
    assert numeric == set(RANGES)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"max_in_flight": "5"}, f"{W}MAX_IN_FLIGHT must be a whole number: got '5'"),
        ({"max_in_flight": True}, f"{W}MAX_IN_FLIGHT must be a whole number: got True"),
        ({"http_timeout_s": "5"}, f"{W}HTTP_TIMEOUT_S must be a number: got '5'"),
        ({"shutdown_grace_s": float("nan")}, f"{W}SHUTDOWN_GRACE_S must be a finite number"),
        ({"http_timeout_s": float("inf")}, f"{W}HTTP_TIMEOUT_S must be a finite number: got inf"),
        ({"group_id": 7}, f"{W}GROUP_ID must be text: got 7"),
    ],
)
def test_settings_built_in_code_are_checked_too(values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        dataclasses.replace(Settings(), **values).check()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {f"{W}LOG_LEVEL": "debug"},
        {f"{W}LOG_LEVEL": "Warning"},
        {f"{W}LOG_FORMAT": "json"},
        {f"{W}DELIVERY": "at_least_once"},
        {f"{W}SHUTDOWN_GRACE_S": "0", f"{W}DEDUP_WINDOW_MS": "0", f"{W}RECONCILE_BUDGET_MS": "0"},
        {f"{W}REVOKE_GRACE_S": "0", f"{W}RATE_GUARD_MS": "0", f"{W}METRICS_PORT": "0"},
        {f"{W}RECV_WINDOW_MS": "60000", f"{W}METRICS_PORT": "65535"},
        {
            f"{W}SESSION_TIMEOUT_MS": "6000",
            f"{W}HEARTBEAT_INTERVAL_MS": "2000",
            f"{W}REVOKE_GRACE_S": "1",
            f"{W}COMMIT_TIMEOUT_S": "2",
        },
        {
            f"{W}SESSION_TIMEOUT_MS": "1800000",
            f"{W}KAFKA_REQUEST_TIMEOUT_MS": "1800001",
            f"{W}HEALTH_STALL_S": "1801",
        },
        {f"{W}TRANSACTION_TIMEOUT_MS": "900000", f"{W}BACKOFF_INITIAL_S": "2"},
        {f"{W}DEADLETTER_MAX_BYTES": "8192", f"{W}MAX_COMMAND_BYTES": str(MAX_KAFKA_RECORD_BYTES)},
        {f"{W}BOOTSTRAP_SERVERS": "kafka-0:9092, kafka-1:9092,[::1]:9093,kafka-2"},
        {f"{W}PAPI_URL": "http://127.0.0.1:8765", f"{W}TRANSACTIONAL_ID_PREFIX": ""},
        {f"{W}ACCOUNTS_FILE": "", "UNRELATED": "x", "cancel_worker_lower_case": "x"},
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL"},  # the system's CAs, no client certificate
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SSL_CAFILE": str(ROOT / "README.md")},
        {
            f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            f"{W}KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            f"{W}KAFKA_SASL_USERNAME": "u",
            f"{W}KAFKA_SASL_PASSWORD": "p",
        },
        # empty means unset: no TLS file, no SASL user with PLAINTEXT
        {f"{W}KAFKA_SSL_CAFILE": "", f"{W}KAFKA_SASL_USERNAME": "", f"{W}KAFKA_SASL_PASSWORD": ""},
    ],
)
def test_edge_values_that_work_are_accepted(env: dict[str, str]) -> None:
    load_settings(env)


def test_the_bound_constants_are_the_clients_own() -> None:
    from worker.kafka.io import MAX_RECORD_BYTES  # noqa: PLC0415

    assert MAX_KAFKA_RECORD_BYTES == MAX_RECORD_BYTES
    assert POSITIVE.allowed() == "more than 0" and NON_NEGATIVE.allowed() == "0 or more"


# -- the project's own configurations -------------------------------------------------------

TEST_SUITE_OVERRIDES: list[dict[str, Any]] = [
    {},
    {"max_in_flight": 4, "rate_order_limit": 1_000_000, "rate_weight_limit": 1_000_000},
    {"delivery": "at_least_once"},
    {"http_timeout_s": 60.0, "shutdown_grace_s": 1.0},
    {"recv_window_ms": 1_000},
    {
        "rate_order_limit": 60,
        "rate_order_window_ms": 10_000,
        "rate_weight_limit": 400,
        "rate_weight_window_ms": 10_000,
        "default_deadline_ms": 120_000,
    },
    {
        "http_timeout_s": 1.0,
        "max_attempts": 10,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 0.5,
        "default_deadline_ms": 60_000,
        "reconcile_budget_ms": 20_000,
        "rate_guard_ms": 50,
    },
]


@pytest.mark.parametrize("overrides", TEST_SUITE_OVERRIDES)
def test_the_test_suites_settings_pass_and_survive_the_environment(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    topics = Topics("cmd-x", "res-x", "dlq-x")
    settings = worker_settings(
        "127.0.0.1:9092", topics, "http://127.0.0.1:1", tmp_path / "a.toml", **overrides
    )
    assert load_settings(worker_env(settings)) == dataclasses.replace(settings, log_level="INFO")


def test_the_demos_settings_pass(tmp_path: Path) -> None:
    from worker.tools.demo import demo_env  # noqa: PLC0415

    broker = cast(Any, types.SimpleNamespace(bootstrap="127.0.0.1:9092"))
    load_settings(demo_env(broker, "http://127.0.0.1:8765", tmp_path / "a.toml"))


def _deploy_env() -> Iterator[tuple[str, str, str]]:
    """(file, name, value) of every CANCEL_WORKER_* variable the deploy/ manifests set."""
    configmap = (ROOT / "deploy/k8s/base/configmap.yaml").read_text()
    for name, value in re.findall(rf'^\s+({W}\w+):\s*"([^"]*)"', configmap, re.M):
        yield "configmap.yaml", name, value
    deployment = (ROOT / "deploy/k8s/base/deployment.yaml").read_text()
    pattern = rf'- name: ({W}\w+)\s+value:\s*"([^"]*)"'
    for name, value in re.findall(pattern, deployment):
        yield "deployment.yaml", name, value
    containerfile = (ROOT / "deploy/container/Containerfile").read_text()
    for name, value in re.findall(rf"({W}\w+)=(\S+)", containerfile):
        yield "Containerfile", name, value


def test_the_deploy_manifests_settings_pass() -> None:
    found = list(_deploy_env())
    assert len(found) >= 10  # the parser still finds them
    env: dict[str, str] = {}
    for _, name, value in found:
        env[name] = value
        if not name.startswith(f"{W}KAFKA_"):  # Kafka's TLS and SASL settings go together
            load_settings({name: value})  # each alone names its own problem
    if env.get(f"{W}KAFKA_SECURITY_PROTOCOL", "PLAINTEXT") != "PLAINTEXT":
        # The password comes from a Secret and the CA is a mounted file: stand in for both.
        env[f"{W}KAFKA_SASL_PASSWORD"] = "from-a-secret"
        env[f"{W}KAFKA_SSL_CAFILE"] = str(ROOT / "README.md")
    load_settings(env)
    makefile = (ROOT / "Makefile").read_text()
    for name in re.findall(rf"{W}\w+", makefile):
        load_settings({name: str(getattr(Settings(), name[len(W) :].lower()))})


# -- (b) did you mean -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (f"{W}MAX_INFLIGHT", f"did you mean {W}MAX_IN_FLIGHT?"),
        (f"{W}SESION_TIMEOUT_MS", f"did you mean {W}SESSION_TIMEOUT_MS?"),
        (f"{W}LOGLEVEL", f"did you mean {W}LOG_LEVEL?"),
        (f"{W}ACCOUNT_FILE", f"did you mean {W}ACCOUNTS_FILE?"),
        (f"{W}HTTP_TIMEOUT", f"did you mean {W}HTTP_TIMEOUT_S?"),
    ],
)
def test_unknown_environment_names_are_refused_with_a_suggestion(name: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({name: "1"})
    assert str(info.value) == f"unknown environment variable {name}; {fragment}"


def test_an_unknown_name_without_a_near_one_gets_no_suggestion() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({f"{W}ZQXJ": "1"})
    assert str(info.value) == f"unknown environment variable {W}ZQXJ"


@pytest.mark.parametrize(
    "name",
    [
        f"{W}SERVICE_HOST",
        f"{W}SERVICE_PORT",
        f"{W}SERVICE_PORT_METRICS",
        f"{W}PORT",
        f"{W}PORT_9400_TCP",
        f"{W}PORT_9400_TCP_PROTO",
        f"{W}PORT_9400_TCP_PORT",
        f"{W}PORT_9400_TCP_ADDR",
    ],
)
def test_kubernetes_service_links_are_not_settings_and_are_accepted(name: str) -> None:
    assert load_settings({name: "10.0.0.1"}) == Settings()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_inflight = 7\n", "unknown setting 'max_inflight'; did you mean max_in_flight?"),
        ("http_timout_s = 1\n", "unknown setting 'http_timout_s'; did you mean http_timeout_s?"),
        ("CANCEL_WORKER_GROUP_ID = 'g'\n", "did you mean group_id? (keys have no prefix here)"),
        ("[kafka]\nbootstrap_servers = 'k:9092'\n", "unknown setting 'kafka'"),
        ("max_in_flight = true\n", f"{W}MAX_IN_FLIGHT: expected a single value, got a bool"),
        ("max_in_flight = 0\n", f"{W}MAX_IN_FLIGHT must be positive: got 0"),
        ("session_timeout_ms = 5999\n", f"{W}SESSION_TIMEOUT_MS must be at least 6000"),
        ("max_in_flight = [\n", "cannot read config file"),
    ],
)
def test_toml_keys_and_values_are_checked_like_the_environment(
    tmp_path: Path, text: str, fragment: str
) -> None:
    config = tmp_path / "w.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings({}, config)
    assert fragment in str(info.value)


def test_toml_keys_in_upper_case_still_work(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("MAX_IN_FLIGHT = 7\nlog_level = 'debug'\n")
    assert load_settings({}, config).max_in_flight == 7


SECRET = "s3cr3t-value-never-shown"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            f'[accounts.x]\napi_key = "k"\nsecret_flie = "{SECRET}"\n',
            "account 'x': unknown field 'secret_flie'; did you mean 'secret_file'?",
        ),
        (
            f'[accounts.x]\napi_kye = "{SECRET}"\nsecret = "{SECRET}"\n',
            "account 'x': unknown field 'api_kye'; did you mean 'api_key'?",
        ),
        (
            f'[accounts.x]\napi_key = "k"\nprivate_key_file = "p.pem"\npassphrase = "{SECRET}"\n',
            "unknown field 'passphrase'; did you mean 'private_key_passphrase'?",
        ),
        (
            f'[accounts.x]\napi_key = "k"\nsecret = "{SECRET}"\nzzz = 1\n',
            "unknown field 'zzz' (known: api_key, api_key_file, secret, secret_file,",
        ),
        (
            f'[acounts.x]\napi_key = "k"\nsecret = "{SECRET}"\n',
            "unknown top-level table or key 'acounts'; did you mean 'accounts'?",
        ),
        (
            f'secret = "{SECRET}"\n[accounts.x]\napi_key = "k"\nsecret = "{SECRET}"\n',
            "unknown top-level table or key 'secret' (known: accounts)",
        ),
    ],
)
def test_accounts_file_unknown_names_are_refused_without_values(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(AccountsError) as info:
        load_accounts(path)
    message = str(info.value)
    assert message.startswith(f"accounts file {path}: ")
    assert fragment in message
    assert SECRET not in message


def test_every_known_accounts_field_is_accepted(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415

    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"),
    )
    (tmp_path / "k.pem").write_bytes(pem)
    (tmp_path / "pass").write_text("pass\n")
    (tmp_path / "key").write_text("k2\n")
    (tmp_path / "secret").write_text("s\n")
    path = tmp_path / "a.toml"
    path.write_text(
        '[accounts.a]\napi_key = "k"\nsecret = "s"\n'
        '[accounts.b]\napi_key_file = "key"\nsecret_file = "secret"\n'
        '[accounts.c]\napi_key = "k"\nprivate_key_file = "k.pem"\n'
        'private_key_passphrase = "pass"\n'
        '[accounts.d]\napi_key = "k"\nprivate_key_file = "k.pem"\n'
        'private_key_passphrase_file = "pass"\n'
        "reserved_weight_share = 0.25\n"
    )
    loaded = load_accounts(path)
    assert sorted(loaded) == ["a", "b", "c", "d"]
    assert loaded["d"].reserved_weight_share == 0.25 and loaded["a"].reserved_weight_share is None
    assert len(FIELDS) == 8


@pytest.mark.parametrize(
    ("shares", "fragment"),
    [
        (["0"], "reserved_weight_share must be a number above 0 and below 1"),
        (["1"], "reserved_weight_share must be a number above 0 and below 1"),
        (["-0.1"], "reserved_weight_share must be a number above 0 and below 1"),
        (['"0.2"'], "reserved_weight_share must be a number above 0 and below 1"),
        (["true"], "reserved_weight_share must be a number above 0 and below 1"),
        (["nan"], "reserved_weight_share must be a number above 0 and below 1"),
        (["0.6", "0.5"], "reserved_weight_share values add up to 1.1"),
        (["0.5", "0.5", None], "less than 1 when some account has none"),
    ],
)
def test_reserved_weight_shares_are_checked(
    tmp_path: Path, shares: list[str | None], fragment: str
) -> None:
    text = ""
    for i, share in enumerate(shares):
        text += f'[accounts.a{i}]\napi_key = "k"\nsecret = "{SECRET}"\n'
        if share is not None:
            text += f"reserved_weight_share = {share}\n"
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(AccountsError) as info:
        load_accounts(path)
    assert fragment in str(info.value) and SECRET not in str(info.value)
    if len(shares) > 1:  # check names the whole file's problem too
        with pytest.raises(AccountsError, match="add up to"):
            load_each_account(path)


# -- (c) the real CLI -----------------------------------------------------------------------

GOOD_ACCOUNTS = '[accounts.x]\napi_key = "k"\nsecret = "s"\n'
GOOD_PRODUCERS = stanza("risk-1", Ed25519PrivateKey.generate(), ["x"])
BAD_ACCOUNTS = f'[accounts.x]\napi_key = "k"\nsecret_flie = "{SECRET}"\n'


@dataclass(frozen=True)
class Case:
    id: str
    env: dict[str, str]
    needle: str  # must be in the one line on stderr
    args: tuple[str, ...] = ("run",)
    config: str | None = None  # a TOML file given with --config
    accounts: str | None = None  # an accounts file, set as CANCEL_WORKER_ACCOUNTS_FILE
    metrics_port_in_use: bool = False
    producers: str | None = None  # a producers file, set as CANCEL_WORKER_PRODUCERS_FILE


CLI_CASES = [
    Case("http-timeout-zero", {f"{W}HTTP_TIMEOUT_S": "0"}, f"{W}HTTP_TIMEOUT_S must be positive"),
    Case("shutdown-grace", {f"{W}SHUTDOWN_GRACE_S": "-5"}, f"{W}SHUTDOWN_GRACE_S must not be"),
    Case("clock-refresh", {f"{W}CLOCK_REFRESH_S": "0"}, f"{W}CLOCK_REFRESH_S must be positive"),
    Case("heartbeat", {f"{W}HEARTBEAT_INTERVAL_MS": "10000"}, f"{W}HEARTBEAT_INTERVAL_MS must"),
    Case("misspelt", {f"{W}MAX_INFLIGHT": "8"}, f"did you mean {W}MAX_IN_FLIGHT?"),
    Case("log-level", {f"{W}LOG_LEVEL": "verbose"}, f"{W}LOG_LEVEL must be one of"),
    Case("session-timeout", {f"{W}SESSION_TIMEOUT_MS": "500"}, f"{W}SESSION_TIMEOUT_MS must be"),
    Case("recv-window", {f"{W}RECV_WINDOW_MS": "70000"}, f"{W}RECV_WINDOW_MS must be at most"),
    Case("metrics-port", {f"{W}METRICS_PORT": "70000"}, f"{W}METRICS_PORT must be at most 65535"),
    Case("backoff", {f"{W}BACKOFF_INITIAL_S": "5"}, f"{W}BACKOFF_INITIAL_S must be at most"),
    Case("delivery", {f"{W}DELIVERY": "twice"}, f"{W}DELIVERY must be one of"),
    Case("log-format", {f"{W}LOG_FORMAT": "xml"}, f"{W}LOG_FORMAT must be one of"),
    Case("not-a-number", {f"{W}MAX_IN_FLIGHT": "many"}, f"{W}MAX_IN_FLIGHT: cannot read"),
    Case("papi-http", {f"{W}PAPI_URL": "http://papi.example"}, f"{W}PAPI_URL must be https"),
    Case("toml-unknown", {}, "did you mean max_in_flight?", config="max_inflight = 7\n"),
    Case("toml-range", {}, f"{W}MAX_ATTEMPTS must be positive", config="max_attempts = 0\n"),
    Case("toml-broken", {}, "cannot read config file", config="max_attempts = \n"),
    Case("accounts-unset", {}, f"{W}ACCOUNTS_FILE is not set"),
    Case("accounts-typo", {}, "unknown field 'secret_flie'", accounts=BAD_ACCOUNTS),
    Case("accounts-missing", {f"{W}ACCOUNTS_FILE": "/nonexistent/a.toml"}, "cannot read"),
    Case(
        "metrics-busy",
        {},
        f"{W}METRICS_PORT",
        accounts=GOOD_ACCOUNTS,
        metrics_port_in_use=True,
        producers=GOOD_PRODUCERS,
    ),
    Case("producers-unset", {}, f"{W}PRODUCERS_FILE is not set", accounts=GOOD_ACCOUNTS),
    Case(
        "producers-typo",
        {},
        "unknown field 'kill_swich'; did you mean 'kill_switch'?",
        accounts=GOOD_ACCOUNTS,
        producers=GOOD_PRODUCERS + "kill_swich = true\n",
    ),
    Case(
        "producers-not-a-key",
        {},
        "producer 'risk-1': public_key #1 is not a PEM public key",
        accounts=GOOD_ACCOUNTS,
        producers='[producers.risk-1]\npublic_key = "not a key"\naccounts = ["x"]\n',
    ),
    Case(
        "producers-no-accounts",
        {},
        "producer 'risk-1': accounts is empty",
        accounts=GOOD_ACCOUNTS,
        producers=GOOD_PRODUCERS.replace('accounts = ["x"]', "accounts = []"),
    ),
    Case(
        "require-signed",
        {f"{W}REQUIRE_SIGNED_COMMANDS": "maybe"},
        f"{W}REQUIRE_SIGNED_COMMANDS must be true or false",
    ),
    Case(
        "send-producer-key",
        {f"{W}PRODUCER_ID": "risk-1", f"{W}PRODUCER_KEY_FILE": "/nonexistent/risk-1.key"},
        "cannot read producer key /nonexistent/risk-1.key",
        args=("send", "--json", "{}"),
    ),
    Case("check-env", {f"{W}HTTP_TIMEOUT_S": "0"}, "HTTP_TIMEOUT_S", args=("check",)),
    Case(
        "kafka-sasl",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_SSL", f"{W}KAFKA_SASL_USERNAME": "u"},
        f"{W}KAFKA_SASL_PASSWORD is not set",
    ),
    Case(
        "kafka-sasl-secret",
        {f"{W}KAFKA_SASL_PASSWORD": SECRET},
        "SASL settings need SASL_PLAINTEXT or SASL_SSL",
        args=("send", "--json", "{}"),
    ),
    Case(
        "kafka-tls-file",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
        f"{W}KAFKA_SSL_CAFILE: cannot read /nonexistent/ca.pem",
        args=("replay", "--dry-run"),
    ),
    Case(
        "kafka-tls-not-pem",
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SSL_CAFILE": str(ROOT / "README.md")},
        f"{W}KAFKA_SSL_CAFILE: cannot load the CA from {ROOT / 'README.md'}: no PEM certificate",
    ),
    Case(
        "toml-kafka-protocol",
        {},
        f"{W}KAFKA_SECURITY_PROTOCOL must be one of",
        config="kafka_security_protocol = 'TLS'\n",
    ),
    Case("send", {f"{W}LOG_LEVEL": "loud"}, f"{W}LOG_LEVEL", args=("send", "--json", "{}")),
    Case("replay", {f"{W}GROUP_ID": ""}, f"{W}GROUP_ID", args=("replay", "--dry-run")),
    Case(
        "sim",
        {},
        "unknown field 'secret_flie'",
        args=("sim", "--port", "0", "--accounts"),
        accounts=BAD_ACCOUNTS,
    ),
]


@dataclass(frozen=True)
class Outcome:
    code: int | None
    stdout: str
    stderr: str


def _run_case(case: Case, work: Path) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith(W)}
    # Nothing listens there: a configuration that passed would wait for Kafka, not exit 2.
    env[f"{W}BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    env.update(case.env)
    args = list(case.args)
    where = work / case.id
    where.mkdir()
    if case.config is not None:
        (where / "w.toml").write_text(case.config)
        args += ["--config", str(where / "w.toml")]
    if case.accounts is not None:
        (where / "a.toml").write_text(case.accounts)
        if args[0] == "sim":
            args.append(str(where / "a.toml"))
        else:
            env[f"{W}ACCOUNTS_FILE"] = str(where / "a.toml")
    if case.producers is not None:
        (where / "p.toml").write_text(case.producers)
        env[f"{W}PRODUCERS_FILE"] = str(where / "p.toml")
    with socket.socket() as busy:
        if case.metrics_port_in_use:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            env[f"{W}METRICS_PORT"] = str(busy.getsockname()[1])
        try:
            done = subprocess.run(
                [sys.executable, "-m", "worker", *args],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return Outcome(None, str(exc.stdout), str(exc.stderr))
    return Outcome(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def cli_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case at once, in parallel: each is a fresh interpreter."""
    work = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        futures = {case.id: pool.submit(_run_case, case, work) for case in CLI_CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_the_cli_refuses_bad_configuration_in_one_line_with_exit_code_2(
    case: Case, cli_outcomes: dict[str, Outcome]
) -> None:
    outcome = cli_outcomes[case.id]
    output = outcome.stdout + outcome.stderr
    assert outcome.code is not None, f"still running after 60 s: {output[-2000:]}"
    assert "Traceback" not in output, output
    assert outcome.code == 2, output
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert case.needle in lines[0], lines[0]
    assert "configuration error: " in lines[0]
    assert outcome.stdout == ""
    assert SECRET not in output


# -- the docs' settings table --------------------------------------------------------------


def _docs_settings_table() -> list[str]:
    """The setting names in the first column of docs/settings.md's settings table (the table
    whose header is ``| name | default | meaning |``), in order; a row may name several
    (``A`` / ``B``)."""
    lines = (ROOT / "docs" / "settings.md").read_text().splitlines()
    start = lines.index("| name | default | meaning |")
    names: list[str] = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        first = line.split("|")[1]
        names += re.findall(r"`([A-Z0-9_]+)`", first)
    return names


def test_the_docs_settings_table_lists_exactly_the_settings() -> None:
    """Every setting of worker/settings.py has a row in docs/settings.md's table, once, and
    the table names nothing else."""
    names = _docs_settings_table()
    settings = [f.name.upper() for f in dataclasses.fields(Settings)]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    missing = sorted(set(settings) - set(names))
    unknown = sorted(set(names) - set(settings))
    assert (missing, unknown) == ([], [])


# -- TLS to the exchange --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8765",
        "http://127.9.9.9/papi",
        "http://localhost:8765",
        "http://LOCALHOST./x",
        "http://[::1]:8765",
        "http://[::ffff:127.0.0.1]:8765",
        "https://papi.binance.com",
        "https://10.0.0.7:8443",
    ],
)
def test_https_or_a_loopback_host_is_accepted_for_the_exchange(url: str) -> None:
    settings = load_settings({f"{W}PAPI_URL": url, f"{W}TIME_URL": f"{url}/fapi/v1/time"})
    assert settings.papi_url == url
    assert not settings.allow_insecure_exchange


@pytest.mark.parametrize("name", ["PAPI_URL", "TIME_URL"])
@pytest.mark.parametrize(
    "url",
    [
        "http://papi.binance.com",
        "http://sim:8765",
        "http://10.0.0.7:8765",
        "http://128.0.0.1",
        "http://[::2]:80",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
    ],
)
def test_plain_http_to_another_host_is_refused_unless_allowed(name: str, url: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({f"{W}{name}": url})
    message = str(info.value)
    assert message.startswith(f"{W}{name} must be https")
    assert f"{W}ALLOW_INSECURE_EXCHANGE=true" in message
    allowed = load_settings({f"{W}{name}": url, f"{W}ALLOW_INSECURE_EXCHANGE": "true"})
    assert getattr(allowed, name.lower()) == url
    assert allowed.allow_insecure_exchange is True


def test_check_warns_when_plain_http_to_the_exchange_is_allowed_and_used() -> None:
    assert exchange_tls_result(Settings()) is None  # https
    assert exchange_tls_result(Settings(papi_url="http://127.0.0.1:1")) is None  # loopback
    https_allowed = Settings(allow_insecure_exchange=True)
    assert exchange_tls_result(https_allowed) is None  # allowed, not used
    insecure = load_settings(
        {
            f"{W}PAPI_URL": "http://user:pw@sim:8765",
            f"{W}ALLOW_INSECURE_EXCHANGE": "true",
        }
    )
    result = exchange_tls_result(insecure)
    assert result is not None
    assert result.ok  # a warning, not a failure
    assert result.detail.startswith("WARNING: plain http to the exchange")
    assert f"{W}PAPI_URL=" in result.detail and f"{W}TIME_URL" not in result.detail
    assert "pw" not in result.detail
