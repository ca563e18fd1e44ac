"""Who may open a room: the ownership protocol, and the single node's, which always may.

A :class:`~canvas_store_trio.RoomManager` asks its ``ownership`` for a :class:`Lease`
before a room loads, and gives it back once the room has closed. The room learns only
two things: "you may open this room" (``acquire`` returns) and "you lost it" (the
lease's ``on_lost`` is called, once; the room then closes its sessions with 1012).
Before a connection is accepted, :meth:`Ownership.owner_elsewhere` says whether another
node serves its room, so that the connection is forwarded there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ..storage._base import StorageError

LostHook = Callable[[str], None]


class FencedWriteError(StorageError):
    """A write of room data refused: this node no longer holds the room's lease. A room
    whose commit is refused so takes it as the loss of its lease (1012)."""
"""``on_lost(reason)``: the room may no longer serve; called at most once, synchronously."""


@attrs.define(eq=False)
class Lease:
    """The right to serve one room, until :meth:`Ownership.release` or ``on_lost``.

    ``epoch`` grows each time the room changes hands: writes of the room's data carry it
    (see :mod:`canvas_store_trio.cluster`). ``deadline`` is the Trio time by which the
    lease must be renewed, as this node reckons it (``inf``: never expires).
    """

    room_id: str
    epoch: int
    on_lost: LostHook
    deadline: float = math.inf
    lost: bool = False

    def lose(self, reason: str) -> None:
        """Mark the lease lost and tell the room, once."""
        if not self.lost:
            self.lost = True
            self.on_lost(reason)


@attrs.frozen
class Owner:
    """The node that holds a room's lease now, and where other nodes reach it."""

    node_id: str
    address: str


class NotOwnerError(Exception):
    """Another node owns the room (``owner`` and its ``address``, when known), or no
    lease can be taken now (the database cannot be reached: both are None). The client
    is closed with 1013 (try again later)."""

    def __init__(self, room_id: str, owner: str | None = None, address: str | None = None,
                 why: str | None = None) -> None:
        self.room_id, self.owner, self.address = room_id, owner, address
        super().__init__(why or f"room {room_id!r} is owned by node {owner!r} at {address}")

    def copy(self) -> NotOwnerError:
        """A fresh exception with the same facts, for another waiter to raise."""
        return NotOwnerError(self.room_id, self.owner, self.address, str(self))


class Ownership(Protocol):
    """Decides which rooms this process may open (see :class:`SoleOwnership`,
    :class:`~canvas_store_trio.cluster.PostgresLeases`)."""

    async def acquire(self, room_id: str, on_lost: LostHook) -> Lease:
        """A lease on ``room_id``, or raise :class:`NotOwnerError`. ``on_lost`` is
        called (once, from the ownership's own task) if the lease is lost before
        :meth:`release`."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lease back, so another node may take the room at once. Never raises
        for a lease that is already lost or gone."""
        ...

    async def owner_elsewhere(self, room_id: str) -> Owner | None:
        """The live node other than this one that holds ``room_id``'s lease, where
        a connection for the room is forwarded; None if there is none (or it cannot be
        told now: the room then opens here, or is refused by :meth:`acquire`)."""
        ...

    @property
    def node_id(self) -> str:
        """This node's id in the cluster (``""`` for a single node)."""
        ...

    @property
    def fenced(self) -> bool:
        """Whether this process cannot keep leases now (it could not renew them in
        time): it serves no room until it can. ``/readyz`` answers 503 meanwhile."""
        ...


class SoleOwnership:
    """The single node's ownership, :class:`~canvas_store_trio.RoomManager`'s default:
    this process owns every room, and never loses one."""

    async def acquire(self, room_id: str, on_lost: LostHook) -> Lease:
        """A lease at once, without a checkpoint: a new room's join waits one loop
        round less."""
        return Lease(room_id, 0, on_lost)

    async def release(self, lease: Lease) -> None:
        await trio.lowlevel.checkpoint()

    async def owner_elsewhere(self, room_id: str) -> Owner | None:
        """None, without a checkpoint: this check runs on every join."""
        return None

    @property
    def node_id(self) -> str:
        return ""

    @property
    def fenced(self) -> bool:
        return False
