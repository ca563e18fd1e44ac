"""Rooms kept as files: one ``<room>.json`` snapshot each, in the Node server's format.

Every file is written to a temp file, made durable and renamed; one worker thread per
folder (:class:`FolderWriter`) writes each batch of saves, syncs their files together
and fsyncs the folder once for all. Loads are batched the same way
(:class:`FolderReader`), so that 300 rooms opening at once cost a few thread hand-offs,
not 300; a new room, and a small saved one the page cache holds, need none.

With durable acks a room also has a journal, ``<room>.journal`` beside the snapshot
(format and replay in :mod:`._journal`): :meth:`FileStorage.commit` appends to it, and
the next save folds it into the snapshot. Appends are jobs of the same writer thread, so
the commits of many rooms of one folder cost one hand-off a batch, and an append and a
snapshot write of one folder never run at once.

With a history interval, a room's past versions are kept in ``<room>.history/``, a folder
beside the snapshot holding one Node-format snapshot per version, ``<version>.json``
(see :meth:`FileStorage.save_version`). Room listings, exports, imports and journal
folding look at files of the room folder only, so they never see it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import itertools
import logging
import os
import re
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, Self, TypeVar

import attrs
import outcome
import trio

from .._document import (
    Changes,
    Snapshot,
    SnapshotError,
    decode_snapshot,
    encode_snapshot_parts,
)
from ._base import StorageError, VersionInfo, take_parts
from ._journal import JournalFile, JournalRecord, JournalScan, encode_record, replay, scan_journal

__all__ = ["FileStorage", "history_folder_name", "journal_file_name", "room_file_name"]

from .._logs import log_event

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


def journal_file_name(room_id: str) -> str:
    """The file name of a room's journal: its snapshot's, ending ``.journal``."""
    return room_file_name(room_id)[: -len(".json")] + ".journal"


def history_folder_name(room_id: str) -> str:
    """The name of the folder of a room's versions: its snapshot's, ending ``.history``."""
    return room_file_name(room_id)[: -len(".json")] + ".history"


def room_id_from_file_name(name: str, suffix: str = ".json") -> str | None:
    """The room id a file name was made from, or None if it is not a room file.

    ``suffix=".journal"`` reads journal names (:func:`journal_file_name`) instead.
    """
    if not name.endswith(suffix):
        return None
    stem = name[: -len(suffix)]
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
    :class:`FolderWriter` does that once for many files instead.
    """
    replace_with_temp(write_temp_file(path, parts, sync=True), path)
    if sync_folder:
        fsync_folder(path.parent)


