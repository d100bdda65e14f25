"""Secrets, keys and logs at the edges: an accounts file or secret file that is not UTF-8,
malformed API keys, credentials others may read, core dumps, control characters in text
logs, and a record's unknown field names in a validation error."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from worker.core.commands import InvalidCommand, decode
from worker.exchange.accounts import AccountsError, load_accounts
from worker.logs import TextFormatter

SECRET_BYTES = b"\xff\xfe-secret-\xc3"


def _accounts(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "a.toml"
    path.write_text(f"[accounts.x]\n{table}")
    path.chmod(0o600)
    return path


def test_a_secret_file_that_is_not_utf8_is_a_clear_error_without_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET_BYTES)
    (tmp_path / "secret").chmod(0o600)
    path = _accounts(tmp_path, 'api_key = "k"\nsecret_file = "secret"\n')
    with pytest.raises(AccountsError) as info:
        load_accounts(path)
    message = str(info.value)
    assert "account 'x': secret_file is not UTF-8 text" in message
    assert "its content is not shown" in message
    for shown in ("0xff", "0xfe", "\\xff", "secret-", "\xff"):
        assert shown not in message


def test_an_accounts_file_that_is_not_utf8_is_a_clear_error_without_its_bytes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.toml"
    path.write_bytes(b'[accounts.x]\napi_key = "k"\nsecret = "' + SECRET_BYTES + b'"\n')
    path.chmod(0o600)
    with pytest.raises(AccountsError) as info:
        load_accounts(path)
    message = str(info.value)
    assert "is not UTF-8 text" in message
    assert "0xff" not in message and "\\xff" not in message


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("abc\r\nX-Injected: 1", "a line break"),
        ("abc\ndef", "a line break"),
        ("abc def", "a space or tab"),
        ("abc\tdef", "a space or tab"),
        ("clé-secrète", "a character that is not ASCII"),
        ("abc\x00def", "a control character"),
        ("abc\x7fdef", "a control character"),
    ],
)
def test_a_malformed_api_key_is_refused_without_its_value(
    tmp_path: Path, key: str, what: str
) -> None:
    (tmp_path / "key").write_text(key)
    (tmp_path / "key").chmod(0o600)
    path = _accounts(tmp_path, 'api_key_file = "key"\nsecret = "s"\n')
    with pytest.raises(AccountsError) as info:
        load_accounts(path)
    message = str(info.value)
    assert f"account 'x': api_key has {what}" in message
    assert "abc" not in message and "secr" not in message


def test_a_key_file_others_may_read_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "secret").write_text("s")
    path = _accounts(tmp_path, 'api_key = "k"\nsecret_file = "secret"\n')
    (tmp_path / "secret").chmod(0o600)
    caplog.set_level(logging.WARNING)
    assert sorted(load_accounts(path)) == ["x"]
    assert not caplog.records
    (tmp_path / "secret").chmod(0o644)  # world-readable
    assert sorted(load_accounts(path)) == ["x"]
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "secret_file" in record.getMessage() and "mode 0644" in record.getMessage()
    assert "s\n" not in record.getMessage()
    caplog.clear()
    (tmp_path / "secret").chmod(0o640)  # group: this process's own group (the file's)
    load_accounts(path)
    assert not caplog.records


def test_core_dumps_are_disabled_when_the_worker_starts(tmp_path: Path) -> None:
    """``serve`` lowers RLIMIT_CORE to 0 (soft and hard) before it reads any secret; run in
    a child interpreter whose limit starts above 0."""
    code = (
        "import asyncio, resource\n"
        "resource.setrlimit(resource.RLIMIT_CORE, (1024 * 1024, resource.RLIM_INFINITY))\n"
        "from worker.app import serve\n"
        "from worker.settings import Settings\n"
        "asyncio.run(serve(Settings(require_signed_commands=False)))\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024 * 1024:
        code = code.replace("resource.RLIM_INFINITY", str(hard)).replace("1024 * 1024", "0")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CANCEL_WORKER_")},
        check=False,
    )
    assert out.stdout.strip().splitlines()[-1] == "(0, 0)", out.stdout + out.stderr


def _boom() -> None:
    raise ValueError("boom")


def test_text_logs_escape_control_characters_in_the_message_only() -> None:
    formatter = TextFormatter()
    record = logging.LogRecord(
        "worker.processor",
        logging.WARNING,
        __file__,
        1,
        "command_id=%s: %s",
        ("evil\n2026-01-01 00:00:00 ERROR worker: forged", "\x1b[2J\u2028\u202e"),
        None,
    )
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line
    assert "\u202e" not in line
    assert "evil\\x0a2026-01-01 00:00:00 ERROR worker: forged" in line
    assert "\\x1b[2J\\u2028\\u202e" in line
    assert line.endswith("\\u202e") and " WARNING worker.processor: command_id=" in line
    try:
        _boom()
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "\nTraceback (most recent call last):" in formatter.format(record)


def test_unknown_field_names_in_a_validation_error_are_few_cut_and_escaped() -> None:
    body = {"command_id": "c-1", "account": "desk-a", "market": "UM", "issued_at": 1}
    body["algo_id"] = 1
    body.update({f"{'x' * 500}\n\x1b[31m{i}": 1 for i in range(2000)})
    decoded = decode(orjson.dumps(body), max_bytes=10_000_000)
    assert isinstance(decoded, InvalidCommand)
    detail = decoded.detail
    assert detail.startswith("(root): 2000 unknown field(s): 'xxx")
    assert len(detail) <= 300
    assert "\n" not in detail and "\x1b" not in detail
    assert decoded.command_id == "c-1"
