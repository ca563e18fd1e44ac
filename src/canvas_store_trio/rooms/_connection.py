"""From a WebSocket handshake to a session: the connect URL, authorize, and the refusals."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from .._logs import log_event
from ..cluster._ownership import NotOwnerError
from ..transport._forward import FORWARDED_HEADER, ForwardingError
from ..transport._handshake import AcceptedSocket, HandshakeRequest
from ._manager import ManagerClosedError, RoomLoadError, RoomManager, TooManyRoomsError
from ._room import SERVER_CLIENT_ID, Room, RoomFullError
from ._session import (
    NORMAL_CLOSE_CODES,
    AuthorizeResult,
    AuthorizeResultError,
    SessionInfo,
    as_authorize_result,
    close_reason,
    log_connection_closed,
)

MAX_ID_LENGTH = 256
"""Characters in a room id or client id."""


class ConnectRequestError(Exception):
    """A connect URL the server refuses. ``code`` is stable; the message is the close reason."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class ConnectRequest:
    """What a connect URL asks for (see :func:`parse_connect_url`)."""

    room_id: str
    client_id: str
    token: str


@attrs.frozen
class AuthorizeInfo:
    """What an ``authorize`` hook is told. ``request`` is None on a token refresh;
    ``claims`` are the verified JWT's, for a hook run by a :class:`JWTAuthorizer`."""

    room_id: str
    client_id: str
    token: str
    request: HandshakeRequest | None = None
    claims: Mapping[str, Any] | None = None


Authorize = Callable[[AuthorizeInfo], AuthorizeResult | Any | Awaitable[Any]]
"""Returns an AuthorizeResult (or a mapping of it), sync or async; raises to refuse."""


def parse_connect_url(url: str, *, default_room_id: str = "default") -> ConnectRequest:
    """Read ``roomId``, ``clientId`` and ``token`` from a connect URL or path.

    A missing ``roomId`` means ``default_room_id``; a missing ``token`` is ``""``.
    Raises :class:`ConnectRequestError` for a missing ``clientId``, an id that is
    too long, or the server's own client id.
    """
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)

    def first(name: str) -> str:
        values = query.get(name)
        return values[0] if values else ""

    room_id = first("roomId") or default_room_id
    client_id = first("clientId")
    if not client_id:
        raise ConnectRequestError("Missing clientId query parameter", "missing-client-id")
    if client_id == SERVER_CLIENT_ID:
        raise ConnectRequestError(
            f"clientId {SERVER_CLIENT_ID!r} is reserved for the server's own edits",
            "invalid-id",
        )
    for name, value in (("roomId", room_id), ("clientId", client_id)):
        if len(value) > MAX_ID_LENGTH or "\x00" in value:
            raise ConnectRequestError(
                f"{name} must be at most {MAX_ID_LENGTH} characters, without NUL",
                "invalid-id",
            )
    return ConnectRequest(room_id, client_id, first("token"))


async def authorize_with(authorize: Authorize, info: AuthorizeInfo) -> AuthorizeResult:
    """Call a sync or async ``authorize`` hook and check what it returns."""
    result = authorize(info)
    if inspect.isawaitable(result):
        result = await result
    return as_authorize_result(result)


async def serve_connection(
    manager: RoomManager,
    request: HandshakeRequest,
    *,
    authorize: Authorize | None = None,
    default_room_id: str = "default",
) -> None:
    """Accept one WebSocket handshake and run its session until it ends.

    If another cluster node serves the room, the connection is forwarded there
    unanswered (see :func:`_forward_if_elsewhere`). Otherwise the socket is accepted
    first, so the client's early frames wait in its buffer while ``authorize`` runs and
    the room loads; none is dropped. Refusals close the socket:
    1008 for a bad URL or a refused token, 1011 for a room that cannot be loaded, 1013
    for a full room or server or a room another node owns, 1001 while the server shuts
    down. Without ``authorize`` every session is readwrite. The socket is always closed
    when this returns.
    """
    try:
        connect = parse_connect_url(request.path, default_room_id=default_room_id)
    except ConnectRequestError as exc:
        await _refuse_url(await request.accept(), exc)
        return
    if FORWARDED_HEADER.lower() not in request.headers and await _forward_if_elsewhere(
        manager, request, connect.room_id
    ):
        return
    ws = await request.accept()
    room_id, client_id = connect.room_id, connect.client_id
    result = AuthorizeResult("readwrite")
    refresh = None
    if authorize is not None:
        info = AuthorizeInfo(room_id, client_id, connect.token, request)
        try:
            result = await _authorize_while_open(ws, authorize, info)
        except Exception as exc:
            hook_bug = isinstance(exc, AuthorizeResultError)  # not a refusal: an error
            reason = "Unauthorized" if hook_bug else close_reason(str(exc) or "Unauthorized")
            log_event(
                logging.ERROR if hook_bug else logging.INFO,
                "auth_refused",
                "refused client %r in room %r: %s",
                client_id,
                room_id,
                exc,
                room=room_id,
                client=client_id,
                code=1008,
                reason=reason,
            )
            await ws.aclose(1008, reason)
            return
        refresh = _refresher(authorize, room_id, client_id)
    if ws.closed:  # the client left while authorize ran: it never joins
        log_connection_closed(ws.closed, room_id, client_id)
        return
    joined: list[SessionInfo] = []

    def log_join(room: Room, session: SessionInfo) -> None:
        joined.append(session)
        _log_join_or_leave("client_joined", "joined", room.room_id, room.session_count(), session)

    try:
        await manager.serve(
            ws,
            room_id,
            client_id=client_id,
            permissions=result.permissions,
            metadata=result.metadata,
            refresh=refresh,
            on_ready=log_join,
        )
    except RoomLoadError:
        # The cause, logged by the room, may name paths: the client gets none of it.
        await _refuse(ws, room_id, client_id, 1011, "Room could not be loaded")
    except NotOwnerError:
        # Another node owns the room (or none can take it now): the client retries.
        await _refuse(ws, room_id, client_id, 1013, "Room is served by another node; try again")
    except (RoomFullError, TooManyRoomsError) as exc:
        await _refuse(ws, room_id, client_id, 1013, str(exc))
    except ManagerClosedError:
        await _refuse(ws, room_id, client_id, 1001, "Server is shutting down")
    else:
        room = manager.get_existing_room(room_id)
        active = room.session_count() if room else 0
        _log_join_or_leave("client_left", "left", room_id, active, joined[0])