def write_temp_file(path: Path, parts: Iterable[bytes], *, sync: bool) -> Path:
    """Write ``parts`` to a new temp file beside ``path``, fsynced if ``sync``; return its
    name. On failure nothing is left behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_temp_names)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            _write_all(fd, [memoryview(part) for part in parts if part])
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace_with_temp(tmp: Path, path: Path) -> None:
    """Rename the temp file ``tmp``, durable by now, over ``path``; on failure remove it."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    """Make the bytes written to the file ``path`` durable (blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _linux_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs``, on a Linux that reports writeback errors to it (5.8 and up)."""
    if sys.platform != "linux":
        return None
    version = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if version is None or (int(version[1]), int(version[2])) < (5, 8):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _linux_syncfs()


def sync_filesystem(folder: Path) -> bool:
    """Make every write to the filesystem holding ``folder`` durable (Linux ``syncfs``).

    Return False, having done nothing durable, where there is no ``syncfs`` or it
    fails: the caller then syncs each file. (Linux reports writeback errors to syncfs
    since 5.8; a file's own fdatasync stays the fallback.) It also flushes other
    programs' writes to that filesystem, which a busy shared disk can make slow.
    """
    if _syncfs is None:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _syncfs(fd) == 0
    finally:
        os.close(fd)


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
    """Write a snapshot (unless ``parts`` is None), then fold ``journal`` if given.

    ``view`` is what a load found in the journal, to replace the worker's own view.
    """

    parts: list[bytes] | None = None
    journal: Path | None = None
    fold_through: int | None = None
    view: JournalScan | None = None
    journal_file: JournalFile | None = None  # set in the thread


_NO_RECORD = JournalRecord(0, b"")


@attrs.define(eq=False)
class _AppendJob(_Job):
    """Append ``record`` to the journal ``path`` and make it durable."""

    record: JournalRecord = _NO_RECORD
    view: JournalScan | None = None


@attrs.define(eq=False)
class _ReadJob(_Job):
    """Read ``path`` (and ``journal``, if given; None when either is missing)."""

    data: bytes | None = None
    journal: Path | None = None
    journal_data: bytes | None = None


class _FoldFailed(Exception):
    """The snapshot was written, but folding the journal into it failed (``os_error``)."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(os_error)
        self.os_error = os_error


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


class FolderWriter(_FolderWorker[_WriteJob | _AppendJob]):
    """Writes files into one folder (see :class:`_FolderWorker`), fsyncing it once a batch.

    :meth:`write` returns once the file is durable: written to a temp file, fsynced,
    renamed over the target, and the folder fsynced after the rename. A missing folder
    is created. :meth:`append` returns once a journal record is durable. The worker
    thread keeps each journal's state (:class:`JournalFile`: good length, records since
    the last fold), so a fold needs no re-read. A journal's descriptor stays open from
    its first append until a save folds it (or removes it), so an append is one
    ``pwrite``, not an open, a seek, a write and a close; at most
    :data:`MAX_OPEN_JOURNALS` stay open (the least recently appended to are closed at
    the end of a batch), and the writer's last ones close when it is garbage-collected.
    The folder is the server's own: a journal removed or replaced behind its back is
    not noticed while its descriptor is open.

    A batch runs in this order: every job's write (snapshots to unsynced temp files,
    journal appends), then one ``syncfs`` that makes them all durable (where it fails or
    is missing, an ``fdatasync`` per journal and an fsync per temp file), then the
    renames of the temp files, then one folder fsync for the lot, then the folds of the
    saves that asked for one, each after its snapshot is durable (the rewritten
    journals synced together the same way, then renamed, then the folder fsynced).
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        # Used in the worker thread only: each journal's state, and those that may have
        # a descriptor open, least recently appended to first.
        self._journals: dict[Path, JournalFile] = {}
        self._open: dict[JournalFile, None] = {}
        self._retired: list[JournalFile] = []  # to close at the end of the batch
        weakref.finalize(self, _close_journals, self._open)

    async def write(
        self,
        path: Path,
        parts: list[bytes] | None,
        *,
        journal: Path | None = None,
        fold_through: int | None = None,
        view: JournalScan | None = None,
    ) -> None:
        """Write the snapshot ``parts`` to ``path`` (None: write none), then fold
        ``journal``: drop its records at or below ``fold_through`` (None: remove it).

        Raises ``OSError`` if the snapshot could not be written (nothing was folded), or
        :class:`_FoldFailed` if it was written but the fold failed.
        """
        job = _WriteJob(path, parts=parts, journal=journal, fold_through=fold_through, view=view)
        await self._run(job)

    async def commit_many(
        self, commits: Sequence[tuple[FileStorage, Changes]]
    ) -> list[Exception | None]:
        """Append each room's changes to its journal, all in one batch of the worker
        (:class:`CommitGroup`); an append that fails leaves its journal as it was.

        Cancelled, the appends still run to their end; the caller only stops waiting.
        """
        done = trio.Event()  # one for all: they are done in one batch
        jobs = [storage._append_job(changes, done) for storage, changes in commits]
        if jobs:
            self._queued.extend(jobs)
            if not self._busy:
                self._start()
            await done.wait()
        return [_append_error(job) for job in jobs]

    def _journal(self, path: Path, view: JournalScan | None, *, read: bool = True) -> JournalFile:
        """This worker's state of one journal: ``view`` if given (replacing what it
        had), else its own, else the file as it is (``read``) or an empty one.

        A replaced state's descriptor, if open, is closed at the end of the batch
        (after the batch has synced it, if it appended to it)."""
        journal = self._journals.get(path)
        if view is not None or journal is None:
            if journal is not None and journal.fd is not None:
                self._open.pop(journal, None)
                self._retired.append(journal)
            if view is not None:
                journal = JournalFile.from_scan(path, view)
            else:
                journal = JournalFile.from_disk(path) if read else JournalFile(path)
            self._journals[path] = journal
        return journal

    def _do_batch(self, batch: list[_WriteJob | _AppendJob]) -> None:
        # Each journal appended to: its length and record count before the batch, and
        # the jobs whose records it took.
        appended: dict[int, tuple[JournalFile, int, int, list[_AppendJob]]] = {}
        self._retired = []
        try:
            self._do_jobs(batch, appended)
        finally:
            open_journals = self._open
            for journal, *_ in appended.values():
                if journal.fd is not None and self._journals.get(journal.path) is journal:
                    open_journals.pop(journal, None)
                    open_journals[journal] = None  # the most recent, last
            if len(open_journals) > MAX_OPEN_JOURNALS:
                for journal in [j for j in open_journals if j.fd is None]:
                    del open_journals[journal]
                excess = len(open_journals) - MAX_OPEN_JOURNALS
                for journal in list(itertools.islice(open_journals, max(0, excess))):
                    del open_journals[journal]
                    self._retired.append(journal)
            _close_journals(self._retired)

    def _do_jobs(
        self,
        batch: list[_WriteJob | _AppendJob],
        appended: dict[int, tuple[JournalFile, int, int, list[_AppendJob]]],
    ) -> None:
        written: list[_WriteJob] = []
        temps: dict[_WriteJob, Path] = {}  # snapshots written, not synced nor renamed yet
        for job in batch:
            if isinstance(job, _AppendJob):
                self._append(job, appended)
            else:
                self._write(job, temps, written)
        # One filesystem sync makes every journal and snapshot of the batch durable at
        # once: 1000 journals cost about 9 ms so, against 135 ms for one fdatasync each.
        # Where it fails, or there is no syncfs, each file is synced on its own.
        synced = len(appended) + len(temps) > 1 and sync_filesystem(self.folder)
        for journal, length, count, jobs in appended.values():
            try:
                if not synced:
                    journal.sync()
            except OSError as exc:
                journal.truncate(length, count)
                for job in jobs:
                    job.error = exc
        for write_job, error in _renamed_once_durable(temps, synced, _replace_snapshot):
            if error is None:
                written.append(write_job)
            else:
                write_job.error = error
        entries = [entry for entry in appended.values() if entry[0].entry_unsynced]
        if entries or any(job.parts is not None for job in written):
            try:
                fsync_folder(self.folder)
            except OSError as exc:
                for write_job in written:
                    write_job.error = exc
                for journal, length, count, jobs in entries:
                    journal.truncate(length, count)
                    for job in jobs:
                        job.error = job.error or exc
            else:
                for journal, *_ in entries:
                    journal.entry_unsynced = False
        self._fold([job for job in written if job.error is None])

    def _append(
        self,
        job: _AppendJob,
        appended: dict[int, tuple[JournalFile, int, int, list[_AppendJob]]],
    ) -> None:
        try:
            journal = self._journal(job.path, job.view)
            entry = appended.setdefault(
                id(journal), (journal, journal.length, len(journal.records), [])
            )
            try:
                journal.append(job.record)
            except FileNotFoundError:  # the folder is not there (yet, or any more)
                self.folder.mkdir(parents=True, exist_ok=True)
                journal.append(job.record)
        except OSError as exc:
            job.error = exc
        else:
            entry[3].append(job)

    def _write(
        self, job: _WriteJob, temps: dict[_WriteJob, Path], written: list[_WriteJob]
    ) -> None:
        """Write the job's snapshot to a temp file (in ``temps``, synced and renamed
        with the batch), or, with none to write, put the job in ``written``."""
        try:
            if job.journal is not None:
                # A plain save removes the whole journal: no need to read it.
                read = job.fold_through is not None
                job.journal_file = self._journal(job.journal, job.view, read=read)
            if job.parts is None:
                written.append(job)  # nothing to write: straight to the fold
                return
            try:
                temps[job] = write_temp_file(job.path, job.parts, sync=False)
            except FileNotFoundError:  # the folder is not there (yet, or any more)
                self.folder.mkdir(parents=True, exist_ok=True)
                temps[job] = write_temp_file(job.path, job.parts, sync=False)
        except OSError as exc:
            job.error = exc

    def _fold(self, jobs: list[_WriteJob]) -> None:
        """Fold the journals of ``jobs``, whose snapshots are durable now: the rewritten
        journals are synced together, as a batch's snapshots are, then renamed."""
        temps: dict[_WriteJob, Path] = {}
        for job in jobs:
            journal = job.journal_file
            if journal is None:
                continue
            try:
                tmp = journal.fold(job.fold_through)
            except OSError as exc:
                job.error = _FoldFailed(exc)
                continue
            if tmp is not None:
                temps[job] = tmp
            elif not journal.records and self._journals.get(journal.path) is journal:
                del self._journals[journal.path]  # removed: nothing to keep
        synced = len(temps) > 1 and sync_filesystem(self.folder)
        rewritten = []
        for job, error in _renamed_once_durable(temps, synced, _replace_journal):
            if error is None:
                rewritten.append(job)
            else:
                job.error = _FoldFailed(error)
        if rewritten:
            try:
                fsync_folder(self.folder)
            except OSError as exc:
                for job in rewritten:
                    job.error = _FoldFailed(exc)  # its journal stays entry_unsynced
            else:
                for job in rewritten:
                    assert job.journal_file is not None
                    job.journal_file.entry_unsynced = False


