"""``canvas-store-trio serve``: the ready-made server."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from .._document import SnapshotError
from .._protocol import Limits
from ..rooms._connection import Authorize, HandshakeRequest, serve_connection
from ..rooms._manager import RoomManager
from ..storage._backends import FileBackend, MemoryBackend, StorageBackend, open_storage_backend
from ..storage._base import StorageError
from ..storage._transfer import TransferError, add_transfer_commands, run_transfer_command
from ..transport._listener import TRANSPORTS, serve_websockets
from ..transport._wire import HttpHandler, default_http_handler
from ._demo_page import DemoNotBuiltError, demo_http_handler, page_url

logger = logging.getLogger("canvas_store_trio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canvas-store-trio",
        description="A sync server for @woven-ecs/canvas-store clients.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the sync server",
        description="Run the sync server. Clients connect to "
        "ws://HOST:PORT/?roomId=ROOM&clientId=CLIENT&token=TOKEN.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT") or 8087),
        help="port to listen on ($PORT, else 8087; 0 picks a free one)",
    )
    store = serve.add_mutually_exclusive_group()
    store.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="folder of room files, in the Node server's format (./data)",
    )
    store.add_argument(
        "--storage",
        metavar="URL",
        help="rooms in a database: sqlite:///rooms.db or postgresql://user@host/db",
    )
    store.add_argument(
        "--memory",
        action="store_true",
        help="keep rooms in memory only; they are lost when the server stops",
    )
    serve.add_argument(
        "--save-throttle",
        type=_option_type("float"),
        default=5.0,
        metavar="SECONDS",
        help="seconds from the first unsaved change to the save (5)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_option_type("float"),
        default=60.0,
        metavar="SECONDS",
        help="seconds an empty room stays open (60)",
    )
    serve.add_argument(
        "--authorize",
        metavar="MODULE:FUNCTION",
        help="hook that checks each token; without it every session is readwrite",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="also serve a demo page (a shared sticky-note board) at http://HOST:PORT/",
    )
    serve.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="wire",
        help="WebSocket implementation: our lean one (wire, the default) or trio-websocket",
    )
    limits = serve.add_argument_group("limits (see README)")
    for field in attrs.fields(Limits):
        annotation = str(field.type)
        default = "off" if field.default is None else field.default
        limits.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_option_type(annotation),
            default=field.default,
            metavar="N" if annotation == "int" else "X",
            help=f"{field.metadata['help']} ({default})",
        )
    add_transfer_commands(commands)
    return parser


def _option_type(annotation: str) -> Callable[[str], object]:
    """An argparse type for a number option of this annotation (``"float | None"``...)."""

    def parse(text: str) -> object:
        if annotation == "float | None" and text.lower() in ("off", "none"):
            return None
        value = int(text) if annotation == "int" else float(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, not {text!r}")
        return value

    return parse


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(**{field.name: getattr(args, field.name) for field in attrs.fields(Limits)})


def load_authorize(spec: str) -> Authorize:
    """Import ``module:function``, looking in the current folder too."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--authorize wants MODULE:FUNCTION, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--authorize {spec}: {exc}") from None
    if not callable(function):
        raise SystemExit(f"--authorize {spec}: not a function")
    return function  # type: ignore[no-any-return]


def open_backend(args: argparse.Namespace) -> StorageBackend:
    """Where ``serve`` keeps rooms: ``--storage URL``, ``--memory``, or ``--data-dir``."""
    if args.storage:
        return open_storage_backend(args.storage)
    if args.memory:
        return MemoryBackend()
    return FileBackend(args.data_dir)


async def serve(
    args: argparse.Namespace, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until SIGINT or SIGTERM, then close every session, flush every room, return."""
    authorize = load_authorize(args.authorize) if args.authorize else None
    limits = limits_from(args)
    http_handler: HttpHandler = default_http_handler
    if args.demo:
        if args.transport != "wire":
            raise SystemExit("--demo: the page is served by the wire transport only")
        try:
            http_handler = demo_http_handler()
        except DemoNotBuiltError as exc:
            raise SystemExit(f"--demo: {exc}") from None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            open_backend(args) as backend,
            RoomManager(
                idle_timeout=args.idle_timeout,
                save_throttle=args.save_throttle,
                create_storage=backend.create_storage,
                limits=limits,
            ) as manager,
            trio.open_nursery() as nursery,
        ):

            async def handler(request: HandshakeRequest) -> None:
                await serve_connection(manager, request, authorize=authorize)

            listeners = await nursery.start(
                functools.partial(
                    serve_websockets,
                    handler,
                    args.host,
                    args.port,
                    max_message_size=limits.max_message_size,
                    transport=args.transport,
                    http_handler=http_handler,
                )
            )
            port = listeners[0].socket.getsockname()[1]
            url = f"ws://{args.host}:{port}"
            where = str(backend)
            logger.info(
                "Listening on %s (rooms in %s). Connect with %s/?roomId=ROOM&clientId=CLIENT",
                url,
                where,
                url,
            )
            if args.demo:
                logger.info("Demo page: %s (open it in two windows)", page_url(listeners[0]))
            task_status.started(port)
            async for signum in signals:
                logger.info("%s: closing sessions and saving rooms", signal.Signals(signum).name)
                break
            failed = await manager.close_all()
            nursery.cancel_scope.cancel()
    if failed:
        raise SystemExit(1)
    logger.info("all rooms saved; bye")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if args.command == "serve":
        try:
            trio.run(serve, args)
        except ValueError as exc:  # a storage URL that names nothing
            raise SystemExit(f"canvas-store-trio serve: {exc}") from None
    else:
        try:
            logger.info("%s", trio.run(run_transfer_command, args))
        except (TransferError, StorageError, SnapshotError, ValueError) as exc:
            raise SystemExit(f"canvas-store-trio {args.command}: {exc}") from None