async def _refuse_url(ws: AcceptedSocket, exc: ConnectRequestError) -> None:
    log_event(
        logging.WARNING,
        "connect_refused",
        "refused a connection: %s",
        exc,
        code=1008,
        reason=str(exc),
        error_code=exc.code,
    )
    await ws.aclose(1008, str(exc))


async def _forward_if_elsewhere(
    manager: RoomManager, request: HandshakeRequest, room_id: str
) -> bool:
    """Forward the connection to the node that serves ``room_id``, if another one
    does; True once the forwarded connection has ended. False, the request still
    unanswered, if the room is served here or may open here, or if the owner cannot be
    reached (then the join below refuses it with 1013 while the lease lives, and the
    client retries). The owner authorizes the client: nothing is checked here."""
    owner = await manager.owner_elsewhere(room_id)
    if owner is None:
        return False
    headers = {FORWARDED_HEADER: manager.ownership.node_id or "-"}
    if request.remote is not None:
        headers["X-Forwarded-For"] = request.remote[0]
    try:
        manager.stats.forwarded_connections += 1
        await request.forward(owner.address, headers)
    except ForwardingError as exc:
        manager.stats.forward_failures += 1
        log_event(logging.WARNING, "forward_failed", "room %r: %s", room_id, exc,
                  room=room_id, owner=owner.node_id, address=owner.address, error=str(exc))
        return False
    return True


async def _authorize_while_open(
    ws: AcceptedSocket, authorize: Authorize, info: AuthorizeInfo
) -> AuthorizeResult:
    """Run ``authorize``; stop early if the client leaves (then ``ws.closed`` is set).

    A socket with ``until_closed`` (our wire transport) is watched while the hook runs;
    trio-websocket's reader task keeps ``closed`` up to date by itself.
    """
    result: AuthorizeResult | Exception = AuthorizeResult("readonly")
    until_closed = getattr(ws, "until_closed", None)
    async with trio.open_nursery() as nursery:
        if until_closed is not None:

            async def cancel_when_closed() -> None:
                await until_closed()
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_when_closed)
        try:
            result = await authorize_with(authorize, info)
        except Exception as exc:  # raised below, not wrapped in an exception group
            result = exc
        nursery.cancel_scope.cancel()
    if isinstance(result, Exception):
        raise result
    return result


def _refresher(
    authorize: Authorize, room_id: str, client_id: str
) -> Callable[[str], Awaitable[AuthorizeResult]]:
    async def refresh(token: str) -> AuthorizeResult:
        return await authorize_with(authorize, AuthorizeInfo(room_id, client_id, token, None))

    return refresh


def _log_join_or_leave(
    event: str, verb: str, room_id: str, active: int, session: SessionInfo
) -> None:
    """``client_joined`` or ``client_left``."""
    log_event(
        logging.INFO,
        event,
        "client %r %s room %r (%d active)",
        session.client_id,
        verb,
        room_id,
        active,
        room=room_id,
        session=session.session_id,
        client=session.client_id,
        active=active,
    )


async def _refuse(ws: AcceptedSocket, room_id: str, client_id: str, code: int, reason: str) -> None:
    """Close a socket that cannot join its room; log it unless the server is stopping."""
    reason = close_reason(reason)
    if code not in NORMAL_CLOSE_CODES:
        log_event(
            logging.WARNING,
            "join_refused",
            "refused client %r in room %r: %s (%d)",
            client_id,
            room_id,
            reason,
            code,
            room=room_id,
            client=client_id,
            code=code,
            reason=reason,
        )
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 5.0
        await ws.aclose(code, reason)
