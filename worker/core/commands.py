"""Decoding and validating cancel commands (pure).

``decode`` turns the raw bytes of one Kafka record into either a :class:`Command`, which is
safe to build a request from, or an :class:`InvalidCommand`, which carries a short,
bounded explanation and whatever identifying fields could be salvaged for the failure
event. It never raises for bad input.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import orjson
from jsonschema.exceptions import ValidationError, best_match

from worker.core.contracts import COMMAND_SCHEMA, command_validator, fast_check, load_schema

DEFAULT_MAX_COMMAND_BYTES = 64 * 1024
_DETAIL_MAX = 300

_COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ACCOUNT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SYMBOL = re.compile(r"[A-Z0-9_]{1,32}")


class Market(enum.StrEnum):
    UM = "UM"
    CM = "CM"


class Scope(enum.StrEnum):
    """What a command cancels when it names no order."""

    SYMBOL = "symbol"  # every open order of the account on the symbol (the kill switch)


@dataclass(frozen=True, slots=True)
class Command:
    """A validated cancel command: exactly one identifier is set, or ``scope`` (then
    ``symbol`` is set and no identifier)."""

    command_id: str
    account: str
    market: Market
    issued_at: int
    symbol: str | None = None
    strategy_id: int | None = None
    client_strategy_id: str | None = None
    algo_id: int | None = None
    client_algo_id: str | None = None
    expires_at: int | None = None
    reason: str | None = None
    source: str | None = None
    scope: Scope | None = None

    @property
    def is_sweep(self) -> bool:
        """A kill switch: every open order on the symbol, not one order."""
        return self.scope is not None


@dataclass(frozen=True, slots=True)
class InvalidCommand:
    """A record that is not a valid command; fields are set only where they are well-formed."""

    detail: str
    command_id: str | None = None
    account: str | None = None
    market: Market | None = None
    symbol: str | None = None


def _clip(text: str, limit: int = _DETAIL_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _salvage(obj: object, detail: str) -> InvalidCommand:
    """Keep the identifying fields that are individually well-formed, for the failure event."""
    if not isinstance(obj, dict):
        return InvalidCommand(detail=detail)

    def pick(name: str, pattern: re.Pattern[str]) -> str | None:
        value = obj.get(name)
        return value if isinstance(value, str) and pattern.fullmatch(value) else None

    market_raw = obj.get("market")
    market = Market(market_raw) if market_raw in ("UM", "CM") else None
    return InvalidCommand(
        detail=detail,
        command_id=pick("command_id", _COMMAND_ID),
        account=pick("account", _ACCOUNT),
        market=market,
        symbol=pick("symbol", _SYMBOL),
    )


_NAMES_SHOWN = 5
_NAME_MAX = 40


def _names(names: list[str]) -> str:
    """Field names from a record, as a detail quotes them: each quoted (escaped) and cut,
    the first few only (a record can carry thousands, each as long as the record allows)."""
    shown = [n if len(n) <= _NAME_MAX else n[: _NAME_MAX - 3] + "..." for n in names]
    more = len(names) > _NAMES_SHOWN
    listed = ", ".join(repr(n) for n in shown[:_NAMES_SHOWN])  # repr escapes controls
    return f"{listed}, ..." if more else listed


def _describe(error: ValidationError) -> str:
    """A bounded description of a schema violation that never echoes a large value."""
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    keyword = str(error.validator)
    if keyword == "oneOf" and not error.absolute_path:
        return (
            "(root): exactly one of strategy_id, client_strategy_id, algo_id, "
            "client_algo_id or scope is required"
        )
    if keyword == "additionalProperties":
        known = load_schema(COMMAND_SCHEMA)["properties"]
        instance = error.instance if isinstance(error.instance, dict) else {}
        extra = sorted(set(instance) - set(known))
        return _clip(f"(root): {len(extra)} unknown field(s): {_names(extra)}")
    if keyword == "required":
        return _clip(f"{where}: {error.message}")
    if keyword == "const" and list(error.absolute_path) == ["market"]:
        return "market: algo identifiers are only valid for market UM"
    return _clip(f"{where}: failed '{keyword}' ({_clip(error.message, 120)})")


def decode(
    raw: bytes | None, max_bytes: int = DEFAULT_MAX_COMMAND_BYTES
) -> Command | InvalidCommand:
    """Decode and validate one record value. Never raises on bad input."""
    if raw is None:
        return InvalidCommand(detail="empty record (null value)")
    if len(raw) > max_bytes:
        return InvalidCommand(
            detail=f"payload of {len(raw)} bytes exceeds the {max_bytes}-byte limit"
        )
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return InvalidCommand(detail=_clip(f"not valid UTF-8 JSON: {exc}"))
    if not isinstance(obj, dict):
        return InvalidCommand(detail=f"command must be a JSON object, got {type(obj).__name__}")
    if not fast_check(COMMAND_SCHEMA)(obj):
        error = best_match(command_validator().iter_errors(obj))
        if error is not None:
            return _salvage(obj, _describe(error))
        # The two validators disagree: refuse, and say so (never build a request from it).
        return _salvage(obj, "(root): refused by the compiled schema check")
    return Command(
        command_id=obj["command_id"],
        account=obj["account"],
        market=Market(obj["market"]),
        issued_at=obj["issued_at"],
        symbol=obj.get("symbol"),
        strategy_id=obj.get("strategy_id"),
        client_strategy_id=obj.get("client_strategy_id"),
        algo_id=obj.get("algo_id"),
        client_algo_id=obj.get("client_algo_id"),
        expires_at=obj.get("expires_at"),
        reason=obj.get("reason"),
        source=obj.get("source"),
        scope=Scope(obj["scope"]) if "scope" in obj else None,
    )


def encode(command: Command) -> bytes:
    """Serialize a command for the commands topic (used by ``send`` and tests)."""
    body = {
        "command_id": command.command_id,
        "account": command.account,
        "market": command.market.value,
        "symbol": command.symbol,
        "strategy_id": command.strategy_id,
        "client_strategy_id": command.client_strategy_id,
        "algo_id": command.algo_id,
        "client_algo_id": command.client_algo_id,
        "scope": command.scope.value if command.scope is not None else None,
        "issued_at": command.issued_at,
        "expires_at": command.expires_at,
        "reason": command.reason,
        "source": command.source,
    }
    return orjson.dumps({k: v for k, v in body.items() if v is not None})
