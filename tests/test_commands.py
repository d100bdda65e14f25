"""Decoding and validation of commands (pure)."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.commands import Command, InvalidCommand, Market, decode, encode
from worker.core.contracts import COMMAND_SCHEMA, command_validator, fast_check, load_schema

BASE = {
    "command_id": "c-1",
    "account": "desk-a",
    "market": "UM",
    "symbol": "BTCUSDT",
    "issued_at": 1795260543136,
}


def _decode(**fields: object) -> Command | InvalidCommand:
    return decode(orjson.dumps({**BASE, **fields}))


def test_valid_conditional_command() -> None:
    cmd = _decode(strategy_id=123, expires_at=1795260549999, reason="dd", source="eng")
    assert cmd == Command(
        "c-1",
        "desk-a",
        Market.UM,
        1795260543136,
        symbol="BTCUSDT",
        strategy_id=123,
        expires_at=1795260549999,
        reason="dd",
        source="eng",
    )


def test_round_trip_through_encode() -> None:
    cmd = _decode(client_strategy_id="abc/def:1")
    assert isinstance(cmd, Command)
    assert decode(encode(cmd)) == cmd


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"strategy_id": 1, "client_strategy_id": "a"}, "exactly one"),
        ({"strategy_id": 1, "algo_id": 2}, "exactly one"),
        ({}, "exactly one"),
        ({"strategy_id": "1"}, "strategy_id"),
        ({"strategy_id": 1.0}, "strategy_id"),
        ({"strategy_id": True}, "strategy_id"),
        ({"strategy_id": 0}, "strategy_id"),
        ({"strategy_id": -5}, "strategy_id"),
        ({"strategy_id": 1, "symbol": "BTCUSDT&strategyId=9"}, "symbol"),
        ({"strategy_id": 1, "symbol": "BTC=USDT"}, "symbol"),
        ({"strategy_id": 1, "symbol": "btcusdt"}, "symbol"),
        ({"client_strategy_id": "a&b=c"}, "client_strategy_id"),
        ({"client_strategy_id": "a b"}, "client_strategy_id"),
        ({"strategy_id": 1, "market": "XM"}, "market"),
        ({"algo_id": 1, "market": "CM"}, "market UM"),
        ({"strategy_id": 1, "issued_at": "now"}, "issued_at"),
        ({"strategy_id": 1, "command_id": ""}, "command_id"),
        ({"strategy_id": 1, "command_id": "x" * 65}, "command_id"),
        ({"strategy_id": 1, "account": "a=b"}, "account"),
        ({"strategy_id": 1, "unexpected": 1}, "unknown field"),
    ],
)
def test_invalid_commands_explain_themselves(fields: dict[str, object], needle: str) -> None:
    result = _decode(**fields)
    assert isinstance(result, InvalidCommand)
    assert needle in result.detail, result.detail
    assert len(result.detail) <= 300


def test_symbol_is_required_for_conditional_routes() -> None:
    raw = orjson.dumps({k: v for k, v in BASE.items() if k != "symbol"} | {"strategy_id": 1})
    result = decode(raw)
    assert isinstance(result, InvalidCommand) and "symbol" in result.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1,2]",
        b"null",
        b"42",
        b'"str"',
        b'{"command_id": "c-1"',
        b"{" * 5000,
        b'{"a": NaN}',
    ],
)
def test_undecodable_records(raw: bytes) -> None:
    result = decode(raw)
    assert isinstance(result, InvalidCommand)
    assert result.command_id is None


def test_null_value_and_oversized_payload() -> None:
    assert isinstance(decode(None), InvalidCommand)
    big = orjson.dumps({**BASE, "strategy_id": 1, "reason": "x" * 1_000_000})
    result = decode(big)
    assert isinstance(result, InvalidCommand)
    assert "exceeds" in result.detail


def test_salvaged_fields_are_only_well_formed_ones() -> None:
    result = _decode(strategy_id="1", command_id="ok-id", account="a&b", symbol="BTC&")
    assert isinstance(result, InvalidCommand)
    assert result.command_id == "ok-id"
    assert result.account is None and result.symbol is None
    assert result.market is Market.UM


def test_huge_value_is_not_echoed_in_detail() -> None:
    result = _decode(strategy_id=1, symbol="A" * 100_000)
    assert isinstance(result, InvalidCommand)
    assert len(result.detail) <= 300


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "command_id",
        "account",
        "market",
        "symbol",
        "strategy_id",
        "client_strategy_id",
        "algo_id",
        "client_algo_id",
        "scope",
        "issued_at",
        "expires_at",
        "reason",
        "source",
    ]
)


def _schema_pattern(field: str) -> str:
    schema = load_schema(COMMAND_SCHEMA)
    prop = schema["properties"][field]
    if "$ref" in prop:
        prop = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
    pattern = prop["pattern"]
    assert isinstance(pattern, str)
    assert pattern.startswith("^") and pattern.endswith("$")
    return pattern[1:-1]


# The string fields that go into a request, an event key or a log line, each with the body
# of its schema pattern (`^body$`): the whole value must match the body.
PATTERNED = {
    name: re.compile(_schema_pattern(name))
    for name in ("command_id", "account", "symbol", "client_strategy_id", "client_algo_id")
}


def _assert_fields_fullmatch(command: Command) -> None:
    for name, pattern in PATTERNED.items():
        value = getattr(command, name)
        assert value is None or pattern.fullmatch(value), (name, value)


@st.composite
def valid_commands(draw: st.DrawFn) -> dict[str, Any]:
    """Commands the schema accepts, of every identifier kind and the kill switch."""

    def text(name: str) -> str:
        return draw(st.from_regex(PATTERNED[name], fullmatch=True))

    ident = draw(
        st.sampled_from(["strategy_id", "client_strategy_id", "algo_id", "client_algo_id", "scope"])
    )
    algo = ident in ("algo_id", "client_algo_id")
    obj: dict[str, Any] = {
        "command_id": text("command_id"),
        "account": text("account"),
        "market": "UM" if algo else draw(st.sampled_from(["UM", "CM"])),
        "issued_at": draw(st.integers(0, 253402300799999)),
    }
    if ident in ("strategy_id", "algo_id"):
        obj[ident] = draw(st.integers(1, 2**63 - 1))
    elif ident == "scope":
        obj[ident] = "symbol"
    else:
        obj[ident] = text(ident)
    if not algo or draw(st.booleans()):
        obj["symbol"] = text("symbol")
    return obj


@settings(max_examples=200, deadline=None)
@given(valid_commands())
def test_valid_commands_decode_to_fields_that_fullmatch(obj: dict[str, Any]) -> None:
    result = decode(orjson.dumps(obj))
    assert isinstance(result, Command), result
    _assert_fields_fullmatch(result)


# Every C0 and C1 control character, DEL, and the Unicode line and paragraph separators.
control_chars = st.characters(categories=["Cc"]) | st.sampled_from(["\u2028", "\u2029"])


@settings(max_examples=400, deadline=None)
@given(valid_commands(), st.data())
def test_a_control_character_in_a_patterned_field_is_always_rejected(
    obj: dict[str, Any], data: st.DataObject
) -> None:
    r"""A trailing "\n" (Python's `$` matches before it), "\r\n", or any control character
    anywhere: never a Command, never salvaged into the failure event."""
    field = data.draw(st.sampled_from(sorted(PATTERNED.keys() & obj.keys())), label="field")
    value: str = obj[field]
    extra = data.draw(st.sampled_from(["\n", "\r\n", "\n\n"]) | control_chars, label="extra")
    at = data.draw(st.sampled_from([len(value), 0]) | st.integers(0, len(value)), label="at")
    bad = {**obj, field: value[:at] + extra + value[at:]}
    result = decode(orjson.dumps(bad))
    assert isinstance(result, InvalidCommand), (field, bad[field])
    assert not command_validator().is_valid(bad)
    assert getattr(result, field, None) is None
    assert field in result.detail, result.detail


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        field_names,
        json_values
        | st.sampled_from(
            [
                "UM",
                "CM",
                "BTCUSDT",
                "c-1",
                5,
                1795260543136,
                "BTCUSDT\n",
                "c-1\n",
                "a\r\n",
                "symbol",
            ]
        ),
        max_size=8,
    )
)
def test_decode_agrees_with_the_schema(obj: dict[str, object]) -> None:
    """The code accepts exactly what the schema accepts, and never builds from junk."""
    result = decode(orjson.dumps(obj))
    assert isinstance(result, Command) == command_validator().is_valid(obj)
    if isinstance(result, Command):
        ids = [result.strategy_id, result.client_strategy_id, result.algo_id, result.client_algo_id]
        assert sum(i is not None for i in ids) + (result.scope is not None) == 1
        assert result.scope is None or result.symbol is not None
        _assert_fields_fullmatch(result)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_never_raises_on_bytes(raw: bytes) -> None:
    assert isinstance(decode(raw), Command | InvalidCommand)


# -- the compiled check on the hot path agrees with the full validator -----------------------

mutations = st.sampled_from(
    [
        5.0,
        1.5,
        -1,
        0,
        2**63,
        2**63 - 1,
        253402300799999,
        253402300800000,
        True,
        None,
        "",
        "x" * 65,
        "BTCUSDT\n",
        "UM",
        "CM",
        "é",
        "symbol",
        "Symbol",
        [],
        {},
    ]
)


@settings(max_examples=600, deadline=None)
@given(
    valid_commands(),
    st.lists(st.tuples(field_names | st.text(max_size=8), mutations | json_values), max_size=3),
    st.lists(field_names, max_size=2),
)
def test_the_compiled_check_agrees_with_the_full_validator(
    obj: dict[str, Any], changes: list[tuple[str, object]], dropped: list[str]
) -> None:
    """The hot path's check (compiled) and the full jsonschema validator (the oracle) accept
    exactly the same commands, near-valid ones included."""
    candidate: dict[str, object] = {**obj, **dict(changes)}
    for name in dropped:
        candidate.pop(name, None)
    for instance in (obj, candidate):
        assert fast_check(COMMAND_SCHEMA)(instance) == command_validator().is_valid(instance), (
            instance
        )


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values | mutations, max_size=8))
def test_the_compiled_check_agrees_on_arbitrary_objects(obj: dict[str, object]) -> None:
    assert fast_check(COMMAND_SCHEMA)(obj) == command_validator().is_valid(obj)
