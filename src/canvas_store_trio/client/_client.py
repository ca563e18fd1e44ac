"""The client: one room over one WebSocket at a time, reconnecting as the npm client does.

Frames are handled as they arrive, in the task that reads them, and never wait: the
document, the presence and the acks change only there. Sending is another task's job,
one per connection, fed by a channel, so ``patch()`` does no I/O and cancelling it never
cuts a frame in half.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import orjson
import trio
import trio_websocket

from .._document import Document, EphemeralState, Patch, Record
from .._protocol import (
    PROTOCOL_VERSION,
    Limits,
    PatchMessage,
    ProtocolError,
    encode,
    parse_client_frame,
)
from ._errors import (
    ClientClosed,
    ClientError,
    ClientTimeout,
    PatchRefused,
    ServerClosed,
    VersionMismatch,
)
from ._updates import Update, UpdateFeed, UpdateReader

CLOSE_TIMEOUT: Final = 5.0
"""Seconds the client waits for the server's answer to its close frame."""

RETRIED_CLOSE_CODES: Final = frozenset({1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014})
"""Closes after which the client reconnects: a restart, a crash, a room that could not be
loaded or a full server may be gone next time. Any other close (1008 refused, 1009 too
big, ...) raises :class:`ServerClosed`."""

_OTHERS: Final = ""
"""The key of everyone else's presence, merged, in the client's ``EphemeralState`` (the
server sends it merged, and client ids are never empty)."""

Outbox = trio.MemorySendChannel[str]


@attrs.define(eq=False)
class _Edit:
    """One ``patch`` frame, from ``patch()`` until its ack or refusal."""

    message_id: str
    frame: str
    document: Sequence[Patch]
    done: trio.Event = attrs.field(factory=trio.Event)
    timestamp: int = 0
    error: ClientError | None = None

    def settle(self, timestamp: int = 0, error: ClientError | None = None) -> None:
        self.timestamp, self.error = timestamp, error
        self.done.set()


