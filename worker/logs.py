"""Logging helpers: a filter that keeps a chatty library from flooding the log, and the text
formatter that keeps every message on its line (:class:`TextFormatter`).

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

from worker.core.errors import escape_controls

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """The text log format with control characters in the message escaped (``\\x0a``,
    ``\\x1b``, ``\\u2028``): what a command, a topic or the exchange put into a message can
    neither start a forged log line nor drive a terminal. A traceback, which is ours, is
    appended as it is."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        message = record.message
        record.message = escape_controls(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


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
