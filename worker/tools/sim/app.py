"""The simulator's HTTP surface (Starlette, served by uvicorn).

PAPI routes (signed; API key, signature, timestamp, the account's order count (order routes
only) and parameters checked in that order, so a refused signature costs no order count):

* ``POST|DELETE /papi/v1/{um,cm}/conditional/order``, ``GET .../openOrder``,
  ``GET .../orderHistory``, ``GET .../openOrders`` (all NEW orders, optional ``symbol``)
* ``POST|DELETE /papi/v1/um/algo/order``, ``GET /papi/v1/um/algo/algoOrder``,
  ``GET /papi/v1/um/algo/openAlgoOrders`` (optional ``symbol``, ``algoId``, ``algoType``)
* ``DELETE /papi/v1/{um,cm}/conditional/allOpenOrders`` and
  ``DELETE /papi/v1/um/algo/allOpenOrders`` (``symbol`` required; the kill switch): every
  NEW order of the account on the symbol is canceled; the answer names none of them
* ``GET /papi/v1/ping`` and ``GET /fapi/v1/time`` (unsigned)

Every answer carries ``X-MBX-USED-WEIGHT-1M``; order routes also ``X-MBX-ORDER-COUNT-1M``.
Request weight is 1, except the open-order lists without a ``symbol`` (40). ``/fapi/v1/time``
counts its weight apart from PAPI's (another exchange host), in the same window.
A route switched off (``um_conditional_enabled = false``) answers 404 as a retired route does.

Each signed request is logged with ``at``/``at_us`` (when the exchange handled it, after any
injected latency) and ``arrived_us`` (when its first bytes reached the server, stamped by the
HTTP protocol before any parsing; ``None`` when served in-process with no socket).

Control routes under ``/_sim/`` (not part of PAPI) seed orders, read the request log and
the book's ground truth, change the configuration, and settle the heap between benchmark
runs (``POST /_sim/settle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from worker.exchange.accounts import Credentials
from worker.settings import Settings
from worker.tools.sim.auth import SignedParams, check_timestamp, split_signed, verify_signature
from worker.tools.sim.book import (
    CONDITIONAL_TYPES,
    AlgoOrder,
    Book,
    ConditionalOrder,
    SimError,
    decimal_str,
    no_such_order,
)
from worker.tools.sim.faults import PROFILES, TOO_MANY, Fault, Injector

# The wall clock (µs) when the request being served reached the server: set per connection by
# the HTTP protocol (worker.tools.sim.server) as a request's first bytes arrive, and inherited
# by the task that serves it.
ARRIVED_US: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "sim_arrived_us", default=None
)

UM_SYMBOLS = frozenset(
    {"BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "LTCUSDT"}
)
CM_SYMBOLS = frozenset(
    {"BTCUSD_PERP", "ETHUSD_PERP", "BNBUSD_PERP", "SOLUSD_PERP", "BTCUSD_261225", "ETHUSD_261225"}
)
_CLIENT_ID = re.compile(r"[.A-Z:/a-z0-9_-]{1,36}")
_ID = re.compile(r"[0-9]{1,19}")
NOT_FOUND_HTML = b"<html><body><h2>404 Not found</h2></body></html>"
LIST_WEIGHT_ALL_SYMBOLS = 40  # an open-order list without a symbol; 1 with one
# A ``timeout`` fault must outlast the client: by default, the worker's default HTTP timeout
# plus this margin.
TIMEOUT_HOLD_MARGIN_MS = 1_000
DEFAULT_TIMEOUT_HOLD_MS = int(Settings().http_timeout_s * 1000) + TIMEOUT_HOLD_MARGIN_MS


@dataclass
class SimConfig:
    um_conditional_enabled: bool = True
    clock_skew_ms: int = 0
    # The exchange's limits (fixed windows); tests set small ones.
    weight_limit: int = 6000
    weight_window_ms: int = 60_000
    order_limit: int = 1200
    order_window_ms: int = 60_000
    ban_after_violations: int = 3  # 429s in one weight window before a 418 ban
    ban_ms: int = 120_000
    profile: str = "none"
    seed: int = 0
    # How long a ``timeout`` fault without its own delay_ms holds the request (profiles).
    timeout_hold_ms: int = DEFAULT_TIMEOUT_HOLD_MS
    # A fixed exchange latency: every PAPI answer waits this long (a non-blocking sleep) after
    # the request was handled and logged, so the log's ``at`` is still its arrival. Adds to a
    # profile's random latency.
    fixed_latency_ms: int = 0
    # An exchange incident: until this server time (ms), every signed PAPI request is
    # answered 503 "Service Unavailable." (JSON msg: not executed). ``POST /_sim/config``
    # also takes ``unavailable_for_ms`` (from now) and sets this from it.
    unavailable_until_ms: int = 0


UNAVAILABLE = Fault(503, None, "Service Unavailable.", body="json", kind="answer")


@dataclass
class SimState:
    accounts_by_key: dict[str, Credentials]
    config: SimConfig = field(default_factory=SimConfig)
    faults: deque[Fault] = field(default_factory=deque)
    injector: Injector = field(default_factory=Injector)
    banned_until: int = 0
    violations: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    book: Book = field(default_factory=Book)
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200_000))
    request_seq: int = 0
    weight_window: int = 0
    weight_used: int = 0
    fapi_weight_window: int = 0
    fapi_weight_used: int = 0
    order_windows: dict[str, tuple[int, int]] = field(default_factory=dict)

    def server_time(self) -> int:
        return self.server_time_us() // 1000

    def server_time_us(self, wall_us: int | None = None) -> int:
        """The exchange's clock (skewed as configured), now or at ``wall_us``."""
        wall = time.time_ns() // 1000 if wall_us is None else wall_us
        return wall + self.config.clock_skew_ms * 1000

    def count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    def use_weight(self, weight: int) -> int:
        window = self.server_time() // self.config.weight_window_ms
        if window != self.weight_window:
            self.weight_window, self.weight_used, self.violations = window, 0, 0
        self.weight_used += weight
        return self.weight_used

    def use_fapi_weight(self, weight: int) -> int:
        """fapi (the clock endpoint's host) counts apart from PAPI, in the same window."""
        window = self.server_time() // self.config.weight_window_ms
        if window != self.fapi_weight_window:
            self.fapi_weight_window, self.fapi_weight_used = window, 0
        self.fapi_weight_used += weight
        return self.fapi_weight_used

    def window_left_s(self, window_ms: int) -> int:
        """Seconds (rounded up) until the current fixed window ends."""
        now = self.server_time()
        return max(1, -(-(window_ms - now % window_ms) // 1000))

    def count_order(self, account: str) -> int:
        index = self.server_time() // self.config.order_window_ms
        window, used = self.order_windows.get(account, (index, 0))
        if window != index:
            used = 0
        self.order_windows[account] = (index, used + 1)
        return used + 1

    def ban(self, duration_ms: int) -> SimError:
        self.banned_until = max(self.banned_until, self.server_time() + duration_ms)
        self.count("bans_418")
        return self.banned()

    def banned(self) -> SimError:
        return SimError(
            418,
            -1003,
            f"Way too many requests; IP(127.0.0.1) banned until "
            f"{self.banned_until}. Please use the websocket for live "
            "updates to avoid bans.",
        )

    def reset_limits(self) -> None:
        """Forget the weight and orders counted so far, the 429s and any ban: a new window
        for a new client (``POST /_sim/config {"reset_limits": true}``; a test suite sharing
        one simulator gives each test its own)."""
        self.weight_window = self.weight_used = self.violations = self.banned_until = 0
        self.fapi_weight_window = self.fapi_weight_used = 0
        self.order_windows.clear()

    def apply_config(self) -> None:
        """Re-arm the fault injector after the profile or seed changed."""
        self.injector.reset(PROFILES[self.config.profile], self.config.seed)

    def log(self, entry: dict[str, Any]) -> None:
        self.request_seq += 1
        entry["seq"] = self.request_seq
        self.requests.append(entry)


def _json(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


def _error(exc: SimError, headers: Mapping[str, str]) -> Response:
    return _json({"code": exc.code, "msg": exc.msg}, exc.status, headers)


class SimulatedResetError(ConnectionResetError):
    """Raised after the response head is sent, so the server drops the connection."""


class _ResetResponse(Response):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1000"), (b"content-type", b"application/json")],
            }
        )
        raise SimulatedResetError("simulated connection reset")


def fault_response(fault: Fault, headers: Mapping[str, str]) -> Response:
    extra = dict(headers)
    if fault.retry_after is not None:
        extra["Retry-After"] = fault.retry_after
    elif fault.retry_after_s is not None:
        extra["Retry-After"] = str(fault.retry_after_s)
    if fault.kind == "reset":
        return _ResetResponse()
    if fault.body == "empty":
        return Response(b"", status_code=fault.status, headers=extra)
    if fault.code is None and fault.body != "json":
        return Response(
            fault.msg.encode(), status_code=fault.status, media_type="text/plain", headers=extra
        )
    body: dict[str, object] = {"msg": fault.msg}
    if fault.code is not None:
        body = {"code": fault.code, "msg": fault.msg}
    return _json(body, fault.status, extra)


def _mandatory(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if not value:
        raise SimError(
            400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
        )
    return value


def _id_param(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not _ID.fullmatch(value):
        raise SimError(
            400,
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(value)


def _client_id_param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not _CLIENT_ID.fullmatch(value):
        raise SimError(
            400,
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range "
            "is '^[\\.A-Z\\:/a-z0-9_-]{1,36}$'.",
        )
    return value


def _symbol(params: Mapping[str, str], market: str) -> str:
    symbol = _mandatory(params, "symbol")
    if symbol not in (UM_SYMBOLS if market == "UM" else CM_SYMBOLS):
        raise SimError(400, -1121, "Invalid symbol.")
    return symbol


def _bool_param(params: Mapping[str, str], name: str) -> bool:
    value = params.get(name, "false").lower()
    if value not in ("true", "false"):
        raise SimError(400, -1100, f"Illegal characters found in parameter '{name}'.")
    return value == "true"


def _side_and_type(params: Mapping[str, str], type_param: str) -> tuple[str, str]:
    """The side and conditional order type of a new order."""
    side = _mandatory(params, "side")
    if side not in ("BUY", "SELL"):
        raise SimError(400, -1100, "Illegal characters found in parameter 'side'.")
    order_type = _mandatory(params, type_param)
    if order_type not in CONDITIONAL_TYPES:
        raise SimError(400, -1116, "Invalid orderType.")
    return side, order_type


Handler = Callable[[SimState, Credentials, Mapping[str, str]], Response]


# -- PAPI handlers ----------------------------------------------------------------------------


def _conditional_ids(params: Mapping[str, str]) -> tuple[int | None, str | None]:
    strategy_id = _id_param(params, "strategyId")
    client_id = _client_id_param(params, "newClientStrategyId")
    if strategy_id is None and client_id is None:
        raise SimError(
            400,
            -1102,
            "Param 'strategyId' or 'newClientStrategyId' must be sent, but both were empty/null!",
        )
    return strategy_id, client_id


def conditional_new(market: str) -> Handler:
    def handle(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
        symbol = _symbol(params, market)
        side, strategy_type = _side_and_type(params, "strategyType")
        now = state.server_time()
        client_id = _client_id_param(params, "newClientStrategyId")
        strategy_id = state.book.next_id()
        trailing = strategy_type == "TRAILING_STOP_MARKET"
        order = ConditionalOrder(
            account=creds.alias,
            market=market,
            strategy_id=strategy_id,
            client_id=client_id or f"sim{strategy_id}",
            symbol=symbol,
            side=side,
            strategy_type=strategy_type,
            position_side=params.get("positionSide", "BOTH"),
            orig_qty=decimal_str(params.get("quantity", "0"), "quantity"),
            price=decimal_str(params.get("price", "0"), "price"),
            stop_price=decimal_str(params.get("stopPrice", "0"), "stopPrice"),
            activate_price=(
                decimal_str(params.get("activationPrice", "0"), "activationPrice")
                if trailing
                else None
            ),
            price_rate=(
                decimal_str(params.get("callbackRate", "0"), "callbackRate") if trailing else None
            ),
            time_in_force=params.get("timeInForce", "GTC"),
            working_type=params.get("workingType", "CONTRACT_PRICE"),
            reduce_only=_bool_param(params, "reduceOnly"),
            price_protect=_bool_param(params, "priceProtect"),
            book_time=now,
            update_time=now,
        )
        state.book.place_conditional(order)
        body = order.as_strategy()
        if market == "CM":
            body["pair"] = symbol.split("_")[0]
        return _json(body)

    return handle


def conditional_cancel(market: str) -> Handler:
    def handle(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
        symbol = _symbol(params, market)
        strategy_id, client_id = _conditional_ids(params)
        order = state.book.cancel_conditional(
            creds.alias, market, symbol, strategy_id, client_id, state.server_time()
        )
        return _json(order.as_strategy())

    return handle


def conditional_query(market: str, *, history: bool) -> Handler:
    def handle(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
        symbol = _symbol(params, market)
        strategy_id, client_id = _conditional_ids(params)
        order = state.book.find_conditional(creds.alias, market, symbol, strategy_id, client_id)
        if order is None or (order.status == "NEW") == history:
            raise no_such_order()
        return _json(order.as_strategy())

    return handle


def _algo_ids(params: Mapping[str, str]) -> tuple[int | None, str | None]:
    algo_id = _id_param(params, "algoId")
    client_id = _client_id_param(params, "clientAlgoId")
    if algo_id is None and client_id is None:
        raise SimError(
            400, -1102, "Param 'algoId' or 'clientAlgoId' must be sent, but both were empty/null!"
        )
    return algo_id, client_id


def algo_new(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
    if _mandatory(params, "algoType") != "CONDITIONAL":
        raise SimError(400, -1100, "Illegal characters found in parameter 'algoType'.")
    symbol = _symbol(params, "UM")
    side, order_type = _side_and_type(params, "type")
    now = state.server_time()
    algo_id = state.book.next_id()
    client_id = _client_id_param(params, "clientAlgoId")
    order = AlgoOrder(
        account=creds.alias,
        algo_id=algo_id,
        client_algo_id=client_id or f"simalgo{algo_id}",
        symbol=symbol,
        side=side,
        order_type=order_type,
        position_side=params.get("positionSide", "BOTH"),
        quantity=decimal_str(params.get("quantity", "0"), "quantity"),
        price=decimal_str(params.get("price", "0"), "price"),
        trigger_price=decimal_str(params.get("triggerPrice", "0"), "triggerPrice"),
        time_in_force=params.get("timeInForce", "GTC"),
        working_type=params.get("workingType", "CONTRACT_PRICE"),
        reduce_only=_bool_param(params, "reduceOnly"),
        price_protect=_bool_param(params, "priceProtect"),
        close_position=_bool_param(params, "closePosition"),
        create_time=now,
        update_time=now,
    )
    state.book.place_algo(order)
    return _json(order.as_algo())


def algo_cancel(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
    algo_id, client_id = _algo_ids(params)
    state.book.cancel_algo(creds.alias, algo_id, client_id, state.server_time())
    return _json({"complete": True})


def algo_query(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
    algo_id, client_id = _algo_ids(params)
    order = state.book.find_algo(creds.alias, algo_id, client_id)
    if order is None:
        raise no_such_order()
    return _json(order.as_algo())


def _optional_symbol(params: Mapping[str, str], market: str) -> str | None:
    return _symbol(params, market) if "symbol" in params else None


def list_weight(params: Mapping[str, str]) -> int:
    """Open-order lists: weight 1 for one symbol, 40 for all of them."""
    return 1 if params.get("symbol") else LIST_WEIGHT_ALL_SYMBOLS


def conditional_open_orders(market: str) -> Handler:
    def handle(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
        symbol = _optional_symbol(params, market)
        orders = state.book.open_conditional(creds.alias, market, symbol)
        return _json([o.as_strategy() for o in orders])

    return handle


CANCEL_ALL_DONE = "The operation of cancel all conditional open order is done."
CANCEL_ALL_ALGO_DONE = "The operation of cancel all open order is done."


def conditional_cancel_all(market: str) -> Handler:
    """``DELETE .../conditional/allOpenOrders``: the code is a *string* on these routes."""

    def handle(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
        symbol = _symbol(params, market)
        state.book.cancel_all_conditional(creds.alias, market, symbol, state.server_time())
        return _json({"code": "200", "msg": CANCEL_ALL_DONE})

    return handle


def algo_cancel_all(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
    """``DELETE /papi/v1/um/algo/allOpenOrders``: the code is an integer here."""
    symbol = _symbol(params, "UM")
    state.book.cancel_all_algo(creds.alias, symbol, state.server_time())
    return _json({"code": 200, "msg": CANCEL_ALL_ALGO_DONE})


def algo_open_orders(state: SimState, creds: Credentials, params: Mapping[str, str]) -> Response:
    symbol = _optional_symbol(params, "UM")
    algo_id = _id_param(params, "algoId")
    algo_type = params.get("algoType")
    if algo_type is not None and algo_type != "CONDITIONAL":
        return _json([])  # the simulator holds CONDITIONAL algo orders only
    return _json([o.as_algo() for o in state.book.open_algo(creds.alias, symbol, algo_id)])


# -- request pipeline -------------------------------------------------------------------------

Weigher = Callable[[Mapping[str, str]], int]


def signed_endpoint(
    state: SimState,
    handler: Handler,
    *,
    order_route: bool,
    um_conditional: bool = False,
    weigh: Weigher | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        arrived_us = ARRIVED_US.get()
        # The weight is charged on arrival, from the parameters as sent, before any check.
        weight = state.use_weight(1 if weigh is None else weigh(request.query_params))
        headers = {"X-MBX-USED-WEIGHT-1M": str(weight)}
        fault, latency_ms = state.injector.draw(request.method)
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        at_us = state.server_time_us()
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "at": at_us // 1000,
            "at_us": at_us,
            "arrived_us": None if arrived_us is None else state.server_time_us(arrived_us),
            "account": None,
            "params": None,
        }
        try:
            _check_limits(state, weight, headers)
            response = await _handle_signed(
                request,
                state,
                handler,
                headers,
                entry,
                order_route=order_route,
                um_conditional=um_conditional,
                drawn=fault,
            )
        except SimError as exc:
            response = _error(exc, headers)
            entry["code"] = exc.code
        entry["status"] = response.status_code
        if "seq" not in entry:  # a held request is logged when it arrives
            state.log(entry)
        await fixed_latency(state.config)
        return response

    return endpoint


async def _handle_signed(
    request: Request,
    state: SimState,
    handler: Handler,
    headers: dict[str, str],
    entry: dict[str, Any],
    *,
    order_route: bool,
    um_conditional: bool,
    drawn: Fault | None,
) -> Response:
    if um_conditional and not state.config.um_conditional_enabled:
        return Response(NOT_FOUND_HTML, status_code=404, media_type="text/html", headers=headers)
    api_key = request.headers.get("x-mbx-apikey")
    if not api_key:
        raise SimError(401, -2014, "API-key format invalid.")
    creds = state.accounts_by_key.get(api_key)
    if creds is None:
        raise SimError(401, -2015, "Invalid API-key, IP, or permissions for action.")
    entry["account"] = creds.alias
    body = await request.body()
    signed: SignedParams = split_signed(request.scope.get("query_string", b""), body)
    entry["params"] = signed.params
    if not verify_signature(creds, signed):
        raise SimError(400, -1022, "Signature for this request is not valid.")
    check_timestamp(signed.params, state.server_time())
    entry["signature"] = signed.signature
    # Only an authenticated request counts toward the account's orders.
    if order_route:
        _count_order(state, creds.alias, headers)
    fault = _scripted(state.faults, request.method) or drawn
    if state.server_time() < state.config.unavailable_until_ms:
        fault = UNAVAILABLE
    if fault is None:
        response = handler(state, creds, signed.params)
        response.headers.update(headers)
        return response
    entry["fault"] = asdict(fault)
    state.count(f"fault_{fault.kind}_{fault.status}")
    if fault.kind == "ban":
        raise state.ban(fault.delay_ms)
    if fault.apply:
        # The order may not be there to change; the client gets the fault either way.
        with contextlib.suppress(SimError):
            handler(state, creds, signed.params)
    if fault.kind == "timeout":
        # Logged on arrival: the exchange has the request whether or not anyone waits for
        # the answer (a later test reading the log is not handed a request released late).
        hold_ms = timeout_hold_ms(state.config, fault)
        entry.update(status=fault.status, held_ms=hold_ms)
        state.log(entry)
        await asyncio.sleep(hold_ms / 1000)
    return fault_response(fault, headers)


def _scripted(faults: deque[Fault], method: str) -> Fault | None:
    """The first queued fault for a request of ``method`` (taken off the queue), if any."""
    for i, fault in enumerate(faults):
        if fault.method is None or fault.method == method:
            del faults[i]
            return fault
    return None


async def fixed_latency(config: SimConfig) -> None:
    """The configured fixed latency of every PAPI answer (none by default)."""
    if config.fixed_latency_ms > 0:
        await asyncio.sleep(config.fixed_latency_ms / 1000)


def timeout_hold_ms(config: SimConfig, fault: Fault) -> int:
    """A scripted fault's own delay_ms, else (profiles) the configured hold."""
    return fault.delay_ms or config.timeout_hold_ms


def _count_order(state: SimState, account: str, headers: dict[str, str]) -> None:
    orders = state.count_order(account)
    headers["X-MBX-ORDER-COUNT-1M"] = str(orders)
    if orders > state.config.order_limit:
        state.count("orders_429")
        headers["Retry-After"] = str(state.window_left_s(state.config.order_window_ms))
        raise SimError(
            429,
            -1015,
            f"Too many new orders; current limit is "
            f"{state.config.order_limit} orders per "
            f"{state.config.order_window_ms // 1000} SECOND.",
        )


def _check_limits(state: SimState, weight: int, headers: dict[str, str]) -> None:
    """IP bans and the IP weight limit, checked before anything else, as the exchange does."""
    if state.banned_until > state.server_time():
        headers["Retry-After"] = str(max(1, -(-(state.banned_until - state.server_time()) // 1000)))
        raise state.banned()
    if weight > state.config.weight_limit:
        state.violations += 1
        if state.violations >= state.config.ban_after_violations:
            headers["Retry-After"] = str(max(1, state.config.ban_ms // 1000))
            raise state.ban(state.config.ban_ms)
        state.count("weight_429")
        headers["Retry-After"] = str(state.window_left_s(state.config.weight_window_ms))
        raise SimError(429, -1003, TOO_MANY.format(limit=state.config.weight_limit))


def build_app(state: SimState) -> Starlette:
    def signed(
        path: str,
        methods: dict[str, Handler],
        *,
        order: bool = False,
        um_cond: bool = False,
        weigh: Weigher | None = None,
    ) -> list[Route]:
        return [
            Route(
                path,
                signed_endpoint(
                    state,
                    h,
                    order_route=order and m != "GET",
                    um_conditional=um_cond,
                    weigh=weigh,
                ),
                methods=[m],
            )
            for m, h in methods.items()
        ]

    async def ping(_: Request) -> Response:
        weight = state.use_weight(1)
        await fixed_latency(state.config)
        return _json({}, headers={"X-MBX-USED-WEIGHT-1M": str(weight)})

    async def server_time(_: Request) -> Response:
        weight = state.use_fapi_weight(1)
        return _json(
            {"serverTime": state.server_time()}, headers={"X-MBX-USED-WEIGHT-1M": str(weight)}
        )

    routes: list[Route] = [Route("/papi/v1/ping", ping), Route("/fapi/v1/time", server_time)]
    for market in ("UM", "CM"):
        base = f"/papi/v1/{market.lower()}/conditional"
        um_cond = market == "UM"
        routes += signed(
            f"{base}/order",
            {"POST": conditional_new(market), "DELETE": conditional_cancel(market)},
            order=True,
            um_cond=um_cond,
        )
        routes += signed(
            f"{base}/openOrder", {"GET": conditional_query(market, history=False)}, um_cond=um_cond
        )
        routes += signed(
            f"{base}/orderHistory",
            {"GET": conditional_query(market, history=True)},
            um_cond=um_cond,
        )
        routes += signed(
            f"{base}/openOrders",
            {"GET": conditional_open_orders(market)},
            um_cond=um_cond,
            weigh=list_weight,
        )
        routes += signed(
            f"{base}/allOpenOrders",
            {"DELETE": conditional_cancel_all(market)},
            order=True,
            um_cond=um_cond,
        )
    routes += signed(
        "/papi/v1/um/algo/order", {"POST": algo_new, "DELETE": algo_cancel}, order=True
    )
    routes += signed("/papi/v1/um/algo/algoOrder", {"GET": algo_query})
    routes += signed(
        "/papi/v1/um/algo/openAlgoOrders", {"GET": algo_open_orders}, weigh=list_weight
    )
    routes += signed("/papi/v1/um/algo/allOpenOrders", {"DELETE": algo_cancel_all}, order=True)
    routes += control_routes(state)
    return Starlette(routes=routes)


# -- control plane ----------------------------------------------------------------------------


def seed_order(state: SimState, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Place an order directly in the book (no signature), for tests and the demo."""
    account = str(spec["account"])
    now = state.server_time()
    oid = state.book.next_id()
    status = str(spec.get("status", "NEW"))
    if spec.get("kind", "conditional") == "algo":
        algo = AlgoOrder(
            account=account,
            algo_id=oid,
            client_algo_id=str(spec.get("client_algo_id") or f"simalgo{oid}"),
            symbol=str(spec.get("symbol", "BTCUSDT")),
            side=str(spec.get("side", "SELL")),
            order_type=str(spec.get("type", "STOP_MARKET")),
            quantity=str(spec.get("quantity", "0.010")),
            trigger_price=str(spec.get("trigger_price", "25000.10")),
            create_time=now,
            update_time=now,
            status=status,
        )
        state.book.place_algo(algo)
        return {"kind": "algo", "algo_id": oid, "client_algo_id": algo.client_algo_id}
    market = str(spec.get("market", "UM"))
    symbol = str(spec.get("symbol", "BTCUSDT" if market == "UM" else "BTCUSD_PERP"))
    strategy_type = str(spec.get("type", "STOP_MARKET"))
    trailing = strategy_type == "TRAILING_STOP_MARKET"
    order = ConditionalOrder(
        account=account,
        market=market,
        strategy_id=oid,
        client_id=str(spec.get("client_strategy_id") or f"sim{oid}"),
        symbol=symbol,
        side=str(spec.get("side", "SELL")),
        strategy_type=strategy_type,
        orig_qty=str(spec.get("quantity", "0.010")),
        price=str(spec.get("price", "0")),
        stop_price=str(spec.get("stop_price", "25000.10")),
        activate_price=str(spec.get("activate_price", "26000.5")) if trailing else None,
        price_rate=str(spec.get("price_rate", "0.3")) if trailing else None,
        book_time=now,
        update_time=now,
        status=status,
    )
    state.book.place_conditional(order)
    return {
        "kind": "conditional",
        "market": market,
        "symbol": symbol,
        "strategy_id": oid,
        "client_strategy_id": order.client_id,
    }


def control_routes(state: SimState) -> list[Route]:
    async def health(_: Request) -> Response:
        return _json({"ok": True})

    async def seed(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            created = [seed_order(state, spec) for spec in body["orders"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return _json({"error": f"bad seed request: {exc}"}, 400)
        except SimError as exc:
            return _json({"error": exc.msg}, 400)
        return _json({"orders": created})

    async def requests(request: Request) -> Response:
        since = int(request.query_params.get("since", "0"))
        return _json(
            {"requests": [r for r in state.requests if r["seq"] > since], "last": state.request_seq}
        )

    async def cancels(_: Request) -> Response:
        return _json({"cancels": [asdict(c) for c in state.book.cancels]})

    async def orders(_: Request) -> Response:
        return _json(
            {
                "conditional": [asdict(o) for o in state.book.conditional.values()],
                "algo": [asdict(o) for o in state.book.algo.values()],
            }
        )

    async def stats(_: Request) -> Response:
        return _json(state.stats)

    async def settle(_: Request) -> Response:
        # What the simulator keeps (the book, the cancels, the request log) only grows; once
        # it holds some 100,000 orders Python's full collection walks it for 60-250 ms, and
        # a request arriving meanwhile is noted that late: an exchange's pause a benchmark
        # would count against the client. Between runs: collect once, then leave everything
        # held now out of later collections (freed by reference count as ever).
        collected = gc.collect()
        gc.freeze()
        return _json({"collected": collected, "frozen": gc.get_freeze_count()})

    async def faults(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            if body.get("clear"):
                state.faults.clear()
            state.faults.extend(Fault(**spec) for spec in body["faults"])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            return _json({"error": f"bad faults: {exc}"}, 400)
        return _json({"queued": len(state.faults)})

    async def config(request: Request) -> Response:
        if request.method == "POST":
            try:
                changes = orjson.loads(await request.body())
                if changes.pop("reset_limits", False):
                    state.reset_limits()
                if "unavailable_for_ms" in changes:
                    for_ms = int(changes.pop("unavailable_for_ms"))
                    changes["unavailable_until_ms"] = state.server_time() + max(for_ms, 0)
                for name, value in changes.items():
                    if not hasattr(state.config, name):
                        return _json({"error": f"unknown setting {name}"}, 400)
                    setattr(state.config, name, type(getattr(state.config, name))(value))
                if state.config.timeout_hold_ms < 0:
                    state.config.timeout_hold_ms = DEFAULT_TIMEOUT_HOLD_MS
                    return _json({"error": "timeout_hold_ms must not be negative"}, 400)
                if state.config.fixed_latency_ms < 0:
                    state.config.fixed_latency_ms = 0
                    return _json({"error": "fixed_latency_ms must not be negative"}, 400)
                if state.config.profile not in PROFILES:
                    bad = state.config.profile
                    state.config.profile = "none"
                    return _json(
                        {"error": f"unknown profile {bad!r}; known: {', '.join(sorted(PROFILES))}"},
                        400,
                    )
                state.apply_config()
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
                return _json({"error": f"bad config: {exc}"}, 400)
        return _json(asdict(state.config))

    return [
        Route("/_sim/health", health),
        Route("/_sim/orders", seed, methods=["POST"]),
        Route("/_sim/orders", orders, methods=["GET"]),
        Route("/_sim/requests", requests),
        Route("/_sim/cancels", cancels),
        Route("/_sim/config", config, methods=["GET", "POST"]),
        Route("/_sim/faults", faults, methods=["POST"]),
        Route("/_sim/stats", stats),
        Route("/_sim/settle", settle, methods=["POST"]),
    ]
