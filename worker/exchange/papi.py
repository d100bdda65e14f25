"""HTTP adapter for PAPI: one pooled ``httpx.AsyncClient``, signing per send, and the
translation of every library error into the :mod:`worker.core.errors` tree at this boundary.

One request, in order:

1. **admission** by the rate governor (waiting for room, never past the deadline) — nothing
   held meanwhile, so an account waiting for its order window blocks no other account;
2. a **connection permit** (at most ``max_connections`` requests on the wire); if the wait
   for it moved the request out of the windows it was counted in, it is uncounted and
   admitted again;
3. **signing** (:class:`~worker.exchange.signing.PapiAuth`): one clock reading gives ``timestamp``
   and ``recvWindow``, and nothing is signed after ``expires_at``;
4. the **exchange**: the answer's head is read and fed to the governor, then the body, at
   most :data:`MAX_ANSWER_BYTES`; all of it, from the first byte written to the body's last,
   within ``timeout_s`` (HTTP_TIMEOUT_S): an answer not complete by then is no answer (a
   server that drips a byte at a time cannot hold a request longer).

The answer's headers reach the governor only as ASCII-digit numbers (:func:`governed_headers`):
``"²"`` passes ``str.isdigit`` and ``"inf"`` passes ``float``; neither is a count or a pause.

Whatever happens, the governor's ticket is ended exactly once: ``observe`` for an answer,
``refund`` for a request that never left, ``settle`` for one that left and got no answer.
Only :class:`~worker.core.errors.PapiError` subclasses leave this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson

from worker import metrics, tracing
from worker.core.errors import (
    ExchangeError,
    NoAnswerError,
    NotAdmittedError,
    NotSentError,
    PapiError,
)
from worker.exchange.accounts import Credentials
from worker.exchange.governor import GovernorDeadlineError, Priority, Purpose, RateGovernor, Ticket
from worker.exchange.headers import ascii_int
from worker.exchange.signing import PapiAuth, SigningRefusedError
from worker.exchange.transport import FastTransport

log = logging.getLogger(__name__)

_USER_AGENT = "cancel-worker/0.1"
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a cancel answer is < 2 KiB; a full open-orders list fits
_TEXT_MAX = 120

# Library errors raised before a byte of the request can have left.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


# Statuses whose meaning does not depend on the body: a rate-limit stop is a rate-limit stop.
_STATUS_SPEAKS = frozenset({418, 429})

# Answer headers the rate governor reads: the exchange's counts and Retry-After.
_GOVERNED_PREFIXES = ("x-mbx-used-weight", "x-mbx-order-count")
# Beyond the attempt's own bound (HTTP_TIMEOUT_S, enforced by the transport): the connect
# timeout and a margin, for a transport that does not honour ``attempt_timeout``.
_OUTER_MARGIN_S = 1.0


def governed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The answer's headers the rate governor reads (weight and order counts, Retry-After),
    each kept only when its value is ASCII digits (:func:`worker.exchange.headers.ascii_int`), as
    plain digits; anything else is left out, so the governor uses its default."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "retry-after" or lowered.startswith(_GOVERNED_PREFIXES):
            number = ascii_int(value)
            if number is not None:
                kept[lowered] = str(number)
    return kept


@dataclass(frozen=True, slots=True)
class PapiResponse:
    status: int
    body: Any
    headers: Mapping[str, str]


def _printable(raw: bytes) -> str:
    text = raw[: _TEXT_MAX * 4].decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:_TEXT_MAX]


def _error_from(status: int, raw: bytes) -> ExchangeError:
    """An error answer: ``code`` and ``msg`` from Binance's JSON body only, never from the
    reason phrase, so a gateway's bare "503 Service Unavailable" is not mistaken for the
    exchange's "not executed" message."""
    code: int | None = None
    msg: str | None = None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        raw_code, raw_msg = body.get("code"), body.get("msg")
        code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        msg = raw_msg if isinstance(raw_msg, str) else None
    return ExchangeError(status, code, msg, text="" if msg is not None else _printable(raw))


