"""Logging helpers: a filter that keeps a chatty library from flooding the log.

During a broker's controlled shutdown aiokafka can log thousands of identical ERROR lines a
second. :class:`RateLimitFilter` lets through at most ``burst`` records of the
loggers named by ``prefixes`` per message
template per ``interval_s``; at the end of an interval in which records were held back, the
next record that passes says how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitFilter(logging.Filter):
    def __init__(
        self,
        prefixes: tuple[str, ...] = ("aiokafka",),
        burst: int = 5,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._prefixes = prefixes
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        self._windows: dict[tuple[str, object], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True  # only the named libraries are limited, never the worker's own lines
        key = (record.name, record.msg)
        now = self._clock()
        start, passed, held = self._windows.get(key, (now, 0, 0))
        if now - start >= self._interval_s:
            if held:
                record.msg = f"{record.msg} [{held} similar line(s) suppressed]"
            start, passed, held = now, 0, 0
        if passed < self._burst:
            self._windows[key] = (start, passed + 1, held)
            return True
        self._windows[key] = (start, passed, held + 1)
        if len(self._windows) > 1000:  # templates are few; never grow without bound
            self._windows.clear()
        return False
