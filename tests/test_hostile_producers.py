"""Hostile producers, on the real broker and simulator, against a worker in its default
(secure) mode: every command must carry a valid signature of a producer of its producers
file, and name only what that producer is entitled to.

Each refused command ends as ``cancel.failed``/``unauthorized`` (the cause in its detail),
with a dead-letter copy saying why, and sends nothing to the exchange: the simulator sees no
request at all while they are processed, and their orders stay open. Then the entitled
producers' own commands go through, and their results name them.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY

from tests.support import (
    SimControl,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    running_worker,
    signed,
    worker_settings,
    write_producers,
)
from worker.app import ConfigError
from worker.core.timeutil import now_ms
from worker.kafka.io import make_producer
from worker.producers import signed_headers, stanza
from worker.settings import Settings
from worker.tools.devstack import Broker

pytestmark = pytest.mark.integration

DESK_A, DESK_B = "desk-0", "desk-1"  # two desks of the session's accounts file
DESK_A_KEY = Ed25519PrivateKey.generate()  # desk-a's risk engine: desk-a only, no kill switch
DESK_A_ENGINE = "desk-a-engine"
STRANGER_KEY = Ed25519PrivateKey.generate()  # a key no producer of the file holds


def _unauthorized(producer: str, cause: str) -> float:
    value = REGISTRY.get_sample_value(
        "cancel_worker_unauthorized_total", {"producer": producer, "cause": cause}
    )
    return value or 0.0


def _papi_requests(sim: SimControl, since: int) -> list[dict[str, Any]]:
    return [r for r in sim.requests(since) if str(r["path"]).startswith("/papi")]


async def _send(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list[Any]]]) -> None:
    """Each (key, value, headers) as it is: the hostile producer chooses the headers."""
    producer = make_producer(Settings(bootstrap_servers=bootstrap))
    await producer.start()
    try:
        for key, value, headers in records:
            await (await producer.send(topic, value, key=key, headers=headers or None))
    finally:
        await producer.stop()


async def test_unsigned_forged_and_unentitled_commands_send_nothing(
    broker: Broker, sim: SimControl, accounts_file: Path, tmp_path: Path
) -> None:
    producers_file = write_producers(tmp_path, stanza(DESK_A_ENGINE, DESK_A_KEY, [DESK_A]))
    topics = await fresh_topics(broker.bootstrap, partitions=2)
    orders = sim.seed(
        [{"account": DESK_A, "kind": "algo", "symbol": "BTCUSDT"}] * 4
        + [{"account": DESK_B, "kind": "algo", "symbol": "ETHUSDT"}] * 2
        + [{"account": DESK_A, "market": "UM", "symbol": "SOLUSDT"}]
    )
    a1, a2, a3, a4, b1, b2, a_sol = orders

    def value(cmd: dict[str, Any]) -> bytes:
        return orjson.dumps(cmd)

    unsigned = value(command(DESK_A, a1, command_id="hostile-unsigned", symbol="BTCUSDT"))
    forged = value(command(DESK_A, a2, command_id="hostile-forged", symbol="BTCUSDT"))
    # A stranger's key, claiming to be the tests' producer (entitled to everything).
    forged_headers = signed_headers("tests", STRANGER_KEY, forged)
    # A good signature of other bytes: the account swapped after signing.
    original = value(command(DESK_A, b1, command_id="hostile-tampered", symbol="ETHUSDT"))
    tampered = original.replace(DESK_A.encode(), DESK_B.encode())
    tampered_headers = signed_headers(DESK_A_ENGINE, DESK_A_KEY, original)
    unknown = value(command(DESK_A, a3, command_id="hostile-unknown", symbol="BTCUSDT"))
    unknown_headers = signed_headers("nobody", STRANGER_KEY, unknown)
    # desk-a's own key, rightly signed, naming desk-b.
    other_desk = value(command(DESK_B, b2, command_id="hostile-other-desk", symbol="ETHUSDT"))
    other_desk_headers = signed_headers(DESK_A_ENGINE, DESK_A_KEY, other_desk)
    # desk-a's own key, its own account, but a kill switch, which it may not send.
    kill = value(
        {
            "command_id": "hostile-kill-switch",
            "account": DESK_A,
            "market": "UM",
            "symbol": "SOLUSDT",
            "scope": "symbol",
            "issued_at": now_ms(),
        }
    )
    kill_headers = signed_headers(DESK_A_ENGINE, DESK_A_KEY, kill)
    # Not base64 of 64 bytes.
    garbled = value(command(DESK_A, a4, command_id="hostile-garbled", symbol="BTCUSDT"))
    garbled_headers = [("x-producer", b"tests"), ("x-signature", b"not-a-signature")]
    hostile: list[tuple[str, bytes, list[Any], str, str]] = [
        ("hostile-unsigned", unsigned, [], "unknown", "missing_header"),
        ("hostile-forged", forged, forged_headers, "tests", "bad_signature"),
        ("hostile-tampered", tampered, tampered_headers, DESK_A_ENGINE, "bad_signature"),
        ("hostile-unknown", unknown, unknown_headers, "unknown", "unknown_producer"),
        (
            "hostile-other-desk",
            other_desk,
            other_desk_headers,
            DESK_A_ENGINE,
            "account_not_entitled",
        ),
        ("hostile-kill-switch", kill, kill_headers, DESK_A_ENGINE, "kill_switch_not_entitled"),
        ("hostile-garbled", garbled, garbled_headers, "tests", "malformed_header"),
    ]
    before = {(p, c): _unauthorized(p, c) for _, _, _, p, c in hostile}

    settings = worker_settings(
        broker.bootstrap, topics, sim.url, accounts_file, producers_file=producers_file
    )
    async with running_worker(settings):
        since = sim.last_seq()
        await _send(
            broker.bootstrap,
            topics.commands,
            [(f"k-{i}".encode(), v, h) for i, (_, v, h, _, _) in enumerate(hostile)],
        )
        results = events_of(await consume(broker.bootstrap, topics.results, len(hostile)))
        dead = await consume(broker.bootstrap, topics.deadletter, len(hostile), validate=False)
        # Nothing reached the exchange: not a cancel, not a listing, not a status query.
        assert _papi_requests(sim, since) == []

        # The entitled producers' own commands go through, and say who sent them.
        own = command(DESK_A, a1, command_id="own-desk-a", symbol="BTCUSDT")
        own_value = value(own)
        anyone = command(DESK_B, b1, command_id="own-tests", symbol="ETHUSDT")
        await _send(
            broker.bootstrap,
            topics.commands,
            [
                (b"own-a", own_value, signed_headers(DESK_A_ENGINE, DESK_A_KEY, own_value)),
                (b"own-t", value(anyone), signed(value(anyone))),
            ],
        )
        later = events_of(await consume(broker.bootstrap, topics.results, len(hostile) + 2))

    by_id = {e["command_id"]: e for e in results}
    assert sorted(by_id) == sorted(h[0] for h in hostile), results
    for command_id, _, _, producer, cause in hostile:
        event = by_id[command_id]
        assert event["type"] == "cancel.failed" and event["reason"] == "unauthorized", event
        assert event["attempts"] == 0 and event["route"] is None, event
        assert event["detail"].startswith(f"unauthorized ({cause}): "), event
        # Only a producer whose signature was good is named (it was not entitled).
        verified = producer if cause.endswith("_not_entitled") else None
        assert event["producer"] == verified, event
        assert _unauthorized(producer, cause) == before[(producer, cause)] + 1, (producer, cause)
    errors = {}
    for record in dead:
        headers = dict(record.headers)
        at = (int(headers["x-source-partition"]), int(headers["x-source-offset"]))
        errors[at] = headers["x-error"].decode()
    assert len(dead) == len(hostile)
    for record in dead:  # the copy is the record as sent, its headers kept
        assert record.value in {v for _, v, _, _, _ in hostile}
    for event in results:
        error = errors[(event["origin"]["partition"], event["origin"]["offset"])]
        assert error == event["detail"][: len(error)], (error, event)
    # Their orders are all still open: nothing was canceled for a hostile producer.
    book = sim.orders()
    for order in (a2, a3, a4, b2, a_sol):
        assert book[order.get("algo_id") or order["strategy_id"]]["status"] == "NEW", order

    mine = {e["command_id"]: e for e in later if e["command_id"].startswith("own-")}
    assert mine["own-desk-a"]["type"] == "strategy.canceled", mine
    assert mine["own-desk-a"]["producer"] == DESK_A_ENGINE
    assert mine["own-tests"]["type"] == "strategy.canceled", mine
    assert mine["own-tests"]["producer"] == "tests"


async def test_a_signature_must_be_standard_padded_base64_of_the_exact_value(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """Unpadded or URL-safe base64 of a good signature, or a good signature sent twice with
    another, is refused like a forgery; the producer's own well-formed signature passes."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    orders = sim.seed([{"account": DESK_A, "kind": "algo", "symbol": "BTCUSDT"}] * 4)
    cmds = [
        orjson.dumps(command(DESK_A, o, command_id=f"b64-{i}", symbol="BTCUSDT"))
        for i, o in enumerate(orders)
    ]
    good = [dict(signed(v)) for v in cmds]
    unpadded = good[0]["x-signature"].rstrip(b"=")
    urlsafe = base64.urlsafe_b64encode(base64.b64decode(good[1]["x-signature"]))
    records = [
        (b"k", cmds[0], [("x-producer", b"tests"), ("x-signature", unpadded)]),
        (b"k", cmds[1], [("x-producer", b"tests"), ("x-signature", urlsafe)]),
        (b"k", cmds[2], [*signed(cmds[2]), *signed(cmds[3])]),  # two signatures
        (b"k", cmds[3], signed(cmds[3])),
    ]
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        since = sim.last_seq()
        await _send(broker.bootstrap, topics.commands, records)
        results = events_of(await consume(broker.bootstrap, topics.results, len(records)))
        requests = _papi_requests(sim, since)
    by_id = {e["command_id"]: e for e in results}
    for i in range(3):
        assert by_id[f"b64-{i}"]["reason"] == "unauthorized", by_id[f"b64-{i}"]
    assert by_id["b64-3"]["type"] == "strategy.canceled", by_id["b64-3"]
    # The one request sent was the well-signed command's cancel of its own order.
    assert {r["params"]["algoId"] for r in requests} == {str(orders[3]["algo_id"])}, requests


