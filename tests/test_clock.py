"""The exchange clock against the simulator's time endpoint."""

from __future__ import annotations

import pytest

from tests.support import SimControl
from worker.exchange.clock import ExchangeClock

# A proxy that is not there: port 9 (discard) on loopback refuses connections.
NO_SUCH_PROXY = "http://127.0.0.1:9"


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])  # the URL is http:
async def test_the_clock_reaches_the_exchange_the_way_the_cancels_do(
    sim: SimControl, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # The PAPI client ignores proxy variables (its transport connects directly); a clock
    # that honoured them would time the exchange over another path, or not reach it at all
    # while every cancel does.
    monkeypatch.setenv(variable, NO_SUCH_PROXY)
    monkeypatch.setenv(variable.lower(), NO_SUCH_PROXY)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    clock = ExchangeClock(f"{sim.url}/fapi/v1/time", timeout_s=2.0)
    try:
        await clock.sync()
    finally:
        await clock.aclose()
    assert clock.generation == 1
    assert clock.round_trip_ms is not None and clock.round_trip_ms < 2000
