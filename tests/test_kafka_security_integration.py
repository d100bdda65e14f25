"""The TLS/SASL options against a real broker that demands them: a SASL_SSL listener with
mutual TLS: the session broker's second listener (``tests/secure_broker.py``).

The worker itself (its group consumer, the transactional producers, the duplicate window's
reader, the start-up wait and topic check) and the client library's ``from_settings`` answer
a cancel end to end over it; ``cancel-worker check`` and ``replay`` work over it; and what
the broker refuses — a wrong SASL password, no client certificate, no TLS at all — is a
failed check, with no password in the output.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.secure_broker import KEY_PASSWORD, SecureBroker
from tests.support import SimControl, Topics, run_cli, running_worker, worker_settings
from worker.client import CancelClient, StrategyCanceled
from worker.kafka.io import ensure_topics, security_options
from worker.settings import ENV_PREFIX, Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
W = ENV_PREFIX


def _security(broker: SecureBroker, mechanism: str = "SCRAM-SHA-512") -> dict[str, object]:
    return {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_ssl_cafile": broker.tls.ca,
        "kafka_ssl_certfile": broker.tls.cert,
        "kafka_ssl_keyfile": broker.tls.key,
        "kafka_ssl_key_password": KEY_PASSWORD,
        "kafka_sasl_mechanism": mechanism,
        "kafka_sasl_username": broker.user,
        "kafka_sasl_password": broker.password,
    }


def _env(settings: Settings) -> dict[str, str]:
    names = [
        "bootstrap_servers",
        "commands_topic",
        "results_topic",
        "deadletter_topic",
        "accounts_file",
        "producers_file",
        "producer_id",
        "producer_key_file",
        "papi_url",
        "time_url",
        *(name for name in _security_names()),
    ]
    return {f"{W}{n.upper()}": str(getattr(settings, n)) for n in names}


def _security_names() -> list[str]:
    return [
        "kafka_security_protocol",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_ssl_key_password",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
    ]


def _cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout_s=120)


def _topics() -> Topics:
    tag = uuid.uuid4().hex[:10]
    return Topics(f"cmd-{tag}", f"res-{tag}", f"dlq-{tag}")


async def test_the_worker_and_the_client_answer_a_cancel_over_sasl_ssl(
    secured: SecureBroker, sim: SimControl, accounts_file: Path
) -> None:
    topics = _topics()
    settings = worker_settings(
        secured.bootstrap, topics, sim.url, accounts_file, **_security(secured)
    )
    await ensure_topics(
        secured.bootstrap,
        {topics.commands: 2, topics.results: 2, topics.deadletter: 1},
        **security_options(settings),
    )
    [order] = sim.seed([{"account": "desk-0", "kind": "algo", "symbol": "BTCUSDT"}])
    async with running_worker(settings), CancelClient.from_settings(settings) as client:
        result = await client.cancel(
            "desk-0", "UM", symbol="BTCUSDT", algo_id=order["algo_id"], timeout=60
        )
    assert isinstance(result, StrategyCanceled), result
    assert result.strategy.algo_id == order["algo_id"]
    assert sim.orders()[order["algo_id"]]["status"] == "CANCELED"

    # The same topics through the CLI: check, then a dry-run replay that reads the results.
    env = _env(settings)
    done = await asyncio.to_thread(_cli, "check", "--skip", "clock", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{secured.bootstrap} (SASL_SSL) answered in" in done.stdout
    done = await asyncio.to_thread(_cli, "replay", "--dry-run", "--skip-processed", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read 1, would publish 0, skipped as processed 1" in done.stdout
    for output in (done.stdout, done.stderr):
        assert KEY_PASSWORD not in output
        assert secured.password not in output


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_each_sasl_mechanism_gets_in(
    secured: SecureBroker, accounts_file: Path, mechanism: str
) -> None:
    topics = _topics()
    settings = worker_settings(
        secured.bootstrap,
        topics,
        "http://127.0.0.1:1",
        accounts_file,
        **_security(secured, mechanism),
    )
    done = _cli(
        "check", "--create-topics", "--partitions", "1", "--skip", "clock", env=_env(settings)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    topics" in done.stdout


NO_TLS = dict.fromkeys(_security_names()[1:], "") | {
    "kafka_security_protocol": "PLAINTEXT",
    "kafka_sasl_mechanism": "PLAIN",
}
HUNG_UP = "closed (the broker hung up: does CANCEL_WORKER_KAFKA_SECURITY_PROTOCOL match"


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        (
            {"kafka_sasl_password": "not-the-password"},
            "SaslAuthenticationFailed: Authentication failed",
        ),
        (
            {
                "kafka_security_protocol": "SSL",
                "kafka_sasl_username": "",
                "kafka_sasl_password": "",
            },
            "",  # the listener waits for a SASL handshake that never comes
        ),
        (
            {"kafka_ssl_certfile": None, "kafka_ssl_keyfile": None, "kafka_ssl_key_password": ""},
            HUNG_UP,
        ),
        ({"kafka_ssl_cafile": None}, "CERTIFICATE_VERIFY_FAILED"),  # the system's CAs
        (NO_TLS, HUNG_UP),
    ],
    ids=["wrong-password", "no-sasl", "no-client-certificate", "unknown-ca", "plaintext"],
)
def test_what_the_broker_refuses_fails_the_check(
    secured: SecureBroker, accounts_file: Path, change: dict[str, object], cause: str
) -> None:
    options = _security(secured) | change
    env = {
        f"{W}BOOTSTRAP_SERVERS": secured.bootstrap,
        f"{W}ACCOUNTS_FILE": str(accounts_file),
        **{f"{W}{k.upper()}": "" if v is None else str(v) for k, v in options.items()},
    }
    done = _cli("check", "--timeout", "5", "--skip", "clock", env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    assert done.stderr == ""
    broker_line = next(line for line in done.stdout.splitlines() if " broker " in line)
    assert broker_line.startswith("FAIL"), broker_line
    assert secured.bootstrap in broker_line
    assert cause in broker_line
    assert secured.password not in output
    assert KEY_PASSWORD not in output
