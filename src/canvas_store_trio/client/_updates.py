"""Remote changes as the client saw them, and the feed that ``Client.updates()`` reads."""

from __future__ import annotations

from collections import deque

import attrs
import trio

from .._document import Patch
from ._errors import UpdatesOverflow


@attrs.frozen
class Update:
    """One frame of changes made elsewhere, as the server sent it.

    ``client_id`` is who made them: ``""`` for the server's catch-up after a
    (re)connect (the diff since the client's timestamp, and the others' presence), and
    for the presence a lost connection takes away. ``timestamp`` is the room timestamp of
    the document patches, None when there are none. Patches are in the wire format
    (buffer deltas included); ``Client.document`` and ``Client.presence`` already
    include them when the update is read.
    """

    client_id: str
    timestamp: int | None
    document: tuple[Patch, ...] = ()
    presence: tuple[Patch, ...] = ()


class UpdateFeed:
    """The last ``size`` updates, read by any number of :class:`UpdateReader` s.

    Pushing never waits: a reader that falls more than ``size`` updates behind gets
    :class:`UpdatesOverflow` at its next read.
    """

    def __init__(self, size: int) -> None:
        self._log: deque[Update] = deque(maxlen=size)
        self._end = 0  # the number of updates ever pushed
        self._changed = trio.Event()
        self._closed = False

    def push(self, update: Update) -> None:
        self._log.append(update)
        self._end += 1
        self._wake()

    def close(self) -> None:
        """End every reader's iteration once it has read what is left."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def reader(self) -> UpdateReader:
        return UpdateReader(self)


class UpdateReader:
    """An async iterator over the updates pushed after it was made."""

    def __init__(self, feed: UpdateFeed) -> None:
        self._feed = feed
        self._next = feed._end

    def __aiter__(self) -> UpdateReader:
        return self

    async def __anext__(self) -> Update:
        feed = self._feed
        await trio.lowlevel.checkpoint()
        while self._next == feed._end:
            if feed._closed:
                raise StopAsyncIteration
            await feed._changed.wait()
        first = feed._end - len(feed._log)
        if self._next < first:
            behind, self._next = first - self._next, first
            raise UpdatesOverflow(
                f"this updates() reader fell {behind} updates behind "
                f"(the client keeps the last {feed._log.maxlen})"
            )
        update = feed._log[self._next - first]
        self._next += 1
        return update
