"""aiokafka's log lines that say more than they mean.

aiokafka logs ``ERROR Group Coordinator Request failed: ...`` for every failed lookup of the
group's coordinator, and looks it up again when the error is retriable. At a group's first
join the broker answers ``GroupCoordinatorNotAvailableError`` (error 15) while it creates or
loads the coordinator's ``__consumer_offsets`` partition, and the same happens whenever the
coordinator moves: nothing is wrong, the join goes on a moment later, and an ERROR line at
every start teaches operators to ignore ERROR lines. :class:`CoordinatorLookupFilter` says a
retriable failure at INFO, with what it means; a failure that is not retried stays an ERROR.
Whether the worker is in its group is what ``/readyz``'s ``group`` check says.

Two more of aiokafka's lines come without their meaning, and with a traceback each:
"Unexpected error in sender routine" (the producer's sender task died: that producer
publishes nothing more) and asyncio's "Exception in callback
MessageAccumulator._pop_batch...cb" (aiokafka's bookkeeping of a retried batch, seen after
broker outages). :class:`ProducerErrorsExplained` says each in one line of ours, with what
it means for the results; the traceback stays for DEBUG.
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


SENDER_LOGGER = "aiokafka.producer.sender"
SENDER_DIED = "Unexpected error in sender routine"
SENDER_EXPLAINED = (
    "aiokafka's producer sender task failed (%s): that producer publishes nothing more; its "
    "flush fails and is retried, exactly-once on a new producer under the same transactional "
    "id (which aborts what the old one left open)"
)
ACCUMULATOR_CALLBACK = "MessageAccumulator._pop_batch"
ACCUMULATOR_EXPLAINED = (
    "aiokafka could not drop a finished batch from its pending set (%s in "
    "MessageAccumulator._pop_batch's callback, seen after broker outages): a defect of its "
    "bookkeeping, not of delivery; the batch's flush committed, or failed and is retried"
)


class ProducerErrorsExplained(logging.Filter):
    """On aiokafka's sender logger and asyncio's: the two lines above, in one line of ours
    (still an ERROR); the traceback only when the logger is at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == SENDER_LOGGER and record.msg == SENDER_DIED:
            explained = SENDER_EXPLAINED
        elif record.name == "asyncio" and ACCUMULATOR_CALLBACK in str(record.msg):
            explained = ACCUMULATOR_EXPLAINED
        else:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        record.msg, record.args = explained, (repr(exc) if exc is not None else "unknown",)
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Add the filters to aiokafka's and asyncio's loggers (once)."""
    for name, kind in (
        (COORDINATOR_LOGGER, CoordinatorLookupFilter),
        (SENDER_LOGGER, ProducerErrorsExplained),
        ("asyncio", ProducerErrorsExplained),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
