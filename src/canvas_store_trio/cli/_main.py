"""``canvas-store-trio serve``: the ready-made server; and the commands on storage."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import trio

from .. import __version__
from .._document import SnapshotError
from .._logs import JSONLogFormatter, TextLogFormatter, log_event
from .._protocol import Limits
from ..auth._jwt import JWTAuthorizer
from ..cluster._cli import add_cluster_commands, run_cluster_command
from ..cluster._leases import DEFAULT_LEASE_TTL, NodeIdInUseError, PostgresLeases
from ..ops import ADMIN_TOKEN_ENV, metrics_registry, ops_http_handler, watch_loop_lag
from ..rooms._connection import Authorize, serve_connection
from ..rooms._history import DEFAULT_HISTORY_KEEP
from ..rooms._manager import RoomManager
from ..storage._backends import FileBackend, MemoryBackend, StorageBackend, open_storage_backend
from ..storage._base import StorageError
from ..storage._history import add_history_commands, run_history_command
from ..storage._postgres import PostgresDatabase
from ..storage._transfer import TransferError, add_transfer_commands, run_transfer_command
from ..transport._handshake import HandshakeRequest
from ..transport._http import HttpHandler, HttpRequest, HttpResponse, default_http_handler
from ..transport._listener import TRANSPORTS, serve_http, serve_websockets
from ._demo_page import DemoNotBuiltError, demo_http_handler, page_url

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canvas-store-trio",
        description="A sync server for @woven-ecs/canvas-store clients.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
        type=port_number,
        default=None,
        help="port to listen on, 0-65535 ($PORT, else 8087; 0 picks a free one)",
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
        "--durable-acks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ack an edit only once it is on disk (journal synced, transaction "
        "committed); default --no-durable-acks: ack it once it is in memory, as the "
        "Node server does, and save it within --save-throttle",
    )
    cluster = serve.add_argument_group("cluster: many nodes sharing rooms (see README)")
    cluster.add_argument(
        "--cluster",
        action="store_true",
        help="be one node of a cluster: each room served by one node at a time, under a "
        "lease in the --storage PostgreSQL database; implies --durable-acks",
    )
    cluster.add_argument(
        "--node-id",
        metavar="ID",
        help="this node's id in the cluster (hostname:port)",
    )
    cluster.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the address other nodes reach this one at (--host:--port; needed when "
        "--host is a wildcard address)",
    )
    cluster.add_argument(
        "--lease-ttl",
        type=_option_type("float"),
        default=None,
        metavar="SECONDS",
        help=f"seconds a room's lease lasts unrenewed: the failover time ({DEFAULT_LEASE_TTL:g})",
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
        "--history-interval",
        type=_option_type("float | None"),
        default=None,
        metavar="SECONDS",
        help="keep a version of each room at most this often while it changes (off)",
    )
    serve.add_argument(
        "--history-keep",
        type=_option_type("int"),
        default=DEFAULT_HISTORY_KEEP,
        metavar="N",
        help=f"versions each room keeps; older ones are dropped ({DEFAULT_HISTORY_KEEP})",
    )
    serve.add_argument(
        "--authorize",
        metavar="MODULE:FUNCTION",
        help="hook that checks each token; without it every session is readwrite",
    )
    tokens = serve.add_argument_group("JWT: the token query parameter (see README)")
    tokens.add_argument(
        "--jwt-secret",
        metavar="SECRET",
        help=f"admit sessions on a JWT signed with this HS256 secret (or ${JWT_SECRET_VARIABLE})",
    )
    tokens.add_argument(
        "--jwt-public-key",
        type=Path,
        metavar="FILE",
        help="admit sessions on a JWT signed for this PEM public key (RSA, EC, Ed25519)",
    )
    tokens.add_argument("--jwt-audience", metavar="AUD", help="the aud a token must hold")
    tokens.add_argument("--jwt-issuer", metavar="ISS", help="the iss a token must have")
    tokens.add_argument(
        "--jwt-leeway",
        type=_option_type("float"),
        default=0.0,
        metavar="SECONDS",
        help="clock skew allowed on exp, nbf and iat (0)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="also serve a demo page (a shared sticky-note board) at http://HOST:PORT/",
    )
    serve.add_argument(
        "--admin-token",
        metavar="TOKEN",
        default=None,
        help=f"enable the JSON admin API under /admin/ for requests with "
        f"'Authorization: Bearer TOKEN' (also ${ADMIN_TOKEN_ENV}); off without it",
    )
    serve.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="serve /metrics on this port of --host instead of the serving port "
        "(/healthz and /readyz answer on both)",
    )
    serve.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="wire",
        help="WebSocket implementation: our lean one (wire, the default) or trio-websocket",
    )
    serve.add_argument(
        "--log-level",
        type=_one_of(LOG_LEVELS),
        default=os.environ.get("CANVAS_STORE_LOG_LEVEL", "info"),
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help="the least severe lines logged ($CANVAS_STORE_LOG_LEVEL, else info)",
    )
    serve.add_argument(
        "--log-format",
        type=_one_of(LOG_FORMATS),
        default=os.environ.get("CANVAS_STORE_LOG_FORMAT", "text"),
        metavar="{" + ",".join(LOG_FORMATS) + "}",
        help="log lines as text, or as json: one object a line, with time, level, event, "
        "message, room, session, client, code... ($CANVAS_STORE_LOG_FORMAT, else text)",
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
    add_history_commands(commands)
    add_cluster_commands(commands)
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


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type for a choice that also checks defaults (taken from ``$VARS``)."""

    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}, not {text!r}")
        return text.lower()

    return parse


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """Log to stderr at ``level``, as text or as one JSON object a line."""
    handler = logging.StreamHandler(sys.stderr)
    json_lines = log_format == "json"
    handler.setFormatter(JSONLogFormatter() if json_lines else TextLogFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.captureWarnings(json_lines)  # else they would be lines of their own format


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0 lets the system pick a free one)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {text!r}")
    return port


