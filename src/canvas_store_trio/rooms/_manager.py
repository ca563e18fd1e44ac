"""RoomManager: the nursery that runs the rooms, and the one place rooms are found."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import trio

from .._logs import log_event
from .._protocol import Limits
from ..cluster._ownership import NotOwnerError, Owner, Ownership, SoleOwnership
from ..storage._base import Storage
from ._history import DEFAULT_HISTORY_KEEP
from ._keepalive import keep_alive
from ._room import (
    DocumentPatchHook,
    MessageSocket,
    Room,
    RoomClosedError,
    SessionRemovedHook,
    TokenRefreshHook,
)
from ._session import Permissions, Session, SessionInfo, TokenRefresh
from ._stats import Stats


class RoomLoadError(Exception):
    """A room's snapshot could not be loaded; the room refuses to serve.

    The cause is chained (``__cause__``). Nothing was written to storage.
    """


class TooManyRoomsError(Exception):
    """The manager already runs ``max_rooms`` rooms."""


class ManagerClosedError(Exception):
    """The manager is shutting down and opens no more rooms."""


class RoomManager:
    """Runs every room as a task in its own nursery.

    Use it as ``async with RoomManager(...) as manager:``. Leaving the block calls
    :meth:`close_all` (shielded), so every acked edit is flushed before it returns,
    even when the block is cancelled.

    ``get_or_create_room`` makes exactly one room per id, even when the first
    connections to a room race for it: the first caller creates and starts the room,
    and every caller waits for the same load. A room that is closing (idle timeout,
    ``close_room``) is waited for, then replaced by a fresh one that loads what the
    closing one saved, so no write is lost and no stale state is loaded.

    ``durable_acks=True`` acks an edit only once it is durable (see :class:`Room`); every
    storage ``create_storage`` makes must then be a
    :class:`~canvas_store_trio.JournalStorage` (file, SQLite and PostgreSQL storage are).

    ``history_interval=SECONDS`` keeps versions of each room's document: while a room
    changes, the document as it was before a change is kept at most once per interval,
    and the ``history_keep`` newest versions are kept (see :class:`Room`). Every storage
    must then be a :class:`~canvas_store_trio.HistoryStorage` (file, SQLite and
    PostgreSQL storage are).

    ``ownership`` decides whether this process may open a room: by default
    (:class:`~canvas_store_trio.cluster.SoleOwnership`) it may open every one; in a
    cluster (:class:`~canvas_store_trio.cluster.PostgresLeases`) a room opens only
    under its lease, and closes (1012) when it loses it.
    """

    def __init__(
        self,
        *,
        idle_timeout: float = 30.0,
        save_throttle: float = 10.0,
        flush_timeout: float = 10.0,
        create_storage: Callable[[str], Storage] | None = None,
        durable_acks: bool = False,
        history_interval: float | None = None,
        history_keep: int = DEFAULT_HISTORY_KEEP,
        on_session_removed: SessionRemovedHook | None = None,
        on_document_patch: DocumentPatchHook | None = None,
        on_token_refresh: TokenRefreshHook | None = None,
        limits: Limits | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self.ownership: Ownership = ownership or SoleOwnership()
        self.idle_timeout = idle_timeout
        self.save_throttle = save_throttle
        self.flush_timeout = flush_timeout
        if durable_acks and create_storage is None:
            raise ValueError("durable acks need a storage: pass create_storage")
        self.create_storage = create_storage
        self.durable_acks = durable_acks
        if history_interval is not None and not history_interval > 0:
            raise ValueError(f"history_interval must be > 0 seconds, not {history_interval!r}")
        if history_keep < 1:
            raise ValueError(f"history_keep must be at least 1, not {history_keep!r}")
        if history_interval is not None and create_storage is None:
            raise ValueError("history needs a storage: pass create_storage")
        self.history_interval = history_interval
        self.history_keep = history_keep
        self.on_session_removed = on_session_removed
        self.on_document_patch = on_document_patch
        self.on_token_refresh = on_token_refresh
        self.limits = limits or Limits()
        self.stats = Stats()
        """What the rooms have done: the counters ``/metrics`` shows."""
        self._rooms: dict[str, Room] = {}
        self._nursery: trio.Nursery | None = None
        self._exit_stack = AsyncExitStack()
        self._closing = False
        self._keep_alive_scope = trio.CancelScope()

    async def __aenter__(self) -> RoomManager:
        self._nursery = await self._exit_stack.enter_async_context(trio.open_nursery())
        if self.limits.ping_interval is not None:
            self._nursery.start_soon(self._keep_alive, name="keep-alive")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with trio.CancelScope(shield=True):
            await self.close_all()
        self._keep_alive_scope.cancel()
        return await self._exit_stack.__aexit__(exc_type, exc, tb)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close_all` has begun: no room opens any more (``/readyz``)."""
        return self._closing

    def session_count(self) -> int:
        """Sessions in every open room."""
        return sum(room.session_count() for room in self._rooms.values())

    async def _keep_alive(self) -> None:
        """One keep-alive task for every room's sessions, cancelled once the rooms have
        closed (the manager's exit)."""
        assert self.limits.ping_interval is not None
        with self._keep_alive_scope:
            await keep_alive(
                self._all_sessions,
                interval=self.limits.ping_interval,
                timeout=self.limits.ping_timeout,
            )

    def _all_sessions(self) -> Iterator[Session]:
        for room in self._rooms.values():
            yield from room.iter_sessions()

    def room_ids(self) -> list[str]:
        """The ids of the rooms open now (loading and closing ones included)."""
        return list(self._rooms)

    def get_existing_room(self, room_id: str) -> Room | None:
        """The open room with this id, or None. Never creates one."""
        return self._rooms.get(room_id)

    async def owner_elsewhere(self, room_id: str) -> Owner | None:
        """The other node that serves ``room_id`` now (see
        :meth:`~canvas_store_trio.cluster.Ownership.owner_elsewhere`); None if the
        room is open here, or may open here."""
        if room_id in self._rooms:
            return None
        return await self.ownership.owner_elsewhere(room_id)

    async def get_or_create_room(self, room_id: str) -> Room:
        """The room with this id, loaded and taking sessions; created if needed.

        Raises :class:`RoomLoadError` when its snapshot cannot be loaded,
        :class:`~canvas_store_trio.cluster.NotOwnerError` when another node owns it,
        :class:`TooManyRoomsError` at ``limits.max_rooms``, and
        :class:`ManagerClosedError` once :meth:`close_all` has begun.
        """
        while True:
            if self._closing or self._nursery is None:
                raise ManagerClosedError("the room manager is closed")
            room = self._rooms.get(room_id)
            if room is None:
                room = self._start_room(room_id)
            await room.wait_ready()
            if isinstance(room.load_error, NotOwnerError):
                raise room.load_error.copy()
            if room.load_error is not None:
                raise RoomLoadError(f"room {room_id!r} could not be loaded") from room.load_error
            if room.accepting:
                return room
            # Loaded but closing: wait for it to end (then start afresh) or, if its
            # closing save fails and it stays open, to take sessions again.
            await room.wait_accepting_or_closed()

    @asynccontextmanager
    async def open_room(self, room_id: str) -> AsyncIterator[Room]:
        """``async with manager.open_room(room_id) as room:`` the room, loaded, held open.

        Loads the room if need be, with or without clients, and keeps it from
        idle-closing while the block runs (see :meth:`Room.hold`): the place for
        :meth:`Room.apply_patch` and :meth:`Room.subscribe`. Raises like
        :meth:`get_or_create_room`. Leaving the block lets the room idle-close once it
        has no sessions either; the room may still close meanwhile (``close_room``,
        shutdown, a failed commit), after which its methods raise
        :class:`RoomClosedError`.
        """
        room = await self.get_or_create_room(room_id)
        with room.hold():  # it takes sessions: get_or_create_room has just made sure
            yield room

    def _start_room(self, room_id: str) -> Room:
        if len(self._rooms) >= self.limits.max_rooms:
            raise TooManyRoomsError(f"this server already has {self.limits.max_rooms} rooms open")
        storage = self.create_storage(room_id) if self.create_storage else None
        room = Room(
            room_id,
            storage=storage,
            save_throttle=self.save_throttle,
            idle_timeout=self.idle_timeout,
            flush_timeout=self.flush_timeout,
            durable_acks=self.durable_acks,
            history_interval=self.history_interval,
            history_keep=self.history_keep,
            limits=self.limits,
            on_session_removed=self.on_session_removed,
            on_document_patch=self.on_document_patch,
            on_token_refresh=self.on_token_refresh,
            stats=self.stats,
            ownership=self.ownership,
        )
        self._rooms[room_id] = room
        assert self._nursery is not None
        self._nursery.start_soon(room.run, self._forget, name=f"room {room_id!r}")
        return room

    def _forget(self, room: Room) -> None:
        if self._rooms.get(room.room_id) is room:
            del self._rooms[room.room_id]

    async def serve(
        self,
        socket: MessageSocket,
        room_id: str,
        *,
        client_id: str,
        permissions: Permissions = "readwrite",
        metadata: Any = None,
        refresh: TokenRefresh | None = None,
        on_ready: Callable[[Room, SessionInfo], None] | None = None,
    ) -> None:
        """Join ``room_id`` (creating it if needed) and serve the session until it ends.

        If the room closes between being found and being joined, a fresh one is used.
        Raises like :meth:`get_or_create_room` and :meth:`Room.serve`.
        """
        while True:
            room = await self.get_or_create_room(room_id)
            try:
                return await room.serve(
                    socket,
                    client_id=client_id,
                    permissions=permissions,
                    metadata=metadata,
                    refresh=refresh,
                    on_ready=on_ready,
                )
            except RoomClosedError:
                continue

    async def close_room(self, room_id: str) -> None:
        """Close one room's sessions, flush it and end its task. No-op if not open."""
        room = self._rooms.get(room_id)
        if room is not None:
            await room.aclose()

    async def close_all(self) -> list[str]:
        """Close every session in every room, then flush every room. Safe to repeat.

        Sessions go first, all at once, so that nothing more can be applied or acked;
        then the rooms flush in parallel, each for at most ``flush_timeout`` seconds.
        Returns the ids of the rooms that closed with unsaved changes (also logged).
        """
        self._closing = True
        rooms = list(self._rooms.values())
        for room in rooms:
            room.begin_close()
        for room in rooms:
            await room.wait_accepting_or_closed()
        failed = [room.room_id for room in rooms if room.unsaved]
        if failed:
            log_event(
                logging.ERROR,
                "rooms_unsaved",
                "closed with unsaved changes in %d room(s): %s",
                len(failed),
                ", ".join(map(repr, failed)),
                rooms=failed,
            )
        return failed
