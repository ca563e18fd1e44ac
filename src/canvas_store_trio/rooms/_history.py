"""A room's history: versions of its document, kept at most once per interval.

When a room's document is about to change and no version was begun for ``interval``
seconds (or since the room loaded), the document as it is, before the change, becomes
a version. So while edits keep coming a version is kept at most once per interval, and
the state a room rested in before a burst of edits is always kept, even when the room
closed and loaded again in between. (An empty room that was never edited keeps no
version of its empty document.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Generator

import attrs
import trio

from .._document import Document
from .._logs import log_event
from ..storage._base import HistoryStorage, take_parts
from ._commits import CommitError

DEFAULT_HISTORY_KEEP = 50
"""How many versions a room keeps by default: the oldest beyond it are dropped."""


@attrs.define(eq=False)
class _Begun:
    """A version begun: its room timestamp, when, and its encoding so far and to come."""

    version: int
    began: float
    first: bytes
    rest: Generator[bytes, None, None]


class HistoryKeeper:
    """Keeps versions of one room's ``document`` in its ``storage``.

    The room calls :meth:`before_change` before each change it applies, and runs
    :meth:`run` as a task. The version is fixed at that call, synchronously (the first
    piece of :meth:`Document.encode_in_steps`), then encoded by the task a piece at a
    time from the live document, so a big room never holds the loop, and stored
    with ``keep``. With ``commit_gate`` (durable acks: the room's
    ``commit_through(timestamp)``), a version is stored only once every edit it holds
    is committed, so it never holds one that a failed commit takes back.
    """

    def __init__(
        self,
        room_id: str,
        storage: HistoryStorage,
        document: Document,
        *,
        interval: float,
        keep: int,
        commit_gate: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.room_id = room_id
        self.storage = storage
        self.document = document
        self.interval = interval
        self.keep = keep
        self.commit_gate = commit_gate
        self._armed = True
        """Whether the next change begins a version (an attribute test per edit)."""
        self._begun = trio.Event()
        self._pending: _Begun | None = None

    def before_change(self) -> None:
        """Begin a version of the document as it is, if one is due. Never awaits."""
        if not self._armed:
            return
        document = self.document
        if not (document.timestamp or document.state):
            return  # an empty room that was never edited: nothing to go back to
        self._armed = False
        parts = document.encode_in_steps()
        first = next(parts)  # fixes what the version holds: the document as it is now
        self._pending = _Begun(document.timestamp, trio.current_time(), first, parts)
        self._begun.set()

    async def run(self) -> None:
        """Store each version begun, then wait ``interval`` from its beginning before the
        next may begin; until cancelled.

        A version that cannot be stored is logged and dropped; the next is kept as
        usual. Cancelled, a version not yet handed to storage is dropped, and one being
        written is finished by the storage (never half written); no version begins
        after that.
        """
        try:
            while True:
                await self._begun.wait()
                self._begun = trio.Event()
                assert self._pending is not None
                began = self._pending.began
                await self._store(self._pending)
                await trio.sleep_until(began + self.interval)
                self._armed = True
        finally:
            self._armed = False
            if self._pending is not None:
                self._pending.rest.close()
                self._pending = None

    async def _store(self, begun: _Begun) -> None:
        with contextlib.closing(begun.rest):
            # The pieces come from the live document, with what changed since the
            # version began kept aside as it was.
            taken = [begun.first, *await take_parts(begun.rest)]
        self._pending = None
        version = begun.version
        try:
            if self.commit_gate is not None:
                await self.commit_gate(version)
            await self.storage.save_version(version, taken, keep=self.keep)
        except CommitError:
            return  # the edits are taken back, and the room closes
        except Exception as exc:
            log_event(
                logging.WARNING,
                "version_failed",
                "room %r: version %d could not be kept: %s",
                self.room_id,
                version,
                exc,
                room=self.room_id,
                version=version,
                error=str(exc),
            )
