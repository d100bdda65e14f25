"""The simulator answers as the exchange does: weights, holds, order counts and the lists.

Most tests drive the Starlette app in process (httpx's ASGI transport): nothing here needs a
socket except the timeout holds, which run a real loopback server so the client's own
timeout is what fires. The official SDK reads the open-order lists from the session's
simulator process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson
import pytest

from tests.support import HMAC_ACCOUNTS, SimControl
from tests.test_sdk_fidelity import sdk_client
from worker.core.routes import encode_params
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials
from worker.exchange.signing import HmacSigner, append_signature
from worker.settings import Settings
from worker.tools.sim.app import SimConfig, SimState, build_app, timeout_hold_ms
from worker.tools.sim.book import Book, SimError, no_such_order, unknown_order
from worker.tools.sim.faults import PROFILES, Fault, Injector, Profile
from worker.tools.sim.server import running_sim, state_from_accounts

WEIGHT = "X-MBX-USED-WEIGHT-1M"
ORDER_COUNT = "X-MBX-ORDER-COUNT-1M"


@dataclass
class Rig:
    state: SimState
    http: httpx.AsyncClient

    async def seed(self, *specs: dict[str, Any]) -> list[dict[str, Any]]:
        r = await self.http.post("/_sim/orders", content=orjson.dumps({"orders": list(specs)}))
        assert r.status_code == 200, r.text
        created: list[dict[str, Any]] = r.json()["orders"]
        return created

    async def configure(self, **changes: Any) -> httpx.Response:
        return await self.http.post("/_sim/config", content=orjson.dumps(changes))

    async def signed(
        self,
        method: str,
        path: str,
        params: list[tuple[str, str]],
        *,
        account: str = "desk-0",
        secret: str | None = None,
        timestamp: int | None = None,
    ) -> httpx.Response:
        return await signed(
            self.http, method, path, params, account=account, secret=secret, timestamp=timestamp
        )


async def signed(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    params: list[tuple[str, str]],
    *,
    account: str = "desk-0",
    secret: str | None = None,
    timestamp: int | None = None,
) -> httpx.Response:
    key, real_secret = HMAC_ACCOUNTS[account]
    sent = [*params, ("timestamp", str(timestamp if timestamp is not None else now_ms()))]
    query = append_signature(encode_params(sent), HmacSigner(secret or real_secret))
    return await http.request(method, f"{path}?{query}", headers={"X-MBX-APIKEY": key})


@pytest.fixture
async def rig(accounts: dict[str, Credentials]) -> AsyncIterator[Rig]:
    state = state_from_accounts(accounts, SimConfig())
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim.test") as http:
        yield Rig(state, http)


def _weight(response: httpx.Response) -> int:
    return int(response.headers[WEIGHT])


# -- 1. the clock endpoint's weight -------------------------------------------------------------


async def test_fapi_time_carries_its_own_used_weight(rig: Rig) -> None:
    first = await rig.http.get("/fapi/v1/time")
    second = await rig.http.get("/fapi/v1/time")
    assert first.status_code == 200 and isinstance(first.json()["serverTime"], int)
    assert (_weight(first), _weight(second)) == (1, 2)

    # PAPI's weight is another counter: neither moves the other.
    ping = await rig.http.get("/papi/v1/ping")
    assert _weight(ping) == 1
    assert _weight(await rig.http.get("/fapi/v1/time")) == 3
    assert _weight(await rig.http.get("/papi/v1/ping")) == 2

    # Same window as PAPI's: the next window starts from zero again.
    rig.state.config.clock_skew_ms += rig.state.config.weight_window_ms
    assert _weight(await rig.http.get("/fapi/v1/time")) == 1
    assert _weight(await rig.http.get("/papi/v1/ping")) == 1


# -- 2. the timeout hold ----------------------------------------------------------------------


def test_default_timeout_hold_outlasts_the_workers_default_http_timeout() -> None:
    default = SimConfig().timeout_hold_ms
    assert default > Settings().http_timeout_s * 1000
    timeouts = [f for _, f in PROFILES["timeouts"].faults if f.kind == "timeout"]
    assert timeouts  # the profile holds with the configured hold, not a figure of its own
    assert all(timeout_hold_ms(SimConfig(), f) == default for f in timeouts)
    assert timeout_hold_ms(SimConfig(timeout_hold_ms=750), timeouts[0]) == 750
    # A scripted fault that names its own hold keeps it.
    assert timeout_hold_ms(SimConfig(), Fault(kind="timeout", delay_ms=2_300)) == 2_300


def _seed_holding_twice() -> int:
    """A seed whose first two cancels both draw a timeout from the ``timeouts`` profile."""
    for seed in range(1000):
        injector = Injector()
        injector.reset(PROFILES["timeouts"], seed)
        drawn = [injector.draw("DELETE")[0] for _ in range(2)]
        if all(f is not None and f.kind == "timeout" for f in drawn):
            return seed
    raise AssertionError("no seed draws two timeouts")


async def test_configured_timeout_hold_is_honoured(accounts: dict[str, Credentials]) -> None:
    hold_s = 0.4
    state = state_from_accounts(accounts, SimConfig())
    cancel = [("algoId", "12345")]
    async with running_sim(state) as url, httpx.AsyncClient(base_url=url) as control:
        changes = {"timeout_hold_ms": int(hold_s * 1000), "profile": "timeouts"}
        r = await control.post(
            "/_sim/config", content=orjson.dumps({**changes, "seed": _seed_holding_twice()})
        )
        assert r.status_code == 200 and r.json()["timeout_hold_ms"] == 400, r.text

        # A client that waits less than the hold times out after its own timeout.
        async with httpx.AsyncClient(base_url=url, timeout=0.15) as impatient:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await signed(impatient, "DELETE", "/papi/v1/um/algo/order", cancel)
            assert time.monotonic() - started < hold_s
        # Logged on arrival, with the hold it is serving, while it is still held.
        (arrived,) = state.requests
        assert arrived["fault"]["kind"] == "timeout" and arrived["held_ms"] == 400

        # A client that waits longer gets the fault's answer once the hold is over.
        async with httpx.AsyncClient(base_url=url, timeout=5) as patient:
            started = time.monotonic()
            held = await signed(patient, "DELETE", "/papi/v1/um/algo/order", cancel)
            elapsed = time.monotonic() - started
        assert held.status_code == 503 and held.text == "held past the client's timeout"
        assert hold_s - 0.02 <= elapsed < hold_s + 1.0
        assert [(r["status"], r["held_ms"]) for r in state.requests] == [(503, 400)] * 2

        bad = await control.post("/_sim/config", content=orjson.dumps({"timeout_hold_ms": -1}))
        assert bad.status_code == 400


# -- 3. fresh exceptions ----------------------------------------------------------------------


def _depth(tb: TracebackType | None) -> int:
    depth = 0
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    return depth


def _raised_by_cancel(book: Book) -> SimError:
    try:
        book.cancel_algo("desk-0", 42, None, now_ms())
    except SimError as exc:
        return exc
    raise AssertionError("canceling a missing order must fail")


def test_sim_errors_are_raised_fresh_and_their_tracebacks_do_not_grow() -> None:
    assert unknown_order() is not unknown_order()
    assert no_such_order() is not no_such_order()
    book = Book()
    errors = [_raised_by_cancel(book) for _ in range(5)]
    assert len({id(e) for e in errors}) == 5
    assert {e.code for e in errors} == {-2011}
    assert len({_depth(e.__traceback__) for e in errors}) == 1  # no frames pile up


# -- 4. the open-order lists ------------------------------------------------------------------

UM_LIST = "/papi/v1/um/conditional/openOrders"
CM_LIST = "/papi/v1/cm/conditional/openOrders"
ALGO_LIST = "/papi/v1/um/algo/openAlgoOrders"


async def _book_for_lists(rig: Rig) -> dict[str, list[int]]:
    """Seed desk-0's orders (and a stranger's), cancel some; returns the open ids by list."""
    specs: list[dict[str, Any]] = [
        {"account": "desk-0", "market": "UM", "symbol": "BTCUSDT"},
        {"account": "desk-0", "market": "UM", "symbol": "BTCUSDT"},
        {"account": "desk-0", "market": "UM", "symbol": "ETHUSDT", "type": "TRAILING_STOP_MARKET"},
        {"account": "desk-0", "market": "UM", "symbol": "BTCUSDT", "status": "TRIGGERED"},
        {"account": "desk-0", "market": "CM", "symbol": "BTCUSD_PERP"},
        {"account": "desk-0", "market": "CM", "symbol": "ETHUSD_PERP"},
        {"account": "desk-0", "kind": "algo", "symbol": "BTCUSDT"},
        {"account": "desk-0", "kind": "algo", "symbol": "BTCUSDT"},
        {"account": "desk-0", "kind": "algo", "symbol": "ETHUSDT"},
        {"account": "desk-0", "kind": "algo", "symbol": "ETHUSDT", "status": "EXPIRED"},
        {"account": "desk-1", "market": "UM", "symbol": "BTCUSDT"},
        {"account": "desk-1", "kind": "algo", "symbol": "BTCUSDT"},
    ]
    o = await rig.seed(*specs)
    canceled = await rig.signed(
        "DELETE",
        "/papi/v1/um/conditional/order",
        [("symbol", "BTCUSDT"), ("strategyId", str(o[0]["strategy_id"]))],
    )
    assert canceled.json()["strategyStatus"] == "CANCELED"
    canceled = await rig.signed(
        "DELETE", "/papi/v1/um/algo/order", [("algoId", str(o[7]["algo_id"]))]
    )
    assert canceled.json() == {"complete": True}
    return {
        "um": [o[1]["strategy_id"], o[2]["strategy_id"]],
        "um_btc": [o[1]["strategy_id"]],
        "cm": [o[4]["strategy_id"], o[5]["strategy_id"]],
        "cm_eth": [o[5]["strategy_id"]],
        "algo": [o[6]["algo_id"], o[8]["algo_id"]],
        "algo_eth": [o[8]["algo_id"]],
    }


async def _listed(rig: Rig, path: str, params: list[tuple[str, str]]) -> tuple[list[Any], int]:
    """The list and the weight it cost."""
    before = _weight(await rig.http.get("/papi/v1/ping"))
    response = await rig.signed("GET", path, params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list)
    return body, _weight(response) - before


async def test_open_order_lists_answer_the_documented_shapes_and_weights(rig: Rig) -> None:
    open_ids = await _book_for_lists(rig)

    um_all, um_all_weight = await _listed(rig, UM_LIST, [])
    um_btc, um_btc_weight = await _listed(rig, UM_LIST, [("symbol", "BTCUSDT")])
    cm_all, cm_all_weight = await _listed(rig, CM_LIST, [])
    cm_eth, cm_eth_weight = await _listed(rig, CM_LIST, [("symbol", "ETHUSD_PERP")])
    algo_all, algo_all_weight = await _listed(rig, ALGO_LIST, [])
    algo_eth, algo_eth_weight = await _listed(rig, ALGO_LIST, [("symbol", "ETHUSDT")])

    # Only the account's own NEW orders; canceled, triggered and expired ones are absent.
    assert [o["strategyId"] for o in um_all] == open_ids["um"]
    assert [o["strategyId"] for o in um_btc] == open_ids["um_btc"]
    assert [o["strategyId"] for o in cm_all] == open_ids["cm"]
    assert [o["strategyId"] for o in cm_eth] == open_ids["cm_eth"]
    assert [o["algoId"] for o in algo_all] == open_ids["algo"]
    assert [o["algoId"] for o in algo_eth] == open_ids["algo_eth"]
    assert {o["strategyStatus"] for o in um_all + cm_all} == {"NEW"}
    assert {o["algoStatus"] for o in algo_all} == {"NEW"}
    # Documented weights: 1 with a symbol, 40 without.
    assert (um_all_weight, cm_all_weight, algo_all_weight) == (40, 40, 40)
    assert (um_btc_weight, cm_eth_weight, algo_eth_weight) == (1, 1, 1)

    # Each listed object is exactly what the single-order query answers.
    for market, listed in (("um", um_all), ("cm", cm_all)):
        for order in listed:
            one = await rig.signed(
                "GET",
                f"/papi/v1/{market}/conditional/openOrder",
                [("symbol", order["symbol"]), ("strategyId", str(order["strategyId"]))],
            )
            assert one.json() == order
    assert "selfTradePreventionMode" in um_all[0] and "selfTradePreventionMode" not in cm_all[0]
    assert "activatePrice" in um_all[1]  # the trailing stop
    for order in algo_all:
        one = await rig.signed(
            "GET", "/papi/v1/um/algo/algoOrder", [("algoId", str(order["algoId"]))]
        )
        assert one.json() == order

    by_id, _ = await _listed(rig, ALGO_LIST, [("algoId", str(open_ids["algo"][0]))])
    assert [o["algoId"] for o in by_id] == open_ids["algo"][:1]
    assert (await _listed(rig, ALGO_LIST, [("algoType", "VP")]))[0] == []
    other = await rig.signed("GET", UM_LIST, [], account="desk-1")
    assert len(other.json()) == 1


async def test_open_order_lists_are_signed_checked_and_retire_with_their_route(rig: Rig) -> None:
    await _book_for_lists(rig)
    for path in (UM_LIST, CM_LIST, ALGO_LIST):
        wrong = await rig.signed("GET", path, [], secret="not-the-secret")
        assert (wrong.status_code, wrong.json()["code"]) == (400, -1022)
        no_key = await rig.http.get(path)
        assert no_key.json()["code"] == -2014
        assert ORDER_COUNT not in wrong.headers and WEIGHT in wrong.headers
    bad_symbol = await rig.signed("GET", CM_LIST, [("symbol", "BTCUSDT")])  # a UM symbol
    assert (bad_symbol.status_code, bad_symbol.json()["code"]) == (400, -1121)
    bad_symbol = await rig.signed("GET", ALGO_LIST, [("symbol", "NOPE")])
    assert bad_symbol.json()["code"] == -1121

    rig.state.config.um_conditional_enabled = False
    assert (await rig.signed("GET", UM_LIST, [])).status_code == 404
    assert (await rig.signed("GET", CM_LIST, [])).status_code == 200
    assert (await rig.signed("GET", ALGO_LIST, [])).status_code == 200


async def test_fault_profiles_reach_the_lists_only_when_get_is_in_their_methods(rig: Rig) -> None:
    await _book_for_lists(rig)
    # The named profiles fault cancels only: the lists answer.
    assert (await rig.configure(profile="5xx", seed=1)).status_code == 200
    for _ in range(10):
        for path in (UM_LIST, CM_LIST, ALGO_LIST):
            assert (await rig.signed("GET", path, [])).status_code == 200
    # A profile that covers GET faults them too.
    unavailable = Fault(503, None, "Service Unavailable")
    rig.state.injector.reset(Profile(((1.0, unavailable),), methods=("GET",)), seed=0)
    for path, symbol in ((UM_LIST, "ETHUSDT"), (CM_LIST, "ETHUSD_PERP"), (ALGO_LIST, "ETHUSDT")):
        response = await rig.signed("GET", path, [("symbol", symbol)])
        assert (response.status_code, response.text) == (503, "Service Unavailable")
    assert rig.state.stats["fault_answer_503"] >= 3


@pytest.mark.e2e
def test_official_sdk_reads_the_open_order_lists(sim: SimControl) -> None:
    account = "desk-3"
    placed = sim.seed(
        [
            {"account": account, "market": "CM", "symbol": "ETHUSD_261225"},
            {"account": account, "market": "CM", "symbol": "ETHUSD_261225"},
            {"account": account, "kind": "algo", "symbol": "XRPUSDT"},
            {"account": account, "kind": "algo", "symbol": "XRPUSDT"},
        ]
    )
    api = sdk_client(sim.url, account)
    api.cancel_cm_conditional_order(symbol="ETHUSD_261225", strategy_id=placed[1]["strategy_id"])
    api.cancel_um_algo_order(algo_id=placed[3]["algo_id"])

    conditional = api.query_all_current_cm_open_conditional_orders(symbol="ETHUSD_261225").data()
    ids = {o.strategy_id for o in conditional}
    assert placed[0]["strategy_id"] in ids and placed[1]["strategy_id"] not in ids
    assert {o.symbol for o in conditional} == {"ETHUSD_261225"}
    assert {o.strategy_status for o in conditional} == {"NEW"}

    algos = api.query_all_current_um_open_algo_orders(symbol="XRPUSDT").data()
    algo_ids = {o.algo_id for o in algos}
    assert placed[2]["algo_id"] in algo_ids and placed[3]["algo_id"] not in algo_ids
    assert {o.symbol for o in algos} == {"XRPUSDT"}
    assert {o.algo_status for o in algos} == {"NEW"}


# -- 5. the order count -----------------------------------------------------------------------


async def test_refused_signatures_and_timestamps_do_not_count_as_orders(rig: Rig) -> None:
    (first, second) = await rig.seed(
        {"account": "desk-0", "kind": "algo"}, {"account": "desk-0", "kind": "algo"}
    )
    rig.state.config.order_limit = 1
    cancel = "/papi/v1/um/algo/order"
    for _ in range(5):
        bad = await rig.signed("DELETE", cancel, [("algoId", str(first["algo_id"]))], secret="x")
        assert (bad.status_code, bad.json()["code"]) == (400, -1022)  # not 429 -1015
        assert ORDER_COUNT not in bad.headers
    stale = await rig.signed(
        "DELETE", cancel, [("algoId", str(first["algo_id"]))], timestamp=now_ms() - 60_000
    )
    assert stale.json()["code"] == -1021 and ORDER_COUNT not in stale.headers

    good = await rig.signed("DELETE", cancel, [("algoId", str(first["algo_id"]))])
    assert good.status_code == 200 and good.headers[ORDER_COUNT] == "1"
    over = await rig.signed("DELETE", cancel, [("algoId", str(second["algo_id"]))])
    assert (over.status_code, over.json()["code"]) == (429, -1015)
    assert over.headers[ORDER_COUNT] == "2"
    assert [c.order_id for c in rig.state.book.cancels] == [first["algo_id"]]
