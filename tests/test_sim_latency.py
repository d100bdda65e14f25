"""The simulator as the bench uses it: its fixed exchange latency, and its settled heap.

A real loopback server (the sleep must be a real one), driven through ``/_sim/config`` as the
bench does: every PAPI answer waits ``fixed_latency_ms``, the request log's ``at`` is still
the arrival, concurrent requests wait side by side (the sleep blocks nothing), and a
negative value is refused. ``arrived_us``, what the bench reads, is when the request's bytes
reached the server, before anything the simulator does with it. ``/_sim/settle`` keeps the
book out of later garbage collections.
"""

from __future__ import annotations

import asyncio
import gc
import time

import httpx
import orjson

from tests.support import HMAC_ACCOUNTS
from worker.core.routes import encode_params
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.signing import HmacSigner, append_signature
from worker.tools.sim.app import SimConfig
from worker.tools.sim.server import running_sim, state_from_accounts

LATENCY_MS = 200


async def cancel(http: httpx.AsyncClient, algo_id: int) -> httpx.Response:
    key, secret = HMAC_ACCOUNTS["desk-0"]
    params = [("algoId", str(algo_id)), ("recvWindow", "5000"), ("timestamp", str(now_ms()))]
    query = append_signature(encode_params(params), HmacSigner(secret))
    return await http.delete(f"/papi/v1/um/algo/order?{query}", headers={"X-MBX-APIKEY": key})


async def seed(http: httpx.AsyncClient, count: int) -> list[int]:
    specs = [{"account": "desk-0", "kind": "algo"} for _ in range(count)]
    r = await http.post("/_sim/orders", content=orjson.dumps({"orders": specs}))
    assert r.status_code == 200, r.text
    return [o["algo_id"] for o in r.json()["orders"]]


async def timed_cancel(http: httpx.AsyncClient, algo_id: int) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await cancel(http, algo_id)
    return response, time.monotonic() - started


async def test_fixed_latency_delays_every_answer_and_the_log_keeps_the_arrival(
    accounts: dict[str, Credentials],
) -> None:
    assert SimConfig().fixed_latency_ms == 0  # off unless asked for
    state = state_from_accounts(accounts, SimConfig())
    async with running_sim(state) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        first, second, *together = await seed(http, 12)

        # Off: the answer does not wait.
        fast, elapsed = await timed_cancel(http, first)
        assert fast.status_code == 200 and fast.json() == {"complete": True}
        assert elapsed < LATENCY_MS / 1000

        r = await http.post("/_sim/config", content=orjson.dumps({"fixed_latency_ms": LATENCY_MS}))
        assert r.status_code == 200 and r.json()["fixed_latency_ms"] == LATENCY_MS, r.text

        sent_at_us = time.time_ns() // 1000
        slow, elapsed = await timed_cancel(http, second)
        assert slow.status_code == 200 and slow.json() == {"complete": True}
        assert LATENCY_MS / 1000 - 0.01 <= elapsed < LATENCY_MS / 1000 + 1.0
        # The cancel applied, and was logged, when the request arrived, not when answered.
        arrived = state.requests[-1]
        assert arrived["params"]["algoId"] == str(second) and arrived["status"] == 200
        # Its arrival is logged to the microsecond (what the bench measures), and in ms.
        assert 0 <= arrived["at_us"] - sent_at_us < LATENCY_MS * 1000 / 2
        assert arrived["at"] == arrived["at_us"] // 1000

        # Errors wait as long: the same order again is -2011, as late.
        gone, elapsed = await timed_cancel(http, second)
        assert gone.status_code == 400 and gone.json()["code"] == -2011
        assert elapsed >= LATENCY_MS / 1000 - 0.01

        # The unsigned ping is a PAPI answer too.
        started = time.monotonic()
        assert (await http.get("/papi/v1/ping")).status_code == 200
        assert time.monotonic() - started >= LATENCY_MS / 1000 - 0.01

        # A non-blocking wait: ten requests at once take about one latency, not ten.
        started = time.monotonic()
        answers = await asyncio.gather(*(cancel(http, algo_id) for algo_id in together))
        assert [a.status_code for a in answers] == [200] * len(together)
        assert time.monotonic() - started < 3 * LATENCY_MS / 1000

        # Back to none.
        r = await http.post("/_sim/config", content=orjson.dumps({"fixed_latency_ms": 0}))
        assert r.json()["fixed_latency_ms"] == 0
        (extra,) = await seed(http, 1)
        _, elapsed = await timed_cancel(http, extra)
        assert elapsed < LATENCY_MS / 1000


async def test_the_log_notes_when_the_bytes_arrived_before_the_exchange_handled_them(
    accounts: dict[str, Credentials],
) -> None:
    """The ``latency`` profile holds each request 20-150 ms *before* the exchange handles it:
    ``at_us`` is after that hold, ``arrived_us`` before it, on the exchange's (skewed) clock.
    Several requests on one kept-alive connection each get their own arrival."""
    skew_ms = 1_000
    state = state_from_accounts(accounts, SimConfig(profile="latency", clock_skew_ms=skew_ms))
    async with running_sim(state) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        algo_ids = await seed(http, 3)
        client_ends = set()
        for algo_id in algo_ids:
            sent_at_us = time.time_ns() // 1000 + skew_ms * 1000
            answer = await cancel(http, algo_id)
            assert answer.status_code == 200, answer.text
            client_ends.add(answer.extensions["network_stream"].get_extra_info("client_addr"))
            await asyncio.sleep(0.03)  # the next one is sent well after this one arrived
            entry = state.requests[-1]
            assert entry["params"]["algoId"] == str(algo_id)
            assert 0 <= entry["arrived_us"] - sent_at_us < 20_000
            assert entry["at_us"] - entry["arrived_us"] >= 20_000  # the profile's least hold
        assert len(client_ends) == 1  # all three on one connection


async def test_a_negative_fixed_latency_is_refused(accounts: dict[str, Credentials]) -> None:
    state = state_from_accounts(accounts, SimConfig())
    async with running_sim(state) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        bad = await http.post("/_sim/config", content=orjson.dumps({"fixed_latency_ms": -5}))
        assert bad.status_code == 400 and "fixed_latency_ms" in bad.json()["error"]
        assert state.config.fixed_latency_ms == 0
        assert (await http.get("/_sim/config")).json()["fixed_latency_ms"] == 0


async def test_settle_keeps_the_book_out_of_later_collections(
    accounts: dict[str, Credentials],
) -> None:
    """The bench settles the simulator before each run: a full collection then no longer
    walks the orders held (with 150,000 of them, one took 136 ms, and a request arriving
    meanwhile was noted that late), and the book still answers as before."""
    state = state_from_accounts(accounts, SimConfig())

    def held_orders() -> int:
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "AlgoOrder")

    try:
        async with running_sim(state) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            first, *rest = await seed(http, 50)
            assert held_orders() >= 50  # walked by every full collection

            r = await http.post("/_sim/settle")
            assert r.status_code == 200, r.text
            assert r.json()["frozen"] >= 50 and gc.get_freeze_count() >= 50
            assert held_orders() == 0  # left out of the collector's generations

            answer = await cancel(http, first)
            assert answer.status_code == 200 and answer.json() == {"complete": True}
            assert len(rest) == 49 and all(state.book.algo[i].status == "NEW" for i in rest)
    finally:
        gc.unfreeze()  # the simulator ran in this test's process
