"""Room leases in PostgreSQL: :class:`PostgresLeases`, the ownership of a cluster node.

Two tables (schema version 3) hold who serves what:

- ``canvas_store_nodes``: one row per node, ``id``, ``address`` (where other nodes reach
  it) and ``expires_at``. A node is live while ``expires_at`` is ahead; a second process
  cannot join under the id of a live node.
- ``canvas_store_leases``: one row per room ever leased, ``room``, ``owner``, ``address``,
  ``epoch`` and ``expires_at``. Taking a lease is one statement: insert the row, or take
  over one that has expired (or that this node itself holds) and bump its epoch. Rows
  are never deleted, so epochs only grow.

A node renews its node row and all its leases in one statement, ``RENEWALS_PER_TTL``
times per TTL, on a connection of its own: loads, commits and saves that fill the
database's pool can never hold a renewal back until the leases lapse.

Every write of room data runs :meth:`PostgresLeases.check` first, in its own
transaction: it reads the room's lease ``FOR SHARE`` and refuses the write unless
this node holds it, with the epoch it took, unexpired. The lock keeps a takeover waiting
until the write has committed, so the new owner loads it; and a node that lost a lease,
however long it slept, can never write that room again.

Self-fencing: a lease whose renewal is late (PostgreSQL unreachable, a paused process)
is given up by this node ``ttl / RENEWALS_PER_TTL`` seconds before it can expire in the
database: the room is told (``on_lost``) and closes its sessions with 1012. Its clients
reconnect, and the room opens again once a lease can be taken.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._logs import log_event
from ..storage._base import StorageError
from ..storage._postgres import DedicatedConnection, PostgresDatabase, _from_pg, _to_pg
from ..storage._sql import LEASES_TABLE, NODES_TABLE
from ._ownership import FencedWriteError, Lease, LostHook, NotOwnerError, Owner

if TYPE_CHECKING:
    from ..storage._postgres import Connection

__all__ = [
    "DEFAULT_LEASE_TTL",
    "RENEWALS_PER_TTL",
    "FencedWriteError",
    "NodeIdInUseError",
    "Owner",
    "PostgresLeases",
    "cluster_status",
]

DEFAULT_LEASE_TTL = 10.0
"""Seconds a lease (and a node's liveness) lasts without renewal: ``serve --lease-ttl``."""

RENEWALS_PER_TTL = 4
"""A node renews its leases this many times per TTL, and gives up a lease that has gone
unrenewed for all but one of these intervals."""

_TTL = "now() + %(ttl)s * interval '1 second'"
_JOIN = (
    f"INSERT INTO {NODES_TABLE} (id, address, expires_at, started_at) "
    f"VALUES (%(node)s, %(address)s, {_TTL}, now()) "
    "ON CONFLICT (id) DO UPDATE SET address = excluded.address, "
    "expires_at = excluded.expires_at, started_at = excluded.started_at "
    f"WHERE {NODES_TABLE}.expires_at <= now() RETURNING id"
)
_TAKE = (
    f"INSERT INTO {LEASES_TABLE} (room, owner, address, epoch, expires_at) "
    f"VALUES (%(room)s, %(node)s, %(address)s, 1, {_TTL}) "
    f"ON CONFLICT (room) DO UPDATE SET owner = excluded.owner, address = excluded.address, "
    f"epoch = {LEASES_TABLE}.epoch + 1, expires_at = excluded.expires_at "
    f"WHERE {LEASES_TABLE}.expires_at <= now() OR {LEASES_TABLE}.owner = excluded.owner "
    "RETURNING epoch"
)
_RENEW = (
    f"WITH node AS (UPDATE {NODES_TABLE} SET expires_at = {_TTL} WHERE id = %(node)s) "
    f"UPDATE {LEASES_TABLE} SET expires_at = {_TTL} "
    "WHERE owner = %(node)s AND expires_at > now() RETURNING room, epoch"
)
_FENCE = (
    f"SELECT room, epoch FROM {LEASES_TABLE} WHERE room = ANY(%s) AND owner = %s "
    "AND expires_at > now() ORDER BY room FOR SHARE"
)
_LIVE_OWNER = (
    f"SELECT owner, address FROM {LEASES_TABLE} WHERE room = %s AND expires_at > now()"
)


class NodeIdInUseError(Exception):
    """A live node already runs under this node id."""


@attrs.define(eq=False)
class PostgresLeases:
    """The :class:`~canvas_store_trio.cluster.Ownership` of one node of a cluster: room
    leases in ``database``, which must also hold the rooms (every write of room data is
    fenced by the lease, see the module).

    ``async with PostgresLeases(database, ttl=...) as leases:``, then
    :meth:`join` once the node knows its id and address: rooms wait for it to take their
    leases. Leaving the block (cancelled or not) stops the renewals and releases the node
    and every lease it still holds at once, so other nodes need not wait for expiry;
    close the rooms (the :class:`~canvas_store_trio.RoomManager`) first.
    """

    database: PostgresDatabase
    ttl: float = DEFAULT_LEASE_TTL
    node_id: str = attrs.field(default="", init=False)
    address: str = attrs.field(default="", init=False)
    _held: dict[str, Lease] = attrs.field(factory=dict, init=False)
    _joined: trio.Event = attrs.field(factory=trio.Event, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stack: AsyncExitStack = attrs.field(factory=AsyncExitStack, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _renewed_at: float | None = attrs.field(default=None, init=False)
    """When the last renewal that succeeded began (Trio time); None before the first."""
    _liveness: DedicatedConnection = attrs.field(init=False)
    """A connection beside ``database``'s pool, for joining, renewing and leaving: the
    node's liveness never queues behind room data, and a renewal after an outage
    reconnects at once."""

    @_liveness.default
    def _own_connection(self) -> DedicatedConnection:
        return DedicatedConnection(self.database)

    def __attrs_post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError(f"the lease TTL must be above 0 seconds, not {self.ttl!r}")
        self.database.write_fence = self
        self.database.idle_in_transaction_timeout = self.ttl

    async def __aenter__(self) -> PostgresLeases:
        self._stack.push_async_callback(self._liveness.aclose)
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._leave()
        # The renewals are cancelled; an error of the block goes on as it was raised.
        await self._stack.aclose()

    @property
    def interval(self) -> float:
        """Seconds between two renewals."""
        return self.ttl / RENEWALS_PER_TTL

    def held(self) -> list[str]:
        """The rooms this node holds a lease on now."""
        return list(self._held)

    @property
    def fenced(self) -> bool:
        """Whether the renewals have failed for as long as a lease is kept unrenewed
        (one interval short of the TTL): every lease is given up by then, and the node
        takes no room until a renewal succeeds again."""
        if self._renewed_at is None:
            return False  # not renewing yet: nothing held that could have lapsed
        return trio.current_time() - self._renewed_at >= self.ttl - self.interval

    async def join(self, node_id: str, address: str) -> None:
        """Register this node as ``node_id``, reachable at ``address``, and start
        renewing. Raise :class:`NodeIdInUseError` if a live node has that id, and
        :class:`StorageError` if the database cannot be used."""
        params = {"node": node_id, "address": address, "ttl": self.ttl}

        def join(conn: Connection) -> bool:
            return conn.execute(_JOIN, params).fetchone() is not None

        if not await self._liveness.run(join, f"cannot join the cluster as {node_id!r}"):
            raise NodeIdInUseError(
                f"node id {node_id!r} is in use by a live node; give another --node-id, or "
                f"wait {self.ttl:g} s (the lease TTL) if that node has died"
            )
        self.node_id, self.address = node_id, address
        assert self._nursery is not None
        self._nursery.start_soon(self._renew_forever)
        self._nursery.start_soon(self._watch)
        self._joined.set()
        log_event(logging.INFO, "cluster_joined",
                  "joined the cluster as node %r at %s (leases last %g s)",
                  node_id, address, self.ttl, node=node_id, address=address)

    # --- the Ownership protocol ----------------------------------------------------

    async def acquire(self, room_id: str, on_lost: LostHook) -> Lease:
        """Take the room's lease (one transaction), or raise
        :class:`~canvas_store_trio.cluster.NotOwnerError` naming the live owner (or
        none, when the database cannot be reached). Waits for :meth:`join`."""
        await self._joined.wait()
        params = {"room": _to_pg(room_id), "node": self.node_id,
                  "address": self.address, "ttl": self.ttl}

        def take(conn: Connection) -> tuple[int | None, Owner | None]:
            row = conn.execute(_TAKE, params).fetchone()
            if row is not None:
                return row[0], None
            owner = conn.execute(_LIVE_OWNER, (params["room"],)).fetchone()
            return None, None if owner is None else Owner(*owner)

        started = trio.current_time()
        try:
            epoch, owner = await self.database.run(take, f"cannot lease room {room_id!r}")
        except StorageError as exc:
            raise NotOwnerError(room_id, why=str(exc)) from None
        if epoch is None:
            if owner is None:  # it expired between the two statements
                raise NotOwnerError(room_id, why=f"room {room_id!r} is changing hands")
            raise NotOwnerError(room_id, owner.node_id, owner.address)
        lease = Lease(room_id, epoch, on_lost, deadline=started + self.ttl)
        self._held[room_id] = lease
        self._changed.set()
        return lease

    async def release(self, lease: Lease) -> None:
        """Let the lease expire now (if it is still this node's, at its epoch). A
        database that cannot be reached is logged: the lease then expires by itself."""
        if self._held.get(lease.room_id) is lease:
            del self._held[lease.room_id]
        lease.lost = True  # released: never told it is lost
        params = (_to_pg(lease.room_id), self.node_id, lease.epoch)

        def release(conn: Connection) -> None:
            conn.execute(
                f"UPDATE {LEASES_TABLE} SET expires_at = now() "
                "WHERE room = %s AND owner = %s AND epoch = %s",
                params,
            )

        try:
            await self.database.run(release, f"cannot release the lease of {lease.room_id!r}")
        except StorageError as exc:
            log_event(logging.WARNING, "lease_release_failed",
                      "room %r: %s; it expires within %g s", lease.room_id, exc, self.ttl,
                      room=lease.room_id, error=str(exc))

    async def owner_of(self, room_id: str) -> Owner | None:
        """The live owner of ``room_id``, or None. Raises :class:`StorageError` if the
        database cannot be used."""
        def query(conn: Connection) -> Owner | None:
            row = conn.execute(_LIVE_OWNER, (_to_pg(room_id),)).fetchone()
            return None if row is None else Owner(*row)

        return await self.database.run(query, f"cannot look up the owner of {room_id!r}")

    async def owner_elsewhere(self, room_id: str) -> Owner | None:
        """The live owner of ``room_id`` if it is another node; None if it is this one,
        if there is none, or if the database cannot be used now (:meth:`acquire` then
        refuses the room)."""
        if room_id in self._held:
            return None
        try:
            owner = await self.owner_of(room_id)
        except StorageError:
            return None
        return None if owner is None or owner.node_id == self.node_id else owner

    # --- the write fence (PostgresDatabase.write_fence) ----------------------------

    def check(self, conn: Connection, room_ids: Sequence[str]) -> None:
        """In a write's transaction (worker thread): lock the rooms' lease rows (``FOR
        SHARE``) and raise :class:`FencedWriteError` unless each is this node's, at the
        epoch it took, unexpired."""
        wanted: dict[str, int | None] = {}
        for room_id in room_ids:
            lease = self._held.get(room_id)
            wanted[_to_pg(room_id)] = None if lease is None or lease.lost else lease.epoch
        rows = conn.execute(_FENCE, (list(wanted), self.node_id)).fetchall()
        found = {room: epoch for room, epoch in rows}
        lost = [_from_pg(room) for room, epoch in wanted.items()
                if epoch is None or found.get(room) != epoch]
        if lost:
            raise FencedWriteError(
                f"not written: node {self.node_id!r} no longer holds the lease of room(s) "
                + ", ".join(map(repr, lost))
            )

    # --- renewals ------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        params = {"node": self.node_id, "ttl": self.ttl}

        def renew(conn: Connection) -> set[tuple[str, int]]:
            return {(_from_pg(room), epoch) for room, epoch
                    in conn.execute(_RENEW, params).fetchall()}

        failing = False
        while True:
            started = trio.current_time()
            held = dict(self._held)
            try:
                renewed = await self._liveness.run(renew, "cannot renew the leases")
            except StorageError as exc:
                if not failing:
                    log_event(logging.WARNING, "lease_renewal_failed",
                              "%s; its rooms close in %g s unless it succeeds", exc,
                              self.ttl - self.interval, error=str(exc))
                failing = True
            else:
                failing = False
                self._renewed_at = started
                for room_id, lease in held.items():
                    if self._held.get(room_id) is not lease:
                        continue  # released meanwhile
                    if (room_id, lease.epoch) in renewed:
                        lease.deadline = max(lease.deadline, started + self.ttl)
                    else:
                        self._lose(lease, "it expired, or another node took it")
            await trio.sleep_until(started + self.interval)

    async def _watch(self) -> None:
        """Give up each lease one interval before it could expire unrenewed."""
        while True:
            now = trio.current_time()
            for lease in [lease for lease in self._held.values()
                          if lease.deadline - self.interval <= now]:
                self._lose(lease, f"not renewed for {now - lease.deadline + self.ttl:.1f} s")
            next_due = min((lease.deadline for lease in self._held.values()),
                           default=float("inf")) - self.interval
            self._changed = trio.Event()
            with trio.move_on_at(next_due):
                await self._changed.wait()

    def _lose(self, lease: Lease, reason: str) -> None:
        if self._held.get(lease.room_id) is lease:
            del self._held[lease.room_id]
        lease.lose(reason)

    async def _leave(self) -> None:
        """Release the node and every lease it holds, in one transaction."""
        if not self._joined.is_set():
            return
        node = self.node_id
        self._held.clear()

        def leave(conn: Connection) -> None:
            conn.execute(f"UPDATE {LEASES_TABLE} SET expires_at = now() WHERE owner = %s "
                         "AND expires_at > now()", (node,))
            conn.execute(f"UPDATE {NODES_TABLE} SET expires_at = now() WHERE id = %s", (node,))

        try:
            await self._liveness.run(leave, "cannot leave the cluster")
        except StorageError as exc:
            log_event(logging.WARNING, "lease_release_failed",
                      "%s; its leases expire within %g s", exc, self.ttl, error=str(exc))
        else:
            log_event(logging.INFO, "cluster_left", "node %r left the cluster", node, node=node)


async def cluster_status(database: PostgresDatabase) -> dict[str, Any]:
    """``{"nodes": [{"node_id", "address", "rooms", "lease_expires_at"}], "leases":
    [{"room", "owner", "epoch", "expires_at"}]}``: the live nodes (``rooms`` counts the
    unexpired leases each holds) and the unexpired leases, sorted."""

    def query(conn: Connection) -> dict[str, Any]:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        nodes = conn.execute(
            f"SELECT n.id, n.address, n.expires_at, count(l.room) FROM {NODES_TABLE} n "
            f"LEFT JOIN {LEASES_TABLE} l ON l.owner = n.id AND l.expires_at > now() "
            "WHERE n.expires_at > now() GROUP BY n.id, n.address, n.expires_at ORDER BY n.id"
        ).fetchall()
        leases = conn.execute(
            f"SELECT room, owner, epoch, expires_at FROM {LEASES_TABLE} "
            "WHERE expires_at > now() ORDER BY room"
        ).fetchall()
        return {
            "nodes": [{"node_id": node, "address": address, "rooms": rooms,
                       "lease_expires_at": _iso(expires)}
                      for node, address, expires, rooms in nodes],
            "leases": [{"room": _from_pg(room), "owner": owner, "epoch": epoch,
                        "expires_at": _iso(expires)}
                       for room, owner, epoch, expires in leases],
        }

    return await database.run(query, "cannot read the cluster's state")


def _iso(moment: datetime) -> str:
    from datetime import UTC

    return moment.astimezone(UTC).isoformat()
