"""The append-only journal of a room on file storage: ``R.journal`` beside ``R.json``.

A durable commit (:meth:`FileStorage.commit`) appends one record to the journal and
``fdatasync``s it; the throttled save writes the ``R.json`` snapshot and then *folds* the
journal: the records the snapshot holds are dropped, and a journal left empty is removed.
After a clean shutdown only ``R.json`` files remain.

Record format (all integers little-endian)::

    u32 length of payload | u32 zlib.crc32(payload) | payload (length bytes)

The payload is a JSON object in the snapshot's own shape, holding only what one commit
changed (:class:`~canvas_store_trio._document.Changes`)::

    {"timestamp": T, "state": {key: record, ...}, "timestamps": {key: field_timestamps}}

``T`` is the room timestamp after the commit; each key carries its *whole* record (a
tombstone is ``{"_exists": false}``) and its field timestamps as they stood then, so a
record replaces the key outright and nothing is renumbered on replay.

Replay (on load): the records are read in file order, and each one whose timestamp is
above the snapshot's (a missing snapshot counts as timestamp 0, empty) is applied:
``state.update``, ``timestamps.update``, room timestamp = the larger. Each record is
checked (a full header, a full payload, the checksum, and the snapshot checks of
:func:`~canvas_store_trio._document.snapshot_from_json`). The first record that fails
ends the replay: it is a torn or corrupt tail (a crash mid-append), logged as a
warning with the file and byte offset, never a load failure. Loading writes nothing;
the tail is cut off (``ftruncate``) before the next append, so no record ever follows
garbage.

This module holds the format (:func:`encode_record`, :func:`scan_journal`,
:func:`replay`) and the worker thread's view of one journal file (:class:`JournalFile`);
:class:`~canvas_store_trio.storage._files.FolderWriter` drives them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import orjson

from .._document import Changes, Snapshot, SnapshotError, snapshot_from_json

__all__ = [
    "JournalFile",
    "JournalRecord",
    "JournalScan",
    "encode_record",
    "replay",
    "scan_journal",
]

HEADER = struct.Struct("<II")
"""The length of the payload and its CRC-32."""


def encode_record(changes: Changes) -> bytes:
    """One journal record (header and payload) for ``changes``."""
    state: dict[str, Any] = {}
    timestamps: dict[str, Any] = {}
    for key, change in changes.records.items():
        state[key] = change.record
        timestamps[key] = change.timestamps
    payload = orjson.dumps(
        {"timestamp": changes.timestamp, "state": state, "timestamps": timestamps}
    )
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@attrs.frozen
class JournalRecord:
    """One good record as stored: its timestamp and its bytes (header included)."""

    timestamp: int
    data: bytes


@attrs.define
class JournalScan:
    """What a journal file holds.

    ``records`` are the good records in file order, ``changes`` the same records parsed
    (empty when the scan was asked not to keep them), ``good_length`` where the last good
    record ends, ``size`` the file's length (0 when there is no file), and ``bad_offset``
    and ``problem`` where and why the good records stop (None when they reach the end).
    """

    records: list[JournalRecord] = attrs.field(factory=list)
    changes: list[Snapshot] = attrs.field(factory=list)
    good_length: int = 0
    size: int = 0
    bad_offset: int | None = None
    problem: str | None = None


def scan_journal(data: bytes, *, keep_changes: bool = True) -> JournalScan:
    """Split a journal's bytes into good records, up to the first bad one."""
    scan = JournalScan(size=len(data))
    offset = 0
    view = memoryview(data)
    while offset < len(data):
        problem = None
        if len(data) - offset < HEADER.size:
            problem = "a short record header"
        else:
            length, crc = HEADER.unpack_from(data, offset)
            end = offset + HEADER.size + length
            payload = view[offset + HEADER.size : end]
            if end > len(data):
                problem = "a short record"
            elif zlib.crc32(payload) != crc:
                problem = "a checksum mismatch"
            else:
                try:
                    change = snapshot_from_json(orjson.loads(payload))
                except orjson.JSONDecodeError:
                    problem = "a record that is not JSON"
                except SnapshotError as exc:
                    problem = f"a record of the wrong shape ({exc})"
        if problem is not None:
            scan.bad_offset, scan.problem = offset, problem
            break
        scan.records.append(JournalRecord(change.timestamp, data[offset:end]))
        if keep_changes:
            scan.changes.append(change)
        offset = scan.good_length = end
    return scan


def replay(snapshot: Snapshot | None, changes: Iterable[Snapshot]) -> Snapshot | None:
    """``snapshot`` with every change newer than it applied, in order.

    A missing snapshot is timestamp 0 with nothing in it; it stays None when no change
    applies.
    """
    base_timestamp = snapshot.timestamp if snapshot is not None else 0
    newer = [change for change in changes if change.timestamp > base_timestamp]
    if not newer:
        return snapshot
    timestamp = base_timestamp
    state = dict(snapshot.state) if snapshot is not None else {}
    timestamps = dict(snapshot.timestamps) if snapshot is not None else {}
    for change in newer:
        state.update(change.state)
        timestamps.update(change.timestamps)
        timestamp = max(timestamp, change.timestamp)
    return Snapshot(timestamp, state, timestamps)


