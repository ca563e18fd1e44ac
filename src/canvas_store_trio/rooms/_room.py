"""A room: one document, its sessions, its presence, its saver and its idle timer.

Frames are handled synchronously, in the task of the session that read them, by
methods that never await. Trio runs one task at a time, so that is enough to make
every frame atomic with no lock: a frame is checked, applied, broadcast and acked
before any other frame in the process is looked at. The room's own task (started by
:class:`~canvas_store_trio.RoomManager`) loads the document, runs the throttled saver,
closes the room when it has been empty for ``idle_timeout``, and flushes on the way out.

With durable acks, a frame is still applied at once, but the frames that tell of its
edits wait for the room's :class:`~._commits.Committer` to commit them.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

import orjson
import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._document import (
    EphemeralState,
    Patch,
    Record,
    Snapshot,
    has_content,
    replacement_patches,
)
from .._logs import log_event
from .._protocol import (
    AuthRefreshMessage,
    Limits,
    PatchMessage,
    ProtocolError,
    ReconnectMessage,
    ack_frame,
    client_count_frame,
    error_frame,
    parse_client_frame,
    patch_frame,
    presence_frame,
    resync_frame,
    synced_frame,
    version_mismatch_frame,
)
from ..cluster._ownership import (
    FencedWriteError,
    Lease,
    NotOwnerError,
    Ownership,
    SoleOwnership,
)
from ..storage._base import HistoryStorage, JournalStorage, Storage
from ..transport._handshake import MessageSocket
from ._commits import CommitError, Committer
from ._feed import Change, ChangeFeed
from ._history import DEFAULT_HISTORY_KEEP, HistoryKeeper
from ._saver import Saver
from ._session import (
    NORMAL_CLOSE_CODES,
    AuthorizeResult,
    AuthorizeResultError,
    Permissions,
    PushSocket,
    Session,
    SessionInfo,
    TokenRefresh,
    as_authorize_result,
    check_permissions,
    close_reason,
    implements,
    log_connection_closed,
)
from ._stats import Stats

CLOSE_TIMEOUT = 5.0
"""Seconds a session's clean-up may spend draining its outbox and closing its socket."""

SERVER_CLIENT_ID = "@server"
"""The client id that server-side edits (:meth:`Room.apply_patch`) are broadcast under,
and that holds the server's presence. No session may use it."""

CHANGE_FEED_BUFFER = 1000
"""The default ``max_buffer`` of :meth:`Room.subscribe`."""


class RoomClosedError(Exception):
    """The room is closing or closed; it takes no new sessions. Get a fresh one."""


class RoomFullError(Exception):
    """The room already has ``max_sessions_per_room`` sessions."""


SessionRemovedHook = Callable[["Room", str, int], None]
"""``(room, session_id, remaining)``, called after a session leaves."""
DocumentPatchHook = Callable[["Room", Sequence[Patch]], None]
"""``(room, document_patches)``, called after a frame's document patches are applied."""
TokenRefreshHook = Callable[["Room", SessionInfo, str], Awaitable[Any] | Any]
"""``(room, session, token) -> AuthorizeResult``; raise to end the session."""