class Client:
    """One client of one room; made by :func:`connect`, which owns its socket and task.

    ``document`` and ``presence`` are live read-only views: do not change them, edit
    with :meth:`patch`.
    """

    def __init__(
        self,
        url: str,
        *,
        room_id: str,
        client_id: str | None,
        token: str | None,
        timeout: float | None,
        backoff: tuple[float, float],
        max_message_size: int,
        updates_buffer: int,
    ) -> None:
        self.url = url
        self.room_id = room_id
        self.client_id = client_id or str(uuid.uuid4())
        self.timeout = timeout
        self._token = token
        self._backoff = backoff
        self._max_message_size = max_message_size
        self._document = Document()
        self._ephemeral = EphemeralState()  # ours under client_id, the others' under _OTHERS
        self._unacked: dict[str, _Edit] = {}
        self._sent = 0  # messageIds given out: `<clientId>-<n>`, as the npm client counts
        self._outbox: Outbox | None = None  # the current connection's
        self._in_sync = False  # whether patch() may write to that outbox
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._feed = UpdateFeed(updates_buffer)
        self._problem = "the server did not answer"  # why the last connection ended
        self._closed = False
        self._on_first_sync: trio.TaskStatus[None] | None = None
        self._sync_scope = trio.CancelScope()  # its deadline: `timeout` after losing sync
        self._task_scope = trio.CancelScope()  # the background task's; see _on_synced

    # --- what the app reads --------------------------------------------------------------

    @property
    def document(self) -> Mapping[str, Record]:
        """The room's document as this client knows it: key -> record.

        It holds what the server has sent and this client's own edits once they are
        acked, applied in the server's order with the server's rules (buffer deltas,
        tombstones), so it converges to the server's state. A deleted key stays as
        ``{"_exists": False}``, as on the server.
        """
        return self._document.state

    @property
    def timestamp(self) -> int:
        """The room timestamp this client has seen (what it reconnects with)."""
        return self._document.timestamp

    @property
    def presence(self) -> Mapping[str, Record]:
        """Every other client's ephemeral state (cursors, selections), merged: key -> record.

        Emptied when the connection is lost; the server sends it again on reconnect.
        """
        return self._ephemeral.by_client.get(_OTHERS, {})

    def updates(self) -> AsyncIterator[Update]:
        """Iterate over the changes others make from now on, in the server's order.

        Each call makes a new iterator. It ends when the client closes; a reader that falls
        more than ``updates_buffer`` updates behind gets
        :class:`~canvas_store_trio.client.UpdatesOverflow`. Your own edits are not in it.
        """
        return UpdateReader(self._feed)

    # --- what the app does ---------------------------------------------------------------

    async def patch(self, patch: Patch, *, ephemeral: Patch | None = None) -> int:
        """Send one edit and return the room timestamp of its ack.

        ``patch`` is one ``documentPatches`` entry (key -> fields, with ``_exists`` and
        buffer deltas), ``ephemeral`` this client's presence change. An edit this client
        can tell is bad raises :class:`PatchRefused` at once; one the server refuses
        raises it when the refusal comes. While disconnected the edit waits, and it is
        sent again after each reconnect until acked. It enters :attr:`document` with its
        ack, unless the session is readonly (then it is acked, but nothing changes).

        Waits at most ``timeout`` for the ack (:class:`ClientTimeout`). A timeout or a
        cancellation only stops the wait: the edit stays queued and is still applied
        once the server acks it.
        """
        edit = self._queue(patch, ephemeral)
        if edit is None:  # nothing to send: the server would not even ack it
            await trio.lowlevel.checkpoint()
            return self.timestamp
        with self._bounded(f"ack for {edit.message_id}"):
            await edit.done.wait()
        if edit.error is not None:
            raise edit.error
        return edit.timestamp

    async def refresh_auth(self, token: str) -> None:
        """Use ``token`` from now on: send ``auth-refresh`` on the open connection, and
        put it in the URL of every later reconnect.

        The server answers nothing; if its authorize hook refuses the token, it closes
        the session with 1008 and ``connect()``'s block raises :class:`ServerClosed`.
        """
        self._check_open()
        self._token = token
        if self._outbox is not None:
            self._outbox.send_nowait(_text({"type": "auth-refresh", "token": token}))
        await trio.lowlevel.checkpoint()

    def _queue(self, patch: Patch, ephemeral: Patch | None) -> _Edit | None:
        self._check_open()
        self._sent += 1
        message_id = f"{self.client_id}-{self._sent}"
        frame: dict[str, Any] = {"type": "patch", "messageId": message_id}
        if patch:
            frame["documentPatches"] = [patch]
        if ephemeral:
            frame["ephemeralPatches"] = [ephemeral]
        if len(frame) == 2:
            return None
        text = _text(frame)
        try:  # checked as our server checks a frame; the parsed copy is what enters the
            message = parse_client_frame(text, Limits())  # document, not the caller's dict
        except ProtocolError as exc:
            raise PatchRefused(exc.code, exc.message, message_id) from None
        assert isinstance(message, PatchMessage)
        self._ephemeral.apply(self.client_id, message.ephemeral_patches)
        edit = self._unacked[message_id] = _Edit(message_id, text, message.document_patches)
        if self._in_sync and self._outbox is not None:
            self._outbox.send_nowait(text)
        return edit

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed: its async with block has ended")

    @contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        if self.timeout is None:
            yield
            return
        try:
            with trio.fail_after(self.timeout):
                yield
        except trio.TooSlowError:
            raise ClientTimeout(f"no {what} within {self.timeout} s") from None

    # --- the connection, over and over -----------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect with backoff, until cancelled or something is fatal."""
        self._on_first_sync = task_status
        delay = self._backoff[0]
        with self._task_scope, self._sync_scope:
            if self.timeout is not None:
                self._sync_scope.deadline = trio.current_time() + self.timeout
            while not self._closed:
                was_in_sync = await self._connect_once()
                if was_in_sync:
                    delay = self._backoff[0]
                await trio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
        if self._task_scope.cancel_called or self._closed:
            return
        raise ClientTimeout(
            f"could not sync with {self.url} (room {self.room_id!r}) within "
            f"{self.timeout} s: {self._problem}"
        )

    def _lose_sync(self) -> None:
        if self._in_sync and self.timeout is not None:  # from now on, `timeout` to get back
            self._sync_scope.deadline = trio.current_time() + self.timeout
        self._in_sync = False
        self._outbox = self._ws = None
        gone = self._ephemeral.remove(_OTHERS)
        if gone:  # as the npm client: others' presence goes with the connection
            self._feed.push(Update(_OTHERS, None, presence=(gone,)))

    async def _connect_once(self) -> bool:
        """One connection, handshake to close; return whether it got in sync.

        Raises what reconnecting cannot fix; anything else is noted in ``_problem``.
        """
        fatal: ClientError | None = None
        try:
            async with trio_websocket.open_websocket_url(
                self._connect_url(),
                max_message_size=self._max_message_size,
                receive_buffer_size=1 << 16,
                disconnect_timeout=min(CLOSE_TIMEOUT, self.timeout or CLOSE_TIMEOUT),
            ) as ws:
                self._ws = ws
                self._outbox, frames = trio.open_memory_channel[str](math.inf)
                self._outbox.send_nowait(self._reconnect_frame(self.timestamp))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, ws, frames)
                    nursery.start_soon(self._keep_alive, ws, nursery.cancel_scope)
                    fatal = await self._read(ws)
                    nursery.cancel_scope.cancel()
        except trio_websocket.ConnectionRejected as exc:
            status = exc.status_code or 0
            if 400 <= status < 500 and status not in (408, 429):
                raise ServerClosed(None, f"the handshake was refused: {exc}", status) from None
            self._problem = f"the handshake was refused: {exc}"
        except trio_websocket.HandshakeError as exc:
            if self._ws is None:  # not a close that timed out: the connection never opened
                self._problem = f"could not connect: {exc.__cause__ or exc}"
        if fatal is not None:
            raise fatal
        was_in_sync = self._in_sync
        self._lose_sync()
        return was_in_sync

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> ClientError | None:
        """Handle frames until the socket closes (None) or one is fatal (returned)."""
        while True:
            try:
                text = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                closed = exc.reason
                code, reason = (closed.code, closed.reason or "") if closed else (1006, "")
                if code not in RETRIED_CLOSE_CODES and not self._closed:
                    return ServerClosed(code, reason)
                self._problem = f"the connection closed ({f'{code} {reason}'.strip()})"
                return None
            try:
                self._handle(text)
            except ClientError as exc:
                return exc

    async def _write(
        self, ws: trio_websocket.WebSocketConnection, frames: trio.MemoryReceiveChannel[str]
    ) -> None:
        try:
            async for text in frames:
                await ws.send_message(text)
        except trio_websocket.ConnectionClosed:
            pass  # the reader sees it too

    async def _keep_alive(
        self, ws: trio_websocket.WebSocketConnection, connection: trio.CancelScope
    ) -> None:
        """Ping every ``timeout / 2`` s; a pong missing for as long drops the connection.

        A network that dies without a word (no FIN, no RST) would otherwise leave the
        client waiting for ever.
        """
        if self.timeout is None:
            return
        while True:
            await trio.sleep(self.timeout / 2)
            with trio.move_on_after(self.timeout / 2) as waited:
                try:
                    await ws.ping()
                except trio_websocket.ConnectionClosed:
                    return
            if waited.cancelled_caught:
                self._problem = f"no pong within {self.timeout / 2} s"
                connection.cancel()
                return

    def _connect_url(self) -> str:
        """The URL with ``roomId``, ``clientId`` and ``token`` set, as the npm client sets
        them (any other query parameter is kept)."""
        parts = urlsplit(self.url)
        ours = {"roomId": self.room_id, "clientId": self.client_id}
        if self._token:
            ours["token"] = self._token
        query = [
            (name, value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            if name not in ("roomId", "clientId", "token")
        ]
        return urlunsplit(parts._replace(query=urlencode([*query, *ours.items()])))

    def _reconnect_frame(self, last_timestamp: int) -> str:
        """The npm client's first frame; its own presence goes with it. Unacked edits go
        after ``synced``, each in its own frame, so each gets its ack."""
        frame: dict[str, Any] = {
            "type": "reconnect",
            "lastTimestamp": last_timestamp,
            "protocolVersion": PROTOCOL_VERSION,
        }
        mine = self._ephemeral.by_client.get(self.client_id)
        if mine:
            frame["ephemeralPatches"] = [mine]
        return _text(frame)

    # --- server frames ---------------------------------------------------------------------

    def _handle(self, text: str | bytes) -> None:
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            return  # as the npm client does
        if type(frame) is not dict:
            return
        match frame.get("type"):
            case "patch":
                self._on_patch(frame)
            case "ack":
                self._on_ack(frame.get("messageId"), _int(frame.get("timestamp")))
            case "synced":
                self._on_synced(_int(frame.get("timestamp")))
            case "resync":
                self._on_resync(_int(frame.get("since")))
            case "error":
                self._on_error(frame)
            case "version-mismatch":
                raise VersionMismatch(frame.get("serverProtocolVersion"))

    def _on_patch(self, frame: dict[str, Any]) -> None:
        document = frame.get("documentPatches") or ()
        presence = frame.get("ephemeralPatches") or ()
        timestamp = frame.get("timestamp")
        if type(timestamp) is not int:
            timestamp, document = None, ()
        else:
            self._apply(document, timestamp)
        self._ephemeral.apply(_OTHERS, presence)
        if document or presence:
            client_id = frame.get("clientId")
            self._feed.push(Update(
                client_id if type(client_id) is str else "", timestamp,
                tuple(document), tuple(presence),
            ))

    def _apply(self, patches: Sequence[Patch], timestamp: int) -> None:
        """Apply patches the server applied at ``timestamp``, with its field timestamps."""
        self._document.timestamp = timestamp - 1  # Document.apply stamps timestamp + 1
        self._document.apply(patches)
        self._document.timestamp = timestamp

    def _on_ack(self, message_id: object, timestamp: int) -> None:
        edit = self._unacked.pop(message_id, None) if type(message_id) is str else None
        if timestamp > self.timestamp:  # the room moved on: the edit was applied
            if edit is not None:
                self._apply(edit.document, timestamp)
            else:  # a resync answer, which holds what the document already has
                self._document.timestamp = timestamp
        if edit is not None:
            edit.settle(timestamp)

    def _on_synced(self, timestamp: int) -> None:
        self._document.timestamp = timestamp
        if self._in_sync or self._outbox is None:
            return  # the second catch-up after a resync
        for edit in self._unacked.values():  # in the order patch() queued them
            self._outbox.send_nowait(edit.frame)
        self._in_sync = True
        self._sync_scope.deadline = math.inf
        if self._on_first_sync is not None:
            self._on_first_sync.started()
            self._on_first_sync = None
            # From now on only leaving the block ends this task (_close), so the close
            # handshake can finish even when the block is cancelled from outside.
            self._task_scope.shield = True

    def _on_resync(self, since: int) -> None:
        """The server went back in time (it restarted from an older save).

        As the npm client, send it every field known to be newer than ``since``. Then
        catch up from scratch: edits others made since the restart may have timestamps
        below ours, which a diff since ours would leave out.
        """
        if self._outbox is None:
            return
        diff = self._document.diff_since(since)
        if diff:
            self._sent += 1
            self._outbox.send_nowait(_text({
                "type": "patch",
                "messageId": f"{self.client_id}-resync-{self._sent}",
                "documentPatches": [diff],
            }))
        self._outbox.send_nowait(self._reconnect_frame(0))

    def _on_error(self, frame: dict[str, Any]) -> None:
        message_id = frame.get("messageId")
        error = PatchRefused(
            str(frame.get("code")),
            str(frame.get("message")),
            message_id if type(message_id) is str else None,
        )
        edit = self._unacked.pop(message_id, None) if type(message_id) is str else None
        if edit is None:  # not an edit of ours: a frame of this client's was refused
            raise error
        edit.settle(error=error)

    # --- the end -------------------------------------------------------------------------

    async def _close(self) -> None:
        """Close the socket with 1000, for at most ``CLOSE_TIMEOUT`` even when cancelled,
        and release every waiter."""
        self._closed = True
        self._feed.close()
        for edit in self._unacked.values():
            edit.settle(error=ClientClosed(f"the client closed before {edit.message_id} was acked"))
        if self._ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._ws.aclose(1000)
        self._task_scope.cancel()


def _text(frame: dict[str, Any]) -> str:
    return encode(frame).decode()


def _int(value: object) -> int:
    return value if type(value) is int else 0


@asynccontextmanager
async def connect(
    url: str,
    *,
    room_id: str,
    client_id: str | None = None,
    token: str | None = None,
    timeout: float | None = 30.0,
    backoff: tuple[float, float] = (0.5, 10.0),
    max_message_size: int = 2**30,
    updates_buffer: int = 10_000,
) -> AsyncIterator[Client]:
    """Join room ``room_id`` of the server at ``url`` (``ws://`` or ``wss://``).

    Speaks protocol v2 as the npm client ``@woven-ecs/canvas-store`` does: the same URL
    query (``roomId``, ``clientId``, ``token``), ``reconnect`` with ``lastTimestamp``
    first, answers to ``resync``, and reconnects after a lost connection, waiting
    ``backoff[0]`` seconds doubling to ``backoff[1]`` (0.5 to 10, the npm client's).
    ``client_id`` defaults to a new UUID. Edits not acked when a connection is lost are
    sent again, in order, once the client is back in sync.

    Entering waits until the client is in sync with the room (the document is loaded).
    ``timeout`` (seconds, None for ever) bounds every wait on the server: that first
    sync, each ``patch()``'s ack, a pong, and the time spent out of sync after a lost
    connection; past it, :class:`ClientTimeout` is raised.

    The block owns the socket and a background task that reads it. Leaving the block,
    by any way including cancellation, closes the socket with 1000 (waiting up to 5 s for
    the server's answer) and cancels the task; ``patch()`` calls still waiting in other
    tasks raise :class:`ClientClosed` and ``updates()`` iterators end. What reconnecting
    cannot fix ends the block with its exception: :class:`VersionMismatch`,
    :class:`ServerClosed` (a refused token, 1008), :class:`PatchRefused` for a refused
    frame that is not an edit, :class:`ClientTimeout`.
    """
    client = Client(
        url,
        room_id=room_id,
        client_id=client_id,
        token=token,
        timeout=timeout,
        backoff=backoff,
        max_message_size=max_message_size,
        updates_buffer=updates_buffer,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client._close()
    except BaseExceptionGroup as group:
        _raise_alone(group)


def _raise_alone(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one exception a (nested) group holds, as if no nursery had wrapped it
    (its own context kept); raise the group itself if it holds more."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if error is group:
        raise group
    context = error.__context__
    try:
        raise error
    finally:
        error.__context__ = context
