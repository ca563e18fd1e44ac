"""The document model, sans-IO: patches, tombstones, field timestamps, buffer deltas.

Nothing here knows about sockets, tasks or files. Every function takes input that
:mod:`canvas_store_trio._protocol` has already validated, so it never has to guess
what a malformed value means.

Records are treated as immutable once stored: a write replaces the record (and its
field-timestamp map) with a new dict instead of editing it in place, and keys are
never removed. That makes :meth:`Document.snapshot` a shallow copy that a saver may
serialize later, or on another thread, while the room keeps applying patches, and lets
:meth:`Document.encode_in_steps` encode the document as it was without copying it.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import attrs
import orjson

Record = dict[str, Any]
"""One component: field name -> JSON value. ``_exists`` marks life and death."""
Patch = dict[str, Record]
"""Key (``<entity>/<component>`` or ``SINGLETON/<name>``) -> record or partial record."""
FieldTimestamps = dict[str, int]

TOMBSTONE: Record = {"_exists": False}
_MISSING = object()


class SnapshotError(ValueError):
    """A stored snapshot does not have the shape of one. The room refuses to load it."""


def is_buffer_delta(value: object) -> TypeGuard[dict[str, Any]]:
    """Whether a field value is a buffer delta (``{"__buf": 1, "len": N, "runs": [...]}``)."""
    if type(value) is not dict:
        return False
    marker = value.get("__buf")
    return marker == 1 and type(marker) is not bool  # as JavaScript's `__buf === 1`


def apply_buffer_delta(base: object, delta: Mapping[str, Any]) -> list[Any]:
    """The full array a buffer delta stands for, on top of ``base``.

    The result has length ``len``: the first ``min(len(base), len)`` items of ``base``
    (none when ``base`` is not a list), zeros after them, then each run ``[offset,
    values]`` written from ``offset``. Writes outside ``0 <= index < len`` are ignored.
    """
    length: int = delta["len"]
    out: list[Any] = base[:length] if type(base) is list else []
    if len(out) < length:
        out.extend([0] * (length - len(out)))
    for offset, values in delta["runs"]:
        lo = max(offset, 0)
        hi = min(offset + len(values), length)
        if lo < hi:
            out[lo:hi] = values[lo - offset : hi - offset]
    return out


def _materialize(base: Record | None, value: Record) -> Record:
    """A new record: ``base`` with every field of ``value`` written over it."""
    out = dict(base) if base is not None else {}
    for field, field_value in value.items():
        if type(field_value) is dict and is_buffer_delta(field_value):  # no call for scalars
            out[field] = apply_buffer_delta(out.get(field), field_value)
        else:
            out[field] = field_value
    return out


def merge_entry(state: dict[str, Record], key: str, value: Record) -> bool:
    """Apply one patch entry to ``state``; return whether the key was written.

    A value with ``_exists: false`` makes a tombstone. A write to a missing or dead key
    is dropped unless it says ``_exists: true``. Anything else merges field by field.
    """
    exists = value.get("_exists")
    if exists is False:
        state[key] = TOMBSTONE
        return True
    existing = state.get(key)
    if existing is None or existing.get("_exists") is False:
        if exists is not True:
            return False
        state[key] = _materialize(None, value)
    else:
        state[key] = _materialize(existing, value)
    return True


def has_content(patches: Sequence[Patch] | None) -> bool:
    """Whether a list of patches holds at least one entry."""
    return bool(patches) and any(patches)  # type: ignore[arg-type]


def replacement_patches(current: Mapping[str, Record], wanted: Mapping[str, Record]) -> list[Patch]:
    """The document patches that make a document whose state is ``current`` hold exactly
    the live records of ``wanted`` (key -> record): at most two, applied as one edit.

    Keys ``wanted`` lacks (or holds as tombstones) are deleted, records that differ are
    written anew (deleted and re-created in the same edit when they lose a field), and
    the rest is left alone. No patch at all when nothing differs.
    """
    live = {
        key: {"_exists": True, **record}
        for key, record in wanted.items()
        if record.get("_exists") is not False
    }
    deletions: Patch = {}
    for key, record in current.items():
        if record.get("_exists") is not False:
            target = live.get(key)
            if target is None or record.keys() - target.keys():
                deletions[key] = TOMBSTONE
    writes = {key: record for key, record in live.items() if record != current.get(key)}
    return [patch for patch in (deletions, writes) if patch]


@attrs.frozen
class Snapshot:
    """A room's whole persistent state, in the Node server's file format.

    ``state`` keeps tombstones; they are what tells a client that reconnects with an old
    timestamp that something was deleted.
    """

    timestamp: int = 0
    state: Mapping[str, Record] = attrs.field(factory=dict)
    timestamps: Mapping[str, FieldTimestamps] = attrs.field(factory=dict)


@attrs.frozen
class RecordChange:
    """One key as it stands after a change: its record and its field timestamps."""

    record: Record
    timestamps: FieldTimestamps


@attrs.frozen
class Changes:
    """What changed since the last save: the room timestamp and the keys written."""

    timestamp: int
    records: Mapping[str, RecordChange]


@attrs.define
class Document:
    """A room's document: the state, the field timestamps and the room timestamp.

    The room timestamp moves by one for each accepted frame that carries at least one
    non-empty document patch, however many patches and keys the frame holds.
    """

    timestamp: int = 0
    state: dict[str, Record] = attrs.field(factory=dict)
    timestamps: dict[str, FieldTimestamps] = attrs.field(factory=dict)
    unsaved_keys: set[str] | None = attrs.field(default=None, repr=False)
    """Keys written since :meth:`take_changes` last ran, when tracked (None: not tracked).
    Rooms on incremental storage, and with durable acks, track them."""
    _encodings: list[dict[str, tuple[Any, Any]]] = attrs.field(factory=list, init=False, repr=False)
    """One map per :meth:`encode_in_steps` under way: each key written since it began,
    with its record and field timestamps as they were then (``_MISSING`` if absent)."""

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, *, track_changes: bool = False) -> Document:
        """A document holding ``snapshot``. ``track_changes`` keeps the keys each edit
        writes (``unsaved_keys``), for incremental saves."""
        return cls(
            snapshot.timestamp,
            dict(snapshot.state),
            dict(snapshot.timestamps),
            set() if track_changes else None,
        )

    def apply(self, patches: Sequence[Patch]) -> bool:
        """Apply a frame's document patches under one new timestamp.

        Returns False, and changes nothing, when the patches hold no entry at all.
        """
        if not has_content(patches):
            return False
        self.timestamp = ts = self.timestamp + 1
        state, timestamps, unsaved, encodings = (
            self.state,
            self.timestamps,
            self.unsaved_keys,
            self._encodings,
        )
        for patch in patches:
            for key, value in patch.items():
                for before in encodings:
                    if key not in before:
                        before[key] = (state.get(key, _MISSING), timestamps.get(key, _MISSING))
                if not merge_entry(state, key, value):
                    continue
                if unsaved is not None:
                    unsaved.add(key)
                if value.get("_exists") is False:
                    # As the Node server does: every field the deleting patch names
                    # gets the deletion's timestamp (the record keeps only _exists).
                    timestamps[key] = dict.fromkeys(value, ts)
                else:
                    field_ts = dict(timestamps.get(key, ()))
                    for field in value:
                        field_ts[field] = ts
                    timestamps[key] = field_ts
        return True

    def diff_since(self, since: int) -> Patch:
        """Every field written after ``since``, with its current value, grouped by key."""
        state = self.state
        diff: Patch = {}
        for key, field_ts in self.timestamps.items():
            record = state.get(key)
            if record is None:
                continue
            if since <= 0 and field_ts.keys() == record.keys():
                diff[key] = record  # every field is newer: the record itself (never mutated)
                continue
            fields = {f: record[f] for f, ts in field_ts.items() if ts > since and f in record}
            if fields:
                diff[key] = fields
        return diff

    def snapshot(self) -> Snapshot:
        """The persistent state now, frozen: later frames do not change it.

        Records and their timestamps are replaced, never edited in place, so this is two
        shallow dict copies; for 100k components that still takes a few milliseconds
        (:meth:`encode_in_steps` takes none).
        """
        return Snapshot(self.timestamp, dict(self.state), dict(self.timestamps))

    def encode_in_steps(self, chunk_size: int = 1000) -> Generator[bytes, None, None]:
        """The snapshot as it is now, encoded as :func:`encode_snapshot_parts` does, but
        read from the live document a piece at a time instead of copied first.

        The caller may apply frames between pieces: the bytes are still those of the
        snapshot at the first piece. Keys are never removed, so the first N keys of the
        live dicts are the N it had then; the old record and timestamps of any of them
        written meanwhile are kept aside until this ends. Stopping early (``close()``)
        leaves no trace. No copy of the state is made, so no piece holds the loop for
        more than one chunk's encoding.
        """
        before: dict[str, tuple[Any, Any]] = {}
        self._encodings.append(before)
        state, timestamps = self.state, self.timestamps
        counts = len(state), len(timestamps)
        try:
            yield from _encode_document(
                self.timestamp,
                _pieces_as_of(state, counts[0], before, 0, chunk_size),
                _pieces_as_of(timestamps, counts[1], before, 1, chunk_size),
            )
        finally:
            self._encodings = [log for log in self._encodings if log is not before]

    def take_changes(self) -> Changes:
        """The keys written since the last call, as they stand now; then forget them."""
        state, timestamps = self.state, self.timestamps
        records = {
            key: RecordChange(state[key], timestamps.get(key, {}))
            for key in self.unsaved_keys or ()
            if key in state
        }
        self.unsaved_keys = set()
        return Changes(self.timestamp, records)

    def restore_changes(self, changes: Changes) -> None:
        """Mark the keys of a failed incremental save as unsaved again."""
        if self.unsaved_keys is None:
            self.unsaved_keys = set()
        self.unsaved_keys.update(changes.records)


@attrs.define
class EphemeralState:
    """Presence: one map per client id, never persisted and without timestamps.

    A deleted presence key is forgotten rather than kept as a tombstone (the Node server
    keeps it): nobody reconnects to presence with an old timestamp, and a client that
    selects and deselects things for hours must not pile up keys.
    """

    by_client: dict[str, dict[str, Record]] = attrs.field(factory=dict)

    def apply(self, client_id: str, patches: Iterable[Patch]) -> None:
        state = self.by_client.setdefault(client_id, {})
        for patch in patches:
            for key, value in patch.items():
                if value.get("_exists") is False:
                    state.pop(key, None)
                else:
                    merge_entry(state, key, value)

    def key_count(self, client_id: str) -> int:
        return len(self.by_client.get(client_id, ()))

    def snapshot_for(self, client_id: str) -> Patch:
        """Every other client's map, merged into one patch."""
        merged: Patch = {}
        for other, state in self.by_client.items():
            if other != client_id:
                merged.update(state)
        return merged

    def remove(self, client_id: str) -> Patch:
        """Forget a client's map; return the patch that deletes its keys elsewhere."""
        state = self.by_client.pop(client_id, {})
        return dict.fromkeys(state, TOMBSTONE)