class Reachability:
    """Whether the exchange accepts connections; each change said once, at WARNING."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._down_since: float | None = None
        self._not_sent = 0
        metrics.EXCHANGE_REACHABLE.set(1)

    def refused(self, exc: BaseException) -> None:
        self._not_sent += 1
        metrics.NOT_SENT.inc()
        if self._down_since is None:
            self._down_since = time.monotonic()
            metrics.EXCHANGE_REACHABLE.set(0)
            metrics.EXCHANGE_OUTAGES.inc()
            log.warning(
                "exchange unreachable at %s (%s): requests that were not sent are tried "
                "again until their deadline",
                self._url,
                type(exc).__name__,
            )

    def answered(self) -> None:
        if self._down_since is not None:
            log.warning(
                "exchange reachable again at %s after %.1fs (%d attempt(s) not sent meanwhile)",
                self._url,
                time.monotonic() - self._down_since,
                self._not_sent,
            )
            self._down_since, self._not_sent = None, 0
            metrics.EXCHANGE_REACHABLE.set(1)

    @property
    def reachable(self) -> bool:
        return self._down_since is None


class PapiClient:
    """Signed requests to PAPI. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        clock: Callable[[], int],
        timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        governor: RateGovernor | None = None,
    ) -> None:
        self._clock = clock
        self._governor = governor
        self._connections = asyncio.Semaphore(max_connections)
        self._auth: dict[str, PapiAuth] = {}
        # Built once: a request is assembled from these without parsing a URL or merging
        # client defaults (httpx's build_request costs about 37 µs a request).
        self._base_url = httpx.URL(base_url)
        self._urls: dict[str, httpx.URL] = {}
        self._headers: dict[str, httpx.Headers] = {}
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s).as_dict()
        self._attempt_s = timeout_s
        self._outer_s = timeout_s + connect_timeout_s + _OUTER_MARGIN_S
        self.reachability = Reachability(base_url)
        # httpx's own pool (httpcore) scans every pooled connection on every request, so its
        # cost grows with the pool; FastTransport's does not (docs/performance.md).
        self._transport = transport or FastTransport(max_connections=max_connections)
        self._closed = False

    async def __aenter__(self) -> PapiClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._transport.aclose()

    def _auth_for(self, creds: Credentials) -> PapiAuth:
        auth = self._auth.get(creds.alias)
        if auth is None:
            auth = self._auth[creds.alias] = PapiAuth(creds.api_key, creds.signer, self._clock)
        return auth

    def _request(self, creds: Credentials, method: str, path: str) -> httpx.Request:
        """An unsigned request; the auth flow adds the signed query at send time."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._base_url.join(path)
        headers = self._headers.get(creds.alias)
        if headers is None:
            headers = self._headers[creds.alias] = httpx.Headers(
                {"User-Agent": _USER_AGENT, "X-MBX-APIKEY": creds.api_key}
            )
        return httpx.Request(
            method,
            url,
            headers=headers,
            extensions={"timeout": self._timeout, "attempt_timeout": self._attempt_s},
        )

    async def signed(
        self,
        creds: Credentials,
        method: str,
        path: str,
        query: str,
        *,
        is_order: bool = False,
        deadline_ms: int | None = None,
        expires_at: int | None = None,
        recv_window_ms: int = 5_000,
        route: str = "other",
        priority: Priority = Priority.NORMAL,
        purpose: Purpose | None = None,
    ) -> PapiResponse:
        """Send one signed request; return its 2XX JSON answer or raise a :class:`PapiError`.

        ``query``: the request's parameters, encoded (:func:`worker.core.routes.encode_params`).

        ``deadline_ms``: the governor admits nothing at or after it (``NotAdmittedError``).
        ``expires_at``: nothing is signed at or after it, and ``recvWindow`` never reaches
        past it (``NotAdmittedError`` with ``expired``).

        ``route``: the label of the request's latency in ``cancel_worker_exchange_request_seconds``
        (a route name: a bounded set).

        ``priority`` and ``purpose``: how the governor queues it when requests wait (a kill
        switch goes first; reconciliation's weight is capped per account).
        """
        limit = deadline_ms if expires_at is None else min(deadline_ms or expires_at, expires_at)
        while True:
            if tracing.ON:
                with tracing.span(tracing.GOVERNOR_WAIT, _admission(is_order, priority, purpose)):
                    ticket = await self._admit(
                        creds.alias, is_order, limit, expires_at, priority, purpose
                    )
            else:
                ticket = await self._admit(
                    creds.alias, is_order, limit, expires_at, priority, purpose
                )
            async with self._connections:
                if (
                    ticket is not None
                    and self._governor is not None
                    and not self._governor.covers(ticket)
                ):
                    # The wait for a permit moved it out of the windows it was counted in.
                    self._governor.refund(ticket)
                    continue
                if tracing.ON:
                    return await self._traced_exchange(
                        creds, method, path, query, ticket, recv_window_ms, expires_at, route
                    )
                return await self._exchange(
                    creds, method, path, query, ticket, recv_window_ms, expires_at, route
                )

    async def _admit(
        self,
        account: str,
        is_order: bool,
        deadline_ms: int | None,
        expires_at: int | None,
        priority: Priority = Priority.NORMAL,
        purpose: Purpose | None = None,
    ) -> Ticket | None:
        if self._governor is None:
            return None
        try:
            return await self._governor.acquire(
                account,
                is_order=is_order,
                deadline_ms=deadline_ms,
                priority=priority,
                purpose=purpose,
            )
        except GovernorDeadlineError as exc:
            expired = expires_at is not None and exc.wait_until_ms >= expires_at
            raise NotAdmittedError(
                str(exc), why=exc.reason, wait_until_ms=exc.wait_until_ms, expired=expired
            ) from None

    async def _traced_exchange(
        self,
        creds: Credentials,
        method: str,
        path: str,
        query: str,
        ticket: Ticket | None,
        recv_window_ms: int,
        expires_at: int | None,
        route: str,
    ) -> PapiResponse:
        """:meth:`_exchange` in its span: the method, the route's path (never the query, the
        signature or the key), the status and the exchange's code."""
        url = self._base_url
        with tracing.http_attempt(
            method, path, query, route, url.scheme, url.host, url.port
        ) as span:
            try:
                response = await self._exchange(
                    creds, method, path, query, ticket, recv_window_ms, expires_at, route
                )
            except ExchangeError as exc:
                tracing.http_failed(span, exc.status, exc.code, type(exc).__name__)
                raise
            except PapiError as exc:
                tracing.http_failed(span, None, None, type(exc).__name__)
                raise
            tracing.http_answered(span, response.status)
            return response

    async def _exchange(
        self,
        creds: Credentials,
        method: str,
        path: str,
        query: str,
        ticket: Ticket | None,
        recv_window_ms: int,
        expires_at: int | None,
        route: str,
    ) -> PapiResponse:
        """Sign, send and read one request, ending the governor's ticket exactly once."""
        end = _TicketEnd(self._governor, ticket)
        auth = self._auth_for(creds).for_request(recv_window_ms, expires_at, query)
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(self._outer_s):
                    response = await self._transmit(self._request(creds, method, path), auth, end)
                    self.reachability.answered()
                    try:
                        status, headers = response.status_code, response.headers
                        raw, unreadable = await _read_body(response)
                    finally:
                        await response.aclose()
            except (NoAnswerError, TimeoutError) as exc:
                metrics.EXCHANGE_SECONDS.labels(route, "no_answer").observe(
                    time.monotonic() - started
                )
                if isinstance(exc, TimeoutError):
                    raise NoAnswerError(f"no complete answer within {self._outer_s:g} s") from None
                raise
            metrics.EXCHANGE_SECONDS.labels(route, str(status)).observe(time.monotonic() - started)
            error = None if 200 <= status < 300 or raw is None else _error_from(status, raw)
            end.observe(status, governed_headers(headers), error)
            return _interpret(status, headers, raw, unreadable, error)
        except PapiError:
            raise
        except Exception as exc:
            # A library error of a kind not foreseen: the request may have left.
            log.exception("unexpected error from the HTTP client on %s %s", method, path)
            raise NoAnswerError(f"{type(exc).__name__} from the HTTP client") from exc
        finally:
            end.settle()

    async def _transmit(
        self, request: httpx.Request, auth: PapiAuth, end: _TicketEnd
    ) -> httpx.Response:
        """Send and wait for the answer's head; translate what can go wrong before it."""
        if self._closed:  # shut down: a pool would open anew, and send after the end
            end.refund()
            raise NotSentError("the client is closed: nothing was sent")
        try:
            return await self._send(request, auth)
        except SigningRefusedError as exc:
            end.refund()
            raise NotAdmittedError(
                str(exc), why="expired", wait_until_ms=exc.now_ms, expired=True
            ) from None
        except _NOT_SENT as exc:
            end.refund()
            self.reachability.refused(exc)
            raise NotSentError(f"{type(exc).__name__}: nothing was sent") from exc
        except httpx.HTTPError as exc:
            # Read/write timeouts, resets, protocol errors: the request may have arrived.
            raise NoAnswerError(f"{type(exc).__name__} after the request was sent") from exc

    async def _send(self, request: httpx.Request, auth: httpx.Auth) -> httpx.Response:
        """httpx's auth flow over the transport, as ``AsyncClient.send`` runs it, without the
        client's own steps, of which the worker uses none (base URL and default headers:
        the request is built whole; redirects: not followed; cookies, event hooks, proxy
        mounts: none). In a loop with an in-memory transport a request took 52 to 68 µs through
        ``AsyncClient.send`` and 15 to 24 µs this way (docs/performance.md). Nor is the answer
        bound to its stream, as the client binds it to time it: that reference cycle made
        every answer, with its request, wait for the cyclic garbage collector. The answer's
        body is left unread."""
        flow = auth.sync_auth_flow(request)
        request = next(flow)
        while True:
            response = await self._transport.handle_async_request(request)
            try:
                request = flow.send(response)
            except StopIteration:
                return response
            await response.aclose()


