"""The offsets answered ahead of a partition's position, as committed with it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.kafka.pipeline import AHEAD_SPAN, decode_ahead, encode_ahead

BROKER_METADATA_MAX = 4096  # offset.metadata.max.bytes, the brokers' default


@given(
    position=st.integers(min_value=0, max_value=2**62),
    steps=st.sets(st.integers(min_value=1, max_value=AHEAD_SPAN), max_size=300),
)
def test_what_is_encoded_is_decoded(position: int, steps: set[int]) -> None:
    offsets = {position + s for s in steps}
    metadata = encode_ahead(position, offsets)
    assert decode_ahead(position, metadata) == offsets
    assert (metadata == "") == (not offsets)
    assert len(metadata.encode()) <= BROKER_METADATA_MAX


def test_the_widest_span_fits_the_brokers_default_metadata_size() -> None:
    metadata = encode_ahead(10, range(11, 11 + AHEAD_SPAN))
    assert len(metadata.encode()) <= BROKER_METADATA_MAX
    assert decode_ahead(10, metadata) == set(range(11, 11 + AHEAD_SPAN))


@pytest.mark.parametrize("offset", [10, 9, 11 + AHEAD_SPAN])
def test_offsets_outside_the_span_are_refused(offset: int) -> None:
    with pytest.raises(ValueError, match="not within the span"):
        encode_ahead(10, [offset])


@pytest.mark.parametrize("metadata", [None, "", "some other tool's note", "ahead2:AQ=="])
def test_metadata_another_writer_left_says_nothing_is_answered(metadata: str | None) -> None:
    assert decode_ahead(5, metadata) == frozenset()


@pytest.mark.parametrize("metadata", ["ahead1:!!", "ahead1:" + "A" * 4000])
def test_our_metadata_that_does_not_decode_is_an_error(metadata: str) -> None:
    with pytest.raises(ValueError, match="commit metadata"):
        decode_ahead(5, metadata)