def serve_port(args: argparse.Namespace) -> int:
    """``--port``, else ``$PORT``, else 8087. A bad ``$PORT`` is an error for serve only."""
    if args.port is not None:
        return int(args.port)
    text = os.environ.get("PORT") or "8087"
    try:
        return port_number(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"$PORT: {exc}") from None


class UsageError(Exception):
    """Something the user can fix: printed as one line, and the command exits with 2."""


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(**{field.name: getattr(args, field.name) for field in attrs.fields(Limits)})


def load_authorize(spec: str) -> Authorize:
    """Import ``module:function``, looking in the current folder too."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--authorize wants MODULE:FUNCTION, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--authorize {spec}: {exc}") from None
    if not callable(function):
        raise UsageError(f"--authorize {spec}: not a function")
    return function  # type: ignore[no-any-return]


JWT_SECRET_VARIABLE = "CANVAS_STORE_JWT_SECRET"
"""Where ``serve`` takes the HS256 secret from without ``--jwt-secret`` (which a process
listing would show)."""


def jwt_authorizer(args: argparse.Namespace, then: Authorize | None) -> Authorize | None:
    """``then`` behind a :class:`JWTAuthorizer` when a secret or public key is given."""
    secret = args.jwt_secret or os.environ.get(JWT_SECRET_VARIABLE) or None
    key_file: Path | None = args.jwt_public_key
    if secret is not None and key_file is not None:
        raise UsageError(
            f"--jwt-secret (or ${JWT_SECRET_VARIABLE}) and --jwt-public-key: give one of them"
        )
    if secret is None and key_file is None:
        if args.jwt_audience or args.jwt_issuer or args.jwt_leeway:
            raise UsageError(
                "--jwt-audience, --jwt-issuer, --jwt-leeway: need --jwt-secret or --jwt-public-key"
            )
        return then
    option = "--jwt-secret" if key_file is None else f"--jwt-public-key {key_file}"
    try:
        authorizer = JWTAuthorizer(
            secret=secret,
            public_key=None if key_file is None else key_file.read_bytes(),
            audience=args.jwt_audience,
            issuer=args.jwt_issuer,
            leeway=args.jwt_leeway,
            then=then,
        )
    except OSError as exc:
        raise UsageError(f"{option}: {exc.strerror or exc}") from None
    except ValueError as exc:  # never holds the secret
        raise UsageError(f"{option}: {exc}") from None
    log_event(logging.INFO, "jwt_required", "sessions need a JWT signed with %s",
              " or ".join(authorizer.algorithms))
    return authorizer


GC_THRESHOLDS = (700, 10, 100)
"""The garbage collector's thresholds in ``serve``: Python's own, but a full collection
only after 100 middle-generation ones instead of 10. Rooms and sessions are freed by
reference counting alone (tests/test_refcycles.py), and a burst of joins otherwise sets
off a full collection of the whole heap every few hundred rooms: on the bench this
takes about a fifth of the server's CPU when 300 rooms open at once (bench/README.md).
An app that embeds the library keeps its own settings."""

def freeze_start_up_objects() -> None:
    """Move every object alive once ``serve`` is up to the collector's permanent
    generation (``gc.freeze``), once per process.

    They are mostly modules, classes and functions (about 40,000), which no full
    collection then walks again. On 200 busy rooms with durable acks a full collection
    took about 11 ms so, against about 55 ms (bench/README.md): it is the longest pause
    the server has. A second call does nothing, so that what later calls would freeze
    (the rooms of an earlier server in the same process) stays collectable."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


