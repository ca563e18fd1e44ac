"""ReferenceModel: the document model of the protocol, written out longhand.

It shares no code with ``canvas_store_trio._document`` on purpose: tests check the
server against it. It is naive (index by index, deep copies everywhere) so that it is
easy to check by reading it against the protocol's "Document model".
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from .._document import Snapshot

Record = dict[str, Any]


def _is_buffer_delta(value: object) -> bool:
    """``value.__buf === 1`` in JavaScript: the number 1, not ``true``."""
    return isinstance(value, dict) and value.get("__buf") == 1 and value.get("__buf") is not True


def apply_delta(old: object, delta: Mapping[str, Any]) -> list[Any]:
    """"A new array of length N: the first min(old length, N) items of the old array
    (none if there was no array), zeros for the rest, then each run writes v_j at
    offset + j. A write outside 0 <= index < N is ignored." One index at a time."""
    n = delta["len"]
    old_items = old if isinstance(old, list) else []
    out = [copy.deepcopy(old_items[i]) if i < len(old_items) else 0 for i in range(n)]
    for offset, values in delta["runs"]:
        for j, v in enumerate(values):
            if 0 <= offset + j < n:
                out[offset + j] = v
    return out


def _write_fields(base: Record, value: Mapping[str, Any]) -> Record:
    out = copy.deepcopy(base)
    for field, v in value.items():
        out[field] = apply_delta(out.get(field), v) if _is_buffer_delta(v) else copy.deepcopy(v)
    return out


def apply_entry(state: dict[str, Record], key: str, value: Mapping[str, Any]) -> bool:
    """Apply one patch entry to ``state``; return whether the key was written (False: a
    partial write to a missing or dead key, dropped)."""
    if value.get("_exists") is False:
        state[key] = {"_exists": False}
        return True
    current = state.get(key)
    if current is None or current.get("_exists") is False:
        if value.get("_exists") is not True:
            return False
        state[key] = _write_fields({}, value)
    else:
        state[key] = _write_fields(current, value)
    return True


def live_records(state: Mapping[str, Record]) -> dict[str, Record]:
    """What a client holds: live records only (tombstones count as absent)."""
    return {k: copy.deepcopy(v) for k, v in state.items() if v.get("_exists") is not False}


class ReferenceModel:
    """A room's document, last-writer-wins per field, as the protocol defines it.

    Feed it every accepted frame's ``documentPatches`` in the order the room applied
    them (:meth:`apply`), then compare: the room timestamp, :meth:`diff_since` with what
    a client reconnecting with ``lastTimestamp`` gets, :meth:`snapshot` with what the
    room saves (``Room.get_snapshot()``), :meth:`live` with what a client holds.

    - The timestamp goes up by one for each frame holding at least one non-empty patch,
      even if every write in it is dropped; a frame of empty patches changes nothing.
    - ``_exists: false`` makes the record exactly ``{"_exists": false}`` (a tombstone, kept
      for ever). Its field timestamps are cleared, then each field the deleting value
      names gets the frame's timestamp, as the Node server does.
    - A write to a missing or dead key is dropped unless it says ``_exists: true``, and
      then it is the new record (buffer deltas applied to nothing).
    - Otherwise each field written replaces the stored one (a buffer delta is applied to
      the stored array), and gets the frame's timestamp.

    Presence (``ephemeralPatches``) is not modelled: it has no timestamps.
    """

    def __init__(self) -> None:
        self.timestamp = 0
        self.state: dict[str, Record] = {}
        self.timestamps: dict[str, dict[str, int]] = {}
        self.writes: dict[int, list[tuple[str, Record]]] = {}
        """Timestamp -> the entries the frame at that timestamp wrote, in order (dropped
        writes left out)."""

    def apply(self, patches: Iterable[Mapping[str, Mapping[str, Any]]]) -> bool:
        """Apply one frame's document patches; return whether the timestamp moved."""
        frame = copy.deepcopy(list(patches))
        if not any(len(patch) > 0 for patch in frame):
            return False
        self.timestamp += 1
        t = self.timestamp
        written = self.writes.setdefault(t, [])
        for patch in frame:
            for key, value in patch.items():
                if not apply_entry(self.state, key, value):
                    continue
                written.append((key, dict(value)))
                if value.get("_exists") is False:
                    self.timestamps[key] = dict.fromkeys(value, t)
                else:
                    field_ts = self.timestamps.setdefault(key, {})
                    for field in value:
                        field_ts[field] = t
        return True

    def diff_since(self, since: int) -> dict[str, Record]:
        """Every field written after ``since``, with its current value, by key.

        A field with a timestamp but no value (named by a deleting patch) is left out, as
        ``JSON.stringify`` leaves out the Node server's ``undefined``.
        """
        diff = {}
        for key, field_ts in self.timestamps.items():
            record = self.state[key]
            fields = {f: record[f] for f, t in field_ts.items() if t > since and f in record}
            if fields:
                diff[key] = copy.deepcopy(fields)
        return diff

    def snapshot(self) -> Snapshot:
        """The room's persistent state: what it saves and loads."""
        return Snapshot(
            self.timestamp, copy.deepcopy(self.state), copy.deepcopy(self.timestamps)
        )

    def live(self) -> dict[str, Record]:
        """What a client in sync holds: the live records (tombstones are absent)."""
        return live_records(self.state)

    def written_at(self, timestamp: int) -> set[str]:
        """The keys the frame at ``timestamp`` wrote."""
        return {key for key, _ in self.writes.get(timestamp, ())}

    def deleted_after(self, since: int) -> set[str]:
        """The keys tombstoned by a frame after ``since`` (perhaps re-created since)."""
        return {
            key
            for t, entries in self.writes.items()
            if t > since
            for key, value in entries
            if value.get("_exists") is False
        }
