"""``cancel-worker config``: every setting, its value and its source, secrets redacted.

The real CLI runs as a child process with a TOML file and environment variables: a value
set in both comes from the environment, one only in the file from the file, the rest are
defaults; the two passwords and any user information in a URL never appear, in the table or
in ``--json``; a bad setting is the usual one-line configuration error with exit code 2.
The sources come from ``worker.settings.resolve_settings``, the function ``load_settings``
itself uses.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest

from tests.support import run_cli
from tests.tls_material import write_tls_material
from worker.cli.config_report import (
    REDACTED,
    config_entries,
    redact_url_credentials,
    render_text,
    shown_value,
)
from worker.settings import (
    ENV_PREFIX,
    SECRETS,
    Settings,
    SettingsError,
    load_settings,
    resolve_settings,
)

ROOT = Path(__file__).resolve().parents[1]
W = ENV_PREFIX
SASL_PASSWORD = "sasl-pw-never-shown"
KEY_PASSWORD = "key-pw-never-shown"
URL_PASSWORD = "url-pw-never-shown"
URL_TOKEN = "url-token-never-shown"
NEVER_SHOWN = (SASL_PASSWORD, KEY_PASSWORD, URL_PASSWORD, URL_TOKEN)


def _cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


# -- sources -----------------------------------------------------------------------------------


def test_sources_follow_the_precedence_of_load_settings(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("max_in_flight = 7\ngroup_id = 'from-file'\n")
    env = {f"{W}GROUP_ID": "from-env", f"{W}LOG_LEVEL": "debug"}
    settings, sources = resolve_settings(env, config, max_attempts=9)
    assert settings == load_settings(env, config, max_attempts=9)
    assert (settings.max_in_flight, sources["max_in_flight"]) == (7, "file")
    assert (settings.group_id, sources["group_id"]) == ("from-env", "env")
    assert (settings.log_level, sources["log_level"]) == ("debug", "env")
    assert (settings.max_attempts, sources["max_attempts"]) == (9, "override")
    assert sources["bootstrap_servers"] == "default"
    assert set(sources) == {f.name for f in dataclasses.fields(Settings)}


def test_resolve_settings_refuses_what_load_settings_refuses() -> None:
    with pytest.raises(SettingsError, match="did you mean"):
        resolve_settings({f"{W}MAX_INFLIGHT": "1"})


# -- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://papi.binance.com", "https://papi.binance.com"),
        (
            f"https://alice:{URL_PASSWORD}@papi.example.com/x",
            f"https://{REDACTED}@papi.example.com/x",
        ),
        (f"http://{URL_TOKEN}@127.0.0.1:8765", f"http://{REDACTED}@127.0.0.1:8765"),
        (f"https://u:p@ss{URL_PASSWORD}@h/p?q=a@b", f"https://{REDACTED}@h/p?q=a@b"),
        ("https://host/path?mail=a@b.example", "https://host/path?mail=a@b.example"),
        ("kafka-0:9092,kafka-1:9092", "kafka-0:9092,kafka-1:9092"),
        ("desk@example.com", "desk@example.com"),
    ],
)
def test_user_information_in_urls_is_redacted(text: str, shown: str) -> None:
    assert redact_url_credentials(text) == shown


def test_every_secret_is_redacted_and_an_empty_one_shows_as_unset() -> None:
    assert {"kafka_ssl_key_password", "kafka_sasl_password"} == SECRETS
    for name in SECRETS:
        assert shown_value(name, "x") == (REDACTED, True)
        assert shown_value(name, "") == ("", False)
    assert shown_value("max_in_flight", 5) == (5, False)
    assert shown_value("accounts_file", None) == (None, False)
    assert shown_value("accounts_file", Path("/a.toml")) == ("/a.toml", False)


def test_the_table_names_every_setting_once() -> None:
    settings, sources = resolve_settings({})
    entries = config_entries(settings, sources)
    text = render_text(entries, None)
    lines = text.splitlines()
    assert lines[0].startswith("# no config file")
    assert len(lines) == 1 + len(dataclasses.fields(Settings))
    assert [line.split()[0] for line in lines[1:]] == [e.env for e in entries]


# -- the real CLI ------------------------------------------------------------------------------


@pytest.fixture
def secret_setup(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A TOML file and environment that set secrets both ways, and overlap on one key."""
    tls = write_tls_material(tmp_path / "tls", password=KEY_PASSWORD)
    config = tmp_path / "w.toml"
    config.write_text(
        "max_in_flight = 32\n"
        "group_id = 'group-from-file'\n"
        "kafka_security_protocol = 'SASL_SSL'\n"
        f"kafka_ssl_cafile = '{tls.ca}'\n"
        f"kafka_ssl_certfile = '{tls.cert}'\n"
        f"kafka_ssl_keyfile = '{tls.key}'\n"
        f"kafka_ssl_key_password = '{KEY_PASSWORD}'\n"
        f"time_url = 'https://{URL_TOKEN}@fapi.example.com/fapi/v1/time'\n"
    )
    env = {
        f"{W}GROUP_ID": "group-from-env",
        f"{W}KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        f"{W}KAFKA_SASL_USERNAME": "cancel-worker",
        f"{W}KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        f"{W}PAPI_URL": f"https://alice:{URL_PASSWORD}@papi.example.com",
    }
    return config, env


