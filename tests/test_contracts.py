"""The schemas, their examples and the code agree."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from worker import events, normalize
from worker.commands import Command, InvalidCommand, Market, decode
from worker.contracts import command_validator, result_validator, schema_dir
from worker.dedup import first_result_of
from worker.errors import FailureReason
from worker.events import ExchangeReply, Origin
from worker.routes import Route

EXAMPLES = schema_dir() / "examples"


def _files(kind: str, validity: str) -> list[Path]:
    files = sorted((EXAMPLES / kind / validity).glob("*.json"))
    assert files, f"no {validity} {kind} examples"
    return files


@pytest.mark.parametrize("path", _files("command", "valid"), ids=lambda p: p.stem)
def test_valid_command_examples_pass_schema_and_decode(path: Path) -> None:
    assert command_validator().is_valid(orjson.loads(path.read_bytes()))
    assert isinstance(decode(path.read_bytes()), Command)


@pytest.mark.parametrize("path", _files("command", "invalid"), ids=lambda p: p.stem)
def test_invalid_command_examples_fail_schema_and_decode(path: Path) -> None:
    raw = path.read_bytes()
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:  # e.g. an integer beyond 64 bits
        obj = None
    if obj is not None:
        assert not command_validator().is_valid(obj)
    assert isinstance(decode(raw), InvalidCommand)


@pytest.mark.parametrize("path", _files("result", "valid"), ids=lambda p: p.stem)
def test_valid_result_examples(path: Path) -> None:
    result_validator().validate(orjson.loads(path.read_bytes()))


@pytest.mark.parametrize("path", _files("result", "invalid"), ids=lambda p: p.stem)
def test_invalid_result_examples(path: Path) -> None:
    assert not result_validator().is_valid(orjson.loads(path.read_bytes()))


ORIGIN = Origin("cmds", 0, 5, b"desk:BTCUSDT")
CMD = Command("c1", "desk", Market.UM, 1, symbol="BTCUSDT", strategy_id=7, reason="r", source="s")


@pytest.mark.parametrize("route", list(Route))
def test_canceled_events_from_the_code_match_the_schema(route: Route) -> None:
    obj = {
        "strategyId": 7,
        "newClientStrategyId": "x",
        "strategyStatus": "CANCELED",
        "origQty": "1.50",
        "stopPrice": "10",
        "bookTime": 1,
        "updateTime": 2,
        "selfTradePreventionMode": "NONE",
        "goodTillDate": 0,
        "priceMatch": "NONE",
    }
    strategy = (
        normalize.from_algo_cancel(CMD)
        if route is Route.UM_ALGO
        else normalize.from_strategy_object(obj, route)
    )
    event = events.canceled(CMD, ORIGIN, route, strategy, 1, 10, 11)
    result_validator().validate(event)
    if route is Route.CM_CONDITIONAL:
        assert strategy["self_trade_prevention_mode"] is None
        assert strategy["good_till_date"] is None


@pytest.mark.parametrize("reason", list(FailureReason))
def test_every_failure_reason_is_in_the_schema(reason: FailureReason) -> None:
    event = events.failed(
        CMD,
        ORIGIN,
        reason,
        "detail",
        2,
        10,
        11,
        route=Route.UM_ALGO,
        exchange=ExchangeReply(400, -2011, "Unknown order sent."),
        order_status="CANCELED",
        hint="h",
    )
    result_validator().validate(event)


def test_schema_reason_enum_is_exactly_the_code_enum() -> None:
    schema = orjson.loads((schema_dir() / "result-event.schema.json").read_bytes())
    enum = schema["$defs"]["cancel_failed"]["properties"]["reason"]["enum"]
    assert sorted(enum) == sorted(r.value for r in FailureReason)


def test_failed_event_for_undecodable_record_matches_schema() -> None:
    invalid = decode(b"\xff")
    assert isinstance(invalid, InvalidCommand)
    event = events.failed(
        invalid, Origin("t", 0, 0, None), FailureReason.INVALID_COMMAND, invalid.detail, 0, 1, 2
    )
    result_validator().validate(event)
    assert event["command_id"] is None


def test_exchange_message_and_detail_are_bounded() -> None:
    event = events.failed(
        CMD,
        ORIGIN,
        FailureReason.REJECTED,
        "d" * 5000,
        1,
        1,
        2,
        exchange=ExchangeReply(400, -1, "m" * 5000),
    )
    result_validator().validate(event)
    assert len(event["detail"]) == 2048 and len(event["exchange"]["msg"]) == 1024


def _final_results() -> list[dict[str, object]]:
    """A final result of every shape the code builds: each failure reason (with a route, with
    an order status), and a cancel on each route."""
    out: list[dict[str, object]] = []
    for reason in FailureReason:
        out.append(events.failed(CMD, ORIGIN, reason, "d", 1, 10, 11, route=Route.CM_CONDITIONAL))
        out.append(events.failed(CMD, ORIGIN, reason, "d", 1, 10, 11, order_status="FINISHED"))
    strategy = normalize.from_algo_cancel(CMD)
    out += [events.canceled(CMD, ORIGIN, route, strategy, 1, 10, 11) for route in Route]
    return out


@pytest.mark.parametrize(
    "first", _final_results(), ids=lambda e: f"{e['type']}-{e.get('reason') or e['route']}"
)
def test_duplicate_events_carry_any_first_result_the_code_builds(first: dict[str, object]) -> None:
    """Every final result the code builds counts for the window, and the duplicate event
    built from it matches the schema."""
    found = first_result_of(first)
    assert found is not None and found[0] == "c1"
    event = events.duplicate(CMD, Origin("cmds", 1, 9, None), found[1].as_dict(), 20, 21)
    result_validator().validate(event)
    assert event["first_result"]["origin"] == {"topic": "cmds", "partition": 0, "offset": 5}
    assert (event["first_result"]["type"], event["first_result"]["reason"]) == (
        first["type"],
        first.get("reason"),
    )
    assert event["attempts"] == 0 and event["origin"]["offset"] == 9
