"""Many nodes: each room owned by one node at a time, under a lease in PostgreSQL."""

from ._ownership import Lease, NotOwnerError, Ownership, SoleOwnership

__all__ = ["Lease", "NotOwnerError", "Ownership", "SoleOwnership"]
