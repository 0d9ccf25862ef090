"""Pure helpers of the SQL event log: the retention rule of a batch."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from centripy.storage.sql import retention


def _kept_after(sizes: list[int]) -> int:
    """The definition: the i-th append trims the stream to its newest sizes[i] offsets,
    and the n - 1 - i appends after it each add one more."""
    n = len(sizes)
    return min(size + n - 1 - i for i, size in enumerate(sizes))


@given(st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=12))
def test_retention_is_what_appending_one_by_one_keeps(sizes: list[int]) -> None:
    assert retention(sizes) == _kept_after(sizes)
    assert retention([sizes[0]] * len(sizes)) == sizes[0]  # the fast path
