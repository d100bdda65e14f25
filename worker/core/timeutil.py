"""Wall-clock helpers (one place, so tests and the clock estimator agree on units)."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the epoch, from the local wall clock."""
    return time.time_ns() // 1_000_000