DURABLE_ACKS_DEFAULT = False
"""Whether ``serve`` acks edits only once they are durable when no flag says. Off: on
the bench they cost more than the 10% that would make them the default (see
bench/README.md)."""


def durable_acks(args: argparse.Namespace) -> bool:
    """``--durable-acks`` / ``--no-durable-acks``; ``--memory`` implies the latter,
    ``--cluster`` the former (a room that changes hands must find every acked edit)."""
    if args.cluster:
        if args.durable_acks is False:
            raise UsageError(
                "--cluster --no-durable-acks: a cluster acks only what is committed, so "
                "that a room taken over loses nothing; drop --no-durable-acks"
            )
        return True
    if args.memory:
        if args.durable_acks:
            raise UsageError("--memory --durable-acks: memory storage is never durable; drop one")
        return False
    return DURABLE_ACKS_DEFAULT if args.durable_acks is None else bool(args.durable_acks)


def history_options(args: argparse.Namespace) -> tuple[float | None, int]:
    """``--history-interval`` (None: off) and ``--history-keep``, checked."""
    interval, keep = args.history_interval, args.history_keep
    if interval is not None and interval <= 0:
        raise UsageError(f"--history-interval {interval:g}: must be above 0 (or off)")
    if keep < 1:
        raise UsageError(f"--history-keep {keep}: must be at least 1")
    return interval, keep


WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@attrs.frozen
class ClusterOptions:
    """``--cluster``'s options, checked: the node id and address are known only once
    the port is (``--port 0``)."""

    node_id: str | None
    advertise: str | None
    lease_ttl: float


