"""The retry policy: how often, how far apart and for how long a command's requests go again.

One value, shared by the executor (:mod:`worker.executor`, which sends with it) and the kill
switch (:mod:`worker.killswitch`, which bounds its rounds and its reconciliation by it). It
sits below both, so neither has to import the other for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tenacity import RetryCallState
from tenacity.wait import wait_base

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    default_deadline_ms: int = 30_000
    recv_window_ms: int = 5_000
    reconcile_budget_ms: int = 5_000
    max_cancel_rounds: int = 8
    max_command_age_ms: int = 0  # 0: no limit (the worker's setting defaults to 10 minutes)

    def backoff(self) -> wait_base:
        """The wait between retries after the first (exponential, capped, with jitter)."""
        return _EqualJitter(self.backoff_initial_s, self.backoff_max_s)

    def first_backoff_s(self) -> float:
        """The wait before the first retry."""
        jitter = random.uniform(0, self.backoff_initial_s)  # noqa: S311 - spreading, not secrets
        return min(self.backoff_initial_s + jitter, self.backoff_max_s)


class _EqualJitter(wait_base):
    """Capped exponential backoff with "equal jitter": the n-th retry waits between half and
    all of ``min(cap, 2 * initial * 2**(n-1))``. The jitter scales with the wait, so the
    cancels that met the same incident do not come back together at the cap (a jitter added
    before the cap, as tenacity's ``wait_exponential_jitter`` does, vanishes there)."""

    def __init__(self, initial_s: float, cap_s: float) -> None:
        self._initial_s = initial_s
        self._cap_s = cap_s

    def __call__(self, retry_state: RetryCallState) -> float:
        exponent = min(retry_state.attempt_number, 60)
        ceiling = min(self._cap_s, self._initial_s * 2.0**exponent)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - spreading, not secrets
