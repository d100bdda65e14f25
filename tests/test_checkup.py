"""``cancel-worker check``'s checks without a broker or a simulator: the clock verdict, the
report's lines and summary, the broker bound (a socket that accepts and never answers), an
unreadable time endpoint (its URL's user information hidden), and the accounts, each on its
own. The checks against the real broker and simulator are in
``test_checkup_integration.py``."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.cli.checkup import (
    SKIPPABLE,
    CheckResult,
    Report,
    check_accounts,
    check_broker,
    check_clock,
    clock_verdict,
    run_checks,
    settings_result,
)
from worker.settings import ENV_PREFIX, Settings
from worker.tools.devstack import free_port, write_private_key

W = ENV_PREFIX
SECRET = "s3cr3t-never-shown"


@pytest.mark.parametrize(
    ("offset_ms", "recv_window_ms", "ok"),
    [
        (0, 5000, True),
        (2500, 5000, True),
        (-2500, 5000, True),
        (2501, 5000, False),
        (-2501, 5000, False),
        (600, 1000, False),
        (30_000, 60_000, True),
    ],
)
def test_the_clock_fails_past_half_the_receive_window(
    offset_ms: int, recv_window_ms: int, ok: bool
) -> None:
    result = clock_verdict(offset_ms, 7, recv_window_ms)
    assert result.name == "exchange clock"
    assert result.ok is ok
    assert result.detail.startswith(f"offset {offset_ms:+d} ms, round trip 7 ms")
    if not ok:
        assert f"more than half of {W}RECV_WINDOW_MS ({recv_window_ms / 2:g} ms)" in result.detail


def test_the_report_has_a_line_per_check_and_a_summary() -> None:
    report = Report(
        (
            CheckResult("settings", True, "loaded"),
            CheckResult("topics", False, "missing: x"),
            CheckResult("ping desk-a", False, "HTTP 401"),
        )
    )
    assert not report.ok
    assert report.lines() == [
        "ok    settings     loaded",
        "FAIL  topics       missing: x",
        "FAIL  ping desk-a  HTTP 401",
        "summary: 2 of 3 checks failed: topics, ping desk-a",
    ]
    passing = Report((CheckResult("settings", True, "loaded"),))
    assert passing.ok
    assert passing.summary() == "summary: all 1 checks ok"


def test_the_settings_line_counts_the_sources(tmp_path: Path) -> None:
    sources = {"a": "env", "b": "file", "c": "file", "d": "default"}
    result = settings_result(sources, tmp_path / "w.toml")
    assert result.ok
    assert result.detail == (
        f"loaded: 1 from the environment, 2 from {tmp_path / 'w.toml'}, the rest defaults"
    )
    assert settings_result({"a": "default"}, None).detail == (
        "loaded: 0 from the environment, the rest defaults"
    )


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"127.0.0.1:{server.getsockname()[1]}"


async def test_a_broker_that_never_answers_fails_within_the_bound(silent_broker: str) -> None:
    settings = dataclasses.replace(Settings(), bootstrap_servers=silent_broker)
    started = time.monotonic()
    result = await check_broker(settings, 1.0)
    took = time.monotonic() - started
    assert not result.ok
    assert result.detail == f"no answer from {silent_broker} (PLAINTEXT) within 1s"
    assert took < 2.5


async def test_nothing_listening_fails_at_once() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    settings = dataclasses.replace(Settings(), bootstrap_servers=bootstrap)
    started = time.monotonic()
    result = await check_broker(settings, 5.0)
    assert not result.ok
    assert result.detail.startswith(f"cannot reach {bootstrap} (PLAINTEXT): ")
    assert "Connect call failed" in result.detail  # aiokafka's logged cause, not "bootstrap"
    assert time.monotonic() - started < 2.5


async def test_an_unreadable_time_endpoint_fails_without_its_credentials() -> None:
    url = f"http://ops:{SECRET}@127.0.0.1:{free_port()}/fapi/v1/time"
    settings = dataclasses.replace(Settings(), time_url=url, http_timeout_s=1.0)
    result, offset = await check_clock(settings)
    assert not result.ok
    assert offset == 0
    assert result.detail.startswith(
        "cannot read the exchange time from http://<redacted>@127.0.0.1:"
    )
    assert SECRET not in result.detail


def test_each_account_is_checked_on_its_own(tmp_path: Path) -> None:
    write_private_key(tmp_path / "ed.pem", "ed25519")
    write_private_key(tmp_path / "rsa.pem", "rsa")
    (tmp_path / "broken.pem").write_text("not a key\n")
    path = tmp_path / "accounts.toml"
    path.write_text(
        f'[accounts.h]\napi_key = "k1"\nsecret = "{SECRET}"\n'
        '[accounts.e]\napi_key = "k2"\nprivate_key_file = "ed.pem"\n'
        '[accounts.r]\napi_key = "k3"\nprivate_key_file = "rsa.pem"\n'
        '[accounts.b]\napi_key = "k4"\nprivate_key_file = "broken.pem"\n'
        f'[accounts.t]\napi_key = "k5"\nsecret_flie = "{SECRET}"\n'
        '[accounts.m]\napi_key = "k6"\nprivate_key_file = "missing.pem"\n'
    )
    settings = dataclasses.replace(Settings(), accounts_file=path)
    results, loaded = check_accounts(settings)
    assert sorted(loaded) == ["e", "h", "r"]
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == [f"account {a}" for a in "herbtm"]
    assert by_name["account h"] == CheckResult("account h", True, "HMAC secret loaded")
    assert by_name["account e"].detail == "Ed25519 private key loaded"
    assert by_name["account r"].detail == "RSA private key loaded"
    assert not by_name["account b"].ok
    assert by_name["account b"].detail.startswith("private key cannot be loaded")
    assert by_name["account t"].detail == (
        f"unknown field 'secret_flie'; did you mean 'secret_file'? (in {path})"
    )
    assert by_name["account m"].detail.startswith("cannot read private_key_file")
    for result in results:
        assert SECRET not in result.detail


def test_an_accounts_file_that_cannot_be_read_is_one_failure(tmp_path: Path) -> None:
    results, loaded = check_accounts(Settings())
    assert results == [CheckResult("accounts", False, f"{W}ACCOUNTS_FILE is not set")]
    assert loaded == {}
    missing = tmp_path / "nope.toml"
    results, _ = check_accounts(dataclasses.replace(Settings(), accounts_file=missing))
    assert results == [
        CheckResult(
            "accounts", False, f"cannot read accounts file {missing}: No such file or directory"
        )
    ]
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    results, _ = check_accounts(dataclasses.replace(Settings(), accounts_file=empty))
    assert results == [
        CheckResult("accounts", False, f"accounts file {empty}: no [accounts.<alias>] tables")
    ]


def test_the_cli_offers_the_checks_that_can_be_skipped() -> None:
    from worker.cli.main import check  # noqa: PLC0415

    option = next(p for p in check.params if p.name == "skip")
    assert tuple(option.type.choices) == SKIPPABLE  # type: ignore[attr-defined]


async def test_skipped_checks_are_left_out(silent_broker: str) -> None:
    settings = dataclasses.replace(Settings(), bootstrap_servers=silent_broker)
    report = await run_checks(
        settings, {"bootstrap_servers": "env"}, skip=("broker", "accounts", "clock", "topics")
    )
    assert [r.name for r in report.results] == ["settings"]
    assert report.ok
    with pytest.raises(ValueError, match="unknown checks"):
        await run_checks(settings, {}, skip=("ping",))
