"""Helpers for storage tests: a PostgreSQL schema of our own, documents to save, and a
storage that blocks or fails its commits on command.

PostgreSQL tests use ``$CANVAS_STORE_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Each test gets a fresh schema,
named after the process and a random suffix and dropped afterwards, so parallel runs
and leftovers of killed runs never meet. Without a reachable server the tests fail
when ``$CI`` is set and are skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import functools
import os
import random
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
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
