"""aiokafka's log lines that say more than they mean.

aiokafka logs ``ERROR Group Coordinator Request failed: ...`` for every failed lookup of the
group's coordinator, and looks it up again when the error is retriable. At a group's first
join the broker answers ``GroupCoordinatorNotAvailableError`` (error 15) while it creates or
loads the coordinator's ``__consumer_offsets`` partition, and the same happens whenever the
coordinator moves: nothing is wrong, the join goes on a moment later, and an ERROR line at
every start teaches operators to ignore ERROR lines. :class:`CoordinatorLookupFilter` says a
retriable failure at INFO, with what it means; a failure that is not retried stays an ERROR.
Whether the worker is in its group is what ``/readyz``'s ``group`` check says.
"""

from __future__ import annotations

import logging

from aiokafka.errors import KafkaError

COORDINATOR_LOGGER = "aiokafka.consumer.group_coordinator"
LOOKUP_FAILED = "Group Coordinator Request failed: %s"
LOOKUP_RETRIED = (
    "group coordinator not available yet (%s): looking it up again (expected while the broker "
    "creates or loads the group's coordinator, at a group's first join or when it moves)"
)


class CoordinatorLookupFilter(logging.Filter):
    """On aiokafka's group coordinator logger: a retriable coordinator lookup failure is
    logged at INFO and explained; everything else passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != LOOKUP_FAILED or record.levelno != logging.ERROR:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if not (len(args) == 1 and isinstance(args[0], KafkaError) and args[0].retriable):
            return True
        record.msg = LOOKUP_RETRIED
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def install() -> None:
    """Add the filter to aiokafka's group coordinator logger (once)."""
    logger = logging.getLogger(COORDINATOR_LOGGER)
    if not any(isinstance(f, CoordinatorLookupFilter) for f in logger.filters):
        logger.addFilter(CoordinatorLookupFilter())