def _admission(is_order: bool, priority: Priority, purpose: Purpose | None) -> dict[str, Any]:
    """A governor wait's span attributes."""
    attributes: dict[str, Any] = {
        "cancel_worker.is_order": is_order,
        "cancel_worker.priority": priority.name.lower(),
    }
    if purpose is not None:
        attributes["cancel_worker.purpose"] = purpose.name.lower()
    return attributes


class _TicketEnd:
    """Ends one governor ticket exactly once: observed, refunded, or settled."""

    def __init__(self, governor: RateGovernor | None, ticket: Ticket | None) -> None:
        self._governor = governor
        self._ticket = ticket
        self._ended = governor is None or ticket is None

    def observe(self, status: int, headers: Mapping[str, str], error: ExchangeError | None) -> None:
        """Tell the governor what the exchange answered. The answer stands whatever the
        governor makes of it: a failure to learn from it is logged, never turned into "no
        answer" (that would reconcile, or report as unknown, a cancel the exchange confirmed)."""
        if self._ended or self._governor is None or self._ticket is None:
            return
        self._ended = True
        code, msg = (error.code, error.msg) if error is not None else (None, None)
        try:
            self._governor.observe(self._ticket, status, headers, code, msg)
        except Exception:
            log.exception("the rate governor could not learn from an HTTP %d answer", status)

    def refund(self) -> None:
        if not self._ended and self._governor is not None and self._ticket is not None:
            self._governor.refund(self._ticket)
        self._ended = True

    def settle(self) -> None:
        if not self._ended and self._governor is not None and self._ticket is not None:
            self._governor.settle(self._ticket)
        self._ended = True