def _renamed_once_durable(
    temps: dict[_WriteJob, Path],
    synced: bool,
    rename: Callable[[_WriteJob, Path], None],
) -> Iterator[tuple[_WriteJob, OSError | None]]:
    """Rename each job's temp file with ``rename(job, tmp)`` once it is durable: at once
    if ``synced`` (a filesystem sync covered it), else after an fsync of its own. Yield
    each job with the ``OSError`` that failed it (its temp file then removed), or None."""
    for job, tmp in temps.items():
        try:
            if not synced:
                _fsync_file(tmp)
            rename(job, tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            yield job, exc
        else:
            yield job, None


def _replace_snapshot(job: _WriteJob, tmp: Path) -> None:
    replace_with_temp(tmp, job.path)


def _replace_journal(job: _WriteJob, tmp: Path) -> None:
    assert job.journal_file is not None
    job.journal_file.replace_with_folded(tmp)


class _NotCached:
    """What :func:`_read_if_cached` returns for a file the reader thread must read."""


_NOT_CACHED = _NotCached()

CACHED_READ_LIMIT = 64 * 1024
"""The largest room file a load reads on the event loop (if the page cache holds it)."""

_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def _read_if_cached(path: str) -> bytes | _NotCached | None:
    """The bytes of ``path`` (None: there is no such file), read on the event loop
    without waiting for the disk, or :data:`_NOT_CACHED` if that cannot be done.

    A missing file costs one failed ``open``, which the file system answers from its
    cache of names. A file of at most :data:`CACHED_READ_LIMIT` bytes is read whole
    with ``preadv(RWF_NOWAIT)`` (Linux), which refuses (``EAGAIN``) rather than wait
    for pages the page cache lacks. Anything else (a bigger file, a page not cached, no
    ``RWF_NOWAIT``, any other error) is left to the folder's reader thread, which also
    reports the errors.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return _NOT_CACHED
    try:
        size = os.fstat(fd).st_size
        if size > CACHED_READ_LIMIT or (size and _RWF_NOWAIT is None):
            return _NOT_CACHED
        data = bytearray(size)
        if size and os.preadv(fd, [data], 0, _RWF_NOWAIT or 0) != size:
            return _NOT_CACHED  # a page was not cached (a short read), or it shrank
        return bytes(data)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no such reads on this file system
        return _NOT_CACHED
    finally:
        os.close(fd)


def _max_open_journals() -> int:
    try:
        limit = os.sysconf("SC_OPEN_MAX")  # the process's descriptor limit
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        limit = 4096
    return max(16, min(1024, limit // 4))


MAX_OPEN_JOURNALS = _max_open_journals()
"""How many journal descriptors a folder's writer keeps open between batches: 1024, or
a quarter of the process's descriptor limit if that is lower (sockets need the rest)."""


def _close_journals(journals: Iterable[JournalFile]) -> None:
    for journal in journals:
        with contextlib.suppress(OSError):
            journal.close()


def _append_error(job: _AppendJob) -> Exception | None:
    """What a failed append raises to its room (None: it is durable)."""
    error = job.error
    if isinstance(error, OSError):
        return StorageError(f"cannot append to {job.path}: {error.strerror}")
    if error is None or isinstance(error, Exception):
        return error
    raise error  # not an Exception: let it through


class FolderReader(_FolderWorker[_ReadJob]):
    """Reads whole files of one folder (see :class:`_FolderWorker`).

    A file queued behind a big one waits for it: reading 20 MB from the page cache
    takes some milliseconds, about what 40 thread hand-offs cost the event loop.
    """

    async def read(self, path: Path) -> bytes:
        """The file's bytes; raises ``OSError`` (``FileNotFoundError`` if there is none)."""
        data = (await self._run(_ReadJob(path))).data
        assert data is not None
        return data

    async def read_room(self, path: Path, journal: Path) -> tuple[bytes | None, bytes | None]:
        """A snapshot's bytes and its journal's, in one job (None for a missing file).

        Raises ``OSError`` for any other failure; its ``filename`` names the file.
        """
        job = await self._run(_ReadJob(path, journal=journal))
        return job.data, job.journal_data

    def _do_batch(self, batch: list[_ReadJob]) -> None:
        for job in batch:
            try:
                job.data = job.path.read_bytes()
            except FileNotFoundError as exc:
                if job.journal is None:
                    job.error = exc
                    continue
            except OSError as exc:
                job.error = exc
                continue
            if job.journal is not None:
                try:
                    job.journal_data = job.journal.read_bytes()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    job.error = exc


_folder_workers: trio.lowlevel.RunVar[dict[tuple[type, Path], _FolderWorker]] = (  # type: ignore[type-arg]
    trio.lowlevel.RunVar("folder_workers")
)


def _as_path(folder: str | os.PathLike[str]) -> Path:
    return folder if isinstance(folder, Path) else Path(folder)


@attrs.define
class FileStorage:
    """One JSON file per room, in the Node server's format, replaced atomically.

    Saves write a temp file in the same folder, fsync it and rename it over the target,
    so a crash at any moment leaves the old snapshot or the new one. Saves through one
    instance are serialized. A file that exists but cannot be parsed is an error, never
    an empty room.

    Durable commits (:meth:`commit`) append to the room's journal, ``<room>.journal``
    (:mod:`._journal`); :meth:`load` replays it over the snapshot, and a save folds it in.
    Versions (:class:`~canvas_store_trio.HistoryStorage`) are files of the folder
    ``<room>.history``.
    ``needs_fold`` is True after a load that found a journal, until a save succeeds: the
    room should then save soon, so that the journal is folded even if nothing changes.
    """

    dir: Path = attrs.field(converter=_as_path)
    room_id: str
    needs_fold: bool = attrs.field(default=False, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)
    _journal_view: JournalScan | None = attrs.field(default=None, init=False, repr=False)
    """What the last load found in the journal, for the writer thread (handed over with
    the next job, so the thread need not read the journal again)."""

    _stem: str = attrs.field(init=False, repr=False, eq=False)
    _paths: tuple[Path, Path] | None = attrs.field(default=None, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        self._stem = room_file_name(self.room_id)[: -len(".json")]

    @property
    def path(self) -> Path:
        """The snapshot, ``<room>.json``."""
        return self._files()[0]

    @property
    def journal_path(self) -> Path:
        """The journal, ``<room>.journal``."""
        return self._files()[1]

    def _files(self) -> tuple[Path, Path]:
        # Made when first needed: a new room's join needs only their names.
        if self._paths is None:
            self._paths = (self.dir / f"{self._stem}.json", self.dir / f"{self._stem}.journal")
        return self._paths

    @property
    def history_path(self) -> Path:
        """The folder of its versions, ``<room>.history``."""
        return self.dir / history_folder_name(self.room_id)

    @property
    def commit_group(self) -> FolderWriter:
        """Where the commits of this folder's rooms meet (:class:`CommitGroup`)."""
        return FolderWriter.of(self.dir)

    async def load(self) -> Snapshot | None:
        """The snapshot with the journal replayed over it; None for a room with neither.

        A journal's torn or corrupt tail is logged and left out (cut off by the next
        append); nothing is written here. Raises :class:`StorageError` for a file that
        cannot be read and :class:`SnapshotError` for a snapshot that cannot be parsed.
        """
        return (await self._load())[1]

    async def _load(self) -> tuple[Snapshot | None, Snapshot | None]:
        """The snapshot as stored, and with the journal replayed over it."""
        try:
            data, journal = await self._read_files()
        except OSError as exc:
            raise StorageError(f"cannot read {exc.filename or self.path}: {exc.strerror}") from None
        snapshot = None
        if data is not None:
            try:
                snapshot = decode_snapshot(data)
            except SnapshotError as exc:
                raise SnapshotError(f"{self.path} is not a valid snapshot ({exc})") from None
        scan = scan_journal(journal or b"")
        if scan.bad_offset is not None:
            log_event(
                logging.WARNING,
                "journal_tail_dropped",
                "%s: %s at byte %d; replay stops there, after %d good records "
                "(the rest is cut off at the next append or fold)",
                self.journal_path,
                scan.problem,
                scan.bad_offset,
                len(scan.records),
                room=self.room_id,
                file=str(self.journal_path),
                offset=scan.bad_offset,
            )
        changes, scan.changes = scan.changes, []
        self._journal_view = scan
        self.needs_fold = journal is not None
        return snapshot, replay(snapshot, changes)

    async def _read_files(self) -> tuple[bytes | None, bytes | None]:
        """The snapshot's bytes and the journal's (None for a missing file).

        A new room, and the files of a saved one that are small and in the page cache,
        are read on the event loop (:func:`_read_if_cached`): no thread hand-off. The
        rest is read by the folder's reader thread, which raises ``OSError``.
        """
        stem = os.path.join(self.dir, self._stem)  # no Path objects for a new room
        data = _read_if_cached(stem + ".json")
        if not isinstance(data, _NotCached):
            journal = _read_if_cached(stem + ".journal")
            if not isinstance(journal, _NotCached):
                return data, journal
        path, journal_path = self._files()
        return await FolderReader.of(self.dir).read_room(path, journal_path)

    async def commit(self, changes: Changes) -> None:
        """Append ``changes`` to the journal; durable (fdatasynced) once this returns.

        All or nothing: a failed append is cut back off and raises :class:`StorageError`.
        If cancelled, the append still runs to its end in the writer thread, and the
        caller cannot know whether it became durable.
        """
        [error] = await self.commit_group.commit_many([(self, changes)])
        if error is not None:
            raise error

    def _append_job(self, changes: Changes, done: trio.Event) -> _AppendJob:
        record = JournalRecord(changes.timestamp, encode_record(changes))
        view = self._journal_view
        if view is not None:  # the first commit after a load (attrs' setattr is slow)
            self._journal_view = None
        return _AppendJob(self.journal_path, done, record=record, view=view)

    async def save(self, snapshot: Snapshot) -> None:
        """Write the whole snapshot and remove the journal (the snapshot is the truth)."""
        await self.save_encoded(encode_snapshot_parts(snapshot))

    async def save_encoded(
        self,
        parts: Iterable[bytes],
        *,
        fold_through: int | None = None,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Take the parts on the event loop, yielding whenever another
        :data:`~._base.YIELD_EVERY_BYTES` have been taken (so a big document never holds it for
        long, and a small one costs no extra steps), then write, fsync and rename in a
        worker thread (:class:`FolderWriter`).

        ``ready``, if given, is awaited once every part is taken and before anything is
        written (the room's commit gate: the snapshot holds no uncommitted edit once it
        returns); if it raises, nothing is written and its exception propagates.

        Once the snapshot is durable the journal is folded, in the same worker job: its
        records at or below ``fold_through`` are dropped (the rest, appended while this
        saved, are kept), and a journal left empty is removed. With ``fold_through``
        None the whole journal is removed. Raises :class:`StorageError` if the snapshot
        or the fold fails (the journal is then as it was, so nothing is lost).

        Cancelled while the thread writes, the write still runs to its end.
        """
        async with self._lock:
            taken = await take_parts(parts)
            if ready is not None:
                await ready()
            await self._write(taken, fold_through)

    async def _write(self, parts: list[bytes] | None, fold_through: int | None) -> None:
        view, self._journal_view = self._journal_view, None
        try:
            await FolderWriter.of(self.dir).write(
                self.path, parts, journal=self.journal_path, fold_through=fold_through, view=view
            )
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from None
        except _FoldFailed as exc:
            raise StorageError(
                f"cannot fold {self.journal_path}: {exc.os_error.strerror}"
            ) from None
        self.needs_fold = False

    async def fold_journal(self) -> bool:
        """Replay the journal, if there is one, and fold it into a new snapshot.

        Returns whether there was a journal. A journal that holds nothing newer than the
        snapshot is just removed, without rewriting the snapshot. Only for a room that
        is not open (its commits would race the fold).
        """
        async with self._lock:
            stored, replayed = await self._load()
            if not self.needs_fold:
                return False
            if replayed is None or replayed is stored:
                await self._write(None, None if replayed is None else replayed.timestamp)
            else:
                parts = await take_parts(encode_snapshot_parts(replayed, chunk_size=1000))
                await self._write(parts, replayed.timestamp)
            return True

    # --- history ---------------------------------------------------------------------

    async def save_version(self, version: int, parts: Sequence[bytes], *, keep: int) -> None:
        """Write ``<room>.history/<version>.json`` (temp file, fsync, rename), remove the
        oldest versions beyond the ``keep`` newest, and fsync the folder once, all in a
        worker thread. Raises :class:`StorageError`. Cancelled, the thread still runs to
        its end: a version is never half written (the rename makes it whole or absent).
        """
        try:
            await trio.to_thread.run_sync(_save_version, self.history_path, version, parts, keep)
        except OSError as exc:
            raise StorageError(
                f"cannot keep version {version} in {self.history_path}: {exc.strerror}"
            ) from None

    async def list_versions(self) -> list[VersionInfo]:
        """The files of ``<room>.history``, oldest first; ``saved_at`` is each file's
        modification time. No folder, no versions."""
        try:
            return await trio.to_thread.run_sync(_list_versions, self.history_path)
        except OSError as exc:
            raise StorageError(f"cannot list {self.history_path}: {exc.strerror}") from None

    async def load_version(self, version: int) -> Snapshot | None:
        """``<room>.history/<version>.json``, read and parsed in a worker thread."""
        path = self.history_path / f"{version}.json"
        try:
            return await trio.to_thread.run_sync(_read_snapshot, path)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from None


_VERSION_FILE = re.compile(r"(0|[1-9][0-9]*)\.json")


def _version_files(folder: Path) -> dict[int, os.DirEntry[str]]:
    """The version files of a history folder, by version (none if there is no folder)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return {}
    found = {}
    for entry in entries:
        match = _VERSION_FILE.fullmatch(entry.name)
        if match is not None and entry.is_file():
            found[int(match[1])] = entry
    return found


def _save_version(folder: Path, version: int, parts: Sequence[bytes], keep: int) -> None:
    created = not folder.is_dir()
    if created:
        folder.mkdir(parents=True, exist_ok=True)
    write_file_atomically(folder / f"{version}.json", parts, sync_folder=False)
    for old in sorted(_version_files(folder))[:-keep]:
        (folder / f"{old}.json").unlink(missing_ok=True)
    fsync_folder(folder)
    if created:
        fsync_folder(folder.parent)


def _list_versions(folder: Path) -> list[VersionInfo]:
    versions = []
    for version, entry in sorted(_version_files(folder).items()):
        try:
            saved_at = datetime.fromtimestamp(entry.stat().st_mtime, UTC)
        except FileNotFoundError:  # pruned meanwhile
            continue
        versions.append(VersionInfo(version, saved_at))
    return versions


def _read_snapshot(path: Path) -> Snapshot | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode_snapshot(data)
    except SnapshotError as exc:
        raise SnapshotError(f"{path} is not a valid snapshot ({exc})") from None
