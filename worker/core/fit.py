"""Fitting a kill switch's result into one Kafka record (pure).

A ``strategies.canceled`` event names every order the listing showed, and the exchange
decides how many that is: thousands of orders would make a record the broker refuses, and a
result the broker refuses would be retried forever. :func:`fit_kill_switch` keeps the event
within a byte budget by leaving listed orders out of it, never silently: the event's
``omitted`` object counts what each group lost, and the caller counts it in a metric.

What is kept first is what an operator must act on: ``still_open``, then ``unknown``, then
``strategies`` (canceled), then ``closed_otherwise``; within a group the orders keep their
order, and a group is cut where the next order no longer fits. ``complete`` and ``routes``
are never changed: they describe what happened, not what the record could hold.
"""

from __future__ import annotations

from typing import Any

import orjson

GROUPS = ("strategies", "closed_otherwise", "still_open", "unknown")
KEEP_FIRST = ("still_open", "unknown", "strategies", "closed_otherwise")
_COUNT_ROOM = 4 * 20  # the omitted counts at their longest


def fit_kill_switch(event: dict[str, Any], budget: int) -> dict[str, int]:
    """Cut the listed groups of ``event`` (in place) until its JSON fits ``budget`` bytes.

    Returns what each group lost (empty when the event already fitted; then it is not
    touched). Raises :class:`ValueError` when even the event without any listed order
    does not fit."""
    if len(orjson.dumps(event)) <= budget:
        return {}
    full = {group: list(event.get(group) or []) for group in GROUPS}
    for group in GROUPS:
        event[group] = []
    event["omitted"] = dict.fromkeys(GROUPS, 0)
    room = budget - len(orjson.dumps(event)) - _COUNT_ROOM
    if room < 0:
        raise ValueError(f"a kill switch's result does not fit {budget} bytes without its orders")
    for group in KEEP_FIRST:
        kept: list[Any] = []
        for item in full[group]:
            size = len(orjson.dumps(item)) + 1  # and its comma
            if size > room:
                break
            kept.append(item)
            room -= size
        event[group] = kept
    omitted = {group: len(full[group]) - len(event[group]) for group in GROUPS}
    event["omitted"] = omitted
    return {group: n for group, n in omitted.items() if n}
