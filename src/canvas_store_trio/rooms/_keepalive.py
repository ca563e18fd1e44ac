"""Keep-alive: one task per room pings its sessions and drops those that stop answering."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import trio
from trio_websocket import ConnectionClosed

from .._logs import log_event
from ._session import Session


async def keep_alive(
    room_id: str, sessions: Mapping[str, Session], *, interval: float, timeout: float
) -> None:
    """Every ``interval``, ping each session not still waiting for its last pong.

    One task and one timer per room, not per session: each ping runs in its session's
    nursery, so it ends with the session. Runs until cancelled.
    """
    while True:
        await trio.sleep(interval)
        for session in sessions.values():
            if session.nursery is not None and not session.pinging:
                session.pinging = True
                session.nursery.start_soon(_ping, room_id, session, timeout)


async def _ping(room_id: str, session: Session, timeout: float) -> None:
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
            room_id,
            session.client_id,
            timeout,
            **session.log_fields(),
        )
