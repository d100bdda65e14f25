"""The schemas, their examples and the code agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import events, normalize
from worker.commands import Command, InvalidCommand, Market, Scope, decode
from worker.contracts import (
    COMMAND_SCHEMA,
    RESULT_SCHEMA,
    StrictValidator,
    command_validator,
    ecma_anchors,
    load_schema,
    result_validator,
    schema_dir,
)
from worker.dedup import first_result_of
from worker.errors import ExchangeReply, FailureReason
from worker.events import Origin
from worker.routes import Route
from worker.sweep import RouteOutcome, RouteReport, SweepReport, Swept, parse_listing

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
