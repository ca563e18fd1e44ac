"""A room without a network: an in-memory socket pair, and a client that speaks in frames."""

from __future__ import annotations

import math
from typing import Any

import orjson
import trio
from trio_websocket import CloseReason, ConnectionClosed

from ..transport._handshake import MessageSocket

Frame = dict[str, Any]


class _Link:
    """What the two ends of a pair share: how the connection ended, once it has."""

    def __init__(self) -> None:
        self.closed: CloseReason | None = None


class MemorySocket:
    """One end of :func:`memory_socket_pair`: trio-websocket's message API in memory.

    Messages arrive in order and are never lost. Either end may close, once: both ends
    then report the same :attr:`closed` (the code and reason of the end that closed
    first). The other end still gets the messages that were sent before the close, then
    :class:`trio_websocket.ConnectionClosed`; the end that closed gets it at once. Every
    method is a checkpoint. Cancelling a ``get_message`` loses no message; with a bounded
    ``buffer``, a cancelled ``send_message`` sent nothing.
    """

    def __init__(
        self,
        link: _Link,
        send: trio.MemorySendChannel[str | bytes],
        receive: trio.MemoryReceiveChannel[str | bytes],
    ) -> None:
        self._link = link
        self._send = send
        self._receive = receive

    @property
    def closed(self) -> CloseReason | None:
        """None while open; then the close code and reason, as on trio-websocket."""
        return self._link.closed

    async def get_message(self) -> str | bytes:
        """The next message; ConnectionClosed once the peer's messages ran out after a close."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(self._link.closed) from None

    async def send_message(self, message: str | bytes) -> None:
        """Queue a message for the peer; ConnectionClosed once either end has closed."""
        if self._link.closed is not None:
            await trio.lowlevel.checkpoint()
            raise ConnectionClosed(self._link.closed)
        try:
            await self._send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self._link.closed) from None

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close both directions with ``code`` and ``reason``. A no-op once closed."""
        await trio.lowlevel.checkpoint()
        if self._link.closed is None:
            self._link.closed = CloseReason(code, reason)
        self._send.close()  # the peer reads what was sent, then the close
        self._receive.close()  # this end reads nothing more

    async def ping(self, payload: bytes | None = None) -> None:
        """The peer answers at once: returns while open, else ConnectionClosed."""
        await trio.lowlevel.checkpoint()
        if self._link.closed is not None:
            raise ConnectionClosed(self._link.closed)


def memory_socket_pair(buffer: float = math.inf) -> tuple[MemorySocket, FrameClient]:
    """A connected pair with no network: ``(server_side, client)``.

    ``server_side`` is a :class:`~canvas_store_trio.MessageSocket` for
    ``room.serve(server_side, client_id=...)`` or ``manager.serve(server_side, room_id,
    client_id=...)``, run in a nursery of the test's; ``client`` is a
    :class:`FrameClient` on the other end. ``buffer`` bounds the messages each
    direction holds (unbounded by default: the room never waits for a slow test).

    Whoever closes first sets the code both ends see: when the room ends a session
    (1008 for too many invalid frames, 1001 when it closes or ``serve`` is cancelled),
    ``await client.closed()`` returns that code and reason; ``await client.aclose()``
    ends the session as a client hanging up does. Nothing here needs closing
    otherwise: a pair holds no resource.
    """
    link = _Link()
    to_client_send, to_client_receive = trio.open_memory_channel[str | bytes](buffer)
    to_server_send, to_server_receive = trio.open_memory_channel[str | bytes](buffer)
    server_side = MemorySocket(link, to_client_send, to_server_receive)
    client_side = MemorySocket(link, to_server_send, to_client_receive)
    return server_side, FrameClient(client_side)


class FrameClient:
    """A client that speaks the wire protocol by hand: frames as dicts, both ways.

    It wraps any :class:`~canvas_store_trio.MessageSocket`: one end of
    :func:`memory_socket_pair`, or a trio-websocket connection (what
    ``RunningServer.connect`` opens). Every ``receive`` is bounded by ``timeout`` (a
    ``trio.TooSlowError`` rather than a hang).
    """

    def __init__(self, socket: MessageSocket) -> None:
        self.socket = socket

    async def send(self, **frame: Any) -> None:
        """Send ``frame`` (``client.send(type="patch", messageId=1, documentPatches=[...])``)."""
        await self.socket.send_message(orjson.dumps(frame).decode())

    async def send_raw(self, data: str | bytes) -> None:
        """Send a message as it is: any text (a frame encoded by hand, garbage) or bytes."""
        await self.socket.send_message(data)

    async def reconnect(self, last_timestamp: int = 0, **extra: Any) -> list[Frame]:
        """Send ``reconnect`` and return every frame up to and including ``synced``."""
        await self.send(type="reconnect", lastTimestamp=last_timestamp, protocolVersion=2,
                        **extra)
        return await self.receive_until("synced")

    async def receive(self, timeout: float = 5.0) -> Frame:
        """The next frame, parsed."""
        with trio.fail_after(timeout):
            frame: Frame = orjson.loads(await self.socket.get_message())
            return frame

    async def receive_until(self, kind: str, timeout: float = 5.0) -> list[Frame]:
        """Every frame up to and including the next of type ``kind``."""
        frames = []
        while True:
            frame = await self.receive(timeout)
            frames.append(frame)
            if frame["type"] == kind:
                return frames

    async def drain(self, quiet: float = 0.05) -> list[Frame]:
        """Every frame that arrives until none has for ``quiet`` seconds."""
        frames = []
        while True:
            with trio.move_on_after(quiet):
                frames.append(orjson.loads(await self.socket.get_message()))
                continue
            return frames

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Wait for the server to close the socket, skipping frames; return (code, reason)."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.socket.get_message()
            except ConnectionClosed as exc:
                if exc.reason is None:
                    return None, None
                return exc.reason.code, exc.reason.reason

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the socket, as a client that leaves."""
        await self.socket.aclose(code, reason)
