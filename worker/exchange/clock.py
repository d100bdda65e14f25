"""The exchange clock: local time corrected by an estimated offset.

PAPI has no time endpoint; the offset is estimated from ``CANCEL_WORKER_TIME_URL``
(``{"serverTime": ms}``) as ``serverTime - midpoint(request sent, answer received)``, refreshed
periodically, and re-estimated when the exchange answers -1021. Rejections of requests signed
with the same estimate coalesce into one sync (the estimate's ``generation`` tells them apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx
import orjson

from worker.core.timeutil import now_ms

log = logging.getLogger(__name__)


class ClockSyncError(RuntimeError):
    """The time endpoint could not be read."""


class ExchangeClock:
    def __init__(
        self,
        time_url: str,
        *,
        refresh_s: float = 60.0,
        timeout_s: float = 2.0,
        local: Callable[[], int] = now_ms,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = time_url
        self._refresh_s = refresh_s
        self._local = local
        # Proxy variables are ignored, as by the PAPI client: the clock must time the path the
        # cancels take (a proxy would skew the midpoint, or fail where the cancels succeed).
        self._http = httpx.AsyncClient(timeout=timeout_s, transport=transport, trust_env=False)
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        self.offset_ms = 0
        self.round_trip_ms: int | None = None
        self.generation = 0  # successful syncs so far
        self.synced_at_ms: int | None = None  # local time of the last successful sync

    def now(self) -> int:
        """Best estimate of the exchange's time, in ms."""
        return self._local() + self.offset_ms

    @property
    def refresh_s(self) -> float:
        return self._refresh_s

    async def sync(self) -> None:
        """Re-estimate the offset now."""
        async with self._lock:
            await self._sync_locked()

    async def resync(self, seen_generation: int) -> None:
        """After a -1021 on a request signed at ``seen_generation``: sync, unless another
        caller already did since that request was signed (concurrent rejections coalesce).
        A failure is logged; the caller's retry then fails on its own terms."""
        async with self._lock:
            if self.generation != seen_generation:
                return
            try:
                await self._sync_locked()
            except ClockSyncError as exc:
                log.warning("clock resync failed: %s", exc)

    async def _sync_locked(self) -> None:
        sent = self._local()
        try:
            response = await self._http.get(self._url)
            received = self._local()
            server = orjson.loads(response.content)["serverTime"]
        except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ClockSyncError(
                f"cannot read the exchange time from {self._url}: {type(exc).__name__}"
            ) from exc
        if not isinstance(server, int) or isinstance(server, bool):
            raise ClockSyncError(f"{self._url} answered a serverTime that is not an integer")
        self.round_trip_ms = received - sent
        self.offset_ms = server - (sent + received) // 2
        self.generation += 1
        self.synced_at_ms = received
        log.info(
            "exchange clock offset %+d ms (round trip %d ms)", self.offset_ms, self.round_trip_ms
        )

    async def start(self) -> None:
        """Sync once (failure is logged, offset stays 0) and keep refreshing in the background."""
        try:
            await self.sync()
        except ClockSyncError as exc:
            log.warning("initial clock sync failed, using the local clock: %s", exc)
        self._refresher = asyncio.create_task(self._refresh(), name="clock-refresh")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.sync()
            except ClockSyncError as exc:
                log.warning("periodic clock sync failed: %s", exc)

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self._http.aclose()
