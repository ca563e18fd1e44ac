"""Where rooms keep their snapshots: the ``Storage`` protocol and the built-in backends.

A room calls ``load()`` once before it serves anyone, and ``save(snapshot)`` from its
saver task (throttled) and when it closes. A room never runs two saves of its own at
once. Backends may do blocking I/O only through ``trio.to_thread``.

A backend that can store a change without rewriting the whole document also implements
``save_changes(changes)`` (:class:`IncrementalStorage`); the room then hands it only the
keys written since the last save. Backends that only know whole snapshots (memory,
files, a user's own class) keep working unchanged.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs
import trio

from ._document import Changes, Snapshot, SnapshotError, decode_snapshot, encode_snapshot_parts

__all__ = [
    "FileStorage",
    "IncrementalStorage",
    "MemoryStorage",
    "Storage",
    "StorageError",
    "room_file_name",
]


class StorageError(Exception):
    """A backend could not read or write. The message says which room and why."""


@runtime_checkable
class Storage(Protocol):
    """Loads and saves one room's snapshot."""

    async def load(self) -> Snapshot | None:
        """The stored snapshot, or None for a room that was never saved.

        Raise (:class:`StorageError`, :class:`SnapshotError`, anything) when the data
        exists but cannot be read: the room then refuses to start instead of starting
        empty and overwriting it.
        """
        ...

    async def save(self, snapshot: Snapshot) -> None:
        """Store the whole snapshot. Raise on failure; the room keeps it and retries."""
        ...


@runtime_checkable
class IncrementalStorage(Storage, Protocol):
    """A storage that can also save just the keys that changed."""

    async def save_changes(self, changes: Changes) -> None:
        """Store the changed records and the room timestamp, all or nothing."""
        ...


@attrs.define
class MemoryStorage:
    """Keeps the snapshot in memory: for tests, demos and ``serve --memory``."""

    snapshot: Snapshot | None = None

    async def load(self) -> Snapshot | None:
        return self.snapshot

    async def save(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot


_PLAIN_ROOM_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_ENCODED_PREFIX = "~"


def room_file_name(room_id: str) -> str:
    """The file name for a room: ``<id>.json`` for plain ids, an encoded name otherwise.

    Plain ids (letters, digits, ``-``, ``_`` and ``.`` not leading) keep the Node
    server's file name, so its data folders load as they are. Any other id becomes
    ``~<base64url of its UTF-8>.json``: reversible, and never a path outside the folder,
    since ``~`` cannot start a plain id and base64url has no ``/`` or ``.``.
    """
    if _PLAIN_ROOM_ID.fullmatch(room_id):
        return f"{room_id}.json"
    encoded = base64.urlsafe_b64encode(room_id.encode()).decode().rstrip("=")
    return f"{_ENCODED_PREFIX}{encoded}.json"


def room_id_from_file_name(name: str) -> str | None:
    """The room id a file name was made from, or None if it is not a room file."""
    if not name.endswith(".json"):
        return None
    stem = name[: -len(".json")]
    if stem.startswith(_ENCODED_PREFIX):
        body = stem[len(_ENCODED_PREFIX) :]
        try:
            return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        except ValueError:
            return None
    return stem if _PLAIN_ROOM_ID.fullmatch(stem) else None


_temp_names = itertools.count()


def write_file_atomically(path: Path, parts: Iterable[bytes], *, sync_folder: bool = True) -> None:
    """Write ``parts`` to ``path`` through a temp file, fsync and rename (blocking).

    A crash at any moment leaves the old file or the new one, never half of one. With
    ``sync_folder`` the folder is fsynced too, so that the rename survives a power loss;
    :class:`FileStorage` passes False and has :class:`FolderSync` do that for many files.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_temp_names)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.writelines(parts)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the renames done in ``folder`` durable (blocking)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderSync:
    """Fsyncs one folder for every file renamed into it, sharing one fsync among many.

    :meth:`sync` returns once an fsync of the folder that began after the call has
    finished, so it covers every rename done before the call. Callers that arrive while
    an fsync runs share the next one: 1000 rooms saving every few seconds cost a few
    folder fsyncs, not 1000. An ``OSError`` goes to the caller whose fsync failed, and
    the callers it would have covered try again. Cancelled while waiting, a caller just
    leaves; the fsync under way, if any, still finishes for the others.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = trio.Lock()
        self._requested = 0
        self._synced = 0

    @classmethod
    def of(cls, folder: Path) -> FolderSync:
        """The shared instance for ``folder`` in this Trio run."""
        try:
            syncs = _folder_syncs.get()
        except LookupError:
            syncs = {}
            _folder_syncs.set(syncs)
        if folder not in syncs:
            syncs[folder] = cls(folder)
        return syncs[folder]

    async def sync(self) -> None:
        self._requested += 1
        ticket = self._requested
        async with self._lock:
            if self._synced >= ticket:
                return
            covers = self._requested
            await trio.to_thread.run_sync(fsync_folder, self.folder)
            self._synced = covers


_folder_syncs: trio.lowlevel.RunVar[dict[Path, FolderSync]] = trio.lowlevel.RunVar("folder_syncs")


@attrs.define
class FileStorage:
    """One JSON file per room, in the Node server's format, replaced atomically.

    Saves write a temp file in the same folder, fsync it and rename it over the target,
    so a crash at any moment leaves the old snapshot or the new one. Saves through one
    instance are serialized. A file that exists but cannot be parsed is an error, never
    an empty room.
    """

    dir: Path = attrs.field(converter=Path)
    room_id: str
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)

    @property
    def path(self) -> Path:
        return self.dir / room_file_name(self.room_id)

    async def load(self) -> Snapshot | None:
        try:
            data = await trio.to_thread.run_sync(self.path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return decode_snapshot(data)
        except SnapshotError as exc:
            raise SnapshotError(f"{self.path} is not a valid snapshot ({exc})") from None

    async def save(self, snapshot: Snapshot) -> None:
        """Encode on the event loop a piece at a time (so a big document never holds it
        for long), then write, fsync and rename in a worker thread."""
        async with self._lock:
            parts = []
            for part in encode_snapshot_parts(snapshot):
                parts.append(part)
                await trio.sleep(0)
            try:
                await trio.to_thread.run_sync(self._write, parts)
                await FolderSync.of(self.dir).sync()
            except OSError as exc:
                raise StorageError(f"cannot write {self.path}: {exc.strerror}") from None

    def _write(self, parts: list[bytes]) -> None:
        try:
            write_file_atomically(self.path, parts, sync_folder=False)
        except FileNotFoundError:  # the folder is not there (yet, or any more)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_file_atomically(self.path, parts, sync_folder=False)
