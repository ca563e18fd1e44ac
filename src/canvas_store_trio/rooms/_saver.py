"""A room's saver: loads the document from storage, then writes it back, throttled.

One :class:`Saver` per room. It picks the cheapest write the storage offers (only the
changed keys, the live document encoded a piece at a time, or a snapshot), runs at most
one save at a time, retries a failed one with backoff and never forgets a change that
storage does not have yet.

With durable acks the room's :class:`~._commits.Committer` makes each edit durable, and
the saver only writes snapshots for a streaming storage (files): each save folds the
journal of commits into the snapshot, and waits until what it holds is committed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import cast

import trio

from .._document import Document
from .._logs import log_event
from ..storage._base import IncrementalStorage, Storage, StreamingStorage
from ._session import implements
from ._stats import Stats


class Saver:
    """Keeps one room's storage up to date with its :attr:`document`.

    ``save_throttle`` seconds after the first unsaved change it saves, then again
    whenever more changes arrive. A save that fails keeps everything unsaved and is
    retried with backoff (1 s, doubling to 60 s). Each save may take ``flush_timeout``.
    """

    def __init__(
        self,
        room_id: str,
        storage: Storage | None,
        *,
        save_throttle: float,
        flush_timeout: float,
        durable: bool = False,
        stats: Stats | None = None,
    ) -> None:
        self.room_id = room_id
        self.stats = stats or Stats()
        self.durable = durable
        self.commit_gate: Callable[[int], Awaitable[None]] | None = None
        """With durable acks, the room's ``commit_through(timestamp)``: a snapshot save
        waits for it, so a snapshot never holds an edit that was not committed."""
        self._discarded = False
        self.storage = storage
        # The storage's protocols, checked once: a plain isinstance on a Protocol is slow.
        self._incremental = (
            cast(IncrementalStorage, storage) if implements(storage, IncrementalStorage) else None
        )
        self._streaming = (
            cast(StreamingStorage, storage) if implements(storage, StreamingStorage) else None
        )
        self.save_throttle = save_throttle
        self.flush_timeout = flush_timeout
        self._track_changes = durable or self._incremental is not None
        self.document = Document(unsaved_keys=set() if self._track_changes else None)
        self._unsaved = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._lock = trio.Lock()
        self.error: BaseException | None = None
        """The last save failure (without its traceback), or None once a save succeeds."""

    @property
    def unsaved(self) -> bool:
        """Whether the document has changes that storage does not have yet."""
        return self._unsaved.is_set()

    def mark_unsaved(self) -> None:
        self._unsaved.set()
        if not self._running and self._nursery is not None:
            self._running = True
            self._nursery.start_soon(self.run)

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Run :meth:`run` in ``nursery`` from the first unsaved change on (at once if
        there is one); None once the nursery closes. A room that is only read never
        starts the task."""
        self._nursery = nursery
        if nursery is not None and self.unsaved:
            self.mark_unsaved()

    def discard(self) -> None:
        """Never save again: what is unsaved now must not reach storage (a commit of it
        failed, and its edits were never acked)."""
        self._discarded = True
        self._unsaved = trio.Event()

    async def load(self) -> Document:
        """Read the stored snapshot into a new :attr:`document` (kept empty if none).

        Raises whatever the storage raises; the document is then left as it was.
        """
        if self.storage is not None:
            snapshot = await self.storage.load()
            if snapshot is not None:
                self.document = Document.from_snapshot(
                    snapshot, track_changes=self._track_changes
                )
            if getattr(self.storage, "needs_fold", False):
                self.mark_unsaved()  # a journal was replayed: the next save folds it in
        return self.document

    async def run(self) -> None:
        """Save ``save_throttle`` seconds after each first unsaved change, until cancelled.

        Cancellation between saves loses nothing: what is unsaved stays so, for the
        final :meth:`flush_quietly`. A save cancelled midway is rolled back as unsaved.
        """
        while True:
            await self._unsaved.wait()
            await trio.sleep(self.save_throttle)
            delay = 1.0
            while not await self.save():
                log_event(
                    logging.WARNING,
                    "save_failed",
                    "room %r: save failed (%s); retrying in %g s, nothing is lost",
                    self.room_id,
                    self.error,
                    delay,
                    room=self.room_id,
                    error=str(self.error),
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def save(self) -> bool:
        """Write what is unsaved. Return False (and keep it unsaved) if storage fails."""
        if self.storage is None or self._discarded or (self.durable and self._streaming is None):
            # (With durable acks the commits are the saves, but for a streaming storage.)
            self._unsaved = trio.Event()
            return True
        async with self._lock:
            if not self._unsaved.is_set():
                return True
            self._unsaved = trio.Event()
            incremental = None if self.durable else self._incremental
            document = self.document
            changes = document.take_changes() if incremental is not None else None
            started = trio.current_time()
            try:
                with trio.move_on_after(self.flush_timeout) as scope:
                    if incremental is not None and changes is not None:
                        await incremental.save_changes(changes)
                    elif self._streaming is not None:
                        with contextlib.closing(document.encode_in_steps()) as parts:
                            await self._save_encoded(parts)
                    else:
                        await self.storage.save(document.snapshot())
                if scope.cancelled_caught:
                    raise TimeoutError(f"save took over {self.flush_timeout} s")
            except BaseException as exc:
                if changes is not None:
                    document.restore_changes(changes)
                self._unsaved.set()
                if not isinstance(exc, Exception):
                    raise
                self.stats.save_failures += 1
                # Kept without its traceback: its frames hold this saver (a cycle) and
                # the snapshot being saved.
                self.error = exc.with_traceback(None)
                return False
            self.stats.save_seconds.observe(trio.current_time() - started)
            self.error = None
            return True

    async def _save_encoded(self, parts: Iterator[bytes]) -> None:
        assert self._streaming is not None
        gate = self.commit_gate
        if gate is None:
            await self._streaming.save_encoded(parts)
            return
        # The first part fixes what the snapshot holds: everything up to this timestamp.
        first = next(parts)
        through = self.document.timestamp

        async def ready() -> None:
            await gate(through)

        await self._streaming.save_encoded(  # type: ignore[call-arg]
            itertools.chain([first], parts), fold_through=through, ready=ready
        )

    async def flush(self) -> None:
        """Save now if anything is unsaved. Raise the storage's error if that fails.

        The error raised is :attr:`error`, which gets a traceback on its way up:
        :meth:`forget_error_traceback` drops it once the room has closed.
        """
        if not await self.save():
            assert self.error is not None
            raise self.error

    def forget_error_traceback(self) -> None:
        """Drop the traceback :meth:`flush` gave :attr:`error`: its frames hold the saver."""
        if self.error is not None:
            self.error.__traceback__ = None

    async def flush_quietly(self) -> None:
        """The last save of a closing room: at most ``flush_timeout``, a failure logged."""
        with trio.move_on_after(self.flush_timeout):
            if await self.save():
                return
        error = str(self.error or f"flush took over {self.flush_timeout} s")
        log_event(
            logging.ERROR,
            "room_closed_unsaved",
            "room %r closed with unsaved changes: %s",
            self.room_id,
            error,
            room=self.room_id,
            error=error,
        )
