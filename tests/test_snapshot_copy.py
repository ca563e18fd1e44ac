"""A snapshot copied a piece at a time is the document as it was when the copy began."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from canvas_store_trio._document import (
    Document,
    encode_snapshot_parts,
    snapshot_to_json,
)

keys = st.sampled_from([f"e{i}/c" for i in range(12)])
entries = st.one_of(
    st.fixed_dictionaries({"_exists": st.just(True), "v": st.integers(0, 9)}),
    st.fixed_dictionaries({"v": st.integers(0, 9)}),
    st.just({"_exists": False}),
)
patches = st.lists(st.dictionaries(keys, entries, max_size=4), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    before=st.lists(patches, max_size=8),
    during=st.lists(patches, max_size=8),
    chunk_size=st.integers(1, 5),
)
def test_a_gradual_copy_ignores_writes_made_while_it_runs(
    before: list[Any], during: list[Any], chunk_size: int
) -> None:
    doc = Document()
    for frame in before:
        doc.apply(frame)
    expected = doc.snapshot()
    steps = doc.snapshot_steps(chunk_size)
    pending = list(during)
    try:
        while True:
            next(steps)
            if pending:
                doc.apply(pending.pop())
    except StopIteration as done:
        copy = done.value
    assert copy == expected
    assert doc.timestamp >= copy.timestamp
    doc.apply([{"x/y": {"_exists": True}}])  # a later copy may start again
    assert list(doc.snapshot_steps()) is not None


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(patches, max_size=10), chunk_size=st.integers(1, 4))
def test_encoding_in_parts_is_the_node_file_format(frames: list[Any], chunk_size: int) -> None:
    doc = Document()
    for frame in frames:
        doc.apply(frame)
    snapshot = doc.snapshot()
    encoded = b"".join(encode_snapshot_parts(snapshot, chunk_size))
    assert orjson.loads(encoded) == snapshot_to_json(snapshot)
    assert list(orjson.loads(encoded)) == ["timestamp", "state", "timestamps"]
