"""One client's session in a room: who it is, what it may do, and its outbox."""

from __future__ import annotations

import collections
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, cast, runtime_checkable

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._logs import log_event
from ..transport._handshake import MessageSocket
from ._stats import Stats

Permissions = Literal["readwrite", "readonly"]
"""What a session may do: ``readwrite`` edits; ``readonly`` edits are acked but not applied."""


@runtime_checkable
class RawWriter(Protocol):
    """A socket that frames payloads itself and can write without waiting (``WireSocket``)."""

    @property
    def unsent_bytes(self) -> int: ...

    def frame_text(self, payloads: list[bytes]) -> bytes: ...

    def write_nowait(self, data: bytes) -> bool: ...

    async def write(self, data: bytes) -> None: ...


@runtime_checkable
class PushSocket(Protocol):
    """A socket that calls back with each message instead of being asked (``WireSocket``).

    ``deliver_messages`` runs until the connection ends, like a ``get_message`` loop,
    and calls ``after_messages`` once a batch of messages has been delivered, and before
    it waits for more.
    """

    async def deliver_messages(
        self,
        on_message: Callable[[str | bytes], None],
        after_messages: Callable[[], None] = ...,
    ) -> None: ...


PERMISSIONS: tuple[Permissions, ...] = ("readwrite", "readonly")


def check_permissions(value: object) -> Permissions:
    """``value`` if it is ``"readonly"`` or ``"readwrite"``; else a ValueError naming both."""
    if value == "readwrite" or value == "readonly":
        return value
    raise ValueError(f"permissions must be 'readonly' or 'readwrite', not {value!r}")


def implements(obj: object, protocol: type) -> bool:
    """``isinstance(obj, protocol)`` for a runtime-checkable Protocol, decided for the
    first object of each class and remembered: the plain check walks the protocol's
    members every time (tens of microseconds, paid per connection and per save). Our
    protocols are met by a class's methods, never by one instance's attributes."""
    key = (type(obj), protocol)
    known = _implements.get(key)
    if known is None:
        known = _implements[key] = isinstance(obj, protocol)
    return known


_implements: dict[tuple[type, type], bool] = {}


@attrs.frozen
class SessionInfo:
    """What :meth:`Room.get_sessions` reports about one session."""

    session_id: str
    client_id: str
    permissions: Permissions
    metadata: Any = None


@attrs.frozen
class AuthorizeResult:
    """What an ``authorize`` hook returns: the session's permissions and its metadata.

    A plain mapping with the same keys (``{"permissions": ..., "metadata": ...}``) is
    accepted too.
    """

    permissions: Permissions = attrs.field(converter=check_permissions)
    metadata: Any = None


class AuthorizeResultError(ValueError):
    """An ``authorize`` hook returned something that is not an :class:`AuthorizeResult`.

    That is a bug in the hook, not a refusal: the server logs it as an error.
    """


def as_authorize_result(value: object) -> AuthorizeResult:
    """Accept an :class:`AuthorizeResult` or a mapping with ``permissions`` (and maybe
    ``metadata``); raise :class:`AuthorizeResultError` saying what is allowed otherwise."""
    if isinstance(value, AuthorizeResult):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(str(key) for key in value if key not in ("permissions", "metadata"))
        if unknown:
            raise AuthorizeResultError(
                f"authorize returned unknown keys {unknown}; "
                "allowed: 'permissions' and 'metadata'"
            )
        if "permissions" not in value:
            raise AuthorizeResultError(
                "authorize returned no 'permissions': give 'readonly' or 'readwrite'"
            )
        try:
            return AuthorizeResult(value["permissions"], value.get("metadata"))
        except ValueError as exc:
            raise AuthorizeResultError(f"authorize returned bad {exc}") from None
    raise AuthorizeResultError(
        f"authorize must return an AuthorizeResult or a mapping, not {value!r}"
    )


TokenRefresh = Callable[[str], Awaitable[AuthorizeResult]]
"""Checks a session's new token; raises to end the session."""


