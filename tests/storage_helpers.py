"""Helpers for storage tests: a PostgreSQL schema of our own, documents to save, and a
storage that blocks or fails its commits on command.

PostgreSQL tests use ``$CANVAS_STORE_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Each test gets a fresh schema,
named after the process and a random suffix and dropped afterwards, so parallel runs
and leftovers of killed runs never meet. Without a reachable server the tests fail
when ``$CI`` is set and are skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import trio

from canvas_store_trio import (
    Changes,
    Document,
    IncrementalStorage,
    Limits,
    RecordChange,
    RoomManager,
    Snapshot,
    Storage,
    StorageError,
    VersionInfo,
    decode_snapshot,
    open_storage_backend,
)
from canvas_store_trio.cluster import Lease, Ownership, SoleOwnership
from canvas_store_trio.cluster._ownership import LostHook

POSTGRES_ENV = "CANVAS_STORE_TEST_POSTGRES"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_url() -> str:
    return os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES


@functools.cache
def _postgres_problem(url: str) -> str | None:
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        return f"psycopg is not installed ({exc}); pip install -e '.[postgres]'"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error as exc:
        return " ".join(str(exc).split())
    return None


def require_postgres() -> str:
    """The test server's URL; fail (under CI) or skip when it cannot be reached."""
    url = postgres_url()
    problem = _postgres_problem(url)
    if problem:
        message = f"PostgreSQL at {url} is not usable: {problem} (set ${POSTGRES_ENV})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must start PostgreSQL", pytrace=False)
        pytest.skip(message)
    return url


