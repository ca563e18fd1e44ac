"""Durable acks: a room's edits are committed to storage before anyone hears of them.

With durable acks on, every frame that carries a document edit (its ack, its broadcast,
the diff a joining client gets) is held by the room's :class:`Committer` until a
``commit`` holding that edit has returned, then sent, in the order the room applied
the edits. Commits are grouped and pipelined: the rooms whose storages share a commit
group (a folder, a database) commit together, one batch in flight at a time, and every
edit applied meanwhile goes into the next one, while the rooms keep applying.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .._document import Changes, Document
from .._logs import log_event
from ..storage._base import CommitGroup, JournalStorage
from ._session import Session
from ._stats import Stats


class CommitError(Exception):
    """A commit failed: the room acks none of its edits, and closes."""


@attrs.define(eq=False)
class _HeldFrames:
    """Frames that wait for one commit, in the order they were sent.

    A room makes one per commit, and a frame or two per edit: each is kept as lean as
    it can be, as they are what the garbage collector sees pile up between commits.
    """

    number: int
    """Counts up per committer: a session's ``held_ack`` names the last that holds an
    ack of its, so that its later replies queue behind it and every session gets its
    acks in the order it sent the frames."""
    frames: list[tuple[Session | list[Session], bytes]] = attrs.Factory(list)
    """Each frame with the session it goes to, or the list of those (a broadcast)."""
    presence_of: set[str] | None = None
    """Clients whose presence one of the frames carries: their later presence-only
    frames queue behind it, so that no recipient gets an older presence last."""

    def release(self) -> None:
        """Send every frame, in order."""
        for to, frame in self.frames:
            if isinstance(to, Session):
                to.send(frame)
            else:
                for session in to:
                    session.send(frame)


class Committer:
    """Commits one room's edits in batches and holds back the frames that tell of them.

    ``document`` is the room's, tracking its changes (``unsaved_keys`` set), which from
    now on only the committer takes. ``on_committed`` runs after each commit once its
    frames are queued (the room flushes them); ``on_failed(error)`` runs once, when a
    commit fails or takes over ``timeout`` seconds: the held frames are dropped, and the
    committer commits nothing more. The commits themselves are run by its group's
    :class:`_CommitDriver` (the storage's ``commit_group``, else one of its own), not
    by a task of the room: those callbacks run in the driver's system task.
    """

    def __init__(
        self,
        room_id: str,
        storage: JournalStorage,
        document: Document,
        *,
        timeout: float,
        on_committed: Callable[[], None],
        on_failed: Callable[[BaseException], None],
        stats: Stats | None = None,
    ) -> None:
        self.room_id = room_id
        self.stats = stats or Stats()
        self.storage = storage
        self.document = document
        self.timeout = timeout
        self._on_committed = on_committed
        self._on_failed = on_failed
        self.committed = document.timestamp
        """The room timestamp up to which every edit is durable."""
        self.error: BaseException | None = None
        """Why the last commit failed (no traceback), once one has."""
        self.commits = 0
        self._next: _HeldFrames | None = None
        """Frames waiting for edits that no commit holds yet (made on need)."""
        self._numbered = 0
        self._in_flight: _HeldFrames | None = None
        self._in_flight_through = 0
        self._wanted = False
        """In the driver's waiting list: it hears of a room once per batch, not per edit."""
        self._progress: trio.Event | None = None
        """Set when a commit ends or the committer stops; made by a waiter."""
        group = getattr(storage, "commit_group", None)
        self._driver = _CommitDriver.of(group) if group is not None else _CommitDriver(
            _SoleStorage(storage)
        )

    @property
    def uncommitted(self) -> bool:
        """Whether the room has applied edits that are not durable yet."""
        return self.document.timestamp > self.committed

    # --- frames ----------------------------------------------------------------------

    def send(self, session: Session, frame: bytes, *, ack: bool = False) -> None:
        """Send ``frame`` once every edit applied so far is durable: at once if it is.

        ``ack`` says the frame is an ack to ``session``.
        """
        held = self._holder()
        if held is None:
            session.send(frame)
            return
        held.frames.append((session, frame))
        if ack:
            session.held_ack = held.number

    def send_to_all(
        self, sessions: list[Session], frame: bytes, *, presence_of: str | None = None
    ) -> None:
        """:meth:`send` of one frame (no ack) to each of ``sessions``, a list the
        committer keeps as it is: the caller must not change it afterwards.

        ``presence_of`` names the client whose presence the frame also carries.
        """
        held = self._holder()
        if held is None:
            for session in sessions:
                session.send(frame)
            return
        held.frames.append((sessions, frame))
        if presence_of is not None:
            if held.presence_of is None:
                held.presence_of = set()
            held.presence_of.add(presence_of)

    def _holder(self) -> _HeldFrames | None:
        """The frames a frame telling of every edit applied so far waits with (None:
        every one is durable, it goes now)."""
        timestamp = self.document.timestamp
        in_flight = self._in_flight
        if in_flight is None:
            if timestamp <= self.committed:
                return None
        elif timestamp <= self._in_flight_through:
            return in_flight
        return self._next or self._new_holder()

    def _new_holder(self) -> _HeldFrames:
        """A new ``_next``, numbered after every earlier one."""
        self._numbered += 1
        self._next = _HeldFrames(self._numbered)
        return self._next

    def send_reply(self, session: Session, make_frame: Callable[[int], bytes]) -> None:
        """Send a reply that tells of no edit of its own (the ack of a frame that changed
        nothing), behind the session's held acks if it has any.

        ``make_frame(timestamp)`` builds it with the room timestamp it may tell: the
        last committed one if it goes now, the room's own if it waits for a commit.
        """
        held: _HeldFrames | None = None
        if session.held_ack:  # held acks are in the newest holders, or sent already
            for holder in (self._next, self._in_flight):
                if holder is not None and holder.number == session.held_ack:
                    held = holder
        if held is None:
            session.send(make_frame(self.committed))
        else:
            held.frames.append((session, make_frame(self.document.timestamp)))

    def send_presence(self, session: Session, frame: bytes, client_id: str) -> None:
        """Send a frame of ``client_id``'s presence alone: at once, unless a held frame
        carries that client's presence too, in which case it queues behind it."""
        for held in (self._next, self._in_flight):
            if held is not None and held.presence_of and client_id in held.presence_of:
                held.frames.append((session, frame))
                return
        session.send(frame)

    def wanted(self) -> None:
        """Say that there is something to commit: it joins the next commit of its group."""
        if not self._wanted:
            self._wanted = True
            self._driver.want(self)

    # --- commits ---------------------------------------------------------------------

    async def commit_through(self, timestamp: int) -> None:
        """Return once every edit up to ``timestamp`` is durable, committing if need be.

        Raise :class:`CommitError` if a commit fails first (now or earlier). Cancelled,
        it only stops waiting: the commit goes on.
        """
        while self.committed < timestamp:
            if self.error is not None:
                raise CommitError(f"room {self.room_id!r}: {self.error}")
            if self._in_flight is None:
                self.wanted()
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()

    def _begin(self) -> Changes:
        """Take what to commit now; the frames held so far wait for it."""
        changes = self.document.take_changes()
        held = self._next or self._new_holder()
        self._next = None
        self._in_flight, self._in_flight_through = held, changes.timestamp
        return changes

    def _end(self, changes: Changes, error: Exception | None) -> None:
        """The commit of ``changes`` is durable (``error`` None), or failed."""
        held, self._in_flight = self._in_flight, None
        progress, self._progress = self._progress, None
        if error is not None:
            self._fail(error)
        else:
            self.committed = changes.timestamp
            self.commits += 1
            assert held is not None
            held.release()
        if progress is not None:
            progress.set()
        if error is None:
            self._on_committed()

    def stop(self, reason: str) -> None:
        """Commit nothing more (the room lost the right to write): what no commit holds
        yet is dropped with its held frames, and :meth:`commit_through` raises
        :class:`CommitError` from now on. A commit already in flight still ends as the
        storage decides. ``on_failed`` is not called."""
        if self.error is None:
            self.error = CommitError(reason)
        self._next = None
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.set()

    def _fail(self, exc: Exception) -> None:
        # Kept without its traceback: its frames hold the room.
        self.error = exc.with_traceback(None)
        self._next = None
        log_event(
            logging.ERROR,
            "commit_failed",
            "room %r: a commit failed, so %d edit(s) are not acked and the room closes "
            "(its clients reconnect and resend them): %s",
            self.room_id,
            self.document.timestamp - self.committed,
            self.error,
            room=self.room_id,
            error=str(self.error),
        )
        self._on_failed(self.error)


@attrs.frozen(eq=False)
class _SoleStorage:
    """The commit group of a storage that names none: its rooms commit on their own."""

    storage: JournalStorage

    async def commit_many(
        self, commits: Sequence[tuple[Any, Changes]]
    ) -> list[Exception | None]:
        errors: list[Exception | None] = []
        for _, changes in commits:
            try:
                await self.storage.commit(changes)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors


class _CommitDriver:
    """Commits the rooms of one :class:`CommitGroup` in lockstep, with no task per room.

    One batch is in flight at a time: every room with edits applied meanwhile joins the
    next, which starts as soon as the last one has returned and its frames are sent. A
    system task runs the batches while any room waits, and ends when none does. Each
    batch is shielded from cancellation, for at most the smallest ``timeout`` of its
    rooms; past that, each of them fails with a :class:`TimeoutError`.
    """

    def __init__(self, group: CommitGroup) -> None:
        self.group = group
        self._waiting: dict[Committer, None] = {}
        self._running = False

    @classmethod
    def of(cls, group: CommitGroup) -> _CommitDriver:
        """The driver of ``group`` in this Trio run."""
        try:
            drivers = _drivers.get()
        except LookupError:
            drivers = {}
            _drivers.set(drivers)
        driver = drivers.get(id(group))
        if driver is None or driver.group is not group:
            driver = drivers[id(group)] = cls(group)  # it holds the group: ids stay unique
        return driver

    def want(self, committer: Committer) -> None:
        self._waiting[committer] = None
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="canvas-store commits")

    async def _run(self) -> None:
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, {}
                for committer in waiting:
                    committer._wanted = False
                batch = [c for c in waiting
                         if c.error is None and c._in_flight is None and c.uncommitted]
                if batch:
                    await self._commit(batch)
        finally:
            self._running = False
            for committer in self._waiting:
                committer._wanted = False
            self._waiting.clear()

    async def _commit(self, batch: list[Committer]) -> None:
        commits = [(c.storage, c._begin()) for c in batch]
        timeout = min(c.timeout for c in batch)
        errors: list[Exception | None]
        started = trio.current_time()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            try:
                errors = await self.group.commit_many(commits)
            except Exception as exc:  # the group's own failure: every room's
                errors = [exc] * len(batch)
        if scope.cancelled_caught:
            errors = [TimeoutError(f"a commit took over {timeout:g} s")] * len(batch)
        elapsed = trio.current_time() - started
        for stats in {id(c.stats): c.stats for c in batch}.values():  # once per manager
            stats.commit_seconds.observe(elapsed)
        for committer, (_, changes), error in zip(batch, commits, errors, strict=True):
            try:
                committer._end(changes, error)
            except Exception as exc:  # a bug in a room must not end every room's commits
                log_event(
                    logging.ERROR,
                    "commit_handling_failed",
                    "room %r: handling a commit failed",
                    committer.room_id,
                    exc_info=exc,
                    room=committer.room_id,
                )


_drivers: trio.lowlevel.RunVar[dict[int, _CommitDriver]] = trio.lowlevel.RunVar("commit_drivers")
