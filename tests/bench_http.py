"""``python -m tests.bench_http``: the CPU cost of the PAPI client's HTTP stack, per variant.

The server runs in its own process, so the CPU time measured here (``time.process_time``
of this process) is the client's alone: the simulator (``--server sim``, default: signed
algo cancels, each of a freshly seeded order, every answer a 200 checked) or a canned
keep-alive server (``--server canned``: one fixed JSON answer to anything, much cheaper than
the simulator, so the client's CPU rather than the server's sets the pace). Each run gets a
server process of its own, so every variant meets the same empty book.

Each variant sends ``--requests`` signed cancels, ``--concurrency`` at a time, after a
warm-up that opens its connections. A request is what the worker does: a signed
``httpx.Request`` sent with ``stream=True`` and an ``httpx.Auth`` that signs it, the body
read with ``aiter_bytes`` under a size cap, the answer parsed as JSON. Variants:

* ``httpx``: ``httpx.AsyncClient`` with its default transport (httpcore and h11), pool sizes
  8, 16 and 64;
* ``aiohttp``: httpx over ``httpx_aiohttp.AiohttpTransport`` (only if that is installed);
* ``fast``: httpx over :class:`worker.exchange.transport.FastTransport`, pool sizes 8, 16 and 64;
* ``fast+direct``: the same, the request built as ``httpx.Request`` from a parsed URL and
  prebuilt headers instead of by ``AsyncClient.build_request``, and the signed query set
  with ``worker.exchange.signing.with_query`` (without parsing the URL again), as the worker does;
* ``raw``: the transport's connection pool driven directly, without any httpx object (the
  request bytes signed and built by hand): the floor for this HTTP/1.1 code.

Variants run in ``--repeat`` rounds (so that a change in the machine's load meets them all);
the table gives the median rate and the median and least CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from tests.support import SimControl, write_accounts
from worker.core.timeutil import now_ms
from worker.exchange.accounts import Credentials, load_accounts
from worker.exchange.signing import PapiAuth, append_signature, with_query
from worker.exchange.transport import FastTransport, _Pool
from worker.tools.devstack import Process, start_sim

CANCEL_PATH = "/papi/v1/um/algo/order"
MAX_ANSWER_BYTES = 4 * 1024 * 1024
USER_AGENT = "cancel-worker/0.1"
ACCOUNTS = tuple(f"desk-{i}" for i in range(5))  # HMAC: the signing cost stays small
CANNED_ANSWER = orjson.dumps({"complete": True})  # the simulator's answer to an algo cancel


@dataclass
class Result:
    variant: str
    pool: int
    requests: int
    wall_s: float
    cpu_s: float
    failures: int

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.requests * 1e6


# A request sender: (account, algo id) -> whether the answer was a 200 with JSON.
Send = Callable[[Credentials, int], Awaitable[bool]]


async def read_capped(response: httpx.Response) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class QueryAuth(httpx.Auth):
    """Signs ``query`` into the request's URL at send time."""

    def __init__(self, creds: Credentials, query: str) -> None:
        self._creds = creds
        self._query = query

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        query = f"{self._query}&recvWindow=5000&timestamp={now_ms()}"
        signed = append_signature(query, self._creds.signer)
        request.url = with_query(request.url, signed)
        yield request


