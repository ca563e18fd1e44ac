"""``canvas-store-trio cluster status``: the live nodes of a cluster, and their leases."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from ..storage._backends import open_storage_backend
from ..storage._postgres import PostgresDatabase
from ..storage._transfer import TransferError
from ._leases import cluster_status

__all__ = ["add_cluster_commands", "run_cluster_command", "status_text"]


def add_cluster_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``cluster`` subcommand (``status``) to the CLI's subparsers."""
    cluster = commands.add_parser(
        "cluster",
        help="what the nodes of a cluster (serve --cluster) hold",
        description="Read the cluster's state in its PostgreSQL database.",
    )
    actions = cluster.add_subparsers(dest="action", required=True)
    status = actions.add_parser(
        "status",
        help="print the live nodes: address, room count, lease expiry",
        description="Print the live nodes, one a line: node id, address, the rooms it holds "
        "a lease on, and when its own lease expires (UTC). Only reads.",
    )
    status.add_argument("--storage", metavar="URL", required=True,
                        help="the cluster's database: postgresql://USER@HOST/DB")
    status.add_argument("--json", action="store_true",
                        help='print {"nodes": [{"node_id", "address", "rooms", '
                        '"lease_expires_at"}]}')
    status.add_argument("--rooms", action="store_true",
                        help="add one row per leased room: room, owner, epoch")


def status_text(status: dict[str, Any], *, rooms: bool) -> str:
    """What ``cluster status`` prints without ``--json``: tab-separated lines."""
    lines = [f"{n['node_id']}\t{n['address']}\t{n['rooms']}\t{n['lease_expires_at']}"
             for n in status["nodes"]]
    if rooms:
        lines += [""] + [f"{lease['room']}\t{lease['owner']}\t{lease['epoch']}"
                         for lease in status["leases"]]
    return "".join(line + "\n" for line in lines)


async def run_cluster_command(args: argparse.Namespace) -> None:
    """Run ``cluster status``: print to stdout. Raise :class:`TransferError`,
    :class:`~canvas_store_trio.StorageError` or :class:`ValueError` (a bad URL) with a
    message for the user."""
    backend = open_storage_backend(args.storage)
    if not isinstance(backend, PostgresDatabase):
        await backend.aclose()
        raise TransferError(f"--storage: a cluster lives in PostgreSQL, not {backend}")
    async with backend:
        status = await cluster_status(backend)
    if args.json:
        if not args.rooms:
            del status["leases"]
        out = orjson.dumps(status) + b"\n"
    else:
        out = status_text(status, rooms=args.rooms).encode()
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