def cluster_options(args: argparse.Namespace, backend: StorageBackend) -> ClusterOptions | None:
    """``--cluster`` and its options, or None without it; refused in one line if they
    do not fit (another storage, a wildcard host without ``--advertise``...)."""
    if not args.cluster:
        given = [name for name, value in (("--node-id", args.node_id),
                                          ("--advertise", args.advertise),
                                          ("--lease-ttl", args.lease_ttl)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --cluster")
        return None
    if not isinstance(backend, PostgresDatabase):
        raise UsageError(
            "--cluster needs --storage postgresql://...: the nodes share their rooms and "
            f"leases in one PostgreSQL database, not {backend}"
        )
    if args.advertise is None and args.host in WILDCARD_HOSTS:
        raise UsageError(
            f"--cluster needs --advertise HOST:PORT with --host {args.host or repr('')}: "
            "other nodes cannot reach a wildcard address"
        )
    if args.advertise is not None:
        host, sep, port = args.advertise.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--advertise wants HOST:PORT, not {args.advertise!r}")
    ttl = DEFAULT_LEASE_TTL if args.lease_ttl is None else args.lease_ttl
    if not ttl > 0:
        raise UsageError(f"--lease-ttl {ttl:g}: must be above 0")
    if args.node_id == "":
        raise UsageError("--node-id: must not be empty")
    return ClusterOptions(args.node_id, args.advertise, ttl)


def open_backend(args: argparse.Namespace) -> StorageBackend:
    """Where ``serve`` keeps rooms: ``--storage URL``, ``--memory``, or ``--data-dir``.

    A data folder is made if it is missing; one that is a file or cannot be made is a
    :class:`UsageError` now, not an error for every client later.
    """
    if args.storage:
        try:
            return open_storage_backend(args.storage)
        except ValueError as exc:
            raise UsageError(f"--storage: {exc}") from None
    if args.memory:
        return MemoryBackend()
    folder = Path(args.data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--data-dir {folder}: not a folder") from None
    except OSError as exc:
        raise UsageError(f"--data-dir {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--data-dir {folder}: not writable")
    return FileBackend(folder)


async def serve(
    args: argparse.Namespace, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until SIGINT or SIGTERM, then close every session, flush every room, return.

    Raises :class:`UsageError` for what the user can fix (a bad option, an address that
    cannot be listened on) before any client is served.
    """
    authorize = jwt_authorizer(args, load_authorize(args.authorize) if args.authorize else None)
    gc.set_threshold(*GC_THRESHOLDS)
    limits = limits_from(args)
    port = serve_port(args)
    durable = durable_acks(args)
    history_interval, history_keep = history_options(args)
    backend = open_backend(args)
    cluster = cluster_options(args, backend)
    if history_interval is not None and isinstance(backend, MemoryBackend):
        raise UsageError("--history-interval: memory storage keeps no history")
    http_handler: HttpHandler = default_http_handler
    if args.demo:
        if args.transport != "wire":
            raise UsageError("--demo: the page is served by the wire transport only")
        try:
            http_handler = demo_http_handler()
        except DemoNotBuiltError as exc:
            raise UsageError(f"--demo: {exc}") from None
    if isinstance(backend, FileBackend):
        # Journals left by a crash: folded now, so that even the rooms nobody opens
        # again end as plain snapshots.
        folded = await backend.fold_journals()
        if folded:
            log_event(
                logging.INFO,
                "journals_folded",
                "folded the journals of %d room(s) into their snapshots",
                folded,
                count=folded,
            )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        leases = None
        if cluster is not None:
            assert isinstance(backend, PostgresDatabase)
            leases = PostgresLeases(backend, ttl=cluster.lease_ttl)
        async with (
            backend,
            leases if leases is not None else contextlib.nullcontext(),
            RoomManager(
                idle_timeout=args.idle_timeout,
                save_throttle=args.save_throttle,
                create_storage=backend.create_storage,
                durable_acks=durable,
                history_interval=history_interval,
                history_keep=history_keep,
                limits=limits,
                ownership=leases,
            ) as manager,
            trio.open_nursery() as nursery,
        ):

            async def handler(request: HandshakeRequest) -> None:
                await serve_connection(manager, request, authorize=authorize)

            registry = metrics_registry(manager)
            nursery.start_soon(watch_loop_lag, manager.stats)
            own_port = args.metrics_port is not None
            serving = ops_http_handler(
                manager,
                metrics=None if own_port else registry,
                admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
                fallback=http_handler,
            )
            listeners = await _listen(
                nursery,
                args.host,
                port,
                functools.partial(
                    serve_websockets,
                    handler,
                    max_message_size=limits.max_message_size,
                    transport=args.transport,
                    http_handler=serving,
                ),
            )
            if own_port:
                metrics_only = ops_http_handler(manager, metrics=registry, fallback=_not_found)
                metrics_at = await _listen(
                    nursery,
                    args.host,
                    args.metrics_port,
                    functools.partial(serve_http, metrics_only),
                )
                log_event(
                    logging.INFO,
                    "metrics_listening",
                    "Metrics on http://%s:%d/metrics",
                    args.host,
                    metrics_at[0].socket.getsockname()[1],
                )
            port = listeners[0].socket.getsockname()[1]
            url = f"ws://{args.host}:{port}"
            where = f"{backend}, " + ("acks once durable" if durable else "acks once in memory")
            if leases is not None and cluster is not None:
                node_id = cluster.node_id or f"{socket.gethostname()}:{port}"
                try:
                    await leases.join(node_id, cluster.advertise or f"{args.host}:{port}")
                except NodeIdInUseError as exc:
                    raise UsageError(f"--node-id: {exc}") from None
                where += f", node {node_id!r} of a cluster"
            if history_interval is not None:
                where += f", a version at most every {history_interval:g} s"
            log_event(
                logging.INFO,
                "listening",
                "Listening on %s (rooms in %s). Connect with %s/?roomId=ROOM&clientId=CLIENT",
                url,
                where,
                url,
                url=url,
            )
            if args.demo:
                page = page_url(listeners[0])
                log_event(
                    logging.INFO,
                    "demo_page",
                    "Demo page: %s (open it in two windows)",
                    page,
                    url=page,
                )
            freeze_start_up_objects()
            task_status.started(port)
            async for signum in signals:
                name = signal.Signals(signum).name
                log_event(
                    logging.INFO,
                    "shutting_down",
                    "%s: closing sessions and saving rooms",
                    name,
                    signal=name,
                )
                break
            failed = await manager.close_all()
            nursery.cancel_scope.cancel()
    if failed:
        raise SystemExit(1)
    log_event(logging.INFO, "shut_down", "all rooms saved; bye")


async def _listen(
    nursery: trio.Nursery,
    host: str,
    port: int,
    serve_on: Callable[..., Awaitable[None]],
) -> list[trio.SocketListener]:
    """Start ``serve_on(host, port)`` in ``nursery``; an address that cannot be
    listened on is a :class:`UsageError`."""
    try:
        listeners: list[trio.SocketListener] = await nursery.start(serve_on, host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listeners


def _not_found(request: HttpRequest) -> HttpResponse:
    return 404, "text/plain; charset=utf-8", b"Not found: this port serves /metrics.\n"


def _only_error(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The one exception of ``kinds`` that ``exc`` is, or that a group holds alone."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, kinds) else None


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command. Errors the user can fix print one line and exit with status 2.

    With ``--log-format json`` that line, and the traceback of a crash, are JSON lines
    too (events ``usage_error`` and ``crashed``).
    """
    args = build_parser().parse_args(argv)
    log_format = getattr(args, "log_format", "text")  # options of serve only
    configure_logging(getattr(args, "log_level", "info"), log_format)
    json_lines = log_format == "json"
    expected = (UsageError, TransferError, StorageError, SnapshotError, ValueError)
    try:
        if args.command == "serve":
            trio.run(serve, args)
        elif args.command == "cluster":
            trio.run(run_cluster_command, args)
        elif args.command == "history":
            log_event(logging.INFO, "history_done", "%s", trio.run(run_history_command, args))
        else:
            log_event(logging.INFO, "transfer_done", "%s", trio.run(run_transfer_command, args))
    except BaseException as exc:
        error = _only_error(exc, expected)
        if error is None:
            if json_lines and isinstance(exc, Exception):
                log_event(
                    logging.CRITICAL,
                    "crashed",
                    "canvas-store-trio %s crashed",
                    args.command,
                    exc_info=exc,
                )
                raise SystemExit(1) from None
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        if json_lines:
            log_event(logging.ERROR, "usage_error", "canvas-store-trio %s: %s", command, error)
        else:
            print(f"canvas-store-trio {command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
