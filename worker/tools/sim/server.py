"""Running the simulator under uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import h11
import orjson
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker.exchange.accounts import Credentials
from worker.tools.sim.app import (
    ARRIVED_US,
    SimConfig,
    SimState,
    SimulatedResetError,
    build_app,
    seed_order,
)

log = logging.getLogger(__name__)


def state_from_accounts(accounts: Mapping[str, Credentials], config: SimConfig) -> SimState:
    state = SimState(accounts_by_key={c.api_key: c for c in accounts.values()}, config=config)
    state.apply_config()
    return state


class _HideSimulatedResets(logging.Filter):
    """A simulated reset is the point, not a server error worth a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedResetError))


class _ArrivalStampingH11(H11Protocol):
    """uvicorn's h11 protocol, noting when each request's first bytes arrive.

    That is the exchange's receive time, before the simulator parses, routes or schedules
    anything. The stamp lives in the connection's context, and the task that serves the
    request inherits it. A pipelined request (sent before the previous answer; no client
    we meet does this) keeps the stamp of the request before it.
    """

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            ARRIVED_US.set(time.time_ns() // 1000)
        super().data_received(data)


class _EmbeddedServer(uvicorn.Server):
    """Signals belong to the process embedding the simulator, not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def running_sim(
    state: SimState, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the simulator in this event loop; yields its base URL."""
    config = uvicorn.Config(
        build_app(state),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=_ArrivalStampingH11,
    )
    logging.getLogger("uvicorn.error").addFilter(_HideSimulatedResets())
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(), name="papi-sim")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("simulator exited during start-up")
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        await task


async def serve_forever(
    accounts: Mapping[str, Credentials],
    host: str,
    port: int,
    config: SimConfig,
    seed: Sequence[Mapping[str, Any]] = (),
) -> None:
    state = state_from_accounts(accounts, config)
    if seed:
        placed = [seed_order(state, spec) for spec in seed]
        print(orjson.dumps({"seeded": placed}).decode(), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_sim(state, host, port) as url:
        print(f"SIM_READY {url}", flush=True)
        log.info(
            "PAPI simulator listening on %s (accounts: %s)",
            url,
            ", ".join(sorted(c.alias for c in state.accounts_by_key.values())),
        )
        await stop.wait()
