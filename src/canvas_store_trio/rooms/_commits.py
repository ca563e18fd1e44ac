"""Durable acks: a room's edits are committed to storage before anyone hears of them.

With durable acks on, every frame that carries a document edit (its ack, its broadcast,
the diff a joining client gets) is held by the room's :class:`Committer` until a
``commit`` holding that edit has returned, then sent, in the order the room applied
the edits. Commits are grouped and pipelined: one is in flight per room at a time, and
every edit applied meanwhile goes into the next one, while the room keeps applying.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from .._document import Document
from ..storage._base import JournalStorage
from ._session import Session

logger = logging.getLogger("canvas_store_trio")


class CommitError(Exception):
    """A commit failed: the room acks none of its edits, and closes."""


@attrs.define(eq=False)
class _HeldFrames:
    """Frames that wait for one commit, in the order they were sent."""

    frames: list[tuple[Session, bytes]] = attrs.Factory(list)
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
    committer commits nothing more.
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
    ) -> None:
        self.room_id = room_id
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
        self._wanted = trio.Event()
        self._progress = trio.Event()

    @property
    def uncommitted(self) -> bool:
        """Whether the room has applied edits that are not durable yet."""
        return self.document.timestamp > self.committed

    # --- frames ----------------------------------------------------------------------

    def send(
        self,
        session: Session,
        frame: bytes,
        *,
        presence_of: str | None = None,
        ack: bool = False,
    ) -> None:
        """Send ``frame`` once every edit applied so far is durable: at once if it is.

        ``presence_of`` names the client whose presence the frame also carries; ``ack``
        says the frame is an ack to ``session``.
        """
        if self.document.timestamp > (
            self._in_flight_through if self._in_flight is not None else self.committed
        ):
            held: _HeldFrames | None = self._next
        else:
            held = self._in_flight
        if held is None:
            session.send(frame)
            return
        held.frames.append((session, frame))
        if presence_of is not None:
            held.presence_of.add(presence_of)
        if ack:
            held.acks_for.add(session)

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
            held.frames.append((session, make_frame(self.document.timestamp)))

    def send_presence(self, session: Session, frame: bytes, client_id: str) -> None:
        """Send a frame of ``client_id``'s presence alone: at once, unless a held frame
        carries that client's presence too, in which case it queues behind it."""
        in_flight = self._in_flight
        if client_id in self._next.presence_of:
            self._next.frames.append((session, frame))
        elif in_flight is not None and client_id in in_flight.presence_of:
            in_flight.frames.append((session, frame))
        else:
            session.send(frame)

    def wanted(self) -> None:
        """Tell :meth:`run` that there is something to commit."""
        self._wanted.set()

    # --- commits ---------------------------------------------------------------------

    async def run(self) -> None:
        """Commit whatever has been applied, one commit at a time, until cancelled or
        until a commit fails. Cancellation never interrupts a commit (they are shielded,
        for at most ``timeout`` seconds each)."""
        while self.error is None:
            await self._wanted.wait()
            self._wanted = trio.Event()
            if self.uncommitted and self._in_flight is None:
                await self._commit_next()

    async def commit_through(self, timestamp: int) -> None:
        """Return once every edit up to ``timestamp`` is durable, committing if need be.

        Raise :class:`CommitError` if a commit fails first (now or earlier).
        """
        while self.committed < timestamp:
            if self.error is not None:
                raise CommitError(f"room {self.room_id!r}: {self.error}")
            if self._in_flight is None:
                await self._commit_next()
            else:
                await self._progress.wait()

    async def _commit_next(self) -> None:
        changes = self.document.take_changes()
        held, self._next = self._next, _HeldFrames()
        self._in_flight, self._in_flight_through = held, changes.timestamp
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.timeout
                await self.storage.commit(changes)
            if scope.cancelled_caught:
                raise TimeoutError(f"a commit took over {self.timeout:g} s")
        except Exception as exc:
            self._fail(exc)
            return
        finally:
            self._in_flight = None
            self._progress.set()
            self._progress = trio.Event()
        self.committed = changes.timestamp
        self.commits += 1
        for session, frame in held.frames:
            session.send(frame)
        self._on_committed()

    def _fail(self, exc: Exception) -> None:
        # Kept without its traceback: its frames hold the room.
        self.error = exc.with_traceback(None)
        self._next = _HeldFrames()
        logger.error(
            "room %r: a commit failed, so %d edit(s) are not acked and the room closes "
            "(its clients reconnect and resend them): %s",
            self.room_id,
            self.document.timestamp - self.committed,
            self.error,
        )
        self._on_failed(self.error)