@attrs.define(eq=False)
class JournalFile:
    """A worker thread's view of one journal file (blocking methods; one thread at a time).

    ``length`` is where the good records end, and ``records`` are those records (every
    record since the last fold, as a plain ``(timestamp, bytes)`` tuple), so a fold
    needs no re-read. A busy room keeps thousands between two folds: the garbage
    collector stops tracking tuples of plain values, so they add nothing to its full
    collections, where a :class:`JournalRecord` each would. ``dirty_tail``: the file
    may hold bytes past ``length`` (a torn tail, a failed append), cut off before the
    next append. ``entry_unsynced``: the file's folder entry (creation, or the rename of
    a rewrite) is not durable yet, so the folder must be fsynced before an append to it
    counts as durable. ``fd`` is open from the first append until :meth:`close` or a
    fold (the writer keeps it open between batches, see
    :class:`~canvas_store_trio.storage._files.FolderWriter`).
    """

    path: Path
    length: int = 0
    records: list[tuple[int, bytes]] = attrs.field(factory=list)
    dirty_tail: bool = False
    entry_unsynced: bool = False
    fd: int | None = None
    _folded: list[tuple[int, bytes]] = attrs.field(factory=list, repr=False)
    """The records a fold kept, until its file replaces this one."""

    @classmethod
    def from_scan(cls, path: Path, scan: JournalScan) -> JournalFile:
        return cls(
            path,
            scan.good_length,
            [(record.timestamp, record.data) for record in scan.records],
            dirty_tail=scan.size > scan.good_length,
        )

    @classmethod
    def from_disk(cls, path: Path) -> JournalFile:
        """The journal as the file holds it now (none: an empty one)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        return cls.from_scan(path, scan_journal(data, keep_changes=False))

    def _open(self) -> int:
        if self.fd is None:
            flags = os.O_WRONLY | os.O_CLOEXEC
            try:
                self.fd = os.open(self.path, flags)
            except FileNotFoundError:
                self.fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                # A new file: whatever we thought it held is gone.
                self.length, self.records, self.dirty_tail = 0, [], False
                self.entry_unsynced = True
        return self.fd

    def append(self, record: JournalRecord) -> None:
        """Write one record after the good ones (not synced; see :meth:`sync`).

        On failure the file is cut back to its good length and the error raised.
        """
        fd = self._open()
        if self.dirty_tail:
            os.ftruncate(fd, self.length)
            self.dirty_tail = False
        try:
            _write_all(fd, record.data, self.length)
        except BaseException:
            self.truncate(self.length, len(self.records))
            raise
        self.length += len(record.data)
        self.records.append((record.timestamp, record.data))

    def sync(self) -> None:
        """Make the appended bytes durable (``fdatasync``; ``fsync`` where there is none)."""
        if self.fd is not None:
            getattr(os, "fdatasync", os.fsync)(self.fd)

    def truncate(self, length: int, count: int) -> None:
        """Forget every record after the first ``count`` (which end at ``length``), and
        cut the file back to them (now, or before the next append if that fails)."""
        self.length = length
        del self.records[count:]
        self.dirty_tail = True
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, length)
            except OSError:
                return
            self.dirty_tail = False

    def fold(self, through: int | None) -> Path | None:
        """Drop the records at or below ``through`` (None: all of them).

        With none left the file is removed, and None returned; None too if there is
        nothing to drop. Otherwise the rest are written to a temp file beside it, not
        synced, whose name is returned: the caller makes it durable (one filesystem sync
        can serve many), then calls :meth:`replace_with_folded`. Until then this view
        and the file are as they were. The folder is not fsynced after a removal: a
        journal that comes back holds only records the snapshot already has, which
        replay skips.
        """
        keep = [] if through is None else [r for r in self.records if r[0] > through]
        if keep and len(keep) == len(self.records) and not self.dirty_tail:
            return None  # nothing to drop
        if not keep:
            self.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.length, self.records, self.dirty_tail = 0, [], False
            return None
        from ._files import write_temp_file

        self._folded = keep
        return write_temp_file(self.path, [data for _, data in keep], sync=False)

    def replace_with_folded(self, tmp: Path) -> None:
        """Rename the folded file ``tmp`` (from :meth:`fold`, durable by now) over the
        journal, which then holds the kept records. The folder must be fsynced before
        the rename counts (``entry_unsynced`` is set). Raises ``OSError`` (``tmp`` is
        removed, the journal stays as it was)."""
        from ._files import replace_with_temp

        keep, self._folded = self._folded, []  # a failed rename keeps nothing either
        replace_with_temp(tmp, self.path)
        self.close()
        self.records = keep
        self.length = sum(len(data) for _, data in keep)
        self.dirty_tail = False
        self.entry_unsynced = True

    def close(self) -> None:
        """Close the file descriptor, if open (the view stays; it reopens on need)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset`` (``pwrite``: one system call, no seek)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
