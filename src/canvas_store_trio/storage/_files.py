"""Rooms kept as files: one ``<room>.json`` snapshot each, in the Node server's format.

Every file is written to a temp file, fsynced and renamed; one worker thread per folder
(:class:`FolderWriter`) writes each batch of saves and fsyncs the folder once for all.
Loads are batched the same way (:class:`FolderReader`), so that 300 rooms opening at
once cost a few thread hand-offs, not 300.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, Self, TypeVar

import attrs
import outcome
import trio

from .._document import Snapshot, SnapshotError, decode_snapshot, encode_snapshot_parts
from ._base import StorageError

__all__ = ["FileStorage", "room_file_name"]


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


YIELD_EVERY_BYTES = 32 * 1024
""":meth:`FileStorage.save_encoded` yields to the event loop each time this much more of
the encoding has been taken: after about every piece of a big document (a piece of 1000
keys is some tens of KiB), not at all for a room of a hundred keys."""

_temp_names = itertools.count()


def write_file_atomically(path: Path, parts: Iterable[bytes], *, sync_folder: bool = True) -> None:
    """Write ``parts`` to ``path`` through a temp file, fsync and rename (blocking).

    A crash at any moment leaves the old file or the new one, never half of one. With
    ``sync_folder`` the folder is fsynced too, so that the rename survives a power loss;
    :class:`FolderWriter` does that once for many files instead.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_temp_names)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            _write_all(fd, [memoryview(part) for part in parts if part])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_folder(path.parent)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write every byte of ``views`` with as few system calls as the kernel allows."""
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + 1024])
        while written and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def fsync_folder(folder: Path) -> None:
    """Make the renames done in ``folder`` durable (blocking)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define(eq=False)
class _Job:
    """One file for a folder's worker thread; ``error`` is what went wrong with it."""

    path: Path
    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None


@attrs.define(eq=False)
class _WriteJob(_Job):
    parts: list[bytes] = attrs.Factory(list)


@attrs.define(eq=False)
class _ReadJob(_Job):
    data: bytes = b""


J = TypeVar("J", bound=_Job)


class _FolderWorker(Generic[J]):
    """Runs one folder's file jobs in one worker thread at a time, many per hand-off.

    :meth:`_run` queues a job and returns once a worker thread has done it. The worker
    takes every job queued so far, does them one after another (:meth:`_do_batch`, in
    the thread) and reports back once. So many rooms saving or loading at once cost a
    few thread hand-offs, not one each (each hand-off also makes the event loop wait for
    the GIL). An ``OSError`` is raised to the caller whose file it concerns.

    Cancelling :meth:`_run` does not stop the job; the caller only stops waiting.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._queued: list[J] = []
        self._busy = False

    @classmethod
    def of(cls, folder: Path) -> Self:
        """The shared worker of this kind for ``folder`` in this Trio run."""
        try:
            workers = _folder_workers.get()
        except LookupError:
            workers = {}
            _folder_workers.set(workers)
        key = (cls, folder)
        worker = workers.get(key)
        if not isinstance(worker, cls):
            worker = workers[key] = cls(folder)
        return worker

    async def _run(self, job: J) -> J:
        self._queued.append(job)
        if not self._busy:
            self._start()
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def _start(self) -> None:
        batch, self._queued = self._queued, []
        self._busy = True
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[None]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._finished, batch, result)

        trio.lowlevel.start_thread_soon(functools.partial(self._do_batch, batch), deliver)

    def _finished(self, batch: list[J], result: outcome.Outcome[None]) -> None:
        self._busy = False
        if self._queued:
            self._start()
        for job in batch:
            if isinstance(result, outcome.Error) and job.error is None:
                job.error = result.error  # a bug in the worker, not an OSError
            job.done.set()

    def _do_batch(self, batch: list[J]) -> None:
        raise NotImplementedError


class FolderWriter(_FolderWorker[_WriteJob]):
    """Writes files into one folder (see :class:`_FolderWorker`), fsyncing it once a batch.

    :meth:`write` returns once the file is durable: written to a temp file, fsynced,
    renamed over the target, and the folder fsynced after the rename. A missing folder
    is created.
    """

    async def write(self, path: Path, parts: list[bytes]) -> None:
        await self._run(_WriteJob(path, parts=parts))

    def _do_batch(self, batch: list[_WriteJob]) -> None:
        written = []
        for job in batch:
            try:
                try:
                    write_file_atomically(job.path, job.parts, sync_folder=False)
                except FileNotFoundError:  # the folder is not there (yet, or any more)
                    self.folder.mkdir(parents=True, exist_ok=True)
                    write_file_atomically(job.path, job.parts, sync_folder=False)
            except OSError as exc:
                job.error = exc
            else:
                written.append(job)
        if written:
            try:
                fsync_folder(self.folder)
            except OSError as exc:
                for job in written:
                    job.error = exc


class FolderReader(_FolderWorker[_ReadJob]):
    """Reads whole files of one folder (see :class:`_FolderWorker`).

    A file queued behind a big one waits for it: reading 20 MB from the page cache
    takes some milliseconds, about what 40 thread hand-offs cost the event loop.
    """

    async def read(self, path: Path) -> bytes:
        """The file's bytes; raises ``OSError`` (``FileNotFoundError`` if there is none)."""
        return (await self._run(_ReadJob(path))).data

    def _do_batch(self, batch: list[_ReadJob]) -> None:
        for job in batch:
            try:
                job.data = job.path.read_bytes()
            except OSError as exc:
                job.error = exc


_folder_workers: trio.lowlevel.RunVar[dict[tuple[type, Path], _FolderWorker]] = (  # type: ignore[type-arg]
    trio.lowlevel.RunVar("folder_workers")
)


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
            data = await FolderReader.of(self.dir).read(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return decode_snapshot(data)
        except SnapshotError as exc:
            raise SnapshotError(f"{self.path} is not a valid snapshot ({exc})") from None

    async def save(self, snapshot: Snapshot) -> None:
        await self.save_encoded(encode_snapshot_parts(snapshot))

    async def save_encoded(self, parts: Iterable[bytes]) -> None:
        """Take the parts on the event loop, yielding whenever another
        :data:`YIELD_EVERY_BYTES` have been taken (so a big document never holds it for
        long, and a small one costs no extra steps), then write, fsync and rename in a
        worker thread (:class:`FolderWriter`)."""
        async with self._lock:
            taken = []
            unyielded = 0
            for part in parts:
                taken.append(part)
                unyielded += len(part)
                if unyielded >= YIELD_EVERY_BYTES:
                    await trio.sleep(0)
                    unyielded = 0
            try:
                await FolderWriter.of(self.dir).write(self.path, taken)
            except OSError as exc:
                raise StorageError(f"cannot write {self.path}: {exc.strerror}") from None
