"""Durable acks: a room's edits are committed to storage before anyone hears of them.

With durable acks on, every frame that carries a document edit (its ack, its broadcast,
the diff a joining client gets) is held by the room's :class:`Committer` until a
``commit`` holding that edit has returned, then sent, in the order the room applied
the edits. Commits are grouped and pipelined: the rooms whose storages share a commit
group (a folder, a database) commit together, one batch in flight at a time, and every
edit applied meanwhile goes into the next one, while the rooms keep applying.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .._document import Changes, Document
from .._logs import log_event
from ..storage._base import CallbackCommitGroup, CommitGroup, JournalStorage
from ._session import Session
from ._stats import Stats


class CommitError(Exception):
    """A commit failed: the room acks none of its edits, and closes."""


@attrs.define(eq=False)
class _HeldFrames:
    """Frames that wait for one commit, in the order they were sent."""

    frames: list[tuple[Sequence[Session], bytes]] = attrs.Factory(list)
    """Each frame with the sessions it goes to (one tuple or list for a broadcast)."""
    presence_of: set[str] = attrs.Factory(set)
    """Clients whose presence one of the frames carries: their later presence-only
    frames queue behind it, so that no recipient gets an older presence last."""
    acks_for: set[Session] = attrs.Factory(set)
    """Sessions with an ack among the frames: their later replies queue behind it, so
    that every session gets its acks in the order it sent the frames."""


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
        self._next = _HeldFrames()
        """Frames waiting for edits that no commit holds yet."""
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
        held.frames.append(((session,), frame))
        if ack:
            held.acks_for.add(session)

    def send_to_all(
        self, sessions: Sequence[Session], frame: bytes, *, presence_of: str | None = None
    ) -> None:
        """:meth:`send` of one frame (no ack) to each of ``sessions``, which the
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
            held.presence_of.add(presence_of)

    def _holder(self) -> _HeldFrames | None:
        """The frames a frame telling of every edit applied so far waits with (None:
        every one is durable, it goes now)."""
        timestamp = self.document.timestamp
        in_flight = self._in_flight
        if in_flight is None:
            return self._next if timestamp > self.committed else None
        return self._next if timestamp > self._in_flight_through else in_flight

    def send_reply(self, session: Session, make_frame: Callable[[int], bytes]) -> None:
        """Send a reply that tells of no edit of its own (the ack of a frame that changed
        nothing), behind the session's held acks if it has any.

        ``make_frame(timestamp)`` builds it with the room timestamp it may tell: the
        last committed one if it goes now, the room's own if it waits for a commit.
        """
        in_flight = self._in_flight
        if session in self._next.acks_for:
            held: _HeldFrames | None = self._next
        elif in_flight is not None and session in in_flight.acks_for:
            held = in_flight
        else:
            held = None
        if held is None:
            session.send(make_frame(self.committed))
        else:
            held.frames.append(((session,), make_frame(self.document.timestamp)))

    def send_presence(self, session: Session, frame: bytes, client_id: str) -> None:
        """Send a frame of ``client_id``'s presence alone: at once, unless a held frame
        carries that client's presence too, in which case it queues behind it."""
        in_flight = self._in_flight
        if client_id in self._next.presence_of:
            self._next.frames.append(((session,), frame))
        elif in_flight is not None and client_id in in_flight.presence_of:
            in_flight.frames.append(((session,), frame))
        else:
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
        held, self._next = self._next, _HeldFrames()
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
            for sessions, frame in held.frames:
                for session in sessions:
                    session.send(frame)
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
        self._next = _HeldFrames()
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.set()

    def _fail(self, exc: Exception) -> None:
        # Kept without its traceback: its frames hold the room.
        self.error = exc.with_traceback(None)
        self._next = _HeldFrames()
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
    next, which starts as soon as the last one has returned and its frames are sent.
    Each batch has at most the smallest ``timeout`` of its rooms; past that, each of
    them fails with a :class:`TimeoutError`. Nothing cancels a batch.

    One system task per group and Trio run, parked while nothing waits, starts the
    batches that a room asks for while none is in flight (so that every room applying
    edits in the same loop step joins the same batch), and times them out. A
    :class:`CallbackCommitGroup` (a folder's writer) ends each batch in its ``on_done``
    callback, which sends the held frames and starts the next batch at once, with no
    task woken; other groups' batches are awaited in the task.
    """

    def __init__(self, group: CommitGroup) -> None:
        self.group = group
        self._callback_group = group if isinstance(group, CallbackCommitGroup) else None
        self._waiting: dict[Committer, None] = {}
        self._batch: _Batch | None = None
        """The batch in flight."""
        self._task: trio.lowlevel.Task | None = None
        self._parked = False
        """The task waits for a room to want a commit, or for the batch's deadline."""
        self._deadline: trio.CancelScope | None = None

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
        if self._task is None:
            self._task = trio.lowlevel.spawn_system_task(self._run, name="canvas-store commits")
        elif self._parked and self._batch is None:
            self._parked = False
            trio.lowlevel.reschedule(self._task)

    async def _run(self) -> None:
        try:
            while True:
                if self._batch is None and self._waiting:
                    batch = self._take_batch()
                    if batch is not None:
                        await self._commit(batch)
                    continue
                await self._park()
        finally:
            self._task = None
            self._parked = False

    async def _park(self) -> None:
        """Wait until woken by :meth:`want`, or until the batch in flight is overdue
        (then fail it)."""
        batch = self._batch
        with trio.CancelScope(deadline=batch.deadline if batch else math.inf) as scope:
            self._deadline, self._parked = scope, True

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._parked = False
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        self._deadline = None
        if scope.cancelled_caught and batch is not None and batch is self._batch:
            self._end(batch, batch.overdue())

    def _take_batch(self) -> _Batch | None:
        """Begin the commits of every waiting room with something to commit, if any."""
        waiting, self._waiting = self._waiting, {}
        for committer in waiting:
            committer._wanted = False
        batch = [c for c in waiting if c.error is None and c._in_flight is None]
        committers = [c for c in batch if c.uncommitted]
        if not committers:
            return None
        timeout = min(c.timeout for c in committers)
        started = trio.current_time()
        return _Batch(committers, [(c.storage, c._begin()) for c in committers], started,
                      timeout)

    async def _commit(self, batch: _Batch) -> None:
        """Run ``batch``: started and left to its callback in a callback group, else
        awaited here, shielded, until done or overdue."""
        if self._callback_group is not None:
            self._start(batch, self._callback_group)
            return
        self._batch = batch
        errors: list[Exception | None]
        with trio.CancelScope(shield=True, deadline=batch.deadline) as scope:
            try:
                errors = await self.group.commit_many(batch.commits)
            except Exception as exc:  # the group's own failure: every room's
                errors = [exc] * len(batch.commits)
        if scope.cancelled_caught:
            errors = batch.overdue()
        self._end(batch, errors)

    def _end(self, batch: _Batch, errors: list[Exception | None]) -> None:
        """``batch`` is done (or overdue): end each room's commit, then start the next
        batch of a callback group at once. Does nothing for a batch already ended."""
        if batch is not self._batch:
            return
        self._batch = None
        elapsed = trio.current_time() - batch.started
        for stats in {id(c.stats): c.stats for c in batch.committers}.values():  # per manager
            stats.commit_seconds.observe(elapsed)
        for committer, (_, changes), error in zip(
            batch.committers, batch.commits, errors, strict=True
        ):
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
        group = self._callback_group
        if group is not None:
            following = self._take_batch() if self._waiting else None
            if following is not None:
                self._start(following, group)
            elif self._deadline is not None:
                self._deadline.deadline = math.inf

    def _start(self, batch: _Batch, group: CallbackCommitGroup) -> None:
        """Hand ``batch`` to a callback group, which ends it in :meth:`_end`; a parked
        task wakes at its deadline."""
        self._batch = batch
        group.start_commits(batch.commits, functools.partial(self._end, batch))
        if self._deadline is not None:
            self._deadline.deadline = batch.deadline


@attrs.frozen(eq=False)
class _Batch:
    """One call of a commit group: each room's committer and what it commits."""

    committers: list[Committer]
    commits: list[tuple[Any, Changes]]
    started: float
    timeout: float

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def overdue(self) -> list[Exception | None]:
        """Every room's error when the batch takes too long."""
        return [TimeoutError(f"a commit took over {self.timeout:g} s")] * len(self.commits)


_drivers: trio.lowlevel.RunVar[dict[int, _CommitDriver]] = trio.lowlevel.RunVar("commit_drivers")
