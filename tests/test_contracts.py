"""The schemas, their examples and the code agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import support
from tests.conftest import ResultEventCheck
from tests.support import events_of, written_by_the_worker
from worker.core import events, normalize, sweep
from worker.core.commands import Command, InvalidCommand, Market, Scope, decode
from worker.core.contracts import (
    COMMAND_SCHEMA,
    RESULT_SCHEMA,
    StrictValidator,
    command_validator,
    ecma_anchors,
    load_schema,
    result_validator,
    schema_dir,
)
from worker.core.decisions import Outcome
from worker.core.errors import ExchangeReply, FailureReason
from worker.core.events import Origin
from worker.core.routes import Route
from worker.core.sweep import Listed, RouteOutcome, RouteReport, SweepReport, Swept, parse_listing
from worker.executor import CancelExecutor
from worker.kafka.dedup import REFUSED, first_result_of
from worker.processor import CommandProcessor

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
KILL_SWITCH = Command(
    "ks-1", "desk", Market.UM, 1, symbol="BTCUSDT", scope=Scope.SYMBOL, reason="flatten"
)


def _sweep_report() -> SweepReport:
    canceled = parse_listing(
        [{"algoId": 11, "algoStatus": "CANCELED", "quantity": "0.5", "updateTime": 3}],
        Route.UM_ALGO,
    )
    still = parse_listing(
        [{"strategyId": 12, "strategyStatus": "NEW", "origQty": "1"}], Route.UM_CONDITIONAL
    )
    assert canceled is not None and still is not None
    return SweepReport(
        (
            RouteReport(Route.UM_ALGO, RouteOutcome.DONE, listed=1),
            RouteReport(
                Route.UM_CONDITIONAL,
                RouteOutcome.FAILED,
                listed=1,
                reason=FailureReason.EXCHANGE_UNAVAILABLE,
                detail="503",
                exchange=ExchangeReply(503, None, "Service Unavailable."),
            ),
        ),
        Swept(canceled=canceled, still_open=still),
    )


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
    # A kill switch's: its sweep, and its failure (no cancel-all that may have applied).
    out.append(events.strategies_canceled(KILL_SWITCH, ORIGIN, _sweep_report(), 3, 10, 11))
    out.append(
        events.failed(
            KILL_SWITCH, ORIGIN, FailureReason.AUTH, "d", 1, 10, 11, sweep=_sweep_report()
        )
    )
    return out


@pytest.mark.parametrize(
    "first",
    _final_results(),
    ids=lambda e: f"{e['type']}-{e.get('reason') or e.get('route') or e['command_id']}",
)
def test_duplicate_events_carry_any_first_result_the_code_builds(first: dict[str, object]) -> None:
    """Every final result the code builds counts for the window, except a refusal, and the
    duplicate event built from it (for a repeat of the same command) matches the schema."""
    found = first_result_of(first)
    command = KILL_SWITCH if first["command_id"] == KILL_SWITCH.command_id else CMD
    if first.get("reason") in REFUSED:
        assert found is None
        return
    assert found is not None and found.command_id == command.command_id
    assert found.account == command.account
    assert found.first.fingerprint == events.fingerprint(command)
    event = events.duplicate(command, Origin("cmds", 1, 9, None), found.first.as_dict(), 20, 21)
    result_validator().validate(event)
    assert event["first_result"]["origin"] == {"topic": "cmds", "partition": 0, "offset": 5}
    assert (event["first_result"]["type"], event["first_result"]["reason"]) == (
        first["type"],
        first.get("reason"),
    )
    assert event["attempts"] == 0 and event["origin"]["offset"] == 9


# --- `pattern`: ECMA-262 semantics, where `$` is the end of the string ---------------------


def _walk_patterns(node: object, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield where, value
            else:
                yield from _walk_patterns(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_patterns(value, f"{where}/{i}")


def _walk_keys(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _walk_keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_keys(value)


PATTERNS = [
    (f"{name}#{where}", pattern)
    for name in (COMMAND_SCHEMA, RESULT_SCHEMA)
    for where, pattern in _walk_patterns(load_schema(name), "")
]
UNIQUE_PATTERNS = sorted({pattern for _, pattern in PATTERNS})


def _ends_with_unescaped_dollar(pattern: str) -> bool:
    backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    return pattern.endswith("$") and backslashes % 2 == 0


def _outside_the_common_subset(body: str) -> list[str]:
    r"""What in the body of a `^body$` pattern could make Python and ECMA-262 disagree even
    with the end anchor fixed: anchors, `.`, a top-level `|`, class escapes (`\d`, `\w`,
    `\s`, `\b`: Unicode in one and ASCII in the other), `(?` constructs, nested classes."""
    problems: list[str] = []
    depth, in_class, i = 0, False, 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            escaped = body[i + 1 : i + 2]
            if not escaped or escaped.isalnum():
                problems.append(f"escape \\{escaped} at {i}")
            i += 2
            continue
        if in_class:
            if char == "[":
                problems.append(f"nested class at {i}")
            elif char == "]":
                in_class = False
        elif char == "[":
            in_class = True
            if body[i + 1 : i + 2] == "]" or body[i + 1 : i + 3] == "^]":
                problems.append(f"class starting with ] at {i}")
        elif char in "^$.":
            problems.append(f"{char} outside a class at {i}")
        elif char == "(":
            if body[i + 1 : i + 2] == "?":
                problems.append(f"(? at {i}")
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            problems.append(f"top-level | at {i}")
        i += 1
    return problems


def test_the_schemas_have_patterns_and_no_pattern_properties() -> None:
    assert len(PATTERNS) >= 6, PATTERNS
    for name in (COMMAND_SCHEMA, RESULT_SCHEMA):
        keys = set(_walk_keys(load_schema(name)))
        # Our `pattern` keyword is the only regex the validator fixes; these use Python's.
        assert not keys & {"patternProperties", "propertyNames"}, name


@pytest.mark.parametrize(("where", "pattern"), PATTERNS, ids=[w for w, _ in PATTERNS])
def test_every_pattern_is_anchored_and_portable(where: str, pattern: str) -> None:
    """`^...$` so that every validator, in any language, matches the whole string; and
    nothing inside on which Python and ECMA-262 read differently."""
    assert pattern.startswith("^"), where
    assert _ends_with_unescaped_dollar(pattern), where
    assert _outside_the_common_subset(pattern[1:-1]) == [], where


def _ours(pattern: str, text: str) -> bool:
    return bool(StrictValidator({"pattern": pattern}).is_valid(text))


def _ecma(pattern: str, text: str) -> bool:
    """ECMA-262 `new RegExp(pattern).test(text)` for a `^body$` pattern whose body is in the
    common subset: `^` is the start and `$` the end of the string, so the body must match
    the whole string."""
    return re.fullmatch(pattern[1:-1], text) is not None


def _probes(sample: str) -> list[str]:
    middle = len(sample) // 2
    return [
        sample,
        sample + "\n",
        "\n" + sample,
        sample + "\r\n",
        sample + "\r",
        sample[:middle] + "\n" + sample[middle:],
        sample + "\n\n",
        sample + "\u2028",
        sample + "\x00",
        sample + " ",
        "",
        "\n",
        "\r\n",
    ]


def _samples(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern[1:-1], fullmatch=True)


@pytest.mark.parametrize("pattern", UNIQUE_PATTERNS)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_our_pattern_agrees_with_ecma(pattern: str, data: st.DataObject) -> None:
    sample = data.draw(_samples(pattern), label="sample")
    assert _ours(pattern, sample) and _ecma(pattern, sample)
    for probe in _probes(sample):
        assert _ours(pattern, probe) == _ecma(pattern, probe), (pattern, probe)
        if probe != sample:
            assert not _ours(pattern, probe), (pattern, probe)


@pytest.mark.parametrize("pattern", UNIQUE_PATTERNS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_python_dollar_accepts_a_trailing_newline_ours_does_not(
    pattern: str, data: st.DataObject
) -> None:
    """The defect: `re.search` with a plain `$` takes "x\n" for "x"."""
    sample = data.draw(_samples(pattern), label="sample")
    assert re.search(pattern, sample + "\n")
    assert not _ours(pattern, sample + "\n")
    assert ecma_anchors(pattern).endswith(r"\Z")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("^a$", r"^a\Z"),
        (r"^a\$$", r"^a\$\Z"),
        (r"^a\\$", r"^a\\\Z"),
        ("^[$]$", r"^[$]\Z"),
        ("^[]$]$", r"^[]$]\Z"),
        ("^[^]$]$", r"^[^]$]\Z"),
        ("^(a$|b)$", r"^(a\Z|b)\Z"),
        (r"^[\]$]$", r"^[\]$]\Z"),
        ("^a", "^a"),
    ],
)
def test_ecma_anchors_rewrites_only_end_anchors(pattern: str, expected: str) -> None:
    assert ecma_anchors(pattern) == expected


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="no node on PATH for a real ECMA-262 engine")
@settings(max_examples=5, deadline=None)
@given(samples=st.tuples(*(_samples(pattern) for pattern in UNIQUE_PATTERNS)))
def test_our_patterns_agree_with_a_real_ecma_engine(samples: tuple[str, ...]) -> None:
    cases = [
        (pattern, probe)
        for pattern, sample in zip(UNIQUE_PATTERNS, samples, strict=True)
        for probe in _probes(sample)
    ]
    script = (
        "let s='';process.stdin.on('data',d=>s+=d).on('end',()=>{"
        "const cases=JSON.parse(s);"
        "process.stdout.write(JSON.stringify(cases.map(([p,t])=>new RegExp(p,'u').test(t))));});"
    )
    assert NODE is not None
    done = subprocess.run(
        [NODE, "-e", script], input=json.dumps(cases), capture_output=True, text=True, check=True
    )
    ecma = json.loads(done.stdout)
    ours = [_ours(pattern, probe) for pattern, probe in cases]
    assert ours == ecma, [c for c, o, e in zip(cases, ours, ecma, strict=True) if o != e]


@pytest.mark.parametrize("route", [Route.UM_CONDITIONAL, Route.CM_CONDITIONAL])
@pytest.mark.parametrize("bad", ["1.50\n", "\n1.50", "1.50\r\n", "1.\n50", "1.50\x00"])
def test_exchange_decimals_with_a_newline_become_null_not_a_bad_event(
    route: Route, bad: str
) -> None:
    obj = {"strategyId": 7, "strategyStatus": "CANCELED", "origQty": bad, "stopPrice": bad}
    strategy = normalize.from_strategy_object(obj, route)
    assert strategy["orig_qty"] is None and strategy["stop_price"] is None
    result_validator().validate(events.canceled(CMD, ORIGIN, route, strategy, 1, 10, 11))
    algo = normalize.from_algo_object({"algoId": 9, "algoStatus": "CANCELED", "quantity": bad})
    assert algo["orig_qty"] is None


def test_a_command_id_with_a_newline_is_not_salvaged_into_the_event() -> None:
    invalid = decode(orjson.dumps({"command_id": "c1\n", "account": "desk\n", "market": "UM"}))
    assert isinstance(invalid, InvalidCommand)
    assert invalid.command_id is None and invalid.account is None
    event = events.failed(invalid, ORIGIN, FailureReason.INVALID_COMMAND, invalid.detail, 0, 1, 2)
    result_validator().validate(event)


def test_kill_switch_events_from_the_code_match_the_schema() -> None:
    report = _sweep_report()
    event = events.strategies_canceled(KILL_SWITCH, ORIGIN, report, 3, 10, 11)
    result_validator().validate(event)
    assert event["complete"] is False and event["strategies"][0]["strategy"]["algo_id"] == 11
    failed = events.failed(
        KILL_SWITCH, ORIGIN, FailureReason.AUTH, "refused", 1, 10, 11, sweep=report
    )
    result_validator().validate(failed)
    assert [r["outcome"] for r in failed["routes"]] == ["done", "failed"]
    # A kill switch's result is never one order's: no top-level route or strategy.
    bad = {**event, "strategy": event["strategies"][0]["strategy"]}
    assert not result_validator().is_valid(bad)


# --- every event the code builds, in every test, is checked ---------------------------------


def test_the_suite_checks_every_event_a_builder_returns(result_events: ResultEventCheck) -> None:
    """The autouse hook (tests/conftest.py) fails a test that builds an invalid event, here a
    duplicate whose failed first result has a null reason where the schema wants a string."""
    first = {
        "type": "cancel.failed",
        "reason": None,
        "route": None,
        "order_status": None,
        "origin": {"topic": "cmds", "partition": 0, "offset": 5},
        "completed_at": 10,
    }
    before = result_events.checked
    with pytest.raises(
        AssertionError, match=r"worker\.core\.events\.duplicate: the event violates"
    ):
        events.duplicate(CMD, ORIGIN, first, 20, 21)
    assert result_events.checked == before + 1
    (violation,) = result_events.violations
    assert "None is not of type 'string'" in violation and "first_result/reason" in violation
    # The processor's path to bytes is checked too, even for a dict no builder made.
    with pytest.raises(
        AssertionError, match=r"worker\.core\.events\.serialize: the event violates"
    ):
        events.serialize({**events.canceled(CMD, ORIGIN, Route.UM_ALGO, _algo(), 1, 1, 2), "x": 1})
    assert len(result_events.violations) == 2
    result_events.violations.clear()  # seen: this test must not fail at teardown
    # A valid event passes, and is counted.
    events.serialize(events.canceled(CMD, ORIGIN, Route.UM_ALGO, _algo(), 1, 1, 2))
    assert result_events.checked == before + 5 and not result_events.violations


def _algo() -> dict[str, Any]:
    return normalize.from_algo_cancel(Command("c2", "desk", Market.UM, 1, algo_id=9))


class _Record(NamedTuple):
    value: bytes
    headers: list[tuple[str, bytes]]


def test_results_read_from_kafka_are_checked() -> None:
    """What tests read from a results topic (tests/support.py) is checked: a worker's
    record (with its `type` header) that violates the schema fails, a test's own bytes on a
    results topic are not taken for a result."""
    good = events.canceled(CMD, ORIGIN, Route.UM_ALGO, _algo(), 1, 1, 2)
    bad = {**good, "strategy": {**good["strategy"], "status": None}}
    record = _Record(orjson.dumps(bad), [("type", b"strategy.canceled")])
    assert written_by_the_worker(record)
    with pytest.raises(AssertionError, match="strategy/status"):
        support._check_results([record])
    with pytest.raises(AssertionError, match="violates"):
        events_of([record])
    headerless = _Record(orjson.dumps(bad), [])
    assert written_by_the_worker(headerless)  # it looks like a result: it is checked
    with pytest.raises(AssertionError, match="type header"):
        support._check_results([_Record(orjson.dumps(good), [("type", b"cancel.failed")])])
    support._check_results([_Record(orjson.dumps(good), [])])  # e.g. a test's stand-in
    assert not written_by_the_worker(_Record(b"zombie", []))
    assert not written_by_the_worker(_Record(b'{"n": "dead"}', []))
    support._check_results([_Record(orjson.dumps(good), [("type", b"strategy.canceled")])])
    assert events_of([_Record(orjson.dumps(good), [])]) == [good]


def test_a_float_where_an_integer_belongs_is_caught() -> None:
    """The compiled validator takes 5.0 for an integer; the check does not."""
    event = {**events.failed(CMD, ORIGIN, FailureReason.REJECTED, "d", 1, 10, 11), "attempts": 1.0}
    assert support.result_schema_error(event) is not None
    assert not result_validator().is_valid(event)


# --- every Outcome the executor can hand the processor becomes a valid event ----------------

_text = st.text(max_size=40)
_maybe_text = st.none() | _text
_STATUSES = load_schema(RESULT_SCHEMA)["$defs"]["order_status"]["enum"]
_exchange = st.none() | st.builds(
    ExchangeReply,
    st.integers(100, 599),
    st.none() | st.integers(-10_000, 10_000),
    st.none() | st.text(max_size=2000),
)
# What an exchange may answer for an order (known fields, junk in them, or nothing).
_junk = st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.floats()
_decimal_text = st.from_regex(r"\A-?[0-9]{1,6}(\.[0-9]{1,4})?\Z")


def _order_object(route: Route) -> st.SearchStrategy[dict[str, Any]]:
    id_field, status_field = (
        ("algoId", "algoStatus") if route is Route.UM_ALGO else ("strategyId", "strategyStatus")
    )
    return st.fixed_dictionaries(
        {id_field: st.integers(1, 2**62)},
        optional={
            status_field: st.sampled_from(_STATUSES) | _junk,
            "origQty": _decimal_text | _junk,
            "quantity": _decimal_text | _junk,
            "price": _decimal_text | _junk,
            "stopPrice": _decimal_text | _junk,
            "side": st.sampled_from(["BUY", "SELL"]) | _junk,
            "positionSide": st.sampled_from(["BOTH", "LONG", "SHORT"]) | _junk,
            "reduceOnly": _junk,
            "bookTime": _junk,
            "updateTime": _junk,
            "timeInForce": _junk,
            "selfTradePreventionMode": _junk,
            "goodTillDate": _junk,
            "newClientStrategyId": _junk,
            "clientAlgoId": _junk,
        },
    )


@st.composite
def _listed(draw: st.DrawFn, routes: Sequence[Route]) -> Listed:
    route = draw(st.sampled_from(list(routes)))
    strategy = sweep.normalized(draw(_order_object(route)), route)
    order_id = sweep.order_id_of(strategy, route)
    assert order_id is not None
    return Listed(route, order_id, strategy)


@st.composite
def _sweep(draw: st.DrawFn) -> SweepReport:
    """A kill switch's report: one to three routes (never none: a market has routes), each
    with any outcome, and listed orders sorted as classify() sorts them."""
    routes = draw(st.lists(st.sampled_from(list(Route)), min_size=1, max_size=3, unique=True))
    reports = tuple(
        RouteReport(
            route,
            draw(st.none() | st.sampled_from(list(RouteOutcome))),
            draw(st.integers(0, 50)),
            draw(st.none() | st.sampled_from(list(FailureReason))),
            draw(_text),
            draw(_exchange),
        )
        for route in routes
    )
    listed = st.lists(_listed(routes), max_size=3)
    first = draw(listed)
    again = draw(st.lists(st.sampled_from(first))) if first else []
    open_after = {x.key: x for x in again}
    statuses = {
        x.key: draw(st.none() | st.just(x.strategy) | _listed([x.route]).map(lambda y: y.strategy))
        for x in sweep.to_ask(first, open_after)
    }
    return SweepReport(reports, sweep.classify(first, open_after, statuses))


_SINGLE = [
    CMD,
    Command("a1", "desk", Market.UM, 1, algo_id=9, expires_at=5),
    Command("c3", "desk", Market.CM, 1, symbol="BTCUSD_PERP", client_strategy_id="x"),
]


@st.composite
def _outcomes(draw: st.DrawFn) -> tuple[Command, Outcome]:
    kill_switch = draw(st.booleans())
    command = KILL_SWITCH if kill_switch else draw(st.sampled_from(_SINGLE))
    route = draw(st.none() | st.sampled_from(list(Route)))
    strategy = None
    if draw(st.booleans()) and route is not None:
        if route is Route.UM_ALGO and draw(st.booleans()):
            strategy = normalize.from_algo_cancel(command)
        else:
            strategy = sweep.normalized(draw(_order_object(route)), route)
            # The executor reports a cancel only with the order's CANCELED status.
            strategy["status"] = "CANCELED"
    outcome = Outcome(
        canceled=draw(st.booleans()),
        attempts=draw(st.integers(0, 100)),
        route=route,
        strategy=strategy,
        confirmed_by=draw(st.sampled_from(["cancel", "query"])),
        reason=draw(st.none() | st.sampled_from(list(FailureReason))),
        detail=draw(_text),
        exchange=draw(_exchange),
        order_status=draw(st.none() | st.sampled_from(_STATUSES)),
        hint=draw(_maybe_text),
        sweep=draw(st.none() | _sweep()) if kill_switch else None,
    )
    return command, outcome


@settings(max_examples=300, deadline=None)
@given(drawn=_outcomes())
def test_every_outcome_becomes_a_valid_event_and_its_duplicate_too(
    drawn: tuple[Command, Outcome],
) -> None:
    """Any Outcome the executor may hand over (any route, reason, exchange answer, order
    status, kill-switch report) becomes a result event the schema accepts, by the
    processor's own mapping; and a repeat of the command gets a valid `cancel.duplicate`.
    The full validator and the compiled one agree on each."""
    command, outcome = drawn
    processor = CommandProcessor(
        cast(CancelExecutor, None),  # not asked: _event only maps an outcome to an event
        results_topic="res",
        deadletter_topic="dlq",
        max_command_bytes=65_536,
        clock=lambda: 1_795_260_000_000,
    )
    event: dict[str, Any] = processor._event(command, ORIGIN, outcome, 1_795_259_999_000)
    result_validator().validate(event)
    assert support.result_schema_error(event) is None
    found = first_result_of(event)
    if event.get("reason") in REFUSED:  # a refusal is never remembered
        assert found is None, event
        return
    assert found is not None, event  # every other final result counts for the window
    duplicate = events.duplicate(command, Origin("cmds", 2, 99, b"k"), found.first.as_dict(), 1, 2)
    result_validator().validate(duplicate)
    assert duplicate["first_result"]["type"] == event["type"]
    if event["type"] != events.FAILED:
        assert duplicate["first_result"]["reason"] is None
    else:
        assert duplicate["first_result"]["reason"] == event["reason"]


def test_the_compiled_check_agrees_with_the_full_validator_on_the_examples() -> None:
    for path in sorted((EXAMPLES / "result").glob("*/*.json")):
        event = orjson.loads(path.read_bytes())
        assert (support.result_schema_error(event) is None) == result_validator().is_valid(event)
        assert (path.parent.name == "valid") == result_validator().is_valid(event), path


def test_a_kill_switch_listing_an_order_without_a_known_status_is_a_valid_event(
    result_events: ResultEventCheck,
) -> None:
    """An order the listing showed with a status the worker does not know (or none), whose
    status could not be learned after: it is `unknown`, as last reported, status null."""
    listing = parse_listing(
        [{"strategyId": 12, "strategyStatus": "SOMETHING_NEW"}], Route.UM_CONDITIONAL
    )
    assert listing is not None and listing[0].strategy["status"] is None
    report = SweepReport(
        (RouteReport(Route.UM_CONDITIONAL, RouteOutcome.UNCONFIRMED, listed=1),),
        sweep.classify(listing, {}, {listing[0].key: None}),
    )
    event = events.strategies_canceled(KILL_SWITCH, ORIGIN, report, 2, 10, 11)
    result_validator().validate(event)
    assert event["unknown"][0]["strategy"]["status"] is None and event["complete"] is False
    # A single cancel's result always names the status.
    with pytest.raises(AssertionError, match="strategy/status"):
        events.canceled(CMD, ORIGIN, Route.UM_CONDITIONAL, listing[0].strategy, 1, 10, 11)
    result_events.violations.clear()
