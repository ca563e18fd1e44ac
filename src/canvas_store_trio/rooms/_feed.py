"""A room's change feed: every accepted document edit, in timestamp order, for app code.

``Room.subscribe`` hands out a :class:`ChangeFeed`. The room pushes into it without ever
waiting: a feed is a bounded buffer, and a reader that falls behind it is cut off with
:class:`ChangeFeedOverflow` rather than slowing the room down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import attrs
import trio

from .._document import Patch


@attrs.frozen
class Change:
    """One accepted document edit, as the room applied it.

    ``patches`` are the frame's document patches in the wire format (key -> fields);
    they are the objects the room applied, so read them and do not change them.
    ``session_id`` and ``client_id`` name the session that sent the edit; both are None
    for a server-side edit (:meth:`Room.apply_patch`).
    """

    timestamp: int
    patches: Sequence[Patch]
    session_id: str | None
    client_id: str | None


class ChangeFeedOverflow(Exception):
    """The reader fell more than ``max_buffer`` changes behind, and the feed ended.

    ``last_timestamp`` is the timestamp of the last change the reader got (or the room's
    timestamp when it subscribed): ``room.document.diff_since(last_timestamp)`` holds
    everything after it, to catch up before subscribing again.
    """

    def __init__(self, max_buffer: int, last_timestamp: int) -> None:
        super().__init__(
            f"the change feed fell over {max_buffer} changes behind and was cut off; "
            f"changes after timestamp {last_timestamp} were not delivered"
        )
        self.max_buffer = max_buffer
        self.last_timestamp = last_timestamp


class ChangeFeed:
    """An async iterator of :class:`Change`, from ``async with room.subscribe() as feed``.

    Iteration ends (``StopAsyncIteration``) once the room has closed and the changes
    buffered before that are read. A reader that lets more than ``max_buffer`` changes
    pile up gets :class:`ChangeFeedOverflow` at its next read, and nothing more. A read
    cancelled while it waits takes nothing from the feed.
    """

    def __init__(self, max_buffer: int, timestamp: int) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, not {max_buffer}")
        self.max_buffer = max_buffer
        self._buffer: deque[Change] = deque()
        self._last_read = timestamp
        self._overflow: ChangeFeedOverflow | None = None
        self._ended = False
        self._waiting = trio.lowlevel.ParkingLot()

    def push(self, change: Change) -> None:
        """Add one change; never waits. Called by the room."""
        if self._ended:
            return
        if len(self._buffer) >= self.max_buffer:
            self._overflow = ChangeFeedOverflow(self.max_buffer, self._last_read)
            self._buffer.clear()
            self.end()
            return
        self._buffer.append(change)
        self._waiting.unpark_all()

    def end(self) -> None:
        """No more changes will come (the room closed, or the reader left)."""
        self._ended = True
        self._waiting.unpark_all()

    def __aiter__(self) -> ChangeFeed:
        return self

    async def __anext__(self) -> Change:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._buffer:
            if self._overflow is not None:
                raise self._overflow
            if self._ended:
                raise StopAsyncIteration
            await self._waiting.park()
        change = self._buffer.popleft()
        self._last_read = change.timestamp
        await trio.lowlevel.cancel_shielded_checkpoint()
        return change
