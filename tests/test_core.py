"""Pure core: routes, normalization, offsets, taxonomy, settings, accounts."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from worker.app import YOUNG_COLLECTION_THRESHOLD, _Closers, settle_garbage_collector
from worker.core import normalize
from worker.core.commands import Command, Market
from worker.core.decisions import Gone, decide_gone
from worker.core.errors import (
    TAXONOMY,
    Disposition,
    ExchangeError,
    FailureReason,
    NoAnswerError,
    NotAdmittedError,
    NotSentError,
    classify,
    taxonomy_markdown,
)
from worker.core.routes import Route, choose_route, plan_cancel
from worker.exchange.accounts import AccountsError, load_accounts
from worker.logs import RateLimitFilter
from worker.settings import SettingsError, load_settings

REPO = Path(__file__).resolve().parent.parent


# -- routes ---------------------------------------------------------------------------------


def test_routes_follow_market_and_identifier() -> None:
    um = Command("c", "a", Market.UM, 1, symbol="BTCUSDT", strategy_id=5)
    cm = Command("c", "a", Market.CM, 1, symbol="BTCUSD_PERP", client_strategy_id="x/y")
    algo = Command("c", "a", Market.UM, 1, symbol="BTCUSDT", client_algo_id="q")
    assert choose_route(um) is Route.UM_CONDITIONAL
    assert plan_cancel(um).params == (("symbol", "BTCUSDT"), ("strategyId", "5"))
    assert plan_cancel(um).path == "/papi/v1/um/conditional/order"
    assert plan_cancel(cm).path == "/papi/v1/cm/conditional/order"
    assert plan_cancel(cm).params[1] == ("newClientStrategyId", "x/y")
    req = plan_cancel(algo)
    assert req.route is Route.UM_ALGO and req.path == "/papi/v1/um/algo/order"
    assert req.params == (("clientAlgoId", "q"),)  # no symbol; the signer adds the rest
    assert req.method == "DELETE"


# -- normalization --------------------------------------------------------------------------


def test_normalize_keeps_decimal_strings_and_drops_junk() -> None:
    obj = {
        "strategyId": 9,
        "strategyStatus": "CANCELED",
        "origQty": "0.0100",
        "price": 1.5,
        "stopPrice": "1e5",
        "activatePrice": 7,
        "side": "SELL",
        "positionSide": "SIDEWAYS",
        "reduceOnly": "true",
        "bookTime": -1,
        "selfTradePreventionMode": "EXPIRE_TAKER",
        "goodTillDate": 5,
        "priceMatch": "NONE",
    }
    um = normalize.from_strategy_object(obj, Route.UM_CONDITIONAL)
    assert um["orig_qty"] == "0.0100"
    assert um["price"] is None  # a float is never turned into money
    assert um["stop_price"] is None
    assert um["activate_price"] == "7"
    assert um["position_side"] is None and um["reduce_only"] is None and um["book_time"] is None
    assert um["self_trade_prevention_mode"] == "EXPIRE_TAKER"
    cm = normalize.from_strategy_object(obj, Route.CM_CONDITIONAL)
    assert cm["self_trade_prevention_mode"] is None and cm["good_till_date"] is None
    assert set(um) == set(normalize.STRATEGY_FIELDS)


# -- taxonomy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "msg", "disposition", "reason"),
    [
        (400, -1021, "Timestamp outside", Disposition.TERMINAL, FailureReason.REJECTED),
        (429, -1015, "Too many new orders", Disposition.RETRYABLE, FailureReason.RATE_LIMITED),
        (400, -1022, "Signature", Disposition.TERMINAL, FailureReason.AUTH),
        (401, -2015, "Invalid API-key", Disposition.TERMINAL, FailureReason.AUTH),
        (400, -2011, "Unknown order sent.", Disposition.TERMINAL, FailureReason.NOT_FOUND),
        (400, -1102, "Mandatory", Disposition.TERMINAL, FailureReason.REJECTED),
        (429, -1003, "Too many", Disposition.RETRYABLE, FailureReason.RATE_LIMITED),
        (418, -1003, "banned until", Disposition.RETRYABLE, FailureReason.RATE_LIMITED),
        (400, -1006, "unknown", Disposition.AMBIGUOUS, FailureReason.OUTCOME_UNKNOWN),
        (
            503,
            None,
            "Service Unavailable",
            Disposition.RETRYABLE,
            FailureReason.EXCHANGE_UNAVAILABLE,
        ),
        (
            503,
            None,
            "Unknown error, please check your request",
            Disposition.AMBIGUOUS,
            FailureReason.OUTCOME_UNKNOWN,
        ),
        (502, None, "Bad Gateway", Disposition.AMBIGUOUS, FailureReason.OUTCOME_UNKNOWN),
        # A 503 without a JSON msg (a gateway's, which may have forwarded the cancel).
        (503, None, None, Disposition.AMBIGUOUS, FailureReason.OUTCOME_UNKNOWN),
        (503, None, "", Disposition.AMBIGUOUS, FailureReason.OUTCOME_UNKNOWN),
        (
            503,
            -1000,
            "Unknown error, please check your request or try again later.",
            Disposition.AMBIGUOUS,
            FailureReason.OUTCOME_UNKNOWN,
        ),
        (
            503,
            -1001,
            "Internal error; unable to process your request. Please try again.",
            Disposition.RETRYABLE,
            FailureReason.EXCHANGE_UNAVAILABLE,
        ),
        (
            400,
            -1000,
            "An unknown error occurred",
            Disposition.RETRYABLE,
            FailureReason.EXCHANGE_UNAVAILABLE,
        ),
        (404, None, "Not Found", Disposition.TERMINAL, FailureReason.ROUTE_RETIRED),
        (403, None, "", Disposition.TERMINAL, FailureReason.REJECTED),
        (400, -4999, "new code", Disposition.TERMINAL, FailureReason.REJECTED),
    ],
)
def test_classify(
    status: int, code: int | None, msg: str | None, disposition: Disposition, reason: FailureReason
) -> None:
    rule = classify(status, code, msg)
    assert (rule.disposition, rule.reason) == (disposition, reason)
    err = ExchangeError(status, code, msg)
    assert err.retryable == (disposition is Disposition.RETRYABLE)
    assert err.ambiguous == (disposition is Disposition.AMBIGUOUS)


def test_errors_without_an_answer_split_on_whether_the_request_left() -> None:
    assert NotSentError("refused").retryable and not NotSentError("refused").sent
    assert NoAnswerError("reset after the write").ambiguous
    late = NotAdmittedError("x", why="expired", wait_until_ms=1, expired=True)
    assert not late.sent and not late.retryable and not late.ambiguous


def test_docs_taxonomy_table_matches_the_code() -> None:
    page = (REPO / "docs" / "exchange.md").read_text()
    assert taxonomy_markdown() in page
    assert len(TAXONOMY) == len(
        re.findall(r"^\| .+ \| (retryable|terminal|ambiguous) \|", page, re.MULTILINE)
    )


# -- decision after a refused or unanswered cancel --------------------------------------------

ISSUED = 1_800_000_000_000
OURS, CLOSED, OPEN = Gone.CANCELED_BY_COMMAND, Gone.ALREADY_CLOSED, Gone.STILL_OPEN


@pytest.mark.parametrize(
    ("status", "cancel_time", "maybe_landed", "expected"),
    [
        # Canceled after the risk engine decided: an earlier delivery of this command did it.
        ("CANCELED", ISSUED + 250, False, OURS),
        ("CANCELED", ISSUED, False, OURS),  # at issued_at counts as after
        # Canceled before this command existed: it canceled nothing.
        ("CANCELED", ISSUED - 1, False, CLOSED),
        ("CANCELED", None, False, CLOSED),  # cancel time unknown, nothing of ours landed
        # An attempt of this execution may have landed: the cancel is ours, whatever the time.
        ("CANCELED", ISSUED - 60_000, True, OURS),
        ("CANCELED", None, True, OURS),
        ("CANCELED", ISSUED + 1, True, OURS),
        # Closed otherwise: never claimed as a cancel, whatever the times.
        ("TRIGGERED", ISSUED + 1, True, CLOSED),
        ("TRIGGERING", ISSUED + 1, False, CLOSED),
        ("FINISHED", ISSUED + 1, True, CLOSED),
        ("EXPIRED", ISSUED + 1, False, CLOSED),
        ("EXPIRED", None, True, CLOSED),
        ("REJECTED", ISSUED - 1, False, CLOSED),
        # Still open: not gone at all.
        ("NEW", ISSUED + 1, True, OPEN),
        ("NEW", None, False, OPEN),
    ],
)
def test_decide_gone(
    status: str, cancel_time: int | None, maybe_landed: bool, expected: Gone
) -> None:
    assert decide_gone(status, cancel_time, ISSUED, maybe_landed) is expected


# -- settings -------------------------------------------------------------------------------


def test_settings_precedence_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('group_id = "from-file"\nmax_in_flight = 7\n')
    env = {"CANCEL_WORKER_GROUP_ID": "from-env", "UNRELATED": "x"}
    s = load_settings(env, config)
    assert s.group_id == "from-env" and s.max_in_flight == 7


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CANCEL_WORKER_MAX_IN_FLIGHT": "many"}, "MAX_IN_FLIGHT"),
        ({"CANCEL_WORKER_MAX_IN_FLIGHT": "0"}, "positive"),
        ({"CANCEL_WORKER_RECV_WINDOW_MS": "70000"}, "60000"),
        ({"CANCEL_WORKER_PAPI_URL": "ftp://x"}, "PAPI_URL"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(env)


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("max_inflight = 7\n")
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({}, config)


# -- accounts -------------------------------------------------------------------------------


def test_accounts_from_inline_values_and_mounted_files(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "apikey").write_text("mounted-key\n")
    (tmp_path / "secret").write_text("mounted-secret\n")
    (tmp_path / "a.toml").write_text(
        '[accounts.one]\napi_key = "k1"\nsecret = "s1"\n'
        '[accounts.two]\napi_key_file = "apikey"\nprivate_key_file = "k.pem"\n'
        '[accounts.three]\napi_key = "k3"\nsecret_file = "secret"\n'
    )
    accounts = load_accounts(tmp_path / "a.toml")
    assert accounts["one"].key_kind == "hmac"
    assert accounts["two"].key_kind == "ed25519" and accounts["two"].api_key == "mounted-key"
    assert accounts["three"].hmac_secret == "mounted-secret"
    assert "s1" not in repr(accounts["one"]) and "k1" not in repr(accounts["one"])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no [accounts"),
        ('[accounts.x]\nsecret = "s"\n', "api_key is required"),
        ('[accounts.x]\napi_key = "k"\n', "exactly one of secret"),
        (
            '[accounts.x]\napi_key = "k"\nsecret = "topsecret"\nprivate_key_file = "p"\n',
            "exactly one of secret",
        ),
        ('[accounts.x]\napi_key = "k"\nprivate_key_file = "missing.pem"\n', "cannot read"),
        ('[accounts.x]\napi_key = "k"\nsecret = "topsecret"\nsecret_file = "f"\n', "not both"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_accounts_files_fail_clearly_without_leaking(
    tmp_path: Path, text: str, needle: str
) -> None:
    (tmp_path / "a.toml").write_text(text)
    with pytest.raises(AccountsError, match=re.escape(needle)) as info:
        load_accounts(tmp_path / "a.toml")
    assert "topsecret" not in str(info.value)


def test_garbage_private_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.pem").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    (tmp_path / "a.toml").write_text('[accounts.x]\napi_key = "k"\nprivate_key_file = "p.pem"\n')
    with pytest.raises(AccountsError, match="cannot be loaded"):
        load_accounts(tmp_path / "a.toml")


def test_library_log_noise_is_rate_limited_and_counted() -> None:
    now = [0.0]
    limit = RateLimitFilter(prefixes=("aiokafka",), burst=3, interval_s=10.0, clock=lambda: now[0])

    def record(name: str, msg: str = "Unable to update metadata from %s") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("node",), None)

    passed = [limit.filter(record("aiokafka.client")) for _ in range(1000)]
    assert sum(passed) == 3  # a burst, then silence
    assert all(limit.filter(record("worker.kafka.pipeline", "result %s")) for _ in range(50))
    now[0] = 11.0
    first = record("aiokafka.client")
    assert limit.filter(first)
    assert "[997 similar line(s) suppressed]" in first.getMessage()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CANCEL_WORKER_DEADLETTER_MAX_BYTES": "4000"}, "DEADLETTER_MAX_BYTES must be at least"),
        ({"CANCEL_WORKER_DELIVERY": "maybe_once"}, "DELIVERY must be one of"),
        (
            {"CANCEL_WORKER_SESSION_TIMEOUT_MS": "6000"},
            "REVOKE_GRACE_S \\+ CANCEL_WORKER_COMMIT_TIMEOUT_S",
        ),
        (
            {"CANCEL_WORKER_SESSION_TIMEOUT_MS": "8000", "CANCEL_WORKER_REVOKE_GRACE_S": "1"},
            "HEARTBEAT_INTERVAL_MS must be at most a third",
        ),
        ({"CANCEL_WORKER_MAX_BUFFERED_PER_PARTITION": "10"}, "at least CANCEL_WORKER_MAX_POLL"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


# -- closing --------------------------------------------------------------------------------


async def test_close_steps_run_in_reverse_each_bounded_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One failing close and one hanging close skip nothing, and each failure is said."""
    closed: list[str] = []

    def step(name: str, behaviour: str) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            closed.append(name)
            if behaviour == "fail":
                raise RuntimeError(f"{name} broke")
            if behaviour == "hang":
                await asyncio.sleep(60)

        return close

    closers = _Closers(bound_s=0.2)
    for name, behaviour in [("clock", "ok"), ("producer", "fail"), ("consumer", "hang")]:
        closers.add(name, step(name, behaviour))
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        await closers.close_all()
    assert closed == ["consumer", "producer", "clock"]  # reverse order of opening
    said = [r.getMessage() for r in caplog.records]
    assert any("consumer" in m and "0.2s" in m for m in said), said
    assert any("producer" in m and "producer broke" in m for m in said), said
    assert len(said) == 2


def test_the_collector_is_settled_once_the_worker_has_started() -> None:
    """Start-up's objects are frozen out of every collection, and young collections run
    every YOUNG_COLLECTION_THRESHOLD new objects; the older generations keep theirs."""
    before = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, before[1], before[2])
        assert before[0] < YOUNG_COLLECTION_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
