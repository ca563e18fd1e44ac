"""Storage backends: where many rooms live, and how to name one with a URL.

A backend makes the :class:`~canvas_store_trio.Storage` for each room
(``create_storage(room_id)``, the shape a room's ``create_storage`` option takes),
lists the rooms it holds, and is closed once at the end. Every backend is an async
context manager::

    async with open_storage_backend("sqlite:///rooms.db") as backend:
        storage = backend.create_storage("my-room")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import attrs
import trio

from ._base import MemoryStorage, Storage
from ._files import FileStorage, journal_file_name, room_file_name, room_id_from_file_name

__all__ = [
    "FileBackend",
    "MemoryBackend",
    "StorageBackend",
    "open_storage_backend",
]

from .._logs import log_event

FOLD_CONCURRENCY = 32
""":meth:`FileBackend.fold_journals` folds this many rooms at once (their reads and
writes share the folder's thread hand-offs)."""


@runtime_checkable
class StorageBackend(Protocol):
    """Makes the storage for each room of one place (a folder, a database)."""

    def create_storage(self, room_id: str) -> Storage:
        """The storage for one room. Cheap: nothing is read until ``load()``."""
        ...

    async def list_room_ids(self) -> list[str]:
        """The ids of every room saved here, sorted."""
        ...

    async def aclose(self) -> None:
        """Release connections and files. Safe to call twice."""
        ...

    async def __aenter__(self) -> StorageBackend: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


@attrs.define(eq=False)
class FileBackend:
    """A folder of ``<room>.json`` snapshot files (:class:`FileStorage`), as the Node
    server keeps them, with a ``<room>.journal`` beside a snapshot whose room has
    durable commits not folded in yet."""

    dir: Path = attrs.field(converter=Path)

    def create_storage(self, room_id: str) -> FileStorage:
        """The room's :class:`FileStorage` in this folder."""
        return FileStorage(self.dir, room_id)

    async def list_room_ids(self) -> list[str]:
        """Rooms whose snapshot or journal is where :class:`FileStorage` would look for
        it (a room with only a journal counts).

        Temp files of a save in progress and other files are left out.
        """
        snapshots, journals = await self._scan()
        return sorted(set(snapshots) | set(journals))

    async def fold_journals(self) -> int:
        """Fold every room's journal into its snapshot (replayed as a load would); return
        how many rooms had one. After it the folder holds only snapshots.

        For when no room of the folder is open (at start-up, and after every room has
        closed); a folder without journals costs one listing. A room that cannot be
        folded (a snapshot that cannot be parsed, a full disk) is logged as an error and
        keeps its journal; the others are folded all the same.
        """
        _, journals = await self._scan()
        folded = 0
        limiter = trio.CapacityLimiter(FOLD_CONCURRENCY)

        async def fold(room_id: str) -> None:
            nonlocal folded
            async with limiter:
                try:
                    if await self.create_storage(room_id).fold_journal():
                        folded += 1
                except Exception as exc:
                    log_event(
                        logging.ERROR,
                        "journal_fold_failed",
                        "room %r: cannot fold its journal (%s)",
                        room_id,
                        exc,
                        room=room_id,
                        error=str(exc),
                    )

        async with trio.open_nursery() as nursery:
            for room_id in journals:
                nursery.start_soon(fold, room_id)
        return folded

    async def _scan(self) -> tuple[list[str], list[str]]:
        """The ids of the rooms with a snapshot, and of those with a journal, sorted."""

        def scan() -> tuple[list[str], list[str]]:
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                return [], []
            snapshots, journals = [], []
            for name in names:
                if name.endswith(".json"):
                    room_id = room_id_from_file_name(name)
                    if room_id is not None and room_file_name(room_id) == name:
                        snapshots.append(room_id)
                elif name.endswith(".journal"):
                    room_id = room_id_from_file_name(name, ".journal")
                    if room_id is not None and journal_file_name(room_id) == name:
                        journals.append(room_id)
            return sorted(snapshots), sorted(journals)

        return await trio.to_thread.run_sync(scan)

    async def aclose(self) -> None:
        """Nothing to release: the folder's writer and reader threads are shared."""
        pass

    async def __aenter__(self) -> FileBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __str__(self) -> str:
        return f"folder {self.dir}"


@attrs.define(eq=False)
class MemoryBackend:
    """Rooms in memory, for tests and ``serve --memory``: a room that closes and opens
    again finds its snapshot, until the process ends."""

    storages: dict[str, MemoryStorage] = attrs.field(factory=dict)

    def create_storage(self, room_id: str) -> MemoryStorage:
        """The room's :class:`MemoryStorage`, the same one each time."""
        return self.storages.setdefault(room_id, MemoryStorage())

    async def list_room_ids(self) -> list[str]:
        """Rooms saved at least once, sorted."""
        return sorted(k for k, s in self.storages.items() if s.snapshot is not None)

    async def aclose(self) -> None:
        """Nothing to release."""
        pass

    async def __aenter__(self) -> MemoryBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __str__(self) -> str:
        return "memory"


def open_storage_backend(url: str) -> StorageBackend:
    """The backend a storage URL names. Nothing is opened until first use.

    - ``sqlite:///rooms.db`` (a path relative to the working folder),
      ``sqlite:////var/lib/rooms.db`` (absolute), ``sqlite:///:memory:``
    - ``postgresql://user:password@host:5432/dbname`` (or ``postgres://``); any libpq
      parameter may follow as a query (``?sslmode=require``)
    - ``file:///var/lib/rooms`` or ``file:rooms`` (a folder of JSON files), ``memory:``
    - a plain path, which means a folder of JSON files

    Raise :class:`ValueError` for a URL that names none of these, and
    :class:`~canvas_store_trio.StorageError` when the PostgreSQL driver is missing.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        if parts.netloc:
            raise ValueError(
                f"{url!r}: a SQLite URL has no host; write sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError(f"{url!r}: write sqlite:///relative/path.db or sqlite:////abs.db")
        from ._sqlite import SQLiteDatabase

        return SQLiteDatabase(path[1:])
    if scheme in ("postgresql", "postgres"):
        from ._postgres import PostgresDatabase

        return PostgresDatabase(url)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: a file URL names a folder on this machine")
        return FileBackend(unquote(parts.path) or ".")
    if scheme == "memory":
        return MemoryBackend()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a path (C:\ on Windows)
        return FileBackend(url)
    raise ValueError(
        f"unknown storage URL {url!r}: use sqlite:///FILE.db, postgresql://..., "
        "file:///DIR or a folder path"
    )
