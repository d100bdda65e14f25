"""The simulator's checks and the executor's decisions, over real loopback HTTP.

The simulator runs in this event loop (uvicorn on 127.0.0.1); requests are real.
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support import HMAC_ACCOUNTS
from worker.core.commands import Command, Market
from worker.core.errors import FailureReason, NotSentError
from worker.core.routes import Route, encode_params
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.governor import GovernorSettings, RateGovernor
from worker.exchange.papi import PapiClient
from worker.exchange.signing import HmacSigner, append_signature
from worker.executor import CancelExecutor, RetryPolicy
from worker.tools.sim.app import Fault, SimConfig, SimState, seed_order
from worker.tools.sim.faults import Profile
from worker.tools.sim.server import running_sim, state_from_accounts


@dataclass
class Rig:
    url: str
    state: SimState
    accounts: dict[str, Credentials]
    executor: CancelExecutor
    http: httpx.AsyncClient

    def seed(self, **spec: Any) -> dict[str, Any]:
        return seed_order(self.state, {"account": "desk-0", **spec})

    def cancel_log(self) -> list[dict[str, Any]]:
        return [r for r in self.state.requests if r["method"] == "DELETE"]


@pytest.fixture
async def rig(accounts: dict[str, Credentials]) -> AsyncIterator[Rig]:
    state = state_from_accounts(accounts, SimConfig())
    policy = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05)
    async with (
        running_sim(state) as url,
        PapiClient(url, clock=now_ms, timeout_s=2) as client,
        httpx.AsyncClient(base_url=url) as http,
    ):
        yield Rig(url, state, accounts, CancelExecutor(client, accounts, policy, now_ms), http)


def cmd(**fields: Any) -> Command:
    base: dict[str, Any] = {
        "command_id": "c1",
        "account": "desk-0",
        "market": Market.UM,
        "issued_at": now_ms(),
    }
    base.update(fields)
    return Command(**base)


async def _signed(
    rig: Rig,
    method: str,
    path: str,
    params: list[tuple[str, str]],
    secret: str | None = None,
    api_key: str | None = None,
) -> httpx.Response:
    key, real_secret = HMAC_ACCOUNTS["desk-0"]
    query = append_signature(encode_params(params), HmacSigner(secret or real_secret))
    return await rig.http.request(
        method, f"{path}?{query}", headers={"X-MBX-APIKEY": api_key or key}
    )


# -- simulator checks -----------------------------------------------------------------------


async def test_sim_checks_key_signature_timestamp_and_params(rig: Rig) -> None:
    order = rig.seed(market="UM", symbol="BTCUSDT")
    path = "/papi/v1/um/conditional/order"
    ok = [
        ("symbol", "BTCUSDT"),
        ("strategyId", str(order["strategy_id"])),
        ("timestamp", str(now_ms())),
    ]
    cases = [
        (await _signed(rig, "DELETE", path, ok, api_key="nope"), 401, -2015),
        (await _signed(rig, "DELETE", path, ok, secret="wrong"), 400, -1022),
        (
            await _signed(rig, "DELETE", path, [*ok[:2], ("timestamp", str(now_ms() - 6000))]),
            400,
            -1021,
        ),
        (
            await _signed(rig, "DELETE", path, [*ok[:2], ("timestamp", str(now_ms() + 1500))]),
            400,
            -1021,
        ),
        (
            await _signed(
                rig,
                "DELETE",
                path,
                [*ok[:2], ("timestamp", str(now_ms())), ("recvWindow", "70000")],
            ),
            400,
            -1131,
        ),
        (await _signed(rig, "DELETE", path, [ok[0], ok[2]]), 400, -1102),
        (await _signed(rig, "DELETE", path, [("symbol", "NOPE"), *ok[1:]]), 400, -1121),
        (await _signed(rig, "DELETE", path, [ok[0], ("strategyId", "12a"), ok[2]]), 400, -1100),
        (await _signed(rig, "DELETE", path, [ok[0], ("strategyId", "77"), ok[2]]), 400, -2011),
        (await _signed(rig, "GET", "/papi/v1/um/conditional/orderHistory", ok), 400, -2013),
    ]
    for response, status, code in cases:
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
        assert "X-MBX-USED-WEIGHT-1M" in response.headers
    missing_key = await rig.http.delete(f"{path}?symbol=BTCUSDT")
    assert missing_key.json()["code"] == -2014

    good = await _signed(rig, "DELETE", path, ok)
    assert good.status_code == 200 and good.json()["strategyStatus"] == "CANCELED"
    assert int(good.headers["X-MBX-ORDER-COUNT-1M"]) >= 1
    weights = [int(r.headers["X-MBX-USED-WEIGHT-1M"]) for r, _, _ in cases]
    assert weights == sorted(weights)  # the used weight grows with every request
    history = await _signed(rig, "GET", "/papi/v1/um/conditional/orderHistory", ok)
    assert history.json()["strategyStatus"] == "CANCELED"


async def test_sim_retired_route_answers_404(rig: Rig) -> None:
    rig.state.config.um_conditional_enabled = False
    response = await _signed(
        rig,
        "DELETE",
        "/papi/v1/um/conditional/order",
        [("symbol", "BTCUSDT"), ("strategyId", "1"), ("timestamp", str(now_ms()))],
    )
    assert response.status_code == 404
    cm = await _signed(
        rig,
        "DELETE",
        "/papi/v1/cm/conditional/order",
        [("symbol", "BTCUSD_PERP"), ("strategyId", "1"), ("timestamp", str(now_ms()))],
    )
    assert cm.json()["code"] == -2011  # CM conditional is not retired


# -- executor decisions ---------------------------------------------------------------------


async def test_each_route_cancels_with_evidence(rig: Rig) -> None:
    um = rig.seed(market="UM", symbol="ETHUSDT", quantity="1.000")
    cm = rig.seed(market="CM", symbol="BTCUSD_PERP")
    algo = rig.seed(kind="algo")
    out_um = await rig.executor.execute(
        cmd(symbol="ETHUSDT", strategy_id=um["strategy_id"]), now_ms()
    )
    out_cm = await rig.executor.execute(
        cmd(market=Market.CM, symbol="BTCUSD_PERP", client_strategy_id=cm["client_strategy_id"]),
        now_ms(),
    )
    out_algo = await rig.executor.execute(cmd(algo_id=algo["algo_id"]), now_ms())
    assert out_um.canceled and out_um.route is Route.UM_CONDITIONAL
    assert out_um.strategy is not None and out_um.strategy["orig_qty"] == "1.000"
    assert out_cm.canceled and out_cm.route is Route.CM_CONDITIONAL
    assert out_algo.canceled and out_algo.strategy is not None
    assert out_algo.strategy["algo_id"] == algo["algo_id"]
    assert {c.order_id for c in rig.state.book.cancels} == {
        um["strategy_id"],
        cm["strategy_id"],
        algo["algo_id"],
    }


async def test_answers_are_freed_once_read_without_the_cyclic_collector(rig: Rig) -> None:
    """httpx binds a response's stream to the response (a reference cycle): the client
    breaks it once the answer is read, so each answer is freed at once instead of waiting,
    with its request, for the garbage collector (which walked them all, at a cost)."""
    orders = [rig.seed(kind="algo") for _ in range(20)]
    gc.collect()
    gc.disable()
    try:
        for order in orders:
            outcome = await rig.executor.execute(cmd(algo_id=order["algo_id"]), now_ms())
            assert outcome.canceled
        left = [o for o in gc.get_objects() if isinstance(o, httpx.Response | httpx.Request)]
    finally:
        gc.enable()
    assert left == []


async def test_retry_carries_fresh_timestamp_and_signature(rig: Rig) -> None:
    order = rig.seed(kind="algo")
    rig.state.faults.extend(
        [
            Fault(503, None, "Service Unavailable.", body="json"),
            Fault(400, -1000, "An unknown error occurred while processing."),
        ]
    )
    outcome = await rig.executor.execute(cmd(algo_id=order["algo_id"]), now_ms())
    assert outcome.canceled and outcome.attempts == 3
    log = rig.cancel_log()
    assert len(log) == 3
    assert len({r["signature"] for r in log}) == 3
    timestamps = [int(r["params"]["timestamp"]) for r in log]
    assert timestamps == sorted(timestamps) and len(set(timestamps)) == 3


async def test_ambiguous_answer_is_settled_by_query(rig: Rig) -> None:
    applied = rig.seed(kind="algo")
    rig.state.faults.append(Fault(400, -1006, "An unexpected response was received.", apply=True))
    out = await rig.executor.execute(cmd(algo_id=applied["algo_id"]), now_ms())
    assert out.canceled and out.confirmed_by == "query"  # evidence from algoOrder, not a guess
    assert out.attempts == 2  # the cancel and one query; no blind second cancel
    assert out.strategy is not None and out.strategy["status"] == "CANCELED"

    not_applied = rig.seed(market="CM", symbol="BTCUSD_PERP")
    rig.state.faults.append(Fault(502, None, "Bad Gateway"))
    out = await rig.executor.execute(
        cmd(market=Market.CM, symbol="BTCUSD_PERP", strategy_id=not_applied["strategy_id"]),
        now_ms(),
    )
    assert out.canceled and out.confirmed_by == "cancel"
    paths = [r["path"] for r in rig.state.requests if r["method"] in ("GET", "DELETE")]
    assert paths[-3:] == [
        "/papi/v1/cm/conditional/order",
        "/papi/v1/cm/conditional/openOrder",
        "/papi/v1/cm/conditional/order",
    ]  # still open → canceled again
    assert sum(c.order_id == not_applied["strategy_id"] for c in rig.state.book.cancels) == 1


async def test_cancels_that_may_have_landed_are_capped_by_max_attempts(rig: Rig) -> None:
    """Each ambiguous answer (not applied: the order is still NEW when queried) is reconciled
    and the cancel sent again, but no more than max_attempts (3) such cancels go out."""
    order = rig.seed(market="CM", symbol="BTCUSD_PERP")
    rig.state.faults.extend(Fault(502, None, "Bad Gateway", method="DELETE") for _ in range(10))
    out = await rig.executor.execute(
        cmd(market=Market.CM, symbol="BTCUSD_PERP", strategy_id=order["strategy_id"]), now_ms()
    )
    assert out.reason is FailureReason.OUTCOME_UNKNOWN
    deletes = [r for r in rig.cancel_log() if r["path"] == "/papi/v1/cm/conditional/order"]
    assert len(deletes) == 3
    assert not rig.state.book.cancels


async def test_gone_orders_report_their_real_status(rig: Rig) -> None:
    triggered = rig.seed(market="UM", symbol="BTCUSDT", status="TRIGGERED")
    out = await rig.executor.execute(
        cmd(symbol="BTCUSDT", strategy_id=triggered["strategy_id"]), now_ms()
    )
    assert out.reason is FailureReason.ALREADY_CLOSED and out.order_status == "TRIGGERED"
    assert out.exchange is not None and out.exchange.code == -2011

    algo = rig.seed(kind="algo", status="EXPIRED")
    out = await rig.executor.execute(cmd(algo_id=algo["algo_id"]), now_ms())
    assert out.reason is FailureReason.ALREADY_CLOSED and out.order_status == "EXPIRED"

    canceled_before = rig.seed(kind="algo", status="CANCELED")
    rig.state.book.algo[canceled_before["algo_id"]].update_time -= 60_000  # a minute ago
    out = await rig.executor.execute(cmd(algo_id=canceled_before["algo_id"]), now_ms())
    assert not out.canceled  # this command canceled nothing: the order was already closed
    assert out.reason is FailureReason.ALREADY_CLOSED and out.order_status == "CANCELED"

    out = await rig.executor.execute(cmd(symbol="BTCUSDT", strategy_id=987654321), now_ms())
    assert out.reason is FailureReason.NOT_FOUND
    assert out.attempts == 3  # cancel, openOrder, orderHistory


def _answer_code(request: dict[str, Any]) -> int | None:
    code = request.get("code") or (request.get("fault") or {}).get("code")
    return int(code) if code is not None else None


def _command_for(order: dict[str, Any], **fields: Any) -> Command:
    if order["kind"] == "algo":
        return cmd(algo_id=order["algo_id"], **fields)
    return cmd(
        market=Market(order["market"]),
        symbol=order["symbol"],
        client_strategy_id=order["client_strategy_id"],
        **fields,
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"market": "UM", "symbol": "BTCUSDT"},
        {"market": "CM", "symbol": "BTCUSD_PERP"},
        {"kind": "algo"},
    ],
    ids=["um_conditional", "cm_conditional", "um_algo"],
)
async def test_redelivered_command_gets_the_same_answer(rig: Rig, spec: dict[str, Any]) -> None:
    order = rig.seed(**spec)
    command = _command_for(order)
    first = await rig.executor.execute(command, now_ms())
    assert first.canceled and first.confirmed_by == "cancel"

    again = await rig.executor.execute(command, now_ms())  # a crash, a rebalance, a replay
    assert again.canceled and again.confirmed_by == "query"
    assert again.route is first.route and again.reason is None
    assert again.strategy is not None and again.strategy["status"] == "CANCELED"
    (cancel,) = rig.state.book.cancels  # the exchange canceled once
    assert again.strategy["update_time"] == cancel.at >= command.issued_at
    key = "algo_id" if order["kind"] == "algo" else "strategy_id"
    assert again.strategy[key] == order[key]


async def test_order_canceled_before_the_command_was_issued_is_already_closed(rig: Rig) -> None:
    order = rig.seed(market="UM", symbol="ETHUSDT")
    earlier = await rig.executor.execute(
        cmd(command_id="c-earlier", symbol="ETHUSDT", strategy_id=order["strategy_id"]), now_ms()
    )
    assert earlier.canceled
    (cancel,) = rig.state.book.cancels

    # Another command, decided after the order was already canceled: it canceled nothing.
    later = cmd(
        command_id="c-later",
        symbol="ETHUSDT",
        strategy_id=order["strategy_id"],
        issued_at=cancel.at + 1,
    )
    out = await rig.executor.execute(later, now_ms())
    assert not out.canceled
    assert out.reason is FailureReason.ALREADY_CLOSED and out.order_status == "CANCELED"
    assert out.exchange is not None and out.exchange.code == -2011
    assert str(cancel.at) in out.detail and "before this command was issued" in out.detail

    # Issued in the very millisecond of the cancel: at issued_at counts as this command's.
    same_ms = cmd(
        command_id="c-same-ms",
        symbol="ETHUSDT",
        strategy_id=order["strategy_id"],
        issued_at=cancel.at,
    )
    out = await rig.executor.execute(same_ms, now_ms())
    assert out.canceled and out.confirmed_by == "query"
    assert len(rig.state.book.cancels) == 1


@pytest.mark.parametrize(
    "ambiguous",
    [
        Fault(400, -1007, "Timeout waiting for response from backend server."),
        Fault(kind="reset"),
        Fault(503, None, "held past the client's timeout", kind="timeout", delay_ms=2_300),
    ],
    ids=["-1007", "reset", "timeout"],
)
async def test_gone_after_an_ambiguous_attempt_is_this_commands_cancel(
    rig: Rig, ambiguous: Fault
) -> None:
    """Attempt 1 goes unanswered but stays queued at the exchange; the query still sees the
    order open; by the time the second cancel arrives the first has landed: -2011."""
    order = rig.seed(market="UM", symbol="BTCUSDT")
    rig.state.faults.append(ambiguous)  # the first signed request: the first cancel
    # Every later cancel: the queued first cancel lands just before it, so it is refused.
    landed = Fault(400, -2011, "Unknown order sent.", apply=True)
    rig.state.injector.reset(Profile(((1.0, landed),)), seed=0)
    # The risk engine's clock runs a minute ahead of the exchange's: by the cancel time
    # alone the order was canceled before this command; only attempt 1 tells otherwise.
    command = cmd(symbol="BTCUSDT", strategy_id=order["strategy_id"], issued_at=now_ms() + 60_000)

    out = await rig.executor.execute(command, now_ms())

    assert out.canceled and out.confirmed_by == "query", out
    assert out.strategy is not None and out.strategy["strategy_id"] == order["strategy_id"]
    assert out.strategy["status"] == "CANCELED"
    # A held request is logged only when the simulator lets it go; then read arrival order.
    for _ in range(200):
        if len(rig.state.requests) >= 5:
            break
        await asyncio.sleep(0.01)
    arrivals = sorted(rig.state.requests, key=lambda r: (r["at"], r["seq"]))
    assert [(r["method"], r["path"].rsplit("/", 1)[1], _answer_code(r)) for r in arrivals] == [
        ("DELETE", "order", ambiguous.code),  # no answer the worker could trust
        ("GET", "openOrder", None),  # still NEW: cancel again
        ("DELETE", "order", -2011),  # the first cancel landed just before
        ("GET", "openOrder", -2013),
        ("GET", "orderHistory", None),  # CANCELED
    ]
    assert [c.order_id for c in rig.state.book.cancels] == [order["strategy_id"]]


async def test_terminal_and_retryable_answers(rig: Rig) -> None:
    order = rig.seed(kind="algo")
    rig.state.faults.append(Fault(401, -2015, "Invalid API-key, IP, or permissions for action."))
    auth = await rig.executor.execute(cmd(algo_id=order["algo_id"]), now_ms())
    assert auth.reason is FailureReason.AUTH and auth.attempts == 1

    # "Not executed" answers are retried past max_attempts (3 here): only the deadline stops them.
    for _ in range(6):
        rig.state.faults.append(Fault(503, None, "Service Unavailable.", body="json"))
    busy = await rig.executor.execute(cmd(algo_id=order["algo_id"]), now_ms())
    assert busy.canceled and busy.attempts == 7
    assert [c.order_id for c in rig.state.book.cancels] == [order["algo_id"]]


async def test_not_executed_answers_until_the_deadline_fail_at_the_deadline(rig: Rig) -> None:
    order = rig.seed(kind="algo")
    rig.state.faults.extend(
        Fault(503, None, "Service Unavailable.", body="json") for _ in range(10_000)
    )
    started = now_ms()
    busy = await rig.executor.execute(
        cmd(algo_id=order["algo_id"], expires_at=now_ms() + 800), now_ms()
    )
    took = now_ms() - started
    assert busy.reason is FailureReason.EXCHANGE_UNAVAILABLE
    assert busy.attempts > 3  # more than max_attempts: the deadline stopped it
    assert took >= 600  # kept going for most of the 800 ms (backoff at most 50 ms here)
    assert not rig.state.book.cancels


async def test_expired_unknown_account_and_retired_route_send_nothing_or_explain(
    rig: Rig,
) -> None:
    order = rig.seed(market="UM", symbol="BTCUSDT")
    expired = await rig.executor.execute(
        cmd(symbol="BTCUSDT", strategy_id=order["strategy_id"], expires_at=now_ms() - 1), now_ms()
    )
    stranger = await rig.executor.execute(
        cmd(account="nobody", symbol="BTCUSDT", strategy_id=order["strategy_id"]), now_ms()
    )
    assert expired.reason is FailureReason.EXPIRED and expired.attempts == 0
    assert "had passed when the command was taken up" in expired.detail
    assert "waiting" not in expired.detail
    assert stranger.reason is FailureReason.UNKNOWN_ACCOUNT and stranger.attempts == 0
    assert rig.cancel_log() == []

    rig.state.config.um_conditional_enabled = False
    retired = await rig.executor.execute(
        cmd(symbol="BTCUSDT", strategy_id=order["strategy_id"]), now_ms()
    )
    assert retired.reason is FailureReason.ROUTE_RETIRED
    assert retired.hint is not None and "algo_id" in retired.hint


async def test_ed25519_and_rsa_accounts_sign_accepted_requests(rig: Rig) -> None:
    results = collections.Counter()
    for account in ("desk-ed", "desk-rsa"):
        order = seed_order(rig.state, {"account": account, "kind": "algo"})
        outcome = await rig.executor.execute(
            cmd(account=account, algo_id=order["algo_id"]), now_ms()
        )
        results[outcome.canceled] += 1
    assert results == {True: 2}


async def test_unreachable_exchange_is_retried_until_the_deadline_then_reported() -> None:
    """Nothing listens: each try is refused before anything is sent, so the count of
    attempts does not stop it; the deadline does."""
    accounts = {"a": Credentials("a", "k", HmacSigner("s"), hmac_secret="s")}
    policy = RetryPolicy(
        max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.05, default_deadline_ms=600
    )
    async with PapiClient("http://127.0.0.1:9", clock=now_ms, timeout_s=1) as client:
        executor = CancelExecutor(client, accounts, policy, now_ms)
        started = now_ms()
        out = await executor.execute(cmd(account="a", algo_id=5), now_ms())
    assert out.reason is FailureReason.EXCHANGE_UNAVAILABLE
    assert out.attempts == 0  # nothing reached the exchange
    assert "nothing was sent" in out.detail
    assert 400 <= now_ms() - started < 2_000  # kept trying for (about) the deadline


async def test_a_closed_client_sends_nothing(rig: Rig) -> None:
    """Once shut down, a request still asked for is refused as not sent (a retry elsewhere
    is safe), instead of opening a connection after the end."""
    order = rig.seed(kind="algo")
    before = len(rig.cancel_log())
    client = PapiClient(rig.url, clock=now_ms)
    await client.aclose()
    creds = rig.accounts[next(iter(rig.accounts))]
    query = f"algoId={order['algo_id']}"
    with pytest.raises(NotSentError, match="closed: nothing was sent"):
        await client.signed(creds, "DELETE", "/papi/v1/um/algo/order", query, is_order=True)
    assert len(rig.cancel_log()) == before


async def test_recv_window_never_exceeds_the_time_left(rig: Rig) -> None:
    order = rig.seed(kind="algo")
    out = await rig.executor.execute(
        cmd(algo_id=order["algo_id"], expires_at=now_ms() + 800), now_ms()
    )
    assert out.canceled
    (request,) = rig.cancel_log()
    assert 0 < int(request["params"]["recvWindow"]) <= 800


async def test_deadline_passing_while_waiting_on_the_governor_means_expired(rig: Rig) -> None:
    # One order per day: no room will come within any deadline here.
    governor = RateGovernor(GovernorSettings(order_limit=1, order_window_ms=86_400_000), now_ms)
    first, second, third = (rig.seed(kind="algo") for _ in range(3))
    async with PapiClient(rig.url, clock=now_ms, governor=governor) as client:
        executor = CancelExecutor(
            client, rig.accounts, RetryPolicy(default_deadline_ms=2_000), now_ms
        )
        assert (await executor.execute(cmd(algo_id=first["algo_id"]), now_ms())).canceled
        late = await executor.execute(
            cmd(algo_id=second["algo_id"], expires_at=now_ms() + 300), now_ms()
        )
        no_deadline = await executor.execute(cmd(algo_id=third["algo_id"]), now_ms())
    assert late.reason is FailureReason.EXPIRED and late.attempts == 0
    assert "waiting" in late.detail
    # Without expires_at the retry budget ends first: rate_limited, nothing sent.
    assert no_deadline.reason is FailureReason.RATE_LIMITED and no_deadline.attempts == 0
    assert len(rig.cancel_log()) == 1
    assert governor.stats.waits == {}  # refused at once: no room would come in time
