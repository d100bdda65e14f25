"""Which offsets may be committed (pure).

Records of one partition complete out of order (different keys run concurrently), but a
partition's committed offset may only advance past a record once that record *and every
earlier one* has its result durably published. The tracker keeps, per partition, the
offsets in flight in arrival order and the set completed; the commit position is one past
the longest completed prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class PartitionOffsets:
    __slots__ = ("_committed", "_done", "_last", "_pending", "_position")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._position: int | None = None  # next offset to read after the completed prefix
        self._committed: int | None = None
        self._last: int | None = None

    def track(self, offset: int) -> None:
        if self._last is not None and offset <= self._last:
            raise ValueError(f"offset {offset} tracked out of order (last {self._last})")
        self._last = offset
        self._pending.append(offset)

    def complete(self, offset: int) -> None:
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            head = self._pending.popleft()
            self._done.discard(head)
            self._position = head + 1

    def uncommitted_position(self) -> int | None:
        """The position to commit, if it moved since the last commit."""
        if self._position is None or self._position == self._committed:
            return None
        return self._position

    def mark_committed(self, position: int) -> None:
        self._committed = position

    @property
    def in_flight(self) -> int:
        return len(self._pending)


class OffsetTracker(Generic[P]):
    """Per-partition :class:`PartitionOffsets`, keyed by any hashable partition id."""

    def __init__(self) -> None:
        self._parts: dict[P, PartitionOffsets] = {}

    def track(self, part: P, offset: int) -> None:
        self._parts.setdefault(part, PartitionOffsets()).track(offset)

    def complete(self, part: P, offset: int) -> None:
        state = self._parts.get(part)
        if state is not None:  # a revoked partition's late completion is ignored
            state.complete(offset)

    def to_commit(self, parts: Iterable[P] | None = None) -> dict[P, int]:
        chosen = (
            self._parts if parts is None else {p: self._parts[p] for p in parts if p in self._parts}
        )
        out: dict[P, int] = {}
        for part, state in chosen.items():
            position = state.uncommitted_position()
            if position is not None:
                out[part] = position
        return out

    def mark_committed(self, positions: dict[P, int]) -> None:
        for part, position in positions.items():
            state = self._parts.get(part)
            if state is not None:
                state.mark_committed(position)

    def in_flight(self, part: P) -> int:
        state = self._parts.get(part)
        return state.in_flight if state is not None else 0

    def drop(self, parts: Iterable[P]) -> None:
        for part in parts:
            self._parts.pop(part, None)
