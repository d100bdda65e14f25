"""A transaction begun right after a commit: the coordinator refuses its AddPartitionsToTxn
with CONCURRENT_TRANSACTIONS until the previous transaction's markers are written, and the
sink's producer retries after ``CONCURRENT_BACKOFF_S`` (not aiokafka's fixed 20 ms) for the
first ``CONCURRENT_RETRIES_SHORT`` refusals in a row, then after aiokafka's own wait.

On aiokafka's own handler with a stand-in sender (the wait it returns is the unit under
test), and on the real broker: back-to-back transactions meet the refusal, are retried
short, and every result is read once.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.producer import sender as aiokafka_sender

from tests.support import SimControl, fresh_topics, in_group, owning, read_to_end, worker_settings
from worker.kafka.fencing import group_member, stable_committed
from worker.kafka.io import (
    CONCURRENT_BACKOFF_S,
    CONCURRENT_RETRIES_SHORT,
    shorten_concurrent_transactions_backoff,
)
from worker.kafka.pipeline import Flush, OutRecord
from worker.tools.devstack import Broker

CONCURRENT_TRANSACTIONS = 51  # Kafka's error code
RETRY_BACKOFF_S = 0.02  # the sink's producers' retry_backoff_ms, 20


class StandInSender:
    """What aiokafka's AddPartitionsToTxnHandler reads of its sender: the retry backoff and
    the transaction manager (no partition in the transaction yet: its first add)."""

    def __init__(self) -> None:
        self._retry_backoff = RETRY_BACKOFF_S
        self.added: list[TopicPartition] = []
        self._txn_manager = SimpleNamespace(txn_partitions=set(), partition_added=self.added.append)


def answer(handler: Any, code: int) -> Any:
    resp = SimpleNamespace(errors=[("results", [(0, code)])])
    return handler.handle_response(resp)


def handler_for(sender: StandInSender) -> Any:
    return aiokafka_sender.AddPartitionsToTxnHandler(sender, [TopicPartition("results", 0)])


def test_refusals_in_a_row_are_retried_short_then_at_aiokafkas_wait() -> None:
    assert shorten_concurrent_transactions_backoff()
    sender = StandInSender()
    waits = [answer(handler_for(sender), CONCURRENT_TRANSACTIONS) for _ in range(12)]
    assert waits[:CONCURRENT_RETRIES_SHORT] == [CONCURRENT_BACKOFF_S] * CONCURRENT_RETRIES_SHORT
    # then aiokafka's own wait for the race (markers stuck: ~50 requests a second at most)
    assert waits[CONCURRENT_RETRIES_SHORT:] == [aiokafka_sender.BACKOFF_OVERRIDE] * 2
    assert aiokafka_sender.BACKOFF_OVERRIDE > CONCURRENT_BACKOFF_S


def test_a_success_starts_the_count_again_and_other_errors_keep_their_wait() -> None:
    assert shorten_concurrent_transactions_backoff()
    sender = StandInSender()
    for _ in range(CONCURRENT_RETRIES_SHORT):
        answer(handler_for(sender), CONCURRENT_TRANSACTIONS)
    assert answer(handler_for(sender), 0) is None  # added: no wait
    assert sender.added == [TopicPartition("results", 0)]
    assert answer(handler_for(sender), CONCURRENT_TRANSACTIONS) == CONCURRENT_BACKOFF_S
    coordinator_loading = 14  # COORDINATOR_LOAD_IN_PROGRESS: the producer's retry backoff
    assert answer(handler_for(sender), coordinator_loading) == RETRY_BACKOFF_S


def test_shortening_twice_wraps_aiokafkas_handler_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shorten_concurrent_transactions_backoff()
    wrapped = aiokafka_sender.AddPartitionsToTxnHandler.handle_response
    assert shorten_concurrent_transactions_backoff()
    assert aiokafka_sender.AddPartitionsToTxnHandler.handle_response is wrapped

    def other(self: Any, resp: Any) -> Any:  # something else wraps it since (a tracer)
        return wrapped(self, resp)

    monkeypatch.setattr(aiokafka_sender.AddPartitionsToTxnHandler, "handle_response", other)
    assert shorten_concurrent_transactions_backoff()
    assert aiokafka_sender.AddPartitionsToTxnHandler.handle_response is other  # not again
    sender = StandInSender()
    waits = [answer(handler_for(sender), CONCURRENT_TRANSACTIONS) for _ in range(11)]
    assert waits[-1] == aiokafka_sender.BACKOFF_OVERRIDE  # the count still ends the short ones


@pytest.mark.integration
async def test_back_to_back_transactions_are_refused_retried_short_and_read_once(
    broker: Broker, sim: SimControl, accounts_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = await fresh_topics(broker.bootstrap, partitions=1)
    settings = worker_settings(broker.bootstrap, topics, sim.url, accounts_file)
    part = (topics.commands, 0)
    waits: list[float | None] = []
    assert shorten_concurrent_transactions_backoff()  # as the sink does: the spy sees its waits
    async with in_group(settings) as consumer:
        shortened = aiokafka_sender.AddPartitionsToTxnHandler.handle_response

        def seen(self: Any, resp: Any) -> Any:
            wait = shortened(self, resp)
            waits.append(wait)
            return wait

        monkeypatch.setattr(aiokafka_sender.AddPartitionsToTxnHandler, "handle_response", seen)
        async with owning(settings, lambda: group_member(consumer), [part]) as sink:
            sent: list[bytes] = []
            for n in range(1, 61):  # each begun as the previous commit returns
                value = str(n).encode()
                sent.append(value)
                assert sink.stage(part, (OutRecord(topics.results, b"k", value),))
                await sink.flush({part: Flush((OutRecord(topics.results, b"k", value),), n)})
                if CONCURRENT_BACKOFF_S in waits and n >= 10:
                    break
            assert await stable_committed(consumer, [part]) == {part: len(sent)}
    assert CONCURRENT_BACKOFF_S in waits, f"no transaction met the race in {len(sent)}: {waits}"
    assert [r.value for r in await read_to_end(broker.bootstrap, topics.results)] == sent