@contextlib.asynccontextmanager
async def httpx_sender(
    url: str,
    pool: int,
    transport: httpx.AsyncBaseTransport | None,
    accounts: dict[str, Credentials],
    *,
    direct: bool = False,
) -> AsyncIterator[Send]:
    """``direct``: the request is built as ``httpx.Request`` from a parsed URL and prebuilt
    headers, not by ``build_request`` (no URL merge, no client defaults to merge)."""
    auths: dict[str, PapiAuth] = {}
    cancel_url = httpx.URL(url).join(CANCEL_PATH)
    timeout = httpx.Timeout(5.0, connect=2.0).as_dict()
    headers = {
        alias: httpx.Headers({"User-Agent": USER_AGENT, "X-MBX-APIKEY": creds.api_key})
        for alias, creds in accounts.items()
    }
    async with httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(5.0, connect=2.0),
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        headers={"User-Agent": USER_AGENT},
        transport=transport,
        follow_redirects=False,
    ) as client:

        async def send(creds: Credentials, algo_id: int) -> bool:
            auth: httpx.Auth
            if direct:
                auth = QueryAuth(creds, f"algoId={algo_id}")
                request = httpx.Request(
                    "DELETE",
                    cancel_url,
                    headers=headers[creds.alias],
                    extensions={"timeout": timeout},
                )
            else:
                auth = auths.get(creds.alias) or auths.setdefault(
                    creds.alias, PapiAuth(creds.api_key, creds.signer, now_ms, recv_window_ms=5000)
                )
                request = client.build_request("DELETE", f"{CANCEL_PATH}?algoId={algo_id}")
            response = await client.send(request, auth=auth, stream=True)
            try:
                raw = await read_capped(response)
            finally:
                await response.aclose()
            return response.status_code == 200 and raw is not None and bool(orjson.loads(raw))

        yield send


@contextlib.asynccontextmanager
async def raw_sender(url: str, pool_size: int) -> AsyncIterator[Send]:
    origin = httpx.URL(url)
    host, port = origin.host, origin.port or 80
    pool = _Pool(host, port, None, pool_size, 5.0)
    fixed = f" HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {USER_AGENT}\r\n".encode()

    async def send(creds: Credentials, algo_id: int) -> bool:
        query = f"algoId={algo_id}&recvWindow=5000&timestamp={now_ms()}"
        target = f"{CANCEL_PATH}?{append_signature(query, creds.signer)}".encode()
        head = b"".join(
            (b"DELETE ", target, fixed, b"X-MBX-APIKEY: ", creds.api_key.encode(), b"\r\n\r\n")
        )
        conn = await pool.acquire(2.0, None)
        try:
            conn.write_head(head)
            answer = await conn.read_head(5.0)
            conn.keep_alive = answer.keep_alive
            body = b"".join([chunk async for chunk in conn.body(answer, 5.0)])
        except BaseException:
            pool.discard(conn)
            raise
        pool.release(conn)
        return answer.status == 200 and bool(orjson.loads(body))

    try:
        yield send
    finally:
        await pool.aclose()


def aiohttp_transport(pool: int) -> httpx.AsyncBaseTransport | None:
    try:
        from httpx_aiohttp import AiohttpTransport  # noqa: PLC0415 - optional, for comparison
    except ImportError:
        return None
    transport: httpx.AsyncBaseTransport = AiohttpTransport(
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    )
    return transport


async def drive(
    send: Send, work: list[tuple[Credentials, int]], concurrency: int
) -> tuple[float, float, int]:
    """Send every item, ``concurrency`` at a time; (wall s, CPU s, failures)."""
    items = iter(work)
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for creds, algo_id in items:
            try:
                ok = await send(creds, algo_id)
            except httpx.HTTPError:
                ok = False
            failures += not ok

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return time.perf_counter() - wall0, time.process_time() - cpu0, failures


@dataclass
class Server:
    url: str
    seed: Callable[[int], list[int]]  # n fresh algo ids to cancel


def variants(pools: list[int]) -> Iterator[tuple[str, int]]:
    for pool in pools:
        yield "httpx", pool
    if aiohttp_transport(1) is not None:
        yield "aiohttp", max(pools)
    for pool in pools:
        yield "fast", pool
    yield "fast+direct", max(pools)
    yield "raw", max(pools)


def sender(
    name: str, url: str, pool: int, accounts: dict[str, Credentials]
) -> contextlib.AbstractAsyncContextManager[Send]:
    if name == "httpx":
        return httpx_sender(url, pool, None, accounts)
    if name == "aiohttp":
        return httpx_sender(url, pool, aiohttp_transport(pool), accounts)
    if name == "fast":
        return httpx_sender(url, pool, FastTransport(max_connections=pool), accounts)
    if name == "fast+direct":
        transport = FastTransport(max_connections=pool)
        return httpx_sender(url, pool, transport, accounts, direct=True)
    return raw_sender(url, pool)


