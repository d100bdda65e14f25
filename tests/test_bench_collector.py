"""The bench settles its own garbage collector before each measured run."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tests.bench.main import settle_collector


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("thawed")
def test_what_the_last_run_left_frozen_is_freed_and_what_is_held_now_is_frozen() -> None:
    left = _Node()
    gone = weakref.ref(left)
    gc.freeze()  # the previous run's settle froze it while it was still in use
    del left
    held = _Node()

    settle_collector()

    assert gone() is None
    assert gc.get_freeze_count() > 0
    assert not any(obj is held for obj in gc.get_objects())  # out of every collection's walk