# --- snapshot encoding -------------------------------------------------------------


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The Node server's file format: ``{"timestamp", "state", "timestamps"}``."""
    return b"".join(encode_snapshot_parts(snapshot))


def encode_snapshot_parts(snapshot: Snapshot, chunk_size: int = 2000) -> Iterator[bytes]:
    """:func:`encode_snapshot` in pieces of about ``chunk_size`` records each.

    A caller on an event loop can yield between pieces, so a big document never holds
    the loop for the whole encoding.
    """
    return _encode_document(
        snapshot.timestamp,
        _pieces(snapshot.state, chunk_size),
        _pieces(snapshot.timestamps, chunk_size),
    )


def _encode_document(
    timestamp: int,
    state_pieces: Iterable[dict[str, Any]],
    timestamp_pieces: Iterable[dict[str, Any]],
) -> Iterator[bytes]:
    """The Node server's file format, from the pieces of its two maps."""
    yield b'{"timestamp":%d,"state":{' % timestamp
    yield from _encode_members(state_pieces)
    yield b'},"timestamps":{'
    yield from _encode_members(timestamp_pieces)
    yield b"}}"


def _pieces(mapping: Mapping[str, Any], chunk_size: int) -> Iterator[dict[str, Any]]:
    keys = list(mapping)  # one list, not one tuple per item: less for the collector
    for start in range(0, len(keys), chunk_size):
        yield {key: mapping[key] for key in keys[start : start + chunk_size]}


