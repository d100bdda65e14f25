"""The exchange boundary under hostile answers, over real loopback HTTP.

A hostile gateway (``tests/hostile_gateway.py``) sits between the PAPI client and the
simulator and answers as broken proxies and overloaded exchanges do: bare 503s, bodies whose
encoding lies, truncated and oversized bodies. Every answer must end in a truthful outcome
(reconciled by query when the cancel may have happened), never an exception, and never leave
the rate governor holding budget for a request that is over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from tests.hostile_gateway import Gateway, Mangle
from tests.support import (
    SimControl,
    command,
    consume,
    events_of,
    fresh_topics,
    produce,
    worker_env,
    worker_settings,
)
from worker.core.commands import Command, Market
from worker.core.errors import (
    MESSAGE_SHOWN_MAX,
    REPLY_MSG_MAX,
    ExchangeError,
    FailureReason,
    NoAnswerError,
)
from worker.core.routes import encode_params
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.governor import GovernorSettings, RateGovernor
from worker.exchange.papi import PapiClient
from worker.executor import CancelExecutor, Outcome, RetryPolicy
from worker.tools.devstack import Broker, start_worker
from worker.tools.sim.app import SimConfig, SimState, seed_order
from worker.tools.sim.server import running_sim, state_from_accounts


@dataclass
class Rig:
    state: SimState
    gateway: Gateway
    governor: RateGovernor
    executor: CancelExecutor

    def algo(self, account: str = "desk-0") -> int:
        order: dict[str, Any] = seed_order(self.state, {"account": account, "kind": "algo"})
        return int(order["algo_id"])

    def cancels_at_exchange(self) -> list[dict[str, Any]]:
        return [r for r in self.state.requests if r["method"] == "DELETE"]

    async def cancel(self, algo_id: int, **fields: Any) -> Outcome:
        return await self.executor.execute(cmd(algo_id=algo_id, **fields), now_ms())


def cmd(**fields: Any) -> Command:
    base: dict[str, Any] = {
        "command_id": f"c-{fields.get('algo_id', 0)}",
        "account": "desk-0",
        "market": Market.UM,
        "issued_at": now_ms(),
    }
    base.update(fields)
    return Command(**base)


@contextlib.asynccontextmanager
async def rig_for(
    accounts: dict[str, Credentials],
    *,
    governor: GovernorSettings | None = None,
    policy: RetryPolicy | None = None,
    max_connections: int = 16,
) -> AsyncIterator[Rig]:
    state = state_from_accounts(accounts, SimConfig())
    gov = RateGovernor(governor or GovernorSettings(), now_ms)
    async with running_sim(state) as sim_url:
        gateway = Gateway(sim_url)
        async with (
            gateway.running() as url,
            PapiClient(
                url, clock=now_ms, timeout_s=2, governor=gov, max_connections=max_connections
            ) as client,
        ):
            executor = CancelExecutor(
                client,
                accounts,
                policy or RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05),
                now_ms,
            )
            yield Rig(state, gateway, gov, executor)


# -- 1. every library error is translated; the governor is settled --------------------------


@pytest.mark.parametrize(
    "mangle",
    [
        Mangle("bad_encoding"),
        Mangle("truncated"),
        Mangle("huge", size=8 * 1024 * 1024),
        Mangle("not_json"),
    ],
    ids=lambda m: m.kind,
)
async def test_unreadable_answers_after_the_cancel_applied_are_reconciled(
    accounts: dict[str, Credentials], mangle: Mangle
) -> None:
    """Five unreadable answers (the cancel applied each time), then normal traffic.

    The exchange did the work but the client cannot read the answer: each ends
    ``strategy.canceled`` confirmed by query. The governor allows five requests in flight in
    a window the exchange has not answered in yet; leaking those five would block every
    command after them.
    """
    async with rig_for(accounts) as rig:
        rig.gateway.queue("DELETE", *[mangle] * 5)
        first = [rig.algo() for _ in range(5)]
        outcomes = [await rig.cancel(algo_id) for algo_id in first]
        assert [(o.canceled, o.confirmed_by) for o in outcomes] == [(True, "query")] * 5
        assert len(rig.cancels_at_exchange()) == 5  # reconciled, never re-sent blindly
        later = [await rig.cancel(rig.algo()) for _ in range(3)]
        assert [(o.canceled, o.confirmed_by) for o in later] == [(True, "cancel")] * 3


async def test_unreadable_answer_before_the_cancel_applied_cancels_again(
    accounts: dict[str, Credentials],
) -> None:
    async with rig_for(accounts) as rig:
        rig.gateway.queue("DELETE", Mangle("bad_encoding", forward=False))
        out = await rig.cancel(rig.algo())
        assert out.canceled and out.confirmed_by == "cancel"
        assert [kind for method, _, kind in rig.gateway.seen if method == "DELETE"] == [
            "bad_encoding",
            "pass",
        ]


# -- 2. a 503 is matched on its JSON msg only ----------------------------------------------


@pytest.mark.parametrize("kind", ["bare_503", "html_503"])
async def test_a_503_without_a_json_msg_after_the_cancel_applied_is_reconciled(
    accounts: dict[str, Credentials], kind: str
) -> None:
    """The gateway forwarded the cancel, then answered a 503 of its own: not "not executed"."""
    async with rig_for(accounts) as rig:
        rig.gateway.queue("DELETE", Mangle(kind))
        out = await rig.cancel(rig.algo())
        assert out.canceled and out.confirmed_by == "query"
        assert len(rig.cancels_at_exchange()) == 1  # no blind second cancel
        assert [r["method"] for r in rig.state.requests] == ["DELETE", "GET"]


# -- 3. a cancel that landed late ----------------------------------------------------------


async def test_a_cancel_that_landed_late_is_reported_as_this_commands_cancel(
    accounts: dict[str, Credentials],
) -> None:
    """Attempt 1 unanswered; the query still shows NEW; attempt 1 then lands; attempt 2 gets
    -2011 and the order is CANCELED. The producer's clock runs a minute ahead, so the cancel
    time is before ``issued_at``: only "an attempt of this command may have landed" tells
    the truth here."""
    async with rig_for(accounts) as rig:
        algo_id = rig.algo()
        rig.gateway.queue("DELETE", Mangle("status", forward=False, status=504))

        def land_late() -> None:
            rig.state.book.cancel_algo("desk-0", algo_id, None, rig.state.server_time())

        rig.gateway.then("GET", land_late)  # after the query answered NEW
        out = await rig.cancel(algo_id, issued_at=now_ms() + 60_000)
        assert out.canceled and out.confirmed_by == "query", out
        assert out.strategy is not None and out.strategy["status"] == "CANCELED"
        assert [k for m, _, k in rig.gateway.seen] == ["status", "pass", "pass", "pass"]


# -- 4. recvWindow and timestamp come from one clock reading; no signing past expires_at ---


async def test_recv_window_is_computed_after_the_governor_wait(
    accounts: dict[str, Credentials],
) -> None:
    """The account's order window is full for ~1 s; the command expires in 2.5 s. The cancel
    is sent after the wait, and the exchange must not accept it after ``expires_at``."""
    window_ms = 1_000
    async with rig_for(
        accounts, governor=GovernorSettings(order_limit=1, order_window_ms=window_ms, guard_ms=50)
    ) as rig:
        assert (await rig.cancel(rig.algo())).canceled  # fills this window
        expires_at = now_ms() + 2_500
        out = await rig.cancel(rig.algo(), expires_at=expires_at)
        assert out.canceled
        sent = rig.cancels_at_exchange()[-1]["params"]
        assert int(sent["timestamp"]) + int(sent["recvWindow"]) <= expires_at


async def test_nothing_is_signed_after_expires_at_while_waiting_for_a_connection(
    accounts: dict[str, Credentials],
) -> None:
    """One connection, held by a slow answer; a command expiring meanwhile is not sent."""
    async with rig_for(accounts, max_connections=1) as rig:
        rig.gateway.queue("DELETE", Mangle("pass", delay_s=1.0))
        slow = asyncio.create_task(rig.cancel(rig.algo()))
        await asyncio.sleep(0.2)
        late = await rig.cancel(rig.algo(), expires_at=now_ms() + 300)
        assert late.reason is FailureReason.EXPIRED and late.attempts == 0, late
        assert (await slow).canceled
        assert len(rig.cancels_at_exchange()) == 1


# -- 5. a connection permit is taken after admission ---------------------------------------


async def test_an_account_waiting_for_its_order_window_does_not_hold_the_connections(
    accounts: dict[str, Credentials],
) -> None:
    async with rig_for(
        accounts,
        governor=GovernorSettings(order_limit=1, order_window_ms=1_500, guard_ms=50),
        max_connections=2,
    ) as rig:
        assert (await rig.cancel(rig.algo())).canceled  # desk-0's window is now full
        done: list[str] = []

        async def cancel(account: str) -> None:
            out = await rig.cancel(rig.algo(account), account=account)
            assert out.canceled, out
            done.append(account)

        waiting = [asyncio.create_task(cancel("desk-0")) for _ in range(2)]
        await asyncio.sleep(0.1)  # both desk-0 cancels are waiting on the governor
        await cancel("desk-1")
        assert done == ["desk-1"]  # went out while desk-0 waited for its window
        await asyncio.gather(*waiting)


# -- 7. an unreachable exchange costs latency, not cancels ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_a_blip_shorter_than_the_deadline_costs_latency_not_cancels(
    accounts: dict[str, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    """The exchange refuses connections for ~1.5 s; cancels issued meanwhile wait and go out
    once it is back. Said once at WARNING each way, and counted."""
    port = _free_port()
    state = state_from_accounts(accounts, SimConfig())
    ids = [
        int(seed_order(state, {"account": "desk-0", "kind": "algo"})["algo_id"]) for _ in range(50)
    ]
    policy = RetryPolicy(backoff_initial_s=0.02, backoff_max_s=0.2, default_deadline_ms=10_000)
    caplog.set_level(logging.INFO)
    outages = REGISTRY.get_sample_value("cancel_worker_exchange_unreachable_total") or 0.0
    async with PapiClient(
        f"http://127.0.0.1:{port}",
        clock=now_ms,
        timeout_s=2,
        governor=RateGovernor(GovernorSettings(), now_ms),
    ) as client:
        executor = CancelExecutor(client, accounts, policy, now_ms)
        tasks = [asyncio.create_task(executor.execute(cmd(algo_id=i), now_ms())) for i in ids]
        await asyncio.sleep(1.5)
        assert not any(t.done() for t in tasks)
        assert REGISTRY.get_sample_value("cancel_worker_exchange_reachable") == 0
        async with running_sim(state, port=port):
            outcomes = await asyncio.gather(*tasks)
    assert all(o.canceled for o in outcomes), [o.reason for o in outcomes if not o.canceled]
    assert all(o.attempts == 1 for o in outcomes)  # refused tries are not attempts
    assert REGISTRY.get_sample_value("cancel_worker_exchange_reachable") == 1
    assert REGISTRY.get_sample_value("cancel_worker_exchange_unreachable_total") == outages + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("unreachable" in m for m in warnings) == 1, warnings
    assert sum("reachable again" in m for m in warnings) == 1, warnings
    assert not any(
        "retrying" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
    )


# -- 7, end to end: a worker process rides out an exchange that refuses connections ---------


async def test_worker_process_rides_out_an_exchange_refusing_connections(
    broker: Broker, sim: SimControl, accounts_file: Path
) -> None:
    """The real worker, the real broker, the simulator behind a gateway that stops listening
    for 4 s while 300 cancels arrive: every one is canceled once it is back, and the worker
    says so twice (down, back), not once per command and try."""
    topics = await fresh_topics(broker.bootstrap, partitions=3)
    orders = sim.seed([{"account": f"desk-{i % 5}", "kind": "algo"} for i in range(320)])
    gateway = Gateway(sim.url)
    async with gateway.running() as papi_url:
        settings = worker_settings(
            broker.bootstrap, topics, papi_url, accounts_file, time_url=f"{sim.url}/fapi/v1/time"
        )
        worker = start_worker(worker_env(settings))
        try:
            records = [
                (o["algo_id"].to_bytes(8, "big"), orjson.dumps(command(f"desk-{i % 5}", o)))
                for i, o in enumerate(orders)
            ]
            await produce(broker.bootstrap, topics.commands, records[:20])
            assert len(await consume(broker.bootstrap, topics.results, 20)) == 20
            await gateway.stop()
            await produce(broker.bootstrap, topics.commands, records[20:])
            await asyncio.sleep(4.0)
            await gateway.start()
            results = await consume(broker.bootstrap, topics.results, 320, timeout_s=90)
        finally:
            worker.stop()
    events = events_of(results)
    assert len(events) == 320
    assert collections.Counter(e["type"] for e in events) == {"strategy.canceled": 320}
    assert len(sim.cancels()) >= 320
    output = worker.output()
    assert output.count("exchange unreachable") == 1, output[-3000:]
    assert output.count("exchange reachable again") == 1, output[-3000:]
    assert "retrying command_id" not in output


# -- 8. what the exchange's answer can make the client do -----------------------------------


async def test_an_answer_dripped_a_byte_at_a_time_is_no_answer_within_the_attempt_timeout(
    accounts: dict[str, Credentials],
) -> None:
    """The cancel applied; its answer comes a byte every 30 ms, each byte well within the
    read timeout, the whole answer taking several times HTTP_TIMEOUT_S (2 s here). The
    attempt ends at its overall bound as "no answer" (the client closes the connection with
    the answer still dripping) and the cancel is confirmed by query, not by the answer."""
    async with rig_for(accounts) as rig:
        rig.gateway.queue("DELETE", Mangle("drip", interval_s=0.03, size=300))
        out = await rig.cancel(rig.algo())
        assert out.canceled and out.confirmed_by == "query", out
        [drip] = rig.gateway.drips
        await asyncio.wait_for(drip.ended.wait(), 30)
        assert drip.total * 0.03 > 2 * 2  # the whole answer would take over twice the bound
        assert drip.client_closed and drip.sent < drip.total, drip
        assert [r["method"] for r in rig.state.requests] == ["DELETE", "GET"]


async def test_a_dripped_answer_is_cut_by_papi_client_directly(
    accounts: dict[str, Credentials],
) -> None:
    """The same through the PAPI client alone: ``NoAnswerError`` (ambiguous), and the
    dripping server sees its client go before the answer is complete."""
    state = state_from_accounts(accounts, SimConfig())
    algo_id = int(seed_order(state, {"account": "desk-0", "kind": "algo"})["algo_id"])
    async with running_sim(state) as sim_url:
        gateway = Gateway(sim_url)
        async with gateway.running() as url, PapiClient(url, clock=now_ms, timeout_s=1) as client:
            gateway.queue("DELETE", Mangle("drip", interval_s=0.03, size=300))
            with pytest.raises(NoAnswerError, match="attempt timeout"):
                await client.signed(
                    accounts["desk-0"],
                    "DELETE",
                    "/papi/v1/um/algo/order",
                    encode_params([("algoId", str(algo_id))]),
                    is_order=True,
                )
            [drip] = gateway.drips
            await asyncio.wait_for(drip.ended.wait(), 30)
            assert drip.total * 0.03 > 2 * 1
            assert drip.client_closed and drip.sent < drip.total, drip


@pytest.mark.parametrize(
    "headers",
    [
        (("X-MBX-USED-WEIGHT-1M", "\u00b2"),),  # "²".isdigit() is True; int("²") is an error
        (("X-MBX-ORDER-COUNT-1M", "1\u00b3"),),  # "1³": isdigit() too
        (("X-MBX-USED-WEIGHT-1M", "1e3"), ("Retry-After", "inf")),
    ],
    ids=["superscript-two", "one-cubed", "float-forms"],
)
async def test_count_headers_that_are_not_ascii_digits_do_not_spoil_a_successful_cancel(
    accounts: dict[str, Credentials], headers: tuple[tuple[str, str], ...]
) -> None:
    """A confirmed cancel whose answer carries a count the client cannot read as ASCII
    digits: the cancel is confirmed by its answer (the value is ignored, as if absent),
    not turned into "no answer" and a reconciliation."""
    async with rig_for(accounts) as rig:
        rig.gateway.queue("DELETE", Mangle("headers", headers=headers))
        out = await rig.cancel(rig.algo())
        assert out.canceled and out.confirmed_by == "cancel", out
        assert [r["method"] for r in rig.state.requests] == ["DELETE"]
        later = await rig.cancel(rig.algo())  # the governor still works
        assert later.canceled and later.confirmed_by == "cancel"


async def test_a_429_with_retry_after_inf_is_a_default_pause_then_the_cancel_goes_out(
    accounts: dict[str, Credentials],
) -> None:
    """``Retry-After: inf`` (``float`` reads it; ``int(inf)`` raises OverflowError) on a 429
    that did not execute the cancel: read as no Retry-After (the default pause), and the
    cancel is sent again and confirmed."""
    async with rig_for(accounts) as rig:
        rig.gateway.queue(
            "DELETE",
            Mangle("headers", forward=False, status=429, headers=(("Retry-After", "inf"),)),
        )
        out = await rig.cancel(rig.algo())
        assert out.canceled and out.confirmed_by == "cancel", out
        assert rig.governor.stats.pauses_429 == 1
        assert [k for m, _, k in rig.gateway.seen if m == "DELETE"] == ["headers", "pass"]


async def test_an_exchange_message_is_bounded_and_escaped_in_the_error_logs_and_result(
    accounts: dict[str, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    """A 400 whose JSON ``msg`` is 100 KB with line breaks and terminal escapes: the result's
    ``msg`` is at most REPLY_MSG_MAX characters with the controls escaped, and no log line
    holds a raw control character or more than a few hundred characters of the message."""
    evil = "line one\nFAKE 00:00 ERROR injected\x1b[2J" + "m" * 100_000
    error = ExchangeError(400, -1102, evil)
    assert error.msg is not None and len(error.msg) == REPLY_MSG_MAX
    assert "\n" not in error.msg and "\x1b" not in error.msg
    assert "\\x0a" in error.msg and "\\x1b" in error.msg
    assert len(str(error)) < MESSAGE_SHOWN_MAX + 100
    reply = error.reply.as_dict()
    assert reply["msg"] == error.msg
    caplog.set_level(logging.INFO)
    logging.getLogger("worker.executor").warning("command_id=x: %s", error)
    line = caplog.records[-1].getMessage()
    assert "\n" not in line and "\x1b" not in line and len(line) < MESSAGE_SHOWN_MAX + 200
