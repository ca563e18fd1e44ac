"""One task reads every wire socket that has bytes waiting, instead of one task wake per frame.

Trio wakes a task for each readable socket: with thousands of small rooms, that park and
wake (and the re-armed one-shot epoll registration behind it) cost more than handling
the frame itself. :class:`ReadPoller` keeps the sockets of parked sessions in a
level-triggered epoll set of its own, and its single task, woken once per batch of
ready sockets, calls each socket's read callback in turn. A callback that meets
something it cannot handle without waiting (a control frame, a protocol error, the end
of the stream) returns False, and the socket's own task is woken to deal with it.
Callbacks may ask for a call once the whole batch is served (:meth:`ReadPoller.call_after_batch`):
rooms write what a batch queued then, one write per client for all of it.

Linux only (``select.epoll``); elsewhere :func:`open_read_poller` gives None and every
socket reads in its own task. Measured in bench/README.md.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import AsyncIterator, Callable

import outcome
import trio

from .._logs import log_event

BATCH_SIZE = 1024
"""Ready sockets served per wake of the poller task before it yields to other tasks.

Larger batches let a room write more frames per client at once (bench/README.md:
1024 and 2048 beat 128 and 512 on 1000 rooms x 2 editors); a batch holds the loop
for about 15-20 us per ready socket.
"""

OnReadable = Callable[[], bool]
"""Reads what the socket has and handles it; False wakes the waiting task."""


class ReadPoller:
    """Serves :meth:`wait` callers' readable sockets from the task running :meth:`run`.

    Use :func:`open_read_poller`, which runs it in a nursery and stops it on exit.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiting: dict[int, tuple[OnReadable, trio.lowlevel.Task]] = {}
        self._closed = False
        self._after_batch: list[Callable[[], None]] = []

    def call_after_batch(self, callback: Callable[[], None]) -> None:
        """Have the poller's task call ``callback`` once the sockets of this batch are served.

        For the read callbacks only. An exception from ``callback`` is logged and does
        not stop the poller.
        """
        self._after_batch.append(callback)

    def is_waiting(self, fd: int) -> bool:
        """Whether a task still waits on ``fd`` (a callback checks it after each message)."""
        return fd in self._waiting

    async def wait(self, fd: int, on_readable: OnReadable) -> bool:
        """Park until ``on_readable`` returns False or raises; it runs in the poller's task.

        Returns False at once, reading nothing, when the poller has stopped (the caller
        then reads in its own task), and True otherwise. An exception from
        ``on_readable`` is raised here. On cancellation ``fd`` leaves the set before
        ``Cancelled`` is raised, so no callback runs for it afterwards. The caller owns
        the socket and must not close it while it waits here.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return False
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._waiting[fd] = (on_readable, trio.lowlevel.current_task())

        def abort(_: object) -> trio.lowlevel.Abort:
            self._forget(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        served: bool = await trio.lowlevel.wait_task_rescheduled(abort)
        return served

    def _forget(self, fd: int) -> None:
        del self._waiting[fd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)

    def _wake(self, fd: int, result: outcome.Outcome[bool]) -> None:
        task = self._waiting[fd][1]
        self._forget(fd)
        trio.lowlevel.reschedule(task, result)

    async def run(self) -> None:
        """Serve ready sockets until cancelled; then wake every waiter with False."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0, BATCH_SIZE):
                    entry = self._waiting.get(fd)
                    if entry is None:
                        continue
                    try:
                        keep = entry[0]()
                    except Exception as exc:
                        if self._waiting.get(fd) is entry:
                            self._wake(fd, outcome.Error(exc))
                        continue
                    if not keep and self._waiting.get(fd) is entry:
                        self._wake(fd, outcome.Value(True))
                entry = None  # the last socket served is not kept until the next batch
                self._run_after_batch()
        finally:
            self._run_after_batch()
            self._closed = True
            for fd in list(self._waiting):
                self._wake(fd, outcome.Value(False))
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()

    def _run_after_batch(self) -> None:
        callbacks, self._after_batch = self._after_batch, []
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:
                log_event(
                    logging.ERROR,
                    "poller_callback_failed",
                    "a read poller's after-batch callback failed",
                    exc_info=exc,
                )


@contextlib.asynccontextmanager
async def open_read_poller() -> AsyncIterator[ReadPoller | None]:
    """A running :class:`ReadPoller` for the block (None where epoll is missing).

    On exit the poller stops; sockets still waiting in it go back to reading in their
    own tasks, so connections outliving the block keep working.
    """
    if not hasattr(select, "epoll"):
        yield None
        return
    poller = ReadPoller()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        try:
            yield poller
        finally:
            nursery.cancel_scope.cancel()