async def test_without_a_producers_file_only_an_explicit_opt_out_takes_unsigned_commands(
    broker: Broker, sim: SimControl, accounts_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Secure by default: no producers file, no worker. REQUIRE_SIGNED_COMMANDS=false takes
    unsigned commands, says at start that anyone who can write the topic can cancel any
    account, and its results name no producer."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    default = worker_settings(broker.bootstrap, topics, sim.url, accounts_file, producers_file=None)
    with pytest.raises(ConfigError, match="CANCEL_WORKER_PRODUCERS_FILE is not set"):
        async with running_worker(default):
            pass
    (order,) = sim.seed([{"account": DESK_B, "kind": "algo", "symbol": "BTCUSDT"}])
    insecure = dataclasses.replace(default, require_signed_commands=False)
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        async with running_worker(insecure):
            cmd = orjson.dumps(command(DESK_B, order, symbol="BTCUSDT"))
            await produce(broker.bootstrap, topics.commands, [(b"k", cmd)], sign=False)
            (event,) = events_of(await consume(broker.bootstrap, topics.results, 1))
    assert event["type"] == "strategy.canceled" and event["producer"] is None, event
    (warning,) = [r for r in caplog.records if "not verified" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "any writer of the commands topic" in warning.getMessage()


# -- the duplicate window: an id claimed in advance, the same id with other content ----------


async def test_an_id_claimed_in_advance_claims_nothing_and_other_content_is_a_conflict(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The window is keyed on (account, command_id) with the command's fingerprint, and
    refusals are never remembered: records that cost nothing cannot claim an id, and a
    command reusing an answered id for other orders is refused, never a duplicate."""
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    victim_order, other_order = sim.seed(
        [{"account": DESK_B, "kind": "algo", "symbol": "BTCUSDT"}] * 2
    )
    (desk_a_order,) = sim.seed([{"account": DESK_A, "kind": "algo", "symbol": "BTCUSDT"}])
    victim = command(DESK_B, victim_order, command_id="victim-42", symbol="BTCUSDT")
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    async with running_worker(settings):
        since = sim.last_seq()
        claims = [
            orjson.dumps({"command_id": "victim-42"}),  # invalid
            orjson.dumps(victim | {"account": "no-such-desk"}),  # unknown_account
        ]
        await produce(broker.bootstrap, topics.commands, [(b"claim", c) for c in claims])
        # Unsigned, for desk-b: unauthorized.
        await _send(broker.bootstrap, topics.commands, [(b"claim", orjson.dumps(victim), [])])
        refused = events_of(await consume(broker.bootstrap, topics.results, 3))
        assert [e["reason"] for e in refused] == [
            "invalid_command",
            "unknown_account",
            "unauthorized",
        ]
        assert _papi_requests(sim, since) == []

        # The real victim-42 is processed: a request, the order canceled.
        await produce(
            broker.bootstrap, topics.commands, [(b"desk-1:BTCUSDT", orjson.dumps(victim))]
        )
        answered = events_of(await consume(broker.bootstrap, topics.results, 4))[3]
        assert answered["type"] == "strategy.canceled" and answered["command_id"] == "victim-42"
        assert answered["fingerprint"] is not None
        assert [r for r in sim.requests(since) if r["method"] == "DELETE"]

        # The same id with other content: id_conflict, nothing sent, the other order open.
        # A producer retry of the command (stamped again): a duplicate, nothing sent.
        since = sim.last_seq()
        conflicting = victim | {"algo_id": other_order["algo_id"]}
        retry = victim | {"issued_at": now_ms()}
        await produce(
            broker.bootstrap,
            topics.commands,
            [
                (b"desk-1:BTCUSDT", orjson.dumps(conflicting)),
                (b"desk-1:BTCUSDT", orjson.dumps(retry)),
            ],
        )
        conflict, duplicate = events_of(await consume(broker.bootstrap, topics.results, 6))[4:]
        assert _papi_requests(sim, since) == []
        assert (conflict["type"], conflict["reason"], conflict["attempts"]) == (
            "cancel.failed",
            "id_conflict",
            0,
        )
        assert conflict["fingerprint"] != answered["fingerprint"]
        assert sim.orders()[other_order["algo_id"]]["status"] == "NEW"
        assert duplicate["type"] == "cancel.duplicate"
        assert duplicate["fingerprint"] == answered["fingerprint"]
        assert duplicate["first_result"]["origin"]["offset"] == answered["origin"]["offset"]

        # The same id for another account is another command.
        mine = command(DESK_A, desk_a_order, command_id="victim-42", symbol="BTCUSDT")
        await produce(broker.bootstrap, topics.commands, [(b"desk-0:BTCUSDT", orjson.dumps(mine))])
        theirs = events_of(await consume(broker.bootstrap, topics.results, 7))[6]
        assert theirs["type"] == "strategy.canceled" and theirs["account"] == DESK_A