WRITE_ON_CLOSE_TIMEOUT = 5.0
"""Seconds a write under way when the session closes normally (1000, 1001) may still take."""


class Session:
    """A connected client, as the room sees it, and its outbox.

    The room never waits on a session. It calls :meth:`send`, which queues the frame
    and returns at once, and then :meth:`flush_nowait` (through the room's pending
    list), which writes the queue straight to the socket when the kernel takes it, with
    no task switch. What the socket cannot take now is sent by :meth:`run_writer`, the
    session's writer task, started the first time it is needed. A session whose queue
    outgrows ``outbox_max_bytes`` is closed (1008) rather than buffered without bound.
    :meth:`close` may be called from anywhere and more than once: it records the first
    close code and cancels the session's tasks, whose clean-up sends the close frame.
    """

    def __init__(
        self,
        socket: MessageSocket,
        room_id: str,
        client_id: str,
        permissions: Permissions,
        metadata: Any,
        *,
        outbox_max_bytes: int,
        pending: list[Session],
        stats: Stats | None = None,
        refresh: TokenRefresh | None = None,
    ) -> None:
        self.session_id = str(uuid.uuid4())
        self.socket = socket
        self.room_id = room_id
        self.client_id = client_id
        self.permissions: Permissions = permissions
        self.metadata = metadata
        self.refresh = refresh
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
        self.outbox_max_bytes = outbox_max_bytes
        self._pending = pending
        self._stats = stats or Stats()
        self._flush_queued = False
        self._raw = cast(RawWriter, socket) if implements(socket, RawWriter) else None
        self._outbox_ready = trio.Event()
        self._writer_started = False
        self.close_code: int | None = None
        self.held_ack = 0
        """With durable acks: the number of the room's held frames with this session's
        last ack (0: none yet), so that its later replies queue behind it."""
        self.close_reason = ""
        self.cancel_scope = trio.CancelScope()
        self._write_scope: trio.CancelScope | None = None
        """Shields the writer's write under way: a close ends it (see :meth:`close`)."""
        self.nursery: trio.Nursery | None = None
        self.pinging = False
        """A keep-alive ping is waiting for its pong (the room sends one at a time)."""
        self.refused: collections.deque[float] = collections.deque()
        self.rate_tokens = math.inf
        self.rate_checked = 0.0

    def info(self) -> SessionInfo:
        return SessionInfo(self.session_id, self.client_id, self.permissions, self.metadata)

    def log_fields(self, **fields: Any) -> dict[str, Any]:
        """A log line's fields about this session: who it is, its close code and reason
        (unless ``fields`` say otherwise), and ``fields``."""
        return {
            "room": self.room_id,
            "session": self.session_id,
            "client": self.client_id,
            "code": self.close_code,
            "reason": self.close_reason or None,
            **fields,
        }

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def send(self, frame: bytes) -> None:
        """Queue a frame without waiting. Close the session if it cannot keep up."""
        if self.close_code is not None:
            return
        if not self._flush_queued:  # the first frame of this room step
            backlog = self.outbox_bytes + (self._raw.unsent_bytes if self._raw else 0)
            if backlog >= self.outbox_max_bytes:
                self.close(1008, "too slow: outbox full")
                self._stats.slow_client_closes += 1
                log_event(
                    logging.WARNING,
                    "slow_client",
                    "room %r: client %r closed: too slow (%d bytes waiting to be sent)",
                    self.room_id,
                    self.client_id,
                    backlog,
                    **self.log_fields(),
                )
                return
            self._flush_queued = True
            self._pending.append(self)
        self.outbox.append(frame)
        size = len(frame)
        self.outbox_bytes += size
        self._stats.bytes_sent += size

    def _take_outbox(self) -> list[bytes]:
        frames, self.outbox = self.outbox, []
        self.outbox_bytes = 0
        return frames

    def flush_nowait(self) -> None:
        """Write the queue now if the socket takes it; else leave it to the writer task."""
        self._flush_queued = False
        if not self.outbox:
            return
        if self._raw is None:
            self._wake_writer()
            return
        try:
            if not self._raw.write_nowait(self._raw.frame_text(self._take_outbox())):
                self._wake_writer()
        except ConnectionClosed:
            self.close(1006, "")

    def start(self, nursery: trio.Nursery) -> None:
        """Run the session's tasks in ``nursery`` from now on (the room's ``serve``
        does this once the session has joined, and sets :attr:`nursery` back to None as
        the nursery closes)."""
        self.nursery = nursery
        if self._outbox_ready.is_set():
            self._wake_writer()

    def _wake_writer(self) -> None:
        """Hand the queue to :meth:`run_writer`, started the first time it is needed:
        most sessions' sockets take every write at once, and never need one."""
        self._outbox_ready.set()
        if not self._writer_started and self.nursery is not None:
            self._writer_started = True
            self.nursery.start_soon(self.run_writer)

    async def run_writer(self) -> None:
        """Send whatever :meth:`flush_nowait` could not, until cancelled or disconnected."""
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready = trio.Event()
                # A write under way is not cut by the session's cancellation: its bytes
                # would be lost, or half a frame sent. :meth:`close` bounds it.
                with trio.CancelScope(shield=True) as self._write_scope:
                    await self.drain()
                self._write_scope = None
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            self.close(1006, "")

    async def drain(self) -> None:
        """Send everything queued, waiting for the socket as long as it takes."""
        if self._raw is not None:
            await self._raw.write(self._raw.frame_text(self._take_outbox()))
            return
        # One at a time, each dropped only once sent: a writer cancelled midway (the
        # session closing) leaves the rest for the close's own drain.
        outbox = self.outbox
        while outbox:
            await self.socket.send_message(outbox[0].decode())
            self.outbox_bytes -= len(outbox.pop(0))

    def close(self, code: int, reason: str) -> None:
        """End the session with this close code (the first call wins)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if self._write_scope is not None:
            if self.close_code in (1000, 1001):  # the close drains: the write may finish
                deadline = trio.current_time() + WRITE_ON_CLOSE_TIMEOUT
                self._write_scope.deadline = min(self._write_scope.deadline, deadline)
            else:
                self._write_scope.cancel()
        self.cancel_scope.cancel()

    def check_rate(self, rate: float | None, burst: int) -> bool:
        """Take one frame from the token bucket; False when the session is over its rate."""
        if rate is None:
            return True
        now = trio.current_time()
        tokens = min(float(burst), self.rate_tokens + (now - self.rate_checked) * rate)
        self.rate_checked = now
        if tokens < 1.0:
            self.rate_tokens = tokens
            return False
        self.rate_tokens = tokens - 1.0
        return True

    def note_refused(self, limit: int, window: float) -> bool:
        """Count a refused frame; True when the session is over ``limit`` in ``window``."""
        now = trio.current_time()
        self.refused.append(now)
        while self.refused and self.refused[0] < now - window:
            self.refused.popleft()
        return len(self.refused) > limit


NORMAL_CLOSE_CODES = frozenset((1000, 1001, 1005))
"""Close codes of an end nobody needs to hear about: done, going away, no code."""


def log_connection_closed(
    closed: CloseReason, room: str, client: str, session: str | None = None
) -> None:
    """Log an end that the client or the transport chose, unless its code is normal."""
    if closed.code in NORMAL_CLOSE_CODES:
        return
    log_event(
        logging.INFO if closed.code == 1006 else logging.WARNING,
        "connection_closed",
        "room %r: client %r connection closed: %s (%d)",
        room,
        client,
        closed.reason or "no reason given",
        closed.code,
        room=room,
        session=session,
        client=client,
        code=closed.code,
        reason=closed.reason or None,
    )


def close_reason(text: str) -> str:
    """A WebSocket close reason: at most 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."