class Room:
    """One document and the sessions editing it. Create rooms with a RoomManager.

    Saves go through ``storage``: at most one at a time, ``save_throttle`` seconds after
    the first unsaved change, then again whenever more changes arrive. A save that fails
    keeps everything unsaved and is retried with backoff (1 s, doubling to 60 s).

    With ``durable_acks`` (``storage`` must then be a
    :class:`~canvas_store_trio.JournalStorage`), no frame that carries an edit leaves
    before a ``commit`` holding the edit has returned. A commit that fails, or takes over
    ``flush_timeout``, closes every session with 1013 (try again later) and ends the
    room without saving what was not committed: the clients reconnect to a room loaded
    afresh, and resend their unacked edits.

    With ``history_interval`` (``storage`` must then be a
    :class:`~canvas_store_trio.HistoryStorage`), the room keeps versions of its
    document, at most one per interval while it changes, and the ``history_keep``
    newest of them (see :class:`~._history.HistoryKeeper`).

    ``ownership`` says whether this process may open the room (a cluster's lease): the
    room takes its lease before it loads, and gives it back once it has closed. A room
    refused a lease never serves (its :attr:`load_error` is the
    :class:`~canvas_store_trio.cluster.NotOwnerError`); a room that loses its lease
    closes every session with 1012 (service restart: reconnect) at once, commits and
    saves nothing more, and ends.
    """

    def __init__(
        self,
        room_id: str,
        *,
        storage: Storage | None = None,
        save_throttle: float = 10.0,
        idle_timeout: float = 30.0,
        flush_timeout: float = 10.0,
        durable_acks: bool = False,
        history_interval: float | None = None,
        history_keep: int = DEFAULT_HISTORY_KEEP,
        limits: Limits | None = None,
        on_session_removed: SessionRemovedHook | None = None,
        on_document_patch: DocumentPatchHook | None = None,
        on_token_refresh: TokenRefreshHook | None = None,
        stats: Stats | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self.room_id = room_id
        self._ownership = ownership or SoleOwnership()
        self._lease: Lease | None = None
        self.limits = limits or Limits()
        self.stats = stats or Stats()
        """Counters for ``/metrics``: the manager's, shared by all its rooms."""
        if durable_acks and not implements(storage, JournalStorage):
            raise TypeError(
                f"durable acks need a storage with commit() (a JournalStorage), not {storage!r}"
            )
        if history_interval is not None and not implements(storage, HistoryStorage):
            raise TypeError(
                f"history needs a storage with save_version() (a HistoryStorage), not {storage!r}"
            )
        self._history_interval = history_interval
        self._history_keep = history_keep
        self.history: HistoryKeeper | None = None
        """Set once the room has loaded, with a history interval."""
        self.saver = Saver(
            room_id,
            storage,
            save_throttle=save_throttle,
            flush_timeout=flush_timeout,
            durable=durable_acks,
            stats=self.stats,
        )
        self.committer: Committer | None = None
        """Set once the room has loaded, with durable acks on."""
        self._idle_timeout = idle_timeout
        self._on_session_removed = on_session_removed
        self._on_document_patch = on_document_patch
        self._on_token_refresh = on_token_refresh
        self.document = self.saver.document
        self.ephemeral = EphemeralState()
        self._sessions: dict[str, Session] = {}
        self._unflushed: list[Session] = []
        """Sessions with queued frames, written out by :meth:`_flush` after each event."""
        self._accepting = False
        self._frames_stopped = False
        """Set once the room closes: frames that still arrive are dropped unanswered
        (their senders resend what was not acked, after reconnecting)."""
        self._settled = trio.Event()
        """Set while the room accepts sessions, and once it has closed: what a join
        waits for while the room loads or closes (see :meth:`wait_accepting_or_closed`)."""
        self._idle_scope = trio.CancelScope()
        self._serving = 0
        """Sessions whose :meth:`serve` has not returned (their socket not closed yet)."""
        self._all_served = trio.Event()
        self._holds = 0
        """Open :meth:`hold` blocks: while any runs, the room does not idle-close."""
        self._feeds: list[ChangeFeed] = []
        self._uncommitted_changes: list[Change] = []
        """With durable acks: changes applied but not committed, for the feeds."""
        self._close_requested = trio.Event()
        self._ready = trio.Event()
        self._closed = trio.Event()
        self.load_error: BaseException | None = None
        """Why the snapshot could not be loaded, if it could not: the room then never serves."""

    # --- lifetime ------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether the room is loaded and takes new sessions."""
        return self._accepting

    @property
    def closed(self) -> bool:
        """Whether the room has ended: its sessions are closed and its final flush is done."""
        return self._closed.is_set()

    @property
    def unsaved(self) -> bool:
        """Whether the document has changes that storage does not have yet."""
        return self.saver.unsaved or (self.committer is not None and self.committer.uncommitted)

    @property
    def save_error(self) -> BaseException | None:
        """The last save failure, or None once a save succeeds."""
        return self.saver.error

    async def run(self, on_closed: Callable[[Room], None] | None = None) -> None:
        """Load, serve until idle or closed, then flush. The room's one task.

        A load failure is kept in :attr:`load_error` and ends the task: the room never
        serves anyone, and storage is never written. On cancellation the room closes
        its sessions and runs the final flush shielded, for at most ``flush_timeout``.
        """
        try:
            self._lease = await self._ownership.acquire(self.room_id, self._on_lease_lost)
            self.document = await self.saver.load()
        except Exception as exc:
            if isinstance(exc, NotOwnerError):
                log_event(
                    logging.INFO,
                    "room_not_owned",
                    "room %r not opened here: %s",
                    self.room_id,
                    exc,
                    room=self.room_id,
                    owner=exc.owner,
                )
            else:
                log_event(
                    logging.ERROR,
                    "room_load_failed",
                    "room %r refused: its snapshot could not be loaded: %s",
                    self.room_id,
                    exc,
                    room=self.room_id,
                    error=str(exc),
                )
            self.load_error = exc.with_traceback(None)  # its frames would hold the room
            with trio.CancelScope(shield=True):
                await self._release_lease()
            self._ready.set()
            self._closed.set()
            self._settled.set()
            if on_closed:
                on_closed(self)
            return
        if self.saver.durable:
            self.committer = Committer(
                self.room_id,
                cast(JournalStorage, self.saver.storage),
                self.document,
                timeout=self.saver.flush_timeout,
                on_committed=self._on_committed,
                on_failed=self._on_commit_failed,
                stats=self.stats,
            )
            self.saver.commit_gate = self.committer.commit_through
        if self._history_interval is not None:
            self.history = HistoryKeeper(
                self.room_id,
                cast(HistoryStorage, self.saver.storage),
                self.document,
                interval=self._history_interval,
                keep=self._history_keep,
                commit_gate=self.saver.commit_gate,
            )
        self._set_accepting(True)
        self._ready.set()
        try:
            async with trio.open_nursery() as nursery:
                self.saver.attach(nursery)
                if self.history is not None:
                    nursery.start_soon(self.history.run)
                await self._wait_until_idle_or_closed()
                nursery.cancel_scope.cancel()
        finally:
            self.saver.attach(None)
            # Frames stop now. With durable acks, what was applied is committed before
            # the sessions close, so that its acks go out with their last frames.
            self._frames_stopped = True
            self._set_accepting(False)
            with trio.CancelScope(shield=True):
                committed = await self._commit_all()
                self._stop_accepting()
                if committed:
                    await self.saver.flush_quietly()
                await self._release_lease()
                # The room has ended once its sessions have closed their sockets too:
                # a transport whose reader is cancelled right after (a server shutting
                # down) could not finish their close handshakes any more.
                with trio.move_on_after(CLOSE_TIMEOUT):
                    while self._serving:
                        await self._all_served.wait()
            self.saver.forget_error_traceback()
            for feed in self._feeds:
                feed.end()
            self._closed.set()
            self._settled.set()
            if on_closed:
                on_closed(self)

    async def wait_ready(self) -> None:
        """Wait until the room has loaded (or failed to: see :attr:`load_error`)."""
        await self._ready.wait()

    async def wait_closed(self) -> None:
        """Wait until the room has ended (see :attr:`closed`)."""
        await self._closed.wait()

    async def wait_accepting_or_closed(self) -> None:
        """Wait until the room takes sessions or has closed (at once if it does now).

        A room that is closing for idleness takes nobody while it saves; if that save
        fails it stays open and takes sessions again.
        """
        await self._settled.wait()

    async def aclose(self) -> None:
        """Close every session, flush, and wait until the room has ended. Safe to repeat."""
        self.begin_close()
        await self._closed.wait()

    def begin_close(self) -> None:
        """Stop taking sessions and frames now; the room task then commits (with
        durable acks), closes the sessions (1001), flushes and ends."""
        self._frames_stopped = True
        self._set_accepting(False)
        self._close_requested.set()

    def _set_accepting(self, accepting: bool) -> None:
        self._accepting = accepting
        if accepting:
            self._settled.set()
        elif self._settled.is_set():
            self._settled = trio.Event()

    def _stop_accepting(self, code: int = 1001, reason: str = "room closed") -> None:
        self._set_accepting(False)
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            if code not in NORMAL_CLOSE_CODES and not session.closing:
                log_event(
                    logging.WARNING,
                    "session_closed",
                    "room %r: client %r closed: %s (%d)",
                    self.room_id,
                    session.client_id,
                    reason,
                    code,
                    **session.log_fields(code=code, reason=reason),
                )
            session.close(code, reason)

    async def _commit_all(self) -> bool:
        """Commit every applied edit (durable acks); False if a commit has failed.

        A failed commit has already closed the room (:meth:`_on_commit_failed`), and what
        it did not commit must never be saved.
        """
        if self.committer is None:
            return True
        try:
            await self.committer.commit_through(self.document.timestamp)
        except CommitError:
            return False
        return True

    def _on_committed(self) -> None:
        self._flush()
        if self._uncommitted_changes:
            self._release_changes()
        self.saver.mark_unsaved()  # a snapshot save folds the journal in

    async def _release_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await self._ownership.release(lease)

    def _on_lease_lost(self, reason: str) -> None:
        """Another node may own the room now: not one more frame tells of an edit, and
        the clients reconnect (1012) to whichever node serves it next."""
        log_event(
            logging.WARNING,
            "lease_lost",
            "room %r: lost its lease (%s); its sessions are closed (1012)",
            self.room_id,
            reason,
            room=self.room_id,
            reason=reason,
        )
        self.saver.discard()
        if self.committer is not None:
            # Edits applied but not committed yet are never written, nor told of: the
            # next owner may already serve the room (the write fence would refuse them).
            self.committer.stop("lost its lease")
        self._uncommitted_changes.clear()
        self._frames_stopped = True
        self._stop_accepting(1012, "room moved; reconnect")
        self._close_requested.set()

    def _on_commit_failed(self, error: BaseException) -> None:
        if isinstance(error, FencedWriteError):
            # Another node took the room before this one noticed: the lease is lost.
            self._on_lease_lost(str(error))
            return
        self.saver.discard()
        self._uncommitted_changes.clear()  # nobody hears of them: their senders resend
        self._stop_accepting(1013, "could not save; try again")
        self._close_requested.set()

    async def _wait_until_idle_or_closed(self) -> None:
        while True:
            with trio.CancelScope() as self._idle_scope:
                self._reset_idle_deadline()
                await self._close_requested.wait()
                return
            if self._sessions or self._holds:
                continue  # someone joined as the timer ran out
            # The room closes: from now on a join waits for it to end, then gets a fresh
            # room that loads what this one saved. Joining this one would be undone by
            # the close (1001), and no edit can now arrive after the last save.
            self._set_accepting(False)
            if await self._commit_all() and await self.saver.save():
                log_event(
                    logging.INFO,
                    "room_closed_idle",
                    "room %r closes after %g s without sessions",
                    self.room_id,
                    self._idle_timeout,
                    room=self.room_id,
                )
                return
            if self._close_requested.is_set():
                return
            # A room whose save fails stays open (and keeps retrying) rather than
            # forgetting its acked edits; the joins that waited come in now.
            log_event(
                logging.WARNING,
                "room_kept_open",
                "room %r stays open: its changes could not be saved (%s)",
                self.room_id,
                self.save_error,
                room=self.room_id,
                error=str(self.save_error),
            )
            self._set_accepting(True)

    def _reset_idle_deadline(self) -> None:
        if self._sessions or self._holds:
            self._idle_scope.deadline = math.inf
        else:
            self._idle_scope.deadline = trio.current_time() + self._idle_timeout

    async def flush(self) -> None:
        """Commit (durable acks) and save now if anything is unsaved. Raise the storage's
        error (or :class:`~._commits.CommitError`) if that fails."""
        if self.committer is not None:
            await self.committer.commit_through(self.document.timestamp)
        await self.saver.flush()

    def get_snapshot(self) -> Snapshot:
        """The document as it is now, as a snapshot (a copy: later edits do not change it)."""
        return self.document.snapshot()

    # --- sessions ------------------------------------------------------------------

    def session_count(self) -> int:
        """Sessions in the room now."""
        return len(self._sessions)

    def iter_sessions(self) -> Iterator[Session]:
        """The sessions in the room now (what the manager's keep-alive pings)."""
        return iter(self._sessions.values())

    def get_sessions(self) -> list[SessionInfo]:
        """Every session in the room now: id, client id, permissions, metadata."""
        return [session.info() for session in self._sessions.values()]

    def get_session_permissions(self, session_id: str) -> Permissions | None:
        """A session's permissions, or None if no session has this id."""
        session = self._sessions.get(session_id)
        return session.permissions if session else None

    def set_session_permissions(self, session_id: str, permissions: Permissions) -> None:
        """Change a live session's permissions; ValueError unless readonly or readwrite."""
        permissions = check_permissions(permissions)
        session = self._sessions.get(session_id)
        if session:
            session.permissions = permissions

    def close_session(
        self, session_id: str, code: int = 1008, reason: str = "closed by an administrator"
    ) -> bool:
        """Close one session now (its client may reconnect, and its token is checked
        again then). False if there is no such session."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        session.close(code, reason)
        self._remove_session(session)
        return True

    def get_session_metadata(self, session_id: str) -> Any:
        """A session's metadata (from the authorize hook), or None if no session has this id."""
        session = self._sessions.get(session_id)
        return session.metadata if session else None

    def set_session_metadata(self, session_id: str, metadata: Any) -> None:
        """Replace a live session's metadata; no-op if no session has this id."""
        session = self._sessions.get(session_id)
        if session:
            session.metadata = metadata

    async def serve(
        self,
        socket: MessageSocket,
        *,
        client_id: str,
        permissions: Permissions = "readwrite",
        metadata: Any = None,
        refresh: TokenRefresh | None = None,
        on_ready: Callable[[Room, SessionInfo], None] | None = None,
    ) -> None:
        """Run one session on an open socket until either side closes it.

        The session joins before this first awaits, or :class:`RoomClosedError` /
        :class:`RoomFullError` is raised and nothing is sent (ValueError for the
        reserved client id :data:`SERVER_CLIENT_ID`). ``refresh`` checks the
        token of an ``auth-refresh`` frame (the room's ``on_token_refresh`` otherwise).

        On return or cancellation the session has left the room, and the socket has
        been closed (1001 on cancellation): after a normal end the queued frames are sent
        first, all within ``CLOSE_TIMEOUT`` seconds, shielded from cancellation.
        """
        if client_id == SERVER_CLIENT_ID:
            raise ValueError(f"the client id {SERVER_CLIENT_ID!r} is the server's own")
        session = Session(
            socket,
            self.room_id,
            client_id,
            permissions,
            metadata,
            outbox_max_bytes=self.limits.outbox_max_bytes,
            pending=self._unflushed,
            stats=self.stats,
            refresh=refresh,
        )
        self._add_session(session)
        if not self._serving:
            self._all_served = trio.Event()
        self._serving += 1
        if on_ready:
            on_ready(self, session.info())
        ended: CloseReason | None = None
        try:
            with session.cancel_scope:
                async with trio.open_nursery() as nursery:
                    session.start(nursery)
                    try:
                        ended = await self._read_frames(session, socket)
                        session.close(1000, "")
                    finally:
                        # Nothing new starts in a nursery on its way out: the keep-alive
                        # could otherwise meet it closed before the session leaves the room.
                        session.nursery = None
        finally:
            if session.close_code is None:
                # Cancelled from outside (the app is shutting down): the client is told
                # the server is going away, and reconnects, rather than that it is done.
                session.close(1001, "server shutting down")
            try:
                self._remove_session(session)
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                    await self._close_socket(session, socket)
            finally:
                self._serving -= 1
                if not self._serving:
                    self._all_served.set()
            if ended is None and session.close_code == 1006:  # a write found it gone
                ended = CloseReason(1006, "connection lost")
            if ended is not None:
                log_connection_closed(ended, self.room_id, session.client_id, session.session_id)

    async def _read_frames(self, session: Session, socket: MessageSocket) -> CloseReason:
        """Hand the socket's frames to the room until it closes; return how it closed."""
        try:
            if implements(socket, PushSocket):
                on_message = functools.partial(self._handle_frame, session)
                await cast(PushSocket, socket).deliver_messages(
                    on_message, after_messages=self._flush
                )
            else:
                self._flush()
                while True:
                    self.handle_frame(session, await socket.get_message())
        except ConnectionClosed as exc:
            return exc.reason or CloseReason(1006, "connection lost")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return CloseReason(1006, "connection lost")

    @staticmethod
    async def _close_socket(session: Session, socket: MessageSocket) -> None:
        code = session.close_code or 1000
        try:
            if code in (1000, 1001):
                await session.drain()
            await socket.aclose(code, close_reason(session.close_reason))
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _add_session(self, session: Session) -> None:
        if not self._accepting:
            raise RoomClosedError(self.room_id)
        if len(self._sessions) >= self.limits.max_sessions_per_room:
            raise RoomFullError(
                f"room {self.room_id!r} has {self.limits.max_sessions_per_room} sessions"
            )
        self._sessions[session.session_id] = session
        self._reset_idle_deadline()
        presence = self.ephemeral.snapshot_for(session.client_id)
        if presence:
            session.send(presence_frame("", presence))
        # Written by the session's first read (see _read_frames), with its answers.
        self._broadcast(client_count_frame(len(self._sessions)))

    def _remove_session(self, session: Session) -> None:
        if self._sessions.pop(session.session_id, None) is None:
            return
        deletion = self.ephemeral.remove(session.client_id)
        if deletion:
            self._broadcast_presence(
                presence_frame(session.client_id, deletion), session, session.client_id
            )
        self._broadcast(client_count_frame(len(self._sessions)))
        self._flush()
        self._reset_idle_deadline()
        if self._on_session_removed:
            self._on_session_removed(self, session.session_id, len(self._sessions))

    def _flush(self) -> None:
        """Write every queued frame the sockets take now, without waiting."""
        unflushed = self._unflushed
        while unflushed:
            unflushed.pop().flush_nowait()

    def _broadcast(self, frame: bytes, exclude: Session | None = None) -> None:
        for session in list(self._sessions.values()):
            if session is not exclude:
                session.send(frame)

    def _broadcast_edit(
        self, frame: bytes, sender: Session | None, *, presence_of: str | None
    ) -> None:
        """Broadcast a frame with document patches (and ``presence_of``'s presence, if
        it carries some) to all but the sender: once they are durable, if need be."""
        committer = self.committer
        if committer is None:
            self._broadcast(frame, exclude=sender)
            return
        recipients = [session for session in self._sessions.values() if session is not sender]
        committer.send_to_all(recipients, frame, presence_of=presence_of)

    def _broadcast_presence(self, frame: bytes, sender: Session | None, client_id: str) -> None:
        """Broadcast a frame of ``client_id``'s presence alone (behind its held edits)."""
        committer = self.committer
        if committer is None:
            self._broadcast(frame, exclude=sender)
            return
        for session in list(self._sessions.values()):
            if session is not sender:
                committer.send_presence(session, frame, client_id)

    def _send_edit(self, session: Session, frame: bytes) -> None:
        """Send a frame that tells of edits (an ack, a diff): once they are durable."""
        if self.committer is None:
            session.send(frame)
        else:
            self.committer.send(session, frame)

    # --- the server's own edits and the change feed ------------------------------------

    @contextmanager
    def hold(self) -> Iterator[Room]:
        """Keep the room open while the block runs, as a session would: it does not
        idle-close meanwhile (``close_room`` and shutdown still close it).

        Raises :class:`RoomClosedError` if the room does not take sessions now.
        ``RoomManager.open_room`` finds the room and holds it in one step.
        """
        if not self._accepting:
            raise RoomClosedError(self.room_id)
        self._holds += 1
        self._reset_idle_deadline()
        try:
            yield self
        finally:
            self._holds -= 1
            self._reset_idle_deadline()

    async def apply_patch(self, patch: Patch, *, ephemeral: Patch | None = None) -> int:
        """Edit the document from the server: apply ``patch`` as a client's would be.

        ``patch`` is one ``documentPatches`` entry in the wire format (key -> fields,
        with ``_exists`` and buffer deltas), and ``ephemeral`` one ``ephemeralPatches``
        entry, the server's presence. They are checked as a client frame is, with the
        room's limits: :class:`~canvas_store_trio.ProtocolError` (the same codes a client
        gets) means nothing was applied. Otherwise the edit is applied under one new
        timestamp, broadcast to every session under :data:`SERVER_CLIENT_ID`, handed to
        the change feeds, and saved like any edit; with durable acks this returns once
        it is committed. Returns the room timestamp the edit has (the current one if the
        patch holds no entry).

        Raises :class:`RoomClosedError` if the room takes no sessions now (closed, or
        closing: get a fresh one), and :class:`~._commits.CommitError` if the commit
        fails (the room then closes with 1013, and the edit is gone, as an unacked
        client edit would be). Cancelled while it waits for the commit, the edit stays
        applied and is committed all the same.
        """
        return await self._server_edit([patch], ephemeral)

    async def replace_state(self, state: Mapping[str, Record]) -> int:
        """Make the document hold exactly ``state`` (key -> record), as one server edit.

        Keys ``state`` lacks are deleted, records that differ are written anew (deleted
        and re-created in the same edit when they lose a field), and the rest is left
        alone, so the clients see the change as ordinary patches and keep their
        sessions. Checked, applied, broadcast and saved as :meth:`apply_patch` is, and
        raises as it does. Returns the edit's timestamp (the current one if nothing
        differs).
        """
        return await self._server_edit(replacement_patches(self.document.state, state), None)

    async def _server_edit(self, patches: list[Patch], ephemeral: Patch | None) -> int:
        if not self._accepting:
            raise RoomClosedError(self.room_id)
        message = _server_edit(patches, ephemeral, self.limits)
        try:
            changed = self._apply(
                None, SERVER_CLIENT_ID, message.document_patches, message.ephemeral_patches
            )
        finally:
            self._flush()
        timestamp = self.document.timestamp
        if changed and self.committer is not None:
            await self.committer.commit_through(timestamp)
        else:
            await trio.lowlevel.checkpoint()
        return timestamp

    @asynccontextmanager
    async def subscribe(self, *, max_buffer: int = CHANGE_FEED_BUFFER) -> AsyncIterator[ChangeFeed]:
        """Follow the room's document edits: ``async with room.subscribe() as changes:``.

        ``async for change in changes`` yields one :class:`Change` per accepted edit
        from now on, from clients and :meth:`apply_patch` alike, in timestamp order
        (with durable acks, once it is committed). The room never waits for a reader:
        one that lets more than ``max_buffer`` changes pile up gets
        :class:`ChangeFeedOverflow` at its next read. The iteration ends when the room
        closes; leaving the block ends the subscription. Raises
        :class:`RoomClosedError` if the room takes no sessions now.
        """
        if not self._accepting:
            raise RoomClosedError(self.room_id)
        since = self.committer.committed if self.committer else self.document.timestamp
        feed = ChangeFeed(max_buffer, since)
        self._feeds.append(feed)
        try:
            yield feed
        finally:
            self._feeds.remove(feed)
            feed.end()

    # --- frames --------------------------------------------------------------------

    def handle_frame(self, session: Session, data: str | bytes) -> None:
        """Check and handle one frame from a session, entirely, before returning."""
        try:
            self._handle_frame(session, data)
        finally:
            self._flush()

    def _handle_frame(self, session: Session, data: str | bytes) -> None:
        """:meth:`handle_frame`, leaving the queued frames to the next :meth:`_flush`."""
        if self._frames_stopped or session.session_id not in self._sessions:
            return
        limits = self.limits
        try:
            if not session.check_rate(limits.rate_limit, limits.rate_burst):
                session.close(1008, "rate limit exceeded")
                log_event(
                    logging.WARNING,
                    "rate_limited",
                    "room %r: client %r closed: over %g frames/s",
                    self.room_id,
                    session.client_id,
                    limits.rate_limit,
                    **session.log_fields(),
                )
                self._remove_session(session)
                return
            message = parse_client_frame(data, limits)
            stats = self.stats
            if type(message) is PatchMessage:
                stats.patch_frames += 1
                self._on_patch(session, message)
            elif type(message) is ReconnectMessage:
                stats.reconnect_frames += 1
                self._on_reconnect(session, message)
            elif type(message) is AuthRefreshMessage:
                stats.auth_refresh_frames += 1
                self._on_auth_refresh(session, message)
        except ProtocolError as exc:
            self._refuse(session, exc)

    def _refuse(self, session: Session, error: ProtocolError) -> None:
        self.stats.refused(error.code)
        log_event(
            logging.WARNING,
            "frame_refused",
            "room %r: refused a frame from client %r: %s (%s)",
            self.room_id,
            session.client_id,
            error.message,
            error.code,
            room=self.room_id,
            session=session.session_id,
            client=session.client_id,
            error_code=error.code,
        )
        session.send(error_frame(error))  # at once, even past held acks: it tells of no edit
        if session.note_refused(self.limits.max_invalid_frames, self.limits.invalid_frame_window):
            session.close(1008, "too many invalid frames")
            log_event(
                logging.WARNING,
                "too_many_invalid_frames",
                "room %r: client %r closed: too many invalid frames (over %d in %g s)",
                self.room_id,
                session.client_id,
                self.limits.max_invalid_frames,
                self.limits.invalid_frame_window,
                **session.log_fields(),
            )
            self._remove_session(session)

    def _on_patch(self, session: Session, message: PatchMessage) -> None:
        if not message.document_patches and not message.ephemeral_patches:
            return
        changed = False
        if session.permissions == "readwrite":
            try:
                changed = self._apply(
                    session,
                    session.client_id,
                    message.document_patches,
                    message.ephemeral_patches,
                )
            except ProtocolError as exc:
                exc.message_id = message.message_id
                raise
        committer = self.committer
        if committer is None:
            session.send(ack_frame(message.message_id, self.document.timestamp))
        elif changed:
            committer.send(session, ack_frame(message.message_id, self.document.timestamp),
                           ack=True)
        else:  # nothing of its own to wait for, and it tells of no timestamp not durable
            committer.send_reply(session, functools.partial(ack_frame, message.message_id))

    def _on_reconnect(self, session: Session, message: ReconnectMessage) -> None:
        if not message.version_matches:
            session.send(version_mismatch_frame())
            return
        document = self.document
        since = document.timestamp
        if session.permissions == "readwrite":
            self._apply(
                session, session.client_id, message.document_patches, message.ephemeral_patches
            )
            if message.last_timestamp > since:
                self._send_edit(session, resync_frame(since))
        # With durable acks the diff may hold edits not yet committed: it waits for them.
        diff = document.diff_since(message.last_timestamp)
        presence = self.ephemeral.snapshot_for(session.client_id)
        if diff or presence:
            self._send_edit(
                session,
                patch_frame(
                    "",
                    [diff] if diff else None,
                    document.timestamp,
                    [presence] if presence else None,
                ),
            )
        self._send_edit(session, synced_frame(document.timestamp))

    def _apply(
        self,
        sender: Session | None,
        client_id: str,
        document_patches: Sequence[Patch],
        ephemeral_patches: Sequence[Patch],
    ) -> bool:
        """Apply a frame's patches and broadcast them; True if the document changed.

        ``sender`` is the session that sent them (None for a server-side edit), and
        ``client_id`` the id they are broadcast under. Raise ProtocolError, before
        anything changes, if the frame would take the client over its presence key limit
        or its broadcast cannot be encoded.
        """
        if ephemeral_patches:
            self._check_presence_limit(client_id, ephemeral_patches)
        will_change = has_content(document_patches)
        frame = None
        if will_change or ephemeral_patches:
            try:
                frame = patch_frame(
                    client_id,
                    document_patches if will_change else None,
                    self.document.timestamp + 1,
                    ephemeral_patches,
                )
            except orjson.JSONEncodeError:
                raise ProtocolError(
                    "invalid-component", "a value cannot be encoded as JSON again"
                ) from None
        if will_change:
            if self.history is not None:
                self.history.before_change()
            self.document.apply(document_patches)
        if ephemeral_patches:
            self.ephemeral.apply(client_id, ephemeral_patches)
        if frame is not None:
            if will_change:
                presence_of = client_id if ephemeral_patches else None
                self._broadcast_edit(frame, sender, presence_of=presence_of)
            else:
                self._broadcast_presence(frame, sender, client_id)
        if will_change:
            self.stats.edits += 1
            if self.committer is None:
                self.saver.mark_unsaved()
            else:
                self.committer.wanted()
            if self._feeds:
                self._publish(
                    Change(
                        self.document.timestamp,
                        document_patches,
                        sender.session_id if sender else None,
                        sender.client_id if sender else None,
                    )
                )
            if self._on_document_patch:
                self._on_document_patch(self, document_patches)
        return will_change

    def _publish(self, change: Change) -> None:
        """Hand a change to the feeds: now, or with durable acks once it is committed."""
        if self.committer is None:
            for feed in self._feeds:
                feed.push(change)
        else:
            self._uncommitted_changes.append(change)

    def _release_changes(self) -> None:
        assert self.committer is not None
        committed = self.committer.committed
        pending = self._uncommitted_changes
        released = 0
        while released < len(pending) and pending[released].timestamp <= committed:
            for feed in self._feeds:
                feed.push(pending[released])
            released += 1
        del pending[:released]

    def _check_presence_limit(self, client_id: str, patches: Sequence[Patch]) -> None:
        limit = self.limits.max_ephemeral_keys
        held = self.ephemeral.by_client.get(client_id, {})
        new_keys = {key for patch in patches for key in patch if key not in held}
        if len(held) + len(new_keys) > limit:
            raise ProtocolError(
                "too-many-ephemeral-keys", f"a client may hold at most {limit} presence keys"
            )

    def _on_auth_refresh(self, session: Session, message: AuthRefreshMessage) -> None:
        if session.refresh is None and self._on_token_refresh is None:
            return
        assert session.nursery is not None
        session.nursery.start_soon(self._refresh_auth, session, message.token)

    async def _refresh_auth(self, session: Session, token: str) -> None:
        try:
            if session.refresh is not None:
                result = await session.refresh(token)
            else:
                assert self._on_token_refresh is not None
                value = self._on_token_refresh(self, session.info(), token)
                if isinstance(value, Awaitable):
                    value = await value
                result = as_authorize_result(value)
        except Exception as exc:
            # A hook's refusal says why, as at connect; a hook's bug is not the client's.
            bug = isinstance(exc, AuthorizeResultError)
            session.close(1008, "token refresh refused" + ("" if bug else f": {exc}"))
            log_event(
                logging.ERROR if isinstance(exc, AuthorizeResultError) else logging.INFO,
                "token_refresh_refused",
                "room %r: client %r closed: token refresh refused: %s",
                self.room_id,
                session.client_id,
                exc,
                **session.log_fields(),
            )
            self._remove_session(session)
            return
        if session.session_id in self._sessions:
            session.permissions = result.permissions
            if result.metadata is not None:
                session.metadata = result.metadata


def _server_edit(patches: list[Patch], ephemeral: Patch | None, limits: Limits) -> PatchMessage:
    """Check a server-side edit exactly as the client frame holding it would be."""
    frame: dict[str, Any] = {"type": "patch", "documentPatches": patches}
    if ephemeral is not None:
        frame["ephemeralPatches"] = [ephemeral]
    try:
        data = orjson.dumps(frame)
    except orjson.JSONEncodeError as exc:
        raise ProtocolError("invalid-component", f"the patch is not JSON: {exc}") from None
    if len(data) > limits.max_message_size:
        raise ProtocolError(
            "too-large", f"a frame may hold at most {limits.max_message_size} bytes"
        )
    # Parsed back, the patches are the room's own copies: the caller's stay its own.
    return cast(PatchMessage, parse_client_frame(data.decode(), limits))


__all__ = [
    "CHANGE_FEED_BUFFER",
    "SERVER_CLIENT_ID",
    "AuthorizeResult",
    "MessageSocket",
    "Room",
    "RoomClosedError",
    "RoomFullError",
]