async def run_variant(
    name: str,
    pool: int,
    server: Server,
    accounts: dict[str, Credentials],
    requests: int,
    concurrency: int,
) -> Result:
    warmup = max(2 * concurrency, 500)
    ids = server.seed(warmup + requests)
    work = [(accounts[ACCOUNTS[i % len(ACCOUNTS)]], algo_id) for i, algo_id in enumerate(ids)]
    async with sender(name, server.url, pool, accounts) as send:
        await drive(send, work[:warmup], concurrency)
        wall, cpu, failures = await drive(send, work[warmup:], concurrency)
    return Result(name, pool, requests, wall, cpu, failures)


@contextlib.contextmanager
def serving(kind: str, accounts_file: Path) -> Iterator[Server]:
    if kind == "canned":
        proc = Process("canned", [sys.executable, "-m", "tests.bench_http", "--serve-canned"])
        try:
            url = proc.wait_for_line("READY ", 30, at_start=True).split(" ", 1)[1]
            yield Server(url, lambda n: list(range(1, n + 1)))
        finally:
            proc.stop()
        return
    sim_proc, url = start_sim(accounts_file)
    control = SimControl(url)
    try:
        control.configure(weight_limit=1 << 40, order_limit=1 << 40)

        def seed(n: int) -> list[int]:
            specs = [{"account": ACCOUNTS[i % len(ACCOUNTS)], "kind": "algo"} for i in range(n)]
            ids: list[int] = []
            for start in range(0, n, 1000):  # the simulator's seeding slows as its book grows
                ids += [
                    int(order["algo_id"]) for order in control.seed(specs[start : start + 1000])
                ]
            return ids

        yield Server(url, seed)
    finally:
        control.close()
        sim_proc.stop()


def main_bench(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="cancel-worker-bench-http-"))
    accounts_file = write_accounts(work / "secrets")
    accounts = load_accounts(accounts_file)
    pools = [int(p) for p in args.pools.split(",")]
    print(
        f"server {args.server}, {args.requests} requests per run, concurrency "
        f"{args.concurrency}, {args.repeat} round(s) over the variants",
        flush=True,
    )
    chosen = [
        (name, pool)
        for name, pool in variants(pools)
        if not args.only or name in args.only.split(",")
    ]
    runs: dict[tuple[str, int], list[Result]] = {key: [] for key in chosen}
    # Rounds over all variants, so that a change in the machine's load meets them all; a
    # fresh server for each run, so that each finds the same (empty) book.
    for round_no in range(1, args.repeat + 1):
        for name, pool in chosen:
            with serving(args.server, accounts_file) as server:
                result = asyncio.run(
                    run_variant(name, pool, server, accounts, args.requests, args.concurrency)
                )
            runs[name, pool].append(result)
            print(
                f"round {round_no}  {name:11} pool {pool:3}  {result.rate:7.0f} req/s  "
                f"{result.cpu_us:7.1f} µs CPU/req  failures {result.failures}",
                flush=True,
            )
    print()
    print("| variant | pool | req/s (median) | CPU µs/req (median) | CPU µs/req (min) | failures |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, pool), results in runs.items():
        rate = statistics.median(r.rate for r in results)
        cpu = statistics.median(r.cpu_us for r in results)
        low = min(r.cpu_us for r in results)
        failures = sum(r.failures for r in results)
        print(f"| {name} | {pool} | {rate:.0f} | {cpu:.1f} | {low:.1f} | {failures} |")


# -- the canned server (its own process) ------------------------------------------------------


class _Canned(asyncio.Protocol):
    ANSWER = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(CANNED_ANSWER)).encode()
        + b"\r\n\r\n"
        + CANNED_ANSWER
    )

    def __init__(self) -> None:
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        answers = 0
        while (end := self._buf.find(b"\r\n\r\n")) >= 0:  # requests without a body
            self._buf = self._buf[end + 4 :]
            answers += 1
        if answers and self._transport is not None:
            self._transport.write(self.ANSWER * answers)


async def serve_canned() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Canned, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"READY http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=("sim", "canned"), default="sim")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pools", default="8,16,64", help="pool sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="variants to run, comma-separated")
    parser.add_argument("--serve-canned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_canned:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_canned())
        return
    main_bench(args)


if __name__ == "__main__":
    main()
