"""HTTP adapter for PAPI: one pooled ``httpx.AsyncClient``, signing per send, and the
translation of library errors into the :mod:`worker.errors` tree at this boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson

from worker.accounts import Credentials
from worker.errors import ExchangeError, PapiError, TransportError
from worker.governor import RateGovernor
from worker.signing import PapiAuth, encode_params

log = logging.getLogger(__name__)

_USER_AGENT = "cancel-worker/0.1"


class MalformedAnswerError(PapiError):
    """A 2XX answer whose body cannot be read: whether the cancel happened is unknown."""


@dataclass(frozen=True, slots=True)
class PapiResponse:
    status: int
    body: Any
    headers: Mapping[str, str]


def _error_from(response: httpx.Response) -> ExchangeError:
    code: int | None = None
    msg: str | None = None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        raw_code, raw_msg = body.get("code"), body.get("msg")
        code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        msg = raw_msg if isinstance(raw_msg, str) else None
    if msg is None:
        text = response.text.strip()
        msg = text[:200] if text else (response.reason_phrase or None)
    return ExchangeError(response.status_code, code, msg)


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
        # A request leaves as soon as the governor admits it: it never then queues for a
        # pooled connection, so it reaches the exchange in the window it was counted in.
        self._connections = asyncio.Semaphore(max_connections)
        self._auth: dict[str, PapiAuth] = {}
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"User-Agent": _USER_AGENT},
            transport=transport,
            follow_redirects=False,
        )

    async def __aenter__(self) -> PapiClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _auth_for(self, creds: Credentials) -> PapiAuth:
        auth = self._auth.get(creds.alias)
        if auth is None:
            auth = self._auth[creds.alias] = PapiAuth(creds.api_key, creds.signer, self._clock)
        return auth

    async def signed(
        self,
        creds: Credentials,
        method: str,
        path: str,
        params: tuple[tuple[str, str], ...],
        *,
        is_order: bool = False,
        deadline_ms: int | None = None,
    ) -> PapiResponse:
        """Send one signed request; raise :class:`PapiError` unless the answer is 2XX JSON.

        With a governor, first wait for room in the rate budgets (never past ``deadline_ms``:
        :class:`~worker.governor.GovernorDeadlineError`), and feed it every answer.
        """
        async with self._connections:
            if self._governor is not None:
                await self._governor.acquire(
                    creds.alias, is_order=is_order, deadline_ms=deadline_ms
                )
            try:
                return await self._send(creds, method, path, params, is_order)
            except TransportError:
                if self._governor is not None:
                    self._governor.settle(creds.alias, is_order=is_order)
                raise

    async def _send(
        self,
        creds: Credentials,
        method: str,
        path: str,
        params: tuple[tuple[str, str], ...],
        is_order: bool,
    ) -> PapiResponse:
        url = f"{path}?{encode_params(params)}" if params else path
        try:
            response = await self._http.request(method, url, auth=self._auth_for(creds))
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransportError(
                f"{type(exc).__name__} before the request was sent", written=False
            ) from exc
        except httpx.TransportError as exc:
            # Read/write timeouts, resets, protocol errors: the request may have arrived.
            raise TransportError(
                f"{type(exc).__name__} after the request was sent", written=True
            ) from exc
        if not 200 <= response.status_code < 300:
            error = _error_from(response)
            if self._governor is not None:
                self._governor.observe(
                    creds.alias,
                    response.status_code,
                    response.headers,
                    error.code,
                    error.msg,
                    is_order=is_order,
                )
            raise error
        if self._governor is not None:
            self._governor.observe(
                creds.alias, response.status_code, response.headers, is_order=is_order
            )
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise MalformedAnswerError(
                f"HTTP {response.status_code} with a body that is not JSON"
            ) from exc
        return PapiResponse(response.status_code, body, response.headers)
