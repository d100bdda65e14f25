"""``cancel-worker check`` as a child process against the session's real broker and PAPI
simulator: exit code 0 when every check passes (topics created by ``--create-topics``), 1
when one fails (a missing topic, no broker at the address — within the bound —, an accounts
file that cannot be loaded, an account whose key the exchange does not know with
``--ping``), and never a key, a secret or a signature in what it prints."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.support import (
    HMAC_ACCOUNTS,
    PRODUCERS_FILE_NAME,
    SimControl,
    fresh_topics,
    run_cli,
    write_producers,
)
from worker.kafka.io import ensure_topics
from worker.tools.devstack import Broker, free_port

pytestmark = pytest.mark.integration

W = "CANCEL_WORKER_"
STRANGER_KEY = "key-stranger-" + "x" * 40
STRANGER_SECRET = "secret-stranger-" + "y" * 40
WRONG_SECRET = "secret-wrong-" + "z" * 40


def _check(*args: str, env: Mapping[str, str], timeout_s: float = 90) -> tuple[int, list[str]]:
    done = run_cli("check", *args, env=env, timeout_s=timeout_s)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout.splitlines()


def _env(
    bootstrap: str, sim_url: str, accounts_file: Path, commands: str, results: str, dlq: str
) -> dict[str, str]:
    return {
        f"{W}BOOTSTRAP_SERVERS": bootstrap,
        f"{W}COMMANDS_TOPIC": commands,
        f"{W}RESULTS_TOPIC": results,
        f"{W}DEADLETTER_TOPIC": dlq,
        f"{W}ACCOUNTS_FILE": str(accounts_file),
        f"{W}PRODUCERS_FILE": str(accounts_file.parent / PRODUCERS_FILE_NAME),
        f"{W}PAPI_URL": sim_url,
        f"{W}TIME_URL": f"{sim_url}/fapi/v1/time",
    }


def _by_name(lines: list[str]) -> dict[str, tuple[str, str]]:
    """check name → (status, detail), from the report's lines (the summary apart)."""
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[:-1]:
        status, rest = line.split(None, 1)
        names = {"settings", "broker", "topics", "accounts", "producers", "exchange clock"}
        for name in sorted(names, key=len, reverse=True):
            if rest.startswith(name + " "):
                rows[name] = (status, rest[len(name) :].strip())
                break
        else:
            kind, alias, detail = rest.split(None, 2)
            rows[f"{kind} {alias}"] = (status, detail)
    return rows


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def test_everything_passes_with_the_topics_created_and_every_key_known(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    tag = _tag()
    env = _env(broker.bootstrap, sim.url, accounts_file, f"cmd-{tag}", f"res-{tag}", f"dlq-{tag}")
    code, lines = _check("--create-topics", "--partitions", "2", env=env)
    rows = _by_name(lines)
    assert code == 0, "\n".join(lines)
    assert lines[-1] == f"summary: all {len(lines) - 1} checks ok"
    assert rows["settings"] == ("ok", "loaded: 8 from the environment, the rest defaults")
    assert rows["producers"][0] == "ok" and rows["producers"][1].startswith("1 loaded from ")
    assert rows["producer tests"] == ("ok", "1 key; may name every account; kill switch allowed")
    assert rows["broker"][0] == "ok"
    assert rows["broker"][1].startswith(f"{broker.bootstrap} (PLAINTEXT) answered in ")
    assert "1 broker, cluster " in rows["broker"][1]
    assert rows["topics"] == (
        "ok",
        f"cmd-{tag} (2 partitions), res-{tag} (2 partitions), dlq-{tag} (1 partition)",
    )
    assert rows["account desk-0"] == ("ok", "HMAC secret loaded")
    assert rows["account desk-ed"] == ("ok", "Ed25519 private key loaded")
    assert rows["account desk-rsa"] == ("ok", "RSA private key loaded")
    assert rows["exchange clock"][0] == "ok"
    assert rows["exchange clock"][1].startswith("offset ")
    assert not any(name.startswith("ping") for name in rows)  # only when asked

    seq = sim.last_seq()
    code, lines = _check("--ping", env=env)  # the topics exist now
    rows = _by_name(lines)
    assert code == 0, "\n".join(lines)
    pings = {name: row for name, row in rows.items() if name.startswith("ping ")}
    assert set(pings) == {f"ping {a}" for a in [*HMAC_ACCOUNTS, "desk-ed", "desk-rsa"]}
    for status, detail in pings.values():
        assert status == "ok"
        assert detail.startswith("GET /papi/v1/um/algo/openAlgoOrders?symbol=BTCUSDT: HTTP 200 in ")
    requests = [r for r in sim.requests(seq) if r["path"] == "/papi/v1/um/algo/openAlgoOrders"]
    assert len(requests) == len(pings)
    assert {r["method"] for r in requests} == {"GET"}
    output = "\n".join(lines)
    for key, secret in HMAC_ACCOUNTS.values():
        assert key not in output
        assert secret not in output
    assert "signature" not in output


def test_a_missing_topic_fails_and_names_it(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    tag = _tag()
    commands, results, dlq = f"cmd-{tag}", f"res-{tag}", f"dlq-{tag}"
    asyncio.run(ensure_topics(broker.bootstrap, {commands: 3, dlq: 1}))
    code, lines = _check(env=_env(broker.bootstrap, sim.url, accounts_file, commands, results, dlq))
    rows = _by_name(lines)
    assert code == 1, "\n".join(lines)
    assert rows["broker"][0] == "ok"
    assert rows["topics"] == (
        "FAIL",
        f"missing on {broker.bootstrap}: {results}; present: {commands} (3 partitions), "
        f"{dlq} (1 partition) (cancel-worker check --create-topics makes them)",
    )
    assert lines[-1] == f"summary: 1 of {len(lines) - 1} checks failed: topics"


def test_no_broker_at_the_address_fails_within_the_bound(
    sim: SimControl, accounts_file: Path
) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    env = _env(bootstrap, sim.url, accounts_file, "cmd-x", "res-x", "dlq-x")
    started = time.monotonic()
    code, lines = _check("--timeout", "3", env=env, timeout_s=30)
    took = time.monotonic() - started
    rows = _by_name(lines)
    assert code == 1, "\n".join(lines)
    assert rows["broker"][0] == "FAIL"
    assert rows["broker"][1].startswith(f"cannot reach {bootstrap} (PLAINTEXT): ")
    assert rows["topics"] == ("FAIL", "not checked: the broker did not answer")
    assert rows["account desk-0"][0] == "ok"  # the other checks still ran
    assert rows["exchange clock"][0] == "ok"
    assert lines[-1] == f"summary: 2 of {len(lines) - 1} checks failed: broker, topics"
    assert took < 3 + 10  # the bound, plus starting an interpreter


def test_ping_names_the_account_the_exchange_refuses(
    broker: Broker, sim: SimControl, tmp_path: Path
) -> None:
    known_key, known_secret = HMAC_ACCOUNTS["desk-0"]
    other_key, _ = HMAC_ACCOUNTS["desk-1"]
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        f'[accounts.desk-0]\napi_key = "{known_key}"\nsecret = "{known_secret}"\n'
        f'[accounts.stranger]\napi_key = "{STRANGER_KEY}"\nsecret = "{STRANGER_SECRET}"\n'
        f'[accounts.wrong-secret]\napi_key = "{other_key}"\nsecret = "{WRONG_SECRET}"\n'
    )
    write_producers(tmp_path)
    topics = asyncio.run(fresh_topics(broker.bootstrap, partitions=1))
    env = _env(
        broker.bootstrap, sim.url, accounts, topics.commands, topics.results, topics.deadletter
    )
    code, lines = _check("--ping", env=env)
    rows = _by_name(lines)
    assert code == 1, "\n".join(lines)
    path = "GET /papi/v1/um/algo/openAlgoOrders?symbol=BTCUSDT"
    assert rows["ping desk-0"][0] == "ok"
    assert rows["ping stranger"] == (
        "FAIL",
        f"{path}: the exchange refused it "
        "(HTTP 401, code -2015: Invalid API-key, IP, or permissions for action.)",
    )
    assert rows["ping wrong-secret"] == (
        "FAIL",
        f"{path}: the exchange refused it "
        "(HTTP 400, code -1022: Signature for this request is not valid.)",
    )
    assert rows["account stranger"] == ("ok", "HMAC secret loaded")  # it loads; it is unknown
    assert lines[-1] == (
        f"summary: 2 of {len(lines) - 1} checks failed: ping stranger, ping wrong-secret"
    )
    output = "\n".join(lines)
    for secret in (known_key, known_secret, STRANGER_KEY, STRANGER_SECRET, other_key, WRONG_SECRET):
        assert secret not in output
    assert "signature=" not in output


def test_an_accounts_file_that_cannot_be_loaded_fails_the_check(
    broker: Broker, sim: SimControl, tmp_path: Path
) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(f'[accounts.x]\napi_key = "k"\nsecret_flie = "{STRANGER_SECRET}"\n')
    env = _env(broker.bootstrap, sim.url, accounts, "cmd-x", "res-x", "dlq-x")
    code, lines = _check(env=env)
    rows = _by_name(lines)
    assert code == 1, "\n".join(lines)
    assert rows["account x"] == (
        "FAIL",
        f"unknown field 'secret_flie'; did you mean 'secret_file'? (in {accounts})",
    )
    assert STRANGER_SECRET not in "\n".join(lines)
    del env[f"{W}ACCOUNTS_FILE"]
    code, lines = _check(env=env)
    assert code == 1
    assert _by_name(lines)["accounts"] == ("FAIL", f"{W}ACCOUNTS_FILE is not set")


def test_a_job_that_only_creates_topics_skips_the_exchange(broker: Broker, tmp_path: Path) -> None:
    """What a one-shot topic job runs: no accounts, no exchange clock to reach."""
    tag = _tag()
    env = {
        f"{W}BOOTSTRAP_SERVERS": broker.bootstrap,
        f"{W}COMMANDS_TOPIC": f"cmd-{tag}",
        f"{W}RESULTS_TOPIC": f"res-{tag}",
        f"{W}DEADLETTER_TOPIC": f"dlq-{tag}",
        f"{W}TIME_URL": f"http://127.0.0.1:{free_port()}/fapi/v1/time",  # nothing there
    }
    code, lines = _check(
        "--create-topics", "--partitions", "4", "--skip", "clock", "--skip", "accounts", env=env
    )
    assert code == 0, "\n".join(lines)
    assert [line.split()[1] for line in lines[:-1]] == ["settings", "broker", "topics"]
    code, lines = _check("--skip", "accounts", env=env)
    assert code == 1
    assert _by_name(lines)["exchange clock"][0] == "FAIL"


def test_a_configuration_error_is_still_exit_code_2(tmp_path: Path) -> None:
    done = run_cli("check", "--ping", env={f"{W}RECV_WINDOW_MS": "0"})
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"configuration error: {W}RECV_WINDOW_MS must be positive: got 0 (allowed: 1..60000); "
        "the exchange refuses a larger recvWindow"
    ]


def test_the_producers_check_says_whether_the_worker_would_start(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """No producers file: the worker would not start, and check fails. With the explicit
    opt-out check passes, saying that any writer of the topic can cancel any account."""
    tag = _tag()
    env = _env(broker.bootstrap, sim.url, accounts_file, f"cmd-{tag}", f"res-{tag}", f"dlq-{tag}")
    del env[f"{W}PRODUCERS_FILE"]
    code, lines = _check("--create-topics", "--skip", "clock", env=env)
    status, detail = _by_name(lines)["producers"]
    assert (code, status) == (1, "FAIL"), "\n".join(lines)
    assert detail.startswith(f"{W}PRODUCERS_FILE is not set: the worker will not start")
    code, lines = _check("--skip", "clock", env={**env, f"{W}REQUIRE_SIGNED_COMMANDS": "false"})
    status, detail = _by_name(lines)["producers"]
    assert (code, status) == (0, "ok"), "\n".join(lines)
    assert detail.startswith("WARNING: commands are not verified")
    assert "any writer of the commands topic can cancel any account" in detail
