"""Keep-alive: one task per manager pings every session and drops those that stop answering."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import trio
from trio_websocket import ConnectionClosed

from .._logs import log_event
from ._session import Session


async def keep_alive(
    sessions: Callable[[], Iterable[Session]], *, interval: float, timeout: float
) -> None:
    """Every ``interval``, ping each of ``sessions()`` not still waiting for its last pong.

    One task and one timer for every room, not one per room or per session: each ping
    runs in its session's nursery, so it ends with the session. Runs until cancelled.
    """
    while True:
        await trio.sleep(interval)
        _ping_all(sessions(), timeout)


def _ping_all(sessions: Iterable[Session], timeout: float) -> None:
    """Start the pings (a function of its own: the sleeping task keeps no session)."""
    for session in sessions:
        if session.nursery is not None and not session.pinging:
            session.pinging = True
            session.nursery.start_soon(_ping, session, timeout)


async def _ping(session: Session, timeout: float) -> None:
    """Ping once; close the session with 1001 if the pong takes over ``timeout``."""
    with trio.move_on_after(timeout) as scope:
        with contextlib.suppress(
            ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await session.socket.ping()
    session.pinging = False
    if scope.cancelled_caught:
        session.close(1001, "ping timeout")
        log_event(
            logging.INFO,
            "ping_timeout",
            "room %r: client %r dropped: no pong within %g s",
            session.room_id,
            session.client_id,
            timeout,
            **session.log_fields(),
        )