@contextmanager
def postgres_schema(*, as_url: bool = False) -> Iterator[str]:
    """A fresh schema for one test; yield a conninfo whose search_path is that schema.

    With ``as_url``, the conninfo is a ``postgresql://`` URL (the schema in its query), as
    ``serve --storage`` and the other commands take it.
    """
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    url = require_postgres()
    name = f"cst_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        if as_url:
            query = urlencode({"options": f"-csearch_path={name}", "application_name": name})
            yield f"{url}{'&' if '?' in url else '?'}{query}"
        else:
            yield make_conninfo(url, options=f"-csearch_path={name}", application_name=name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            # Connections a test left behind (a killed child's) must not block the drop.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (name,),
            )
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def run_sql(conninfo: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """One statement in a connection of its own, committed; the rows it returned."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description is not None else []


async def sql(conninfo: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """:func:`run_sql` in a worker thread."""
    return await trio.to_thread.run_sync(run_sql, conninfo, query, params)


async def stored_state(storage_url: str, room: str) -> dict[str, Any]:
    """The document of ``room`` as storage holds it (read the way a server loads it)."""
    async with open_storage_backend(storage_url) as backend:
        snapshot = await backend.create_storage(room).load()
    return {} if snapshot is None else dict(snapshot.state)


@asynccontextmanager
async def rows_locked(conninfo: str, query: str, params: Sequence[Any] = ()
                      ) -> AsyncIterator[None]:
    """Run ``query`` (a ``SELECT ... FOR UPDATE``) and hold its row locks until the block
    ends: other statements on those rows wait, as they would for a slow database."""
    import psycopg

    conn = await trio.to_thread.run_sync(lambda: psycopg.connect(conninfo))
    try:
        await trio.to_thread.run_sync(lambda: conn.execute(query, params).fetchall())
        yield
    finally:
        await trio.to_thread.run_sync(conn.close)  # rolls back: the locks go


# --- a PostgreSQL server of the test's own -------------------------------------------------


def postgres_bindir() -> Path | None:
    """Where PostgreSQL's server programs (initdb, pg_ctl) are: ``pg_config --bindir``,
    else what the test server says (its ``pg_config`` view); None if neither knows."""
    candidates = []
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                              check=False)
        candidates.append(done.stdout.strip())
    if _postgres_problem(postgres_url()) is None:
        with contextlib.suppress(Exception):
            candidates += [row[0] for row in run_sql(
                postgres_url(), "SELECT setting FROM pg_config WHERE name = 'BINDIR'")]
    for folder in candidates:
        if folder and all((Path(folder) / name).is_file() for name in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class PrivatePostgres:
    """A PostgreSQL server of one test's own, which it may stop and start at will; see
    :func:`private_postgres`."""

    bindir: Path
    folder: Path
    port: int
    as_owner: list[str]
    """The command prefix that runs a program as the data folder's owner."""

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
        done = subprocess.run(
            [*self.as_owner, str(self.bindir / "pg_ctl"), *args, "-D", str(self.data),
             "-l", str(self.folder / "server.log"), "-o", options, "-w", "-t", "60"],
            capture_output=True, text=True, timeout=90, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {done.stdout}{done.stderr}"
                               f"{self.server_log()[-2000:]}")

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode)

    def server_log(self) -> str:
        try:
            return (self.folder / "server.log").read_text(errors="replace")
        except OSError:
            return ""


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh PostgreSQL server on a free loopback port (trust auth, superuser
    ``postgres``), in a temporary folder; stopped and removed on the way out.

    Skips, with the reason, where it cannot be made: no initdb/pg_ctl to be found, or
    running as root (which initdb refuses) without a ``postgres`` user to run it as.
    """
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl were not found (pg_config is not on "
                    "PATH, and no test server says where its programs are)")
    as_owner: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, which initdb refuses, and there is no postgres "
                        "user to run it as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root, which initdb refuses, and runuser is missing")
        as_owner = [runuser, "-u", "postgres", "--"]
    # Not under pytest's tmp_path: as root that is a folder no other user may enter.
    folder = Path(tempfile.mkdtemp(prefix="cst-postgres-"))
    try:
        if owner is not None:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        done = subprocess.run(
            [*as_owner, str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        server = PrivatePostgres(bindir, folder, free_port(), as_owner)
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(Exception):
                server.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def save_like_a_room(storage: Storage, document: Document) -> None:
    """Save as a room does: only the changes on an incremental storage, else everything."""
    if isinstance(storage, IncrementalStorage):
        await storage.save_changes(document.take_changes())
    else:
        await storage.save(document.snapshot())


def new_document() -> Document:
    return Document(unsaved_keys=set())


ODD_VALUES: list[Any] = [
    0,
    -1,
    2**53 + 1,
    -(2**63),
    2**64 - 1,
    0.1,
    1.5e300,
    -2.5e-300,
    "",
    "héllo ✓ 🎨",
    "nul\x00in\x00a string",
    "quotes ' \" and \\ backslash",
    "\u2028\u2029 line separators",
    None,
    True,
    False,
    [],
    {},
    [1, [2, [3, {"deep": [None]}]]],
    {"nested": {"a": [1, 2.5, "x"], "b": None}},
]


def random_patch(rng: random.Random, keys: list[str]) -> dict[str, Any]:
    """One patch of creates, updates, buffer deltas and deletions."""
    patch: dict[str, Any] = {}
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.15:
            patch[key] = {"_exists": False}
        elif roll < 0.45:
            patch[key] = {"_exists": True, "v": rng.choice(ODD_VALUES), "n": rng.random()}
        elif roll < 0.6:
            length = rng.randint(0, 6)
            patch[key] = {
                "buf": {"__buf": 1, "len": length, "runs": [[rng.randint(0, 5), [rng.random()]]]}
            }
        else:
            patch[key] = {rng.choice("abcd"): rng.choice(ODD_VALUES)}
    return patch


@attrs.define
class CommandedStorage:
    """A room's storage that keeps what was committed, and commits as it is told.

    - :meth:`block`: commits from now on wait until :meth:`release`;
    - ``fail_next``: the next commit to finish raises :class:`StorageError`.

    ``load`` returns what was committed (and saved). A save of a snapshot newer than the
    last commit would make uncommitted edits durable: it is recorded in ``early_saves``.
    It keeps versions too (a :class:`HistoryStorage`): each ``save_version`` is recorded
    in ``version_saves`` as ``(version, timestamp committed then, trio time)``.
    """

    records: dict[str, RecordChange] = attrs.Factory(dict)
    timestamp: int = 0
    commits: list[Changes] = attrs.Factory(list)
    attempts: int = 0
    saves: list[Snapshot] = attrs.Factory(list)
    early_saves: list[Snapshot] = attrs.Factory(list)
    fail_next: bool = False
    versions: dict[int, Snapshot] = attrs.Factory(dict)
    version_saves: list[tuple[int, int, float]] = attrs.Factory(list)
    _gate: trio.Event | None = None

    async def load(self) -> Snapshot | None:
        if not self.records and not self.timestamp:
            return None
        return Snapshot(self.timestamp,
                        {key: change.record for key, change in self.records.items()},
                        {key: change.timestamps for key, change in self.records.items()})

    async def save(self, snapshot: Snapshot) -> None:
        if snapshot.timestamp > self.timestamp:
            self.early_saves.append(snapshot)
        self.saves.append(snapshot)
        self.records = {key: RecordChange(record, snapshot.timestamps.get(key, {}))
                        for key, record in snapshot.state.items()}
        self.timestamp = snapshot.timestamp

    async def commit(self, changes: Changes) -> None:
        self.attempts += 1
        if self._gate is not None:
            await self._gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise StorageError("the disk is full")
        self.commits.append(changes)
        self.records.update(changes.records)
        self.timestamp = changes.timestamp

    async def save_version(self, version: int, parts: Sequence[bytes], *, keep: int) -> None:
        await trio.lowlevel.checkpoint()
        self.version_saves.append((version, self.timestamp, trio.current_time()))
        self.versions[version] = decode_snapshot(b"".join(parts))
        for old in sorted(self.versions)[:-keep]:
            del self.versions[old]

    async def list_versions(self) -> list[VersionInfo]:
        return [VersionInfo(v, datetime.now(UTC)) for v in sorted(self.versions)]

    async def load_version(self, version: int) -> Snapshot | None:
        return self.versions.get(version)

    def block(self) -> None:
        self._gate = trio.Event()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()
        self._gate = None

    async def wait_attempts(self, n: int) -> None:
        """Until ``n`` commits have begun."""
        with trio.fail_after(5):
            while self.attempts < n:
                await trio.sleep(0.001)

    def committed_keys(self) -> list[set[str]]:
        return [set(changes.records) for changes in self.commits]


class LosableOwnership(SoleOwnership):
    """Owns every room, keeping each lease it hands out (``leases``), so a test can make
    a room lose its lease: ``leases[room_id].lose(reason)``."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    async def acquire(self, room_id: str, on_lost: LostHook) -> Lease:
        lease = self.leases[room_id] = await super().acquire(room_id, on_lost)
        return lease


@asynccontextmanager
async def durable_manager(storage: CommandedStorage, ownership: Ownership | None = None
                          ) -> AsyncIterator[RoomManager]:
    """Durable acks, ``storage`` for every room; saves only at close (the throttle is long)."""
    async with RoomManager(durable_acks=True, create_storage=lambda room_id: storage,
                           save_throttle=1000.0, idle_timeout=600.0, flush_timeout=60.0,
                           limits=Limits(ping_interval=None), ownership=ownership) as manager:
        yield manager