def _interpret(
    status: int,
    headers: Mapping[str, str],
    raw: bytes | None,
    unreadable: str | None,
    error: ExchangeError | None,
) -> PapiResponse:
    """The answer as a response, or the error it is (pure)."""
    if error is not None:
        raise error
    ok = 200 <= status < 300
    if unreadable is not None and (ok or status not in _STATUS_SPEAKS):
        # What the exchange said, or whether it acted, is in the part that cannot be read.
        raise NoAnswerError(f"HTTP {status} with {unreadable}")
    if not ok:
        raise ExchangeError(status, None, None, text=unreadable or "")
    try:
        body = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        raise NoAnswerError(f"HTTP {status} with a body that is not JSON") from None
    return PapiResponse(status, body, headers)


async def _read_body(response: httpx.Response) -> tuple[bytes | None, str | None]:
    """The decoded body, at most :data:`MAX_ANSWER_BYTES`; or None and why it is unreadable."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                return None, f"a body over {MAX_ANSWER_BYTES} bytes"
            chunks.append(chunk)
    except httpx.HTTPError as exc:  # DecodingError, a read timeout or reset mid-body
        why = _printable(str(exc).encode())
        return None, f"a body that could not be read ({type(exc).__name__}: {why})"
    return b"".join(chunks), None
