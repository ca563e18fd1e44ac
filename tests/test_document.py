"""Property tests of the sans-IO document model (PROTOCOL.md, "Document model" and
"Ephemeral"), against references written from the spec alone: ``ReferenceModel`` (from
``canvas_store_trio.testing``, where users get it too) and a presence model here.

The references are deliberately naive (index by index, deep copies everywhere) so that
they share no code and no cleverness with ``_document.py``.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from canvas_store_trio._document import (
    Document,
    EphemeralState,
    Snapshot,
    SnapshotError,
    apply_buffer_delta,
    decode_snapshot,
    encode_snapshot,
    encode_snapshot_parts,
    is_buffer_delta,
    snapshot_from_json,
    snapshot_to_json,
)
from canvas_store_trio.testing import (
    SCHEMAS,
    ReferenceModel,
    buffer_deltas,
    json_values,
    patch_lists,
    snapshots,
)
from canvas_store_trio.testing._model import apply_delta, apply_entry, live_records
from canvas_store_trio.testing._strategies import (
    buffer_arrays,
    buffer_numbers,
    presence_patch_lists,
)

FAST = settings(max_examples=120, deadline=None, report_multiple_bugs=False)
"""For tests whose examples are cheap to draw."""
FRAMES = settings(max_examples=40, deadline=None, report_multiple_bugs=False)
"""For tests that draw runs of frames: drawing dominates their time."""

frame_lists = st.lists(patch_lists(), max_size=8)
"""The document patches of a run of frames, one list per frame."""

# --- what the tests add to the reference model -------------------------------------


class ModelPresence:
    """Per-client presence maps under the same rules, except that a deleted presence
    key is forgotten (our documented choice). Dict order is the order in which clients
    first wrote presence since they last left."""

    def __init__(self) -> None:
        self.by_client: dict[str, dict[str, dict[str, Any]]] = {}

    def apply(self, client: str, frame: list[dict[str, Any]]) -> None:
        state = self.by_client.setdefault(client, {})
        for patch in frame:
            for key, value in patch.items():
                apply_entry(state, key, value)
                if state.get(key) == {"_exists": False}:
                    del state[key]

    def snapshot_for(self, client: str) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for other, state in self.by_client.items():
            if other != client:
                for key, record in state.items():
                    merged[key] = record
        return merged

    def remove(self, client: str) -> dict[str, dict[str, Any]]:
        return {key: {"_exists": False} for key in self.by_client.pop(client, {})}


def client_apply(mirror: dict[str, dict[str, Any]], patch: dict[str, Any]) -> None:
    """A client applying a diff or a broadcast patch to its live records:
    ``_exists: false`` deletes, anything else merges fields (with the same rules)."""
    for key, value in patch.items():
        apply_entry(mirror, key, value)
        if mirror.get(key) == {"_exists": False}:
            del mirror[key]


def assert_converged(
    client: dict[str, dict[str, Any]],
    server: dict[str, dict[str, Any]],
    tolerated: set[str],
) -> None:
    """The client's live records equal the server's. For keys in ``tolerated`` (deleted
    and perhaps re-created since the client's timestamp) the client may keep fields from
    before the deletion that the server no longer has: the diff re-creates a key with
    ``_exists: true`` and its new fields, and a client merges that into the record it
    still holds. That is the wire protocol's limit (the Node server's diff is the same),
    and the real client never meets it: its components have fixed fields, and a
    creation carries all of them (see test_diff_since_converges_exactly_for_client_shaped_writes).
    """
    assert client.keys() == server.keys()
    for key, record in server.items():
        if key in tolerated:
            assert {f: client[key].get(f, KeyError) for f in record} == record, key
        else:
            assert client[key] == record, key


def assert_document_equals(doc: Document, model: ReferenceModel) -> None:
    assert doc.timestamp == model.timestamp
    assert doc.state == model.state
    assert doc.timestamps == model.timestamps
    assert doc.snapshot() == model.snapshot()


# --- buffer deltas ------------------------------------------------------------------


@st.composite
def arrays_and_deltas(draw: st.DrawFn) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(old, new, delta) where delta is an independently encoded delta from old to new.

    The encoder writes every index that changed or is new (it may skip a new index
    that is 0), may also rewrite unchanged indices, splits the writes into runs at
    random, shuffles them, puts junk in front of runs that is then overwritten or falls
    outside the array, and adds runs that lie wholly outside ``0 <= index < len``.
    """
    old = draw(buffer_arrays)
    new = draw(buffer_arrays)
    n = len(new)
    must = [i for i in range(n) if i >= len(old) or old[i] != new[i]]
    if draw(st.booleans()):  # a new index whose value is 0 comes from the zero fill
        must = [i for i in must if not (i >= len(old) and new[i] == 0 and new[i] is not False)]
    extra = draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n)) if n else set()
    indices = sorted(set(must) | extra)
    real: list[list[Any]] = []  # disjoint runs of the right values
    junk_first: list[list[Any]] = []  # wrong values that a later real run overwrites
    i = 0
    while i < len(indices):
        j = i + 1
        while j < len(indices) and indices[j] == indices[j - 1] + 1 and draw(st.booleans()):
            j += 1
        start = indices[i]
        values = [new[k] for k in indices[i:j]]
        prefix = draw(st.lists(buffer_numbers, max_size=3))
        if prefix and start == 0:
            # straddles the start: the junk lands at negative indices and is ignored
            real.append([-len(prefix), prefix + values])
        else:
            if prefix:
                junk_first.append([start, prefix[: len(values)]])
            real.append([start, values])
        i = j
    if n and draw(st.booleans()):
        # straddles the end: the tail falls past len and is ignored
        tail = draw(st.lists(buffer_numbers, min_size=1, max_size=3))
        real.append([n - 1, [new[n - 1], *tail]])
    # runs whose every write is out of range, in any place
    outside: list[list[Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        junk = draw(st.lists(buffer_numbers, min_size=1, max_size=3))
        offset = draw(
            st.integers(n, n + 5) | st.integers(-100, -len(junk)) | st.integers(2**40, 2**62)
        )
        outside.append([offset, junk])
    rest = draw(st.permutations(real + outside))
    return old, new, {"__buf": 1, "len": n, "runs": junk_first + list(rest)}


@FAST
@given(arrays_and_deltas())
def test_buffer_delta_equals_the_array_it_encodes(case: Any) -> None:
    old, new, delta = case
    before = copy.deepcopy(old)
    assert apply_buffer_delta(old, delta) == new
    assert apply_delta(old, delta) == new  # the encoder is right, too
    assert old == before  # the stored array is never edited in place


@FAST
@given(arrays_and_deltas())
def test_document_stores_the_array_a_delta_encodes(case: Any) -> None:
    """Through Document.apply: the stored field becomes the full new array, both when
    merging into a live record and when a creation applies the delta to nothing."""
    old, new, delta = case
    doc = Document()
    doc.apply([{"e/Shape": {"_exists": True, "points": old}}])
    doc.apply([{"e/Shape": {"points": delta}}])
    assert doc.state["e/Shape"]["points"] == new
    doc.apply([{"e/Shape": {"_exists": False}}])
    doc.apply([{"e/Shape": {"_exists": True, "points": delta}}])
    assert doc.state["e/Shape"]["points"] == apply_delta(None, delta)


bases = st.one_of(
    st.none(),
    buffer_arrays,
    st.lists(json_values(), max_size=6),
    st.text(max_size=5),  # not an array: the delta applies to nothing
    st.integers(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
)
wild_deltas = st.fixed_dictionaries(
    {
        "__buf": st.just(1),
        "len": st.integers(0, 30),
        "runs": st.lists(
            st.tuples(
                st.integers(-40, 40) | st.integers(-(2**70), 2**70),
                st.lists(buffer_numbers, max_size=10),
            ).map(list),
            max_size=6,
        ),
    }
)


@FAST
@given(bases, wild_deltas | buffer_deltas())
def test_buffer_delta_matches_reference(base: Any, delta: dict[str, Any]) -> None:
    """Arbitrary deltas: negative and out-of-range offsets, truncation, growth."""
    before = copy.deepcopy(base)
    result = apply_buffer_delta(base, delta)
    assert type(result) is list
    assert result == apply_delta(base, delta)
    assert len(result) == delta["len"]
    assert base == before
    assert result is not base


@pytest.mark.parametrize(
    ("base", "delta", "expected"),
    [
        ([1, 2, 3], {"len": 2, "runs": []}, [1, 2]),  # truncation
        ([1, 2], {"len": 4, "runs": []}, [1, 2, 0, 0]),  # growth with zeros
        (None, {"len": 3, "runs": [[1, [7]]]}, [0, 7, 0]),  # no old array
        ("abc", {"len": 2, "runs": []}, [0, 0]),  # not an array: nothing carried
        ([1, 2, 3], {"len": 3, "runs": [[-2, [9, 9, 5, 6]]]}, [5, 6, 3]),  # negative offset
        ([1, 2, 3], {"len": 3, "runs": [[2, [8, 9, 9]]]}, [1, 2, 8]),  # past the end
        ([1, 2, 3], {"len": 3, "runs": [[5, [9]], [-9, [9]]]}, [1, 2, 3]),  # all outside
        ([0, 0], {"len": 2, "runs": [[0, [1, 1]], [1, [2]]]}, [1, 2]),  # later runs win
        ([1, 2], {"len": 0, "runs": [[0, [5]]]}, []),
    ],
)
def test_buffer_delta_examples(base: Any, delta: dict[str, Any], expected: list[Any]) -> None:
    assert apply_buffer_delta(base, {"__buf": 1, **delta}) == expected


# --- the document against the model -------------------------------------------------


@FRAMES
@given(frame_lists)
def test_document_matches_model(frames: list[list[dict[str, Any]]]) -> None:
    doc, model = Document(), ReferenceModel()
    for frame in frames:
        moved = model.apply(frame)
        assert doc.apply(frame) is moved
        assert_document_equals(doc, model)
    for since in range(-1, model.timestamp + 2):
        assert doc.diff_since(since) == model.diff_since(since)


@FRAMES
@given(frame_lists, st.data())
def test_timestamp_moves_by_one_per_frame_with_content(
    frames: list[list[dict[str, Any]]], data: st.DataObject
) -> None:
    """+1 per frame holding a non-empty patch, however many patches and keys it holds
    and even when every entry is dropped; a frame of empty patches changes nothing."""
    doc = Document(unsaved_keys=set())
    for frame in frames:
        if data.draw(st.booleans()):
            empty = data.draw(st.sampled_from([[], [{}], [{}, {}], [{}, {}, {}]]))
            before = (doc.timestamp, copy.deepcopy(doc.state), copy.deepcopy(doc.timestamps))
            unsaved = set(doc.unsaved_keys or ())
            assert doc.apply(empty) is False
            assert (doc.timestamp, doc.state, doc.timestamps) == before
            assert doc.unsaved_keys == unsaved
        before_ts = doc.timestamp
        has_content = any(frame)
        assert doc.apply(frame) is has_content
        assert doc.timestamp == before_ts + (1 if has_content else 0)
        newest = [t for ts in doc.timestamps.values() for t in ts.values()]
        assert max(newest, default=0) <= doc.timestamp


def test_dropped_writes_still_move_the_timestamp() -> None:
    """The spec counts frames with a non-empty patch, not frames that changed state."""
    doc = Document()
    assert doc.apply([{"ghost/Position": {"x": 1}}]) is True
    assert (doc.timestamp, doc.state, doc.timestamps) == (1, {}, {})
    doc.apply([{"e/Position": {"_exists": True, "x": 1}}])
    doc.apply([{"e/Position": {"_exists": False}}])
    doc.apply([{"e/Position": {"x": 2}}])  # a partial write to a tombstone: dropped
    assert doc.timestamp == 4
    assert doc.state == {"e/Position": {"_exists": False}}
    assert doc.timestamps == {"e/Position": {"_exists": 3}}


def test_recreation_after_tombstone() -> None:
    doc = Document()
    doc.apply([{"e/Position": {"_exists": True, "x": 1, "y": 2}}])
    doc.apply([{"e/Position": {"_exists": False, "x": 5}}])
    assert doc.state["e/Position"] == {"_exists": False}
    assert doc.timestamps["e/Position"] == {"_exists": 2, "x": 2}  # as the Node server
    assert doc.diff_since(1) == {"e/Position": {"_exists": False}}
    doc.apply([{"e/Position": {"_exists": True, "y": 3}}])
    assert doc.state["e/Position"] == {"_exists": True, "y": 3}
    assert doc.timestamps["e/Position"] == {"_exists": 3, "x": 2, "y": 3}
    for since in (-1, 0, 1, 2):
        assert doc.diff_since(since) == {"e/Position": {"_exists": True, "y": 3}}


# --- the diff since T ---------------------------------------------------------------


def _run(frames: list[list[dict[str, Any]]]) -> tuple[Document, ReferenceModel, list[Any]]:
    """Apply frames; return the document, the model and the live state at each T."""
    doc, model = Document(), ReferenceModel()
    history = [live_records(doc.state)]
    for frame in frames:
        if doc.apply(frame):
            model.apply(frame)
            history.append(live_records(doc.state))
    assert len(history) == doc.timestamp + 1
    return doc, model, history


@FRAMES
@given(frame_lists)
def test_diff_since_brings_a_client_to_the_server_state(
    frames: list[list[dict[str, Any]]],
) -> None:
    doc, model, history = _run(frames)
    server = live_records(doc.state)
    for since, client in enumerate(history):
        diff = doc.diff_since(since)
        client = copy.deepcopy(client)
        client_apply(client, diff)
        assert_converged(client, server, model.deleted_after(since))
        # a diff never names a field that was not written after `since`
        for key, fields in diff.items():
            assert all(doc.timestamps[key][f] > since for f in fields)
    assert doc.diff_since(doc.timestamp) == {}
    # from nothing, the diff since 0 is the whole live document, exactly
    client = {}
    client_apply(client, doc.diff_since(0))
    assert client == server


@FRAMES
@given(st.lists(patch_lists(min_patches=1, max_patches=2, schemas=SCHEMAS), max_size=12))
def test_diff_since_converges_exactly_for_client_shaped_writes(
    frames: list[list[dict[str, Any]]],
) -> None:
    """With the real client's shape of writes (fixed fields, full creations) a client
    that applies the diff since T on top of its state at T reaches the server exactly."""
    doc, _, history = _run(frames)
    server = live_records(doc.state)
    for since, client in enumerate(history):
        client = copy.deepcopy(client)
        client_apply(client, doc.diff_since(since))
        assert client == server


def test_diff_cannot_remove_fields_of_a_record_deleted_and_recreated() -> None:
    """Documents the protocol's limit that assert_converged tolerates (the Node server
    sends the same diff): the stale field stays on a client that merges the diff."""
    doc = Document()
    doc.apply([{"e/C": {"_exists": True, "a": 1}}])
    client = live_records(doc.state)
    doc.apply([{"e/C": {"_exists": False}}])
    doc.apply([{"e/C": {"_exists": True, "b": 2}}])
    assert doc.diff_since(1) == {"e/C": {"_exists": True, "b": 2}}
    client_apply(client, doc.diff_since(1))
    assert client == {"e/C": {"_exists": True, "a": 1, "b": 2}}
    assert live_records(doc.state) == {"e/C": {"_exists": True, "b": 2}}


# --- snapshots ----------------------------------------------------------------------


@FRAMES
@given(frame_lists)
def test_snapshot_round_trips(frames: list[list[dict[str, Any]]]) -> None:
    doc, model, _ = _run(frames)
    snap = doc.snapshot()
    assert (snap.timestamp, dict(snap.state), dict(snap.timestamps)) == (
        model.timestamp,
        model.state,
        model.timestamps,
    )
    data = encode_snapshot(snap)
    assert orjson.loads(data) == {
        "timestamp": model.timestamp,
        "state": model.state,
        "timestamps": model.timestamps,
    }  # the Node server's file format, tombstones included
    decoded = decode_snapshot(data)
    assert decoded == snap
    assert decode_snapshot(data.decode()) == snap
    for source in (snap, decoded):
        again = Document.from_snapshot(source)
        assert_document_equals(again, model)
        assert again.snapshot() == snap
    tombstones = {k for k, v in model.state.items() if v == {"_exists": False}}
    assert tombstones <= decoded.state.keys()


@FRAMES
@given(frame_lists, frame_lists)
def test_document_from_snapshot_behaves_like_the_original(
    first: list[list[dict[str, Any]]], then: list[list[dict[str, Any]]]
) -> None:
    """A room reloaded from its snapshot continues exactly as the original would, and
    neither the snapshot nor the original sees the other's later writes."""
    doc, _, _ = _run(first)
    snap = doc.snapshot()
    frozen = copy.deepcopy((snap.timestamp, dict(snap.state), dict(snap.timestamps)))
    reloaded = Document.from_snapshot(decode_snapshot(encode_snapshot(snap)))
    shared = Document.from_snapshot(snap)
    for frame in then:
        assert doc.apply(frame) == reloaded.apply(frame) == shared.apply(frame)
    for other in (reloaded, shared):
        assert (other.timestamp, other.state, other.timestamps) == (
            doc.timestamp,
            doc.state,
            doc.timestamps,
        )
    # the snapshot taken before is untouched by everything applied since
    assert (snap.timestamp, dict(snap.state), dict(snap.timestamps)) == frozen


@FRAMES
@given(frame_lists, st.lists(frame_lists, max_size=12), st.integers(1, 3))
def test_encoding_in_steps_gives_the_snapshot_of_its_start_whatever_is_applied_meanwhile(
    first: list[list[dict[str, Any]]], meanwhile: list[list[list[dict[str, Any]]]], chunk: int
) -> None:
    """Frames applied between the pieces are not in it, byte for byte; a second encoding
    started part-way and one stopped early do not disturb it or leave anything behind."""
    doc, _, _ = _run(first)
    expected = encode_snapshot(doc.snapshot())
    steps = doc.encode_in_steps(chunk)
    parts = [next(steps)]
    later: list[bytes] = []
    abandoned = doc.encode_in_steps(chunk)
    next(abandoned)
    for frames in meanwhile:
        for frame in frames:
            doc.apply(frame)
        if len(later) == 0:
            second = doc.encode_in_steps(chunk)
            later_expected = encode_snapshot(doc.snapshot())
            later.append(next(second))
        parts.extend(itertools.islice(steps, 1))
    abandoned.close()
    parts.extend(steps)
    assert b"".join(parts) == expected
    if later:
        later.extend(second)
        assert b"".join(later) == later_expected
    assert doc._encodings == []


@FRAMES
@given(frame_lists, st.integers(1, 5))
def test_snapshot_encoded_in_parts_is_the_snapshot(
    frames: list[list[dict[str, Any]]], chunk_size: int
) -> None:
    doc, _, _ = _run(frames)
    snap = doc.snapshot()
    data = b"".join(encode_snapshot_parts(snap, chunk_size))
    assert orjson.loads(data) == snapshot_to_json(snap)
    assert data == encode_snapshot(snap)
    assert decode_snapshot(data) == snap


@FAST
@given(snapshots(reachable=False) | snapshots())
def test_any_valid_snapshot_file_round_trips(snapshot: Snapshot) -> None:
    raw = snapshot_to_json(snapshot)
    snap = decode_snapshot(orjson.dumps(raw))
    assert snap == snapshot
    assert snap == snapshot_from_json(raw)
    assert (snap.timestamp, dict(snap.state), dict(snap.timestamps)) == (
        raw["timestamp"],
        raw["state"],
        raw["timestamps"],
    )
    assert decode_snapshot(encode_snapshot(snap)) == snap


@FAST
@given(st.binary(max_size=40) | json_values().map(orjson.dumps))
def test_decode_snapshot_refuses_with_snapshot_error_only(data: bytes) -> None:
    try:
        snap = decode_snapshot(data)
    except SnapshotError:
        return
    assert isinstance(snap, Snapshot)
    assert type(snap.timestamp) is int and snap.timestamp >= 0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"[]",
        b'{"state": {}}',
        b'{"timestamp": -1, "state": {}}',
        b'{"timestamp": 1.5, "state": {}}',
        b'{"timestamp": true, "state": {}}',
        b'{"timestamp": 0}',
        b'{"timestamp": 0, "state": {"k": 3}}',
        b'{"timestamp": 0, "state": {}, "timestamps": []}',
        b'{"timestamp": 0, "state": {}, "timestamps": {"k": {"f": "1"}}}',
        b'{"timestamp": 0, "state": {}, "timestamps": {"k": {"f": true}}}',
        b'{"timestamp": 0, "state": {}, "timestamps": {"k": 1}}',
    ],
)
def test_decode_snapshot_refuses_bad_shapes(raw: bytes) -> None:
    with pytest.raises(SnapshotError):
        decode_snapshot(raw)


# --- incremental-save bookkeeping ---------------------------------------------------


@FRAMES
@given(st.lists(st.one_of(patch_lists(), st.sampled_from(["take", "take-and-fail"])), max_size=16))
def test_take_changes_gives_the_keys_written_since_last_time(ops: list[Any]) -> None:
    doc = Document(unsaved_keys=set())
    model = ReferenceModel()
    expected: set[str] = set()
    for op in ops:
        if isinstance(op, list):
            moved = model.apply(op)
            assert doc.apply(op) is moved
            expected |= model.written_at(model.timestamp) if moved else set()
            continue
        changes = doc.take_changes()
        assert changes.timestamp == doc.timestamp
        assert set(changes.records) == expected
        for key, change in changes.records.items():
            assert change.record == doc.state[key]
            assert change.timestamps == doc.timestamps[key]
        assert doc.take_changes().records == {}  # taken: forgotten
        if op == "take-and-fail":
            doc.restore_changes(changes)
        else:
            expected = set()
    changes = doc.take_changes()
    assert set(changes.records) == expected
    assert all(change.record == doc.state[k] for k, change in changes.records.items())


# --- several clients against the model ----------------------------------------------

CLIENTS = ("alice", "bob", "carol")


class SyncMachine(RuleBasedStateMachine):
    """A room's sans-IO state (Document + EphemeralState) driven by several clients,
    checked against ReferenceModel and ModelPresence.

    Each client keeps a mirror of the live document. A connected client applies every
    frame as it is broadcast; a client that disconnects keeps its mirror and the last
    timestamp it saw (perhaps a few frames behind, as after a lost connection), and on
    reconnect applies the diff since then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.doc = Document(unsaved_keys=set())
        self.presence = EphemeralState()
        self.model = ReferenceModel()
        self.model_presence = ModelPresence()
        self.history: list[dict[str, Any]] = [{}]
        self.connected: set[str] = set()
        self.mirrors: dict[str, dict[str, Any]] = {c: {} for c in CLIENTS}
        self.last_seen: dict[str, int] = dict.fromkeys(CLIENTS, 0)
        self.unsaved: set[str] = set()

    def _apply(
        self, client: str, doc_patches: list[dict[str, Any]], eph_patches: list[dict[str, Any]]
    ) -> None:
        """What Room._apply does with the sans-IO parts, mirrored on the model."""
        moved = self.model.apply(doc_patches)
        assert self.doc.apply(doc_patches) is moved
        self.unsaved |= self.model.written_at(self.model.timestamp) if moved else set()
        if eph_patches:
            self.presence.apply(client, eph_patches)
            self.model_presence.apply(client, eph_patches)
        if moved:
            self.history.append(live_records(self.model.state))
            for other in self.connected:  # the broadcast, and the sender's own edit
                for patch in doc_patches:
                    client_apply(self.mirrors[other], patch)
                self.last_seen[other] = self.doc.timestamp

    @initialize(client=st.sampled_from(CLIENTS))
    def first_client(self, client: str) -> None:
        self.reconnect(client, [], [])

    @precondition(lambda self: self.connected)
    @rule(data=st.data(), doc_patches=patch_lists(), eph_patches=presence_patch_lists)
    def send_patch(
        self,
        data: st.DataObject,
        doc_patches: list[dict[str, Any]],
        eph_patches: list[dict[str, Any]],
    ) -> None:
        client = data.draw(st.sampled_from(sorted(self.connected)))
        self._apply(client, doc_patches, eph_patches)

    @precondition(lambda self: len(self.connected) < len(CLIENTS))
    @rule(
        data=st.data(),
        doc_patches=patch_lists(max_patches=2),
        eph_patches=presence_patch_lists,
    )
    def reconnect_with_offline_edits(
        self,
        data: st.DataObject,
        doc_patches: list[dict[str, Any]],
        eph_patches: list[dict[str, Any]],
    ) -> None:
        client = data.draw(st.sampled_from(sorted(set(CLIENTS) - self.connected)))
        self.reconnect(client, doc_patches, eph_patches)

    def reconnect(
        self, client: str, doc_patches: list[dict[str, Any]], eph_patches: list[dict[str, Any]]
    ) -> None:
        since = self.last_seen[client]
        mirror = self.mirrors[client]
        for patch in doc_patches:  # the client made these edits while offline
            client_apply(mirror, patch)
        self._apply(client, doc_patches, eph_patches)
        self.connected.add(client)
        diff = self.doc.diff_since(since)
        assert diff == self.model.diff_since(since)
        client_apply(mirror, diff)
        assert_converged(mirror, self.model.live(), self.model.deleted_after(since))
        # the client now holds the server state (stale fields aside, see
        # assert_converged); start it from there so later checks can be exact
        self.mirrors[client] = self.model.live()
        self.last_seen[client] = self.doc.timestamp
        assert self.presence.snapshot_for(client) == self.model_presence.snapshot_for(client)

    @precondition(lambda self: self.connected)
    @rule(data=st.data(), lag=st.integers(0, 3))
    def disconnect(self, data: st.DataObject, lag: int) -> None:
        client = data.draw(st.sampled_from(sorted(self.connected)))
        self.connected.discard(client)
        deletion = self.presence.remove(client)
        assert deletion == self.model_presence.remove(client)
        # the client may have missed the last few frames before its socket died
        seen = max(0, self.doc.timestamp - lag)
        self.last_seen[client] = seen
        self.mirrors[client] = copy.deepcopy(self.history[seen])

    @rule(fail=st.booleans())
    def save_incrementally(self, fail: bool) -> None:
        changes = self.doc.take_changes()
        assert changes.timestamp == self.doc.timestamp
        assert set(changes.records) == self.unsaved
        for key, change in changes.records.items():
            assert change.record == self.model.state[key]
            assert change.timestamps == self.model.timestamps[key]
        if fail:
            self.doc.restore_changes(changes)
        else:
            self.unsaved = set()

    @invariant()
    def document_equals_model(self) -> None:
        assert_document_equals(self.doc, self.model)
        assert self.doc.diff_since(self.doc.timestamp) == {}

    @invariant()
    def connected_clients_hold_the_server_state(self) -> None:
        live = self.model.live()
        for client in self.connected:
            assert self.mirrors[client] == live, client

    @invariant()
    def presence_is_the_others_live_presence(self) -> None:
        for client in (*CLIENTS, "newcomer"):
            assert self.presence.snapshot_for(client) == self.model_presence.snapshot_for(
                client
            )
            assert self.presence.key_count(client) == len(
                self.model_presence.by_client.get(client, {})
            )


SyncMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=20,
    report_multiple_bugs=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_sync_machine = SyncMachine.TestCase


def test_buf_true_is_not_a_buffer_delta() -> None:
    """PROTOCOL.md defines a buffer delta as ``"__buf": 1``, and the client and the Node
    server test ``value.__buf === 1``: ``{"__buf": true}`` is an ordinary object field,
    stored and sent back as is. (Before 84b9f25 the document tested ``== 1``, which True
    satisfies in Python, and turned the field into an array of zeros.)"""
    value = {"__buf": True, "len": 2, "runs": []}
    assert not is_buffer_delta(value)
    doc = Document()
    doc.apply([{"e/c": {"_exists": True, "meta": value}}])
    assert doc.state["e/c"]["meta"] == value
