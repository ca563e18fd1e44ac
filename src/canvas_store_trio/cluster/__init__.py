"""Many nodes: each room owned by one node at a time, under a lease in PostgreSQL.

:class:`Ownership` is what a :class:`~canvas_store_trio.RoomManager` asks before it
opens a room; :class:`SoleOwnership` (one process owns every room) is the default and
:class:`PostgresLeases` the cluster's (see its module for the tables and the fencing).
"""

from ._leases import (
    DEFAULT_LEASE_TTL,
    FencedWriteError,
    NodeIdInUseError,
    PostgresLeases,
    cluster_status,
)
from ._ownership import Lease, NotOwnerError, Owner, Ownership, SoleOwnership

__all__ = [
    "DEFAULT_LEASE_TTL",
    "FencedWriteError",
    "Lease",
    "NodeIdInUseError",
    "NotOwnerError",
    "Owner",
    "Ownership",
    "PostgresLeases",
    "SoleOwnership",
    "cluster_status",
]
