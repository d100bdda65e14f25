"""Publishing commands from the shell (``cancel-worker send``)."""

from __future__ import annotations

from typing import Any

from worker.client import build_command as _build
from worker.kafka_io import make_producer
from worker.settings import Settings


def build_command(**fields: Any) -> dict[str, Any]:
    """Assemble a command from CLI options; the worker validates it, not this function.
    ``all``: the kill switch (``scope: "symbol"``) on ``symbol``."""
    if not fields.get("account") or not fields.get("market"):
        raise ValueError("--account and --market are required (or pass --json)")
    if fields.get("all"):
        if not fields.get("symbol"):
            raise ValueError("--all needs --symbol: it cancels every open order on one symbol")
        named = ("strategy_id", "client_strategy_id", "algo_id", "client_algo_id")
        if any(fields.get(n) is not None for n in named):
            raise ValueError("--all cancels every order on the symbol: give no order id")
    return _build(
        fields["account"],
        fields["market"],
        symbol=fields.get("symbol"),
        strategy_id=fields.get("strategy_id"),
        client_strategy_id=fields.get("client_strategy_id"),
        algo_id=fields.get("algo_id"),
        client_algo_id=fields.get("client_algo_id"),
        all_on_symbol=bool(fields.get("all")),
        command_id=fields.get("command_id") or None,
        expires_in_ms=fields.get("expires_in_ms"),
        reason=fields.get("reason"),
        source="cancel-worker send",
    )


async def publish(settings: Settings, key: bytes | None, value: bytes) -> str:
    producer = make_producer(settings)
    await producer.start()
    try:
        meta = await producer.send_and_wait(settings.commands_topic, value, key=key)
    finally:
        await producer.stop()
    return f"{meta.topic}[{meta.partition}]@{meta.offset}"
