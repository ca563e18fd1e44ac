"""Forwarding a WebSocket upgrade to another server: replay its head, then splice bytes.

A cluster node that does not own a room hands the connection to the node that does
(:meth:`~canvas_store_trio.transport.HandshakeRequest.forward`). Nothing is parsed on
the way: the upgrade's head is sent again with a few headers added (the loop marker
:data:`FORWARDED_HEADER`, and ``X-Forwarded-For``), then bytes are copied both ways
as they come, each direction waiting for the other side to take them (backpressure).
Either transport can forward, since nothing of the WebSocket has begun yet.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping

import trio

from ._poller import ReadPoller

FORWARDED_HEADER = "X-Canvas-Store-Forwarded"
"""Added to a forwarded upgrade (its value: the forwarding node's id). A node never
forwards a request that carries it, so no forwarding loop can form: a node that gets
one for a room another node owns closes it with 1013, and the client retries."""

FORWARD_TIMEOUT = 2.0
"""Seconds the owner has to accept the TCP connection and start its answer. A node that
cannot be reached, or is paused (the kernel accepts for it, nothing answers), is given
up on, and the client is told to try again (1013) while the request is still ours."""

CHUNK_SIZE = 65536
"""Bytes read from one side at a time before they are written to the other."""

DRAIN_TIMEOUT = 2.0
"""Seconds the owner gets to finish after the client has sent its EOF."""


class ForwardingError(Exception):
    """The owner could not be reached, or did not answer in time. The request has not
    been answered: the caller may still accept or reject it."""


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port)``; ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port address: {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def with_headers(head: bytes, headers: Mapping[str, str]) -> bytes:
    """A request head (ending in a blank line) with ``headers`` added at its end."""
    if any(ch in text for item in headers.items() for text in item for ch in "\r\n"):
        raise ValueError("a forwarded header must not contain a line break")
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head[:-2] + lines.encode("latin-1") + b"\r\n"


async def forward_upgrade(
    stream: trio.SocketStream,
    head: bytes,
    rest: bytes,
    address: str,
    headers: Mapping[str, str],
    answered: Callable[[], None],
    *,
    poller: ReadPoller | None = None,
) -> None:
    """Send the upgrade (``head`` with ``headers``, then ``rest``, the bytes that came
    after it) to ``address`` and splice ``stream`` with the answer until either ends.

    Raises :class:`ForwardingError` (having written nothing to ``stream``) if the owner
    cannot be reached or sends nothing within :data:`FORWARD_TIMEOUT`; ``answered`` is
    called once its first bytes are in, before they are passed on. From then on nothing
    is raised but Cancelled: when the owner closes, the splice ends; when the client
    sends EOF, the owner gets EOF too and :data:`DRAIN_TIMEOUT` to finish. The caller
    closes ``stream``; the connection to the owner is closed here, cancelled or not.
    With ``poller`` (the wire transport's), the bytes are copied in its task.
    """
    request = with_headers(head, headers) + rest
    upstream: trio.SocketStream | None = None
    try:
        host, port = split_address(address)
        with trio.fail_after(FORWARD_TIMEOUT):
            upstream = await trio.open_tcp_stream(host, port)
            await upstream.send_all(request)
            first = await upstream.receive_some(CHUNK_SIZE)
    except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        if upstream is not None:
            await trio.aclose_forcefully(upstream)
        why = "did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
        raise ForwardingError(f"cannot forward to {address}: {why}") from None
    async with upstream:
        if not first:
            raise ForwardingError(f"cannot forward to {address}: it closed the connection")
        answered()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(first)
        await _splice(stream, upstream, poller)


async def _splice(
    client: trio.SocketStream, upstream: trio.SocketStream, poller: ReadPoller | None
) -> None:
    client_fd, upstream_fd = client.socket.fileno(), upstream.socket.fileno()
    async with trio.open_nursery() as nursery:

        async def owner_to_client() -> None:
            await _copy(upstream_fd, client_fd, poller)
            nursery.cancel_scope.cancel()  # the owner has finished: so has the splice

        async def client_to_owner() -> None:
            if await _copy(client_fd, upstream_fd, poller):
                with contextlib.suppress(OSError, trio.ClosedResourceError):
                    await upstream.send_eof()
            nursery.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT

        nursery.start_soon(owner_to_client)
        nursery.start_soon(client_to_owner)


async def _copy(source: int, target: int, poller: ReadPoller | None) -> bool:
    """Copy bytes from one socket to another as they come; True at the source's EOF,
    False if either side broke. Raw reads and writes on the descriptors, as the wire
    transport's reader does.

    With ``poller``, the copying runs in the poller's task, woken once for every ready
    socket of a batch: this task sleeps until the target cannot take a chunk at once,
    the source ends, or either breaks, and then waits for that itself. Without one, it
    waits for each chunk in turn."""
    unsent = b""
    ended = False

    def move() -> bool:
        """In the poller's task: pass on what the source has; False once this task
        must take over (``unsent`` left, or ``ended``)."""
        nonlocal unsent, ended
        try:
            data = os.read(source, CHUNK_SIZE)
        except BlockingIOError:
            return True
        if not data:
            ended = True
            return False
        try:
            sent = os.write(target, data)
        except BlockingIOError:
            sent = 0
        unsent = data[sent:]
        return not unsent

    chunks = 0
    try:
        while True:
            if unsent:
                await _write_all(target, unsent)
                unsent = b""
            if ended:
                return True
            if poller is not None and await poller.wait(source, move):
                continue
            try:  # no poller, or it has stopped
                data = os.read(source, CHUNK_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(source)
                continue
            if not data:
                return True
            await _write_all(target, data)
            chunks += 1
            if chunks % 64 == 0:  # a source that never runs dry still lets others run
                await trio.lowlevel.checkpoint()
    except (OSError, trio.ClosedResourceError):
        return False


async def _write_all(target: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(target, view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(target)
