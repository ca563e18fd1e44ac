"""The admin API: JSON endpoints under ``/admin/`` to look at and fix rooms by hand.

Enabled by a token (``serve --admin-token``, or ``$CANVAS_STORE_ADMIN_TOKEN``); every
request must carry ``Authorization: Bearer TOKEN``, compared in constant time.

| method and path | what |
|---|---|
| ``GET /admin/rooms`` | the open rooms: id, sessions, timestamp |
| ``GET /admin/rooms/{id}`` | an open room's sessions (permissions, metadata) and size |
| ``GET /admin/rooms/{id}/snapshot`` | the room's snapshot, in the Node file format |
| ``PUT /admin/rooms/{id}/snapshot`` | replace the document with a snapshot's state |
| ``GET /admin/rooms/{id}/history`` | the versions the room keeps, oldest first |
| ``POST /admin/rooms/{id}/history/{version}/restore`` | go back to a version's state |
| ``POST /admin/rooms/{id}/close`` | close the room's sessions, save it, end it |
| ``DELETE /admin/rooms/{id}/sessions/{session}`` | close one session |
| ``PATCH /admin/rooms/{id}/sessions/{session}`` | ``{"permissions": ...}`` |

Ids in the path are percent-decoded. Errors are ``{"error": message}`` with a 4xx
status; the snapshot and restore endpoints load a room that is not open, and it
idle-closes later. The history is read from storage, whether the room is open or not.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Mapping
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit

import orjson

from .._document import Record, SnapshotError, decode_snapshot, encode_snapshot
from .._protocol import ProtocolError
from ..rooms._commits import CommitError
from ..rooms._connection import MAX_ID_LENGTH
from ..rooms._manager import ManagerClosedError, RoomLoadError, RoomManager, TooManyRoomsError
from ..rooms._room import Room, RoomClosedError
from ..storage._base import HistoryStorage
from ..storage._history import versions_json
from ..transport._http import HttpRequest, HttpResponse

T = TypeVar("T")

ADMIN_TOKEN_ENV = "CANVAS_STORE_ADMIN_TOKEN"
"""The environment variable ``serve`` takes the admin token from without ``--admin-token``
(which a process listing would show)."""
_JSON = "application/json"


class _Refusal(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _refuse(status: int, message: str, **headers: str) -> NoReturn:
    raise _Refusal(status, message, {name.replace("_", "-"): v for name, v in headers.items()})


def _json(status: int, value: Any) -> HttpResponse:
    return status, _JSON, orjson.dumps(value, default=str) + b"\n"


class AdminAPI:
    """Answers the requests under ``/admin/`` for one manager (see the module's table)."""

    def __init__(self, manager: RoomManager, token: str) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self.manager = manager
        self._token = token.encode()

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            self._check_token(request)
            return await self._route(request)
        except _Refusal as refusal:
            body = orjson.dumps({"error": str(refusal)}) + b"\n"
            return refusal.status, _JSON, body, refusal.headers

    def _check_token(self, request: HttpRequest) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self._token):
            _refuse(401, "send Authorization: Bearer <admin token>",
                    WWW_Authenticate='Bearer realm="canvas-store admin"')

    async def _route(self, request: HttpRequest) -> HttpResponse:
        path = urlsplit(request.path).path
        parts = [unquote(part) for part in path.removeprefix("/admin/").split("/")]
        method = request.method
        match parts:
            case ["rooms"]:
                _allow(method, "GET")
                return _json(200, {"rooms": [self._room_summary(room)
                                             for room in self._open_rooms()]})
            case ["rooms", room_id]:
                _allow(method, "GET")
                return _json(200, self._room_details(self._open_room(room_id)))
            case ["rooms", room_id, "snapshot"]:
                _allow(method, "GET", "PUT")
                if method == "PUT":
                    return await self._replace(room_id, request.body)
                return await self._snapshot(room_id)
            case ["rooms", room_id, "history"]:
                _allow(method, "GET")
                versions = await self._storage_call(self._history(room_id).list_versions())
                return _json(200, versions_json(room_id, versions))
            case ["rooms", room_id, "history", version, "restore"]:
                _allow(method, "POST")
                return await self._restore(room_id, version)
            case ["rooms", room_id, "close"]:
                _allow(method, "POST")
                self._open_room(room_id)
                await self.manager.close_room(room_id)
                return _json(200, {"room_id": room_id, "closed": True})
            case ["rooms", room_id, "sessions", session_id]:
                _allow(method, "DELETE", "PATCH")
                room = self._open_room(room_id)
                if room.get_session_permissions(session_id) is None:
                    _refuse(404, f"room {room_id!r} has no session {session_id!r}")
                if method == "DELETE":
                    room.close_session(session_id)
                    return _json(200, {"session_id": session_id, "closed": True})
                return self._set_permissions(room, session_id, request.body)
        _refuse(404, f"no admin endpoint at {path}")

    def _open_rooms(self) -> list[Room]:
        rooms = (self.manager.get_existing_room(room_id) for room_id in self.manager.room_ids())
        return [room for room in rooms if room is not None and room.accepting]

    def _open_room(self, room_id: str) -> Room:
        _check_id(room_id)
        room = self.manager.get_existing_room(room_id)
        if room is None or not room.accepting:
            _refuse(404, f"room {room_id!r} is not open")
        return room

    @staticmethod
    def _room_summary(room: Room) -> dict[str, Any]:
        return {"room_id": room.room_id, "sessions": room.session_count(),
                "timestamp": room.document.timestamp}

    def _room_details(self, room: Room) -> dict[str, Any]:
        state = room.document.state
        live = sum(1 for record in state.values() if record.get("_exists") is not False)
        sessions = [
            {"session_id": s.session_id, "client_id": s.client_id,
             "permissions": s.permissions, "metadata": s.metadata}
            for s in room.get_sessions()
        ]
        return {"room_id": room.room_id, "timestamp": room.document.timestamp,
                "sessions": sessions, "size": {"records": live, "tombstones": len(state) - live}}

    async def _snapshot(self, room_id: str) -> HttpResponse:
        _check_id(room_id)
        try:
            async with self.manager.open_room(room_id) as room:
                return 200, _JSON, encode_snapshot(room.get_snapshot())
        except (RoomLoadError, TooManyRoomsError, ManagerClosedError) as exc:
            _refuse(503, str(exc))

    async def _replace(self, room_id: str, body: bytes) -> HttpResponse:
        _check_id(room_id)
        try:
            snapshot = decode_snapshot(body)
        except SnapshotError as exc:
            _refuse(400, f"not a snapshot: {exc}")
        timestamp = await self._replace_state(room_id, snapshot.state)
        return _json(200, {"room_id": room_id, "timestamp": timestamp})

    async def _replace_state(self, room_id: str, state: Mapping[str, Record]) -> int:
        """``room.replace_state(state)`` on the room, loaded if need be; once saved."""
        try:
            async with self.manager.open_room(room_id) as room:
                timestamp = await room.replace_state(state)
                try:
                    await room.flush()  # answered once saved
                except Exception as exc:  # the storage's: applied, saved on a retry
                    _refuse(503, f"applied, but not saved yet ({exc}); it is retried")
        except ProtocolError as exc:
            _refuse(422, f"the snapshot's state is refused ({exc.code}): {exc.message}")
        except (RoomLoadError, TooManyRoomsError, ManagerClosedError, RoomClosedError,
                CommitError) as exc:
            _refuse(503, str(exc) or "the room closed meanwhile")
        return timestamp

    def _history(self, room_id: str) -> HistoryStorage:
        _check_id(room_id)
        create = self.manager.create_storage
        storage = create(room_id) if create is not None else None
        if not isinstance(storage, HistoryStorage):
            _refuse(404, "this server's storage keeps no history")
        return storage

    @staticmethod
    async def _storage_call(call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as exc:  # the storage's: it cannot read the history now
            _refuse(503, f"the history cannot be read: {exc}")

    async def _restore(self, room_id: str, version: str) -> HttpResponse:
        storage = self._history(room_id)
        if not version.isascii() or not version.isdigit():
            _refuse(400, f"a version is a room timestamp (0, 1, ...), not {version!r}")
        kept = await self._storage_call(storage.load_version(int(version)))
        if kept is None:
            _refuse(404, f"room {room_id!r} has no version {version}")
        timestamp = await self._replace_state(room_id, kept.state)
        return _json(200, {"room_id": room_id, "version": int(version), "timestamp": timestamp})

    @staticmethod
    def _set_permissions(room: Room, session_id: str, body: bytes) -> HttpResponse:
        try:
            change = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            _refuse(400, f"the body is not JSON: {exc}")
        if not isinstance(change, dict) or set(change) != {"permissions"}:
            _refuse(400, 'send {"permissions": "readonly"} or {"permissions": "readwrite"}')
        try:
            room.set_session_permissions(session_id, change["permissions"])
        except ValueError as exc:
            _refuse(400, str(exc))
        return _json(200, {"session_id": session_id, "permissions": change["permissions"]})


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        _refuse(405, f"{method} is not allowed here", Allow=", ".join(allowed))


def _check_id(room_id: str) -> None:
    if not room_id or len(room_id) > MAX_ID_LENGTH or "\x00" in room_id:
        _refuse(400, f"a room id has 1 to {MAX_ID_LENGTH} characters, without NUL")
