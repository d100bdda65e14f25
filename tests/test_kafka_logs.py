"""aiokafka's coordinator lookup failures: retriable ones are INFO and explained."""

from __future__ import annotations

import logging

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError

from worker.kafka import logs as kafka_logs


def test_a_retriable_coordinator_lookup_failure_is_info_and_explained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kafka_logs.install()
    kafka_logs.install()  # once
    logger = logging.getLogger(kafka_logs.COORDINATOR_LOGGER)
    assert sum(isinstance(f, kafka_logs.CoordinatorLookupFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="aiokafka"):
        # As aiokafka says it (aiokafka/consumer/group_coordinator.py).
        logger.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
        logger.error("Group Coordinator Request failed: %s", GroupAuthorizationFailedError())
        logger.error("Heartbeat failed: %s", GroupCoordinatorNotAvailableError())
    retried, refused, other = caplog.records
    assert retried.levelname == "INFO" and retried.levelno == logging.INFO
    assert "looking it up again" in retried.getMessage()
    assert "GroupCoordinatorNotAvailableError" in retried.getMessage()
    assert refused.levelname == "ERROR"  # not retried: stays an error
    assert other.levelname == "ERROR" and other.getMessage().startswith("Heartbeat failed")


def test_the_info_line_is_dropped_when_info_is_off(caplog: pytest.LogCaptureFixture) -> None:
    kafka_logs.install()
    logger = logging.getLogger(kafka_logs.COORDINATOR_LOGGER)
    with caplog.at_level(logging.WARNING, logger="aiokafka"):
        logger.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    assert caplog.records == []


def test_a_dead_sender_and_a_failed_batch_callback_are_said_in_one_line_of_ours(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kafka_logs.install()
    sender = logging.getLogger(kafka_logs.SENDER_LOGGER)
    with caplog.at_level(logging.INFO):
        try:
            {}["batch"]  # the KeyError aiokafka's callback raises
        except KeyError:
            # As aiokafka says it (producer/sender.py), and as asyncio reports an exception
            # in the callback aiokafka's MessageAccumulator._pop_batch adds.
            sender.exception("Unexpected error in sender routine")
            logging.getLogger("asyncio").exception(
                "Exception in callback MessageAccumulator._pop_batch.<locals>.cb(<Future>)"
            )
        logging.getLogger("asyncio").error("Task was destroyed but it is pending!")
    died, callback, other = caplog.records
    for record in (died, callback):
        assert record.levelno == logging.ERROR
        assert record.exc_info is None  # one line: the traceback only at DEBUG
        assert "KeyError('batch')" in record.getMessage()
    assert "publishes nothing more" in died.getMessage()
    assert "not of delivery" in callback.getMessage()
    assert other.getMessage() == "Task was destroyed but it is pending!"
