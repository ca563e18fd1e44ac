"""What the client raises: one base class, and a subclass per way things end."""

from __future__ import annotations


class ClientError(Exception):
    """Every error of :mod:`canvas_store_trio.client`."""


class VersionMismatch(ClientError):
    """The server speaks another protocol version. Reconnecting cannot fix it."""

    def __init__(self, server_version: object) -> None:
        super().__init__(
            f"the server speaks protocol version {server_version!r}; this client speaks 2"
        )
        self.server_version = server_version


class PatchRefused(ClientError):
    """An edit was refused whole: nothing of it was applied, and it is not sent again.

    ``code`` is the server's stable error code (``too-deep``, ``invalid-component``, ...,
    the same codes the server's ``error`` frames carry); an edit that this client can tell
    is bad is refused with the same code before it is sent.
    """

    def __init__(self, code: str, message: str, message_id: str | None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.message_id = message_id


class ServerClosed(ClientError):
    """The server ended the session in a way that reconnecting cannot fix.

    ``code`` and ``reason`` are the WebSocket close frame's (1008: refused, such as a
    refused token; 1009: a frame too big). When the server refused the HTTP upgrade
    itself, ``code`` is None and ``status`` is the HTTP status.
    """

    def __init__(self, code: int | None, reason: str, status: int | None = None) -> None:
        shown = f"HTTP {status}" if code is None else f"code {code}"
        super().__init__(f"the server closed the connection ({shown}): {reason or 'no reason'}")
        self.code = code
        self.reason = reason
        self.status = status


class ClientTimeout(ClientError, TimeoutError):
    """The server did not answer in time: no sync within ``timeout``, or no ack."""


class UpdatesOverflow(ClientError):
    """An :meth:`~canvas_store_trio.client.Client.updates` reader fell too far behind."""


class ClientClosed(ClientError):
    """The client's ``async with`` block has ended: it sends and waits for nothing more."""