def _table(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines()[1:]:
        name, *value, source = line.split()
        rows[name] = (" ".join(value), source)
    return rows


def test_config_prints_values_and_sources_with_secrets_redacted(
    secret_setup: tuple[Path, dict[str, str]],
) -> None:
    config, env = secret_setup
    done = _cli("config", "--config", str(config), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    for secret in NEVER_SHOWN:
        assert secret not in done.stdout
    assert done.stdout.splitlines()[0].startswith(f"# config file {config};")
    rows = _table(done.stdout)
    assert len(rows) == len(dataclasses.fields(Settings))
    assert rows[f"{W}GROUP_ID"] == ("group-from-env", "env")  # in both: the environment wins
    assert rows[f"{W}MAX_IN_FLIGHT"] == ("32", "file")
    assert rows[f"{W}KAFKA_SECURITY_PROTOCOL"] == ("SASL_SSL", "file")
    assert rows[f"{W}KAFKA_SASL_MECHANISM"] == ("SCRAM-SHA-256", "env")
    assert rows[f"{W}KAFKA_SASL_USERNAME"] == ("cancel-worker", "env")
    assert rows[f"{W}KAFKA_SASL_PASSWORD"] == (REDACTED, "env")
    assert rows[f"{W}KAFKA_SSL_KEY_PASSWORD"] == (REDACTED, "file")
    assert rows[f"{W}PAPI_URL"] == (f"https://{REDACTED}@papi.example.com", "env")
    assert rows[f"{W}TIME_URL"] == (f"https://{REDACTED}@fapi.example.com/fapi/v1/time", "file")
    assert rows[f"{W}BOOTSTRAP_SERVERS"] == ("127.0.0.1:9092", "default")
    assert rows[f"{W}ACCOUNTS_FILE"] == ("(not set)", "default")
    assert rows[f"{W}SHUTDOWN_GRACE_S"] == ("10.0", "default")


def test_config_json_is_machine_readable(secret_setup: tuple[Path, dict[str, str]]) -> None:
    config, env = secret_setup
    done = _cli("config", "--json", "--config", str(config), env=env)
    assert done.returncode == 0, done.stderr
    for secret in NEVER_SHOWN:
        assert secret not in done.stdout
    document = orjson.loads(done.stdout)
    assert document["config_file"] == str(config)
    settings = document["settings"]
    assert set(settings) == {f.name for f in dataclasses.fields(Settings)}
    assert settings["max_in_flight"] == {
        "value": 32,
        "source": "file",
        "env": f"{W}MAX_IN_FLIGHT",
        "redacted": False,
    }
    assert settings["group_id"]["value"] == "group-from-env"
    assert settings["group_id"]["source"] == "env"
    assert settings["kafka_sasl_password"] == {
        "value": REDACTED,
        "source": "env",
        "env": f"{W}KAFKA_SASL_PASSWORD",
        "redacted": True,
    }
    assert settings["kafka_ssl_key_password"]["redacted"] is True
    assert settings["papi_url"]["value"] == f"https://{REDACTED}@papi.example.com"
    assert settings["papi_url"]["redacted"] is True
    assert settings["accounts_file"] == {
        "value": None,
        "source": "default",
        "env": f"{W}ACCOUNTS_FILE",
        "redacted": False,
    }
    assert settings["http_timeout_s"]["value"] == 5.0


def test_config_without_a_file_or_variables_shows_the_defaults() -> None:
    done = _cli("config", "--json", env={})
    assert done.returncode == 0, done.stderr
    document = orjson.loads(done.stdout)
    assert document["config_file"] is None
    assert {s["source"] for s in document["settings"].values()} == {"default"}
    assert document["settings"]["kafka_sasl_password"]["value"] == ""


@pytest.mark.parametrize(
    ("env", "config_text", "needle"),
    [
        ({f"{W}MAX_INFLIGHT": "8"}, None, f"did you mean {W}MAX_IN_FLIGHT?"),
        ({}, "max_in_flight = 0\n", f"{W}MAX_IN_FLIGHT must be positive"),
        (
            {f"{W}KAFKA_SASL_PASSWORD": SASL_PASSWORD},
            None,
            "SASL settings need SASL_PLAINTEXT or SASL_SSL",
        ),
    ],
    ids=["unknown-variable", "toml-range", "secret-in-a-bad-setting"],
)
def test_config_refuses_bad_settings_in_one_line_with_exit_code_2(
    tmp_path: Path, env: dict[str, str], config_text: str | None, needle: str
) -> None:
    args = ["config"]
    if config_text is not None:
        (tmp_path / "w.toml").write_text(config_text)
        args += ["--config", str(tmp_path / "w.toml")]
    for extra in ([], ["--json"]):
        done = _cli(*args, *extra, env=env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("configuration error: ")
        assert needle in lines[0]
        assert SASL_PASSWORD not in done.stderr


def test_config_refuses_tls_material_that_does_not_load(tmp_path: Path) -> None:
    tls = write_tls_material(tmp_path / "tls", password=KEY_PASSWORD)
    env = {
        f"{W}KAFKA_SECURITY_PROTOCOL": "SSL",
        f"{W}KAFKA_SSL_CAFILE": str(tls.ca),
        f"{W}KAFKA_SSL_CERTFILE": str(tls.cert),
        f"{W}KAFKA_SSL_KEYFILE": str(tls.key),
        f"{W}KAFKA_SSL_KEY_PASSWORD": "wrong-" + KEY_PASSWORD,
    }
    done = _cli("config", env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "does not decrypt the private key" in done.stderr
    assert KEY_PASSWORD not in done.stderr
