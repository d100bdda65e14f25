"""``python -m tests.bench.scrape_storm URL RATE``: scrape ``URL`` (a worker's ``/metrics``)
``RATE`` times a second, each scrape on a connection of its own as a careless scraper opens
them, until SIGTERM; then print one JSON line: scrapes answered 200, failed, and their
latency (p50/p99/max, ms).

The scraper shares the machine's cores with what it measures (Prometheus would not), so it
is kept light: the standard library's ``http.client``, one short-lived connection a scrape,
no client object to build each time.

The bench (``tests.bench.main``) runs it beside every worker it measures at 1 a second, as
Prometheus would scrape it (``worker_unscraped`` is the same worker without it), and at 20 a
second beside ``worker_scrape_storm``.
"""

from __future__ import annotations

import http.client
import signal
import statistics
import sys
import time
import urllib.parse

import orjson

READY = "scrape storm started"


def main(argv: list[str]) -> None:
    url, rate = argv[0], float(argv[1])
    target = urllib.parse.urlsplit(url)
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    ok = failed = 0
    took_ms: list[float] = []
    print(READY, flush=True)
    started = time.monotonic()
    i = 0
    while not stop:  # the first scrape at once, then one every 1 / RATE s
        delay = started + i / rate - time.monotonic()
        i += 1
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=5.0)
        try:
            conn.request("GET", target.path or "/")
            response = conn.getresponse()
            response.read()
            ok += response.status == 200
            failed += response.status != 200
        except (OSError, http.client.HTTPException):
            failed += 1
        finally:
            conn.close()
        took_ms.append((time.perf_counter() - t0) * 1000)
    took_ms.sort()
    summary = {
        "ok": ok,
        "failed": failed,
        "p50_ms": statistics.median(took_ms) if took_ms else None,
        "p99_ms": took_ms[int(len(took_ms) * 0.99)] if took_ms else None,
        "max_ms": took_ms[-1] if took_ms else None,
    }
    print(orjson.dumps(summary).decode(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