def _pieces_as_of(
    live: dict[str, Any],
    count: int,
    before: dict[str, tuple[Any, Any]],
    which: int,
    chunk_size: int,
) -> Iterator[dict[str, Any]]:
    """The first ``count`` keys of ``live`` with their values as they were when ``before``
    began recording (``which``: 0 for records, 1 for timestamps), a piece at a time."""
    keys: Iterator[str] = iter(live)
    size = len(live)
    for start in range(0, count, chunk_size):
        if len(live) != size:
            # Keys were added (never removed) since the last piece, which voids the
            # iterator: a fresh one skips to this piece's start. Otherwise each piece
            # carries on where the last stopped, as skipping costs more with each piece.
            keys, size = itertools.islice(live, start, None), len(live)
        piece = {}
        for key in itertools.islice(keys, min(chunk_size, count - start)):
            old = before.get(key)
            piece[key] = live[key] if old is None else old[which]
        yield piece


def _encode_members(pieces: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """The members of one JSON object, from its pieces (no braces)."""
    first = True
    for piece in pieces:
        if piece:
            if not first:
                yield b","
            first = False
            yield orjson.dumps(piece)[1:-1]


def decode_snapshot(data: bytes | str) -> Snapshot:
    """Parse and check a stored snapshot. Raise :class:`SnapshotError` if it is not one."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    return snapshot_from_json(raw)


def snapshot_from_json(raw: object) -> Snapshot:
    """Check a parsed snapshot object and build a :class:`Snapshot` from it."""
    if type(raw) is not dict:
        raise SnapshotError("a snapshot must be a JSON object")
    timestamp = raw.get("timestamp")
    state = raw.get("state")
    timestamps = raw.get("timestamps", {})
    if type(timestamp) is not int or timestamp < 0:
        raise SnapshotError("'timestamp' must be a non-negative integer")
    if type(state) is not dict or not all(type(v) is dict for v in state.values()):
        raise SnapshotError("'state' must map keys to objects")
    if type(timestamps) is not dict:
        raise SnapshotError("'timestamps' must map keys to field timestamps")
    for key, field_ts in timestamps.items():
        if type(field_ts) is not dict or not all(type(t) is int for t in field_ts.values()):
            raise SnapshotError(f"'timestamps' for {key!r} must map fields to integers")
    return Snapshot(timestamp, state, timestamps)


def snapshot_to_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "timestamp": snapshot.timestamp,
        "state": dict(snapshot.state),
        "timestamps": dict(snapshot.timestamps),
    }
