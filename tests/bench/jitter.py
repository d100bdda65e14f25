"""The machine's own scheduling noise, measured beside each bench run:

    python -m tests.bench.jitter

sleeps 10 ms at a time and notes how late it woke up; on SIGTERM (or SIGINT) it prints
the lateness of every wake-up, in ms, as one JSON list on stdout. A runnable process on an
idle machine wakes within a fraction of a millisecond; on a shared or virtual machine the
p99 can be several milliseconds, and no system's latency tail can be told apart from that
noise. Its own load is 100 wake-ups a second.
"""

from __future__ import annotations

import signal
import sys
import time

import orjson

SLEEP_S = 0.010
READY = "JITTER_READY"


def main() -> None:
    late_ms: list[float] = []
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(READY, flush=True)
    while not stop:
        before = time.perf_counter()
        time.sleep(SLEEP_S)
        late_ms.append(round((time.perf_counter() - before - SLEEP_S) * 1000, 3))
    sys.stdout.write(orjson.dumps(late_ms).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
