"""Publishing commands from the shell (``cancel-worker send``)."""

from __future__ import annotations

import uuid
from typing import Any

from worker.kafka_io import make_producer
from worker.settings import Settings
from worker.timeutil import now_ms


def build_command(**fields: Any) -> dict[str, Any]:
    """Assemble a command from CLI options; the worker validates it, not this function."""
    if not fields.get("account") or not fields.get("market"):
        raise ValueError("--account and --market are required (or pass --json)")
    command: dict[str, Any] = {
        "command_id": fields.get("command_id") or f"cli-{uuid.uuid4().hex[:16]}",
        "account": fields["account"],
        "market": fields["market"],
        "issued_at": now_ms(),
    }
    for name in (
        "symbol",
        "strategy_id",
        "client_strategy_id",
        "algo_id",
        "client_algo_id",
        "reason",
    ):
        if fields.get(name) is not None:
            command[name] = fields[name]
    if fields.get("expires_in_ms") is not None:
        command["expires_at"] = command["issued_at"] + int(fields["expires_in_ms"])
    command.setdefault("source", "cancel-worker send")
    return command


async def publish(settings: Settings, key: bytes | None, value: bytes) -> str:
    producer = make_producer(settings)
    await producer.start()
    try:
        meta = await producer.send_and_wait(settings.commands_topic, value, key=key)
    finally:
        await producer.stop()
    return f"{meta.topic}[{meta.partition}]@{meta.offset}"
