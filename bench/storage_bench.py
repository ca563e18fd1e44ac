"""Save cost of one changed key in a big room: whole-file saves against incremental SQL.

    .venv/bin/python bench/storage_bench.py [--components 100000] [--runs 15]
                                            [--postgres URL] [--dir DIR]

A room of N components is saved once to each backend. Then, run after run, one key is
changed and saved the way the room saves it: FileStorage rewrites the whole document
(as the Node server does); SQLiteStorage and PostgresStorage save only the changed key
and the room timestamp (``save_changes``). Each backend's median save time and bytes
written are printed, with ratios against the file save. Also shown: the first full save
and a cold load of the whole room, which every backend pays once per room start.

Bytes written: the file's size for FileStorage; for SQLite, what this process wrote
(``wchar`` in /proc/self/io: WAL frames and their headers); for PostgreSQL, the WAL the
server generated (``pg_current_wal_lsn()`` before and after; the table pages themselves
are written later by the checkpointer, and are not counted).

PostgreSQL: ``--postgres`` or ``$CANVAS_STORE_BENCH_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``); the bench works in a schema of its
own and drops it. Without a reachable server the PostgreSQL column is left out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from canvas_store_trio import FileStorage, StorageError
from canvas_store_trio._document import Document
from canvas_store_trio.storage._postgres import PostgresDatabase
from canvas_store_trio.storage._sqlite import SQLiteDatabase

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def make_document(components: int) -> Document:
    """A room of shapes: position, size, colour, a short label; every field timestamped."""
    doc = Document(unsaved_keys=set())
    batch: dict[str, Any] = {}
    for i in range(components):
        batch[f"entity-{i:07d}/{'shape' if i % 2 else 'label'}"] = {
            "_exists": True,
            "_version": 1,
            "x": i * 1.25,
            "y": -i * 0.5,
            "width": 120,
            "height": 80,
            "rotation": 0,
            "color": "#3b82f6",
            "text": f"item {i}",
        }
        if len(batch) == 1000:
            doc.apply([batch])
            batch = {}
    if batch:
        doc.apply([batch])
    doc.take_changes()
    return doc


def wchar() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def change_one_key(doc: Document, run: int) -> None:
    doc.apply([{f"entity-{run * 7919 % 1000:07d}/label": {"x": run + 0.5, "text": f"run {run}"}}])


class PgWal:
    """Reads the server's WAL position on a connection of its own."""

    def __init__(self, conninfo: str) -> None:
        import psycopg

        self.conn = psycopg.connect(conninfo, autocommit=True)

    def lsn(self) -> str:
        row = self.conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def diff(self, before: str, after: str) -> int:
        row = self.conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after, before)).fetchone()
        assert row is not None
        return int(row[0])


async def bench(args: argparse.Namespace) -> None:
    print(f"building a room of {args.components:,} components ...", flush=True)
    doc = make_document(args.components)
    results: dict[str, dict[str, float]] = {}
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="canvas-store-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    # --- FileStorage: every save rewrites the whole document -------------------------
    files = FileStorage(workdir / "files", "room")
    first = await timed(lambda: files.save(doc.snapshot()))
    times, sizes = [], []
    for run in range(args.file_runs):
        change_one_key(doc, run)
        doc.take_changes()
        times.append(await timed(lambda: files.save(doc.snapshot())))
        sizes.append(files.path.stat().st_size)
    load = await timed(lambda: _load(files))
    results["FileStorage (whole file)"] = {
        "first": first, "save": statistics.median(times), "bytes": statistics.median(sizes),
        "load": load,
    }

    # --- SQLite: only the changed key -------------------------------------------------
    async with SQLiteDatabase(workdir / "rooms.db") as db:
        storage = db.create_storage("room")
        first = await timed(lambda: storage.save(doc.snapshot()))
        times, written = [], []
        for run in range(args.runs):
            change_one_key(doc, 1000 + run)
            changes = doc.take_changes()
            before = wchar()
            times.append(await timed(lambda: storage.save_changes(changes)))  # noqa: B023
            written.append(wchar() - before)
    async with SQLiteDatabase(workdir / "rooms.db") as db:
        load = await timed(lambda: _load(db.create_storage("room")))
    results["SQLite save_changes"] = {
        "first": first, "save": statistics.median(times), "bytes": statistics.median(written),
        "load": load,
    }

    # --- PostgreSQL: only the changed key --------------------------------------------
    url = args.postgres or os.environ.get("CANVAS_STORE_BENCH_POSTGRES") or DEFAULT_POSTGRES
    schema = f"cst_bench_{uuid.uuid4().hex[:8]}"
    try:
        import psycopg
        from psycopg.conninfo import make_conninfo

        with psycopg.connect(url, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")  # a fixed, generated identifier
    except Exception as exc:
        print(f"PostgreSQL at {url} is not usable, left out: {exc}", file=sys.stderr)
    else:
        conninfo = make_conninfo(url, options=f"-csearch_path={schema}")
        try:
            wal = PgWal(conninfo)
            async with PostgresDatabase(conninfo) as pg:
                pg_storage = pg.create_storage("room")
                first = await timed(lambda: pg_storage.save(doc.snapshot()))
                times, written = [], []
                for run in range(args.runs):
                    change_one_key(doc, 2000 + run)
                    changes = doc.take_changes()
                    before_lsn = wal.lsn()
                    times.append(await timed(lambda: pg_storage.save_changes(changes)))  # noqa: B023
                    written.append(wal.diff(before_lsn, wal.lsn()))
            async with PostgresDatabase(conninfo) as pg:
                load = await timed(lambda: _load(pg.create_storage("room")))
            wal.conn.close()
            results["PostgreSQL save_changes"] = {
                "first": first, "save": statistics.median(times),
                "bytes": statistics.median(written), "load": load,
            }
        finally:
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")

    report(args, results)


async def _load(storage: Any) -> None:
    snapshot = await storage.load()
    if snapshot is None:
        raise StorageError("nothing loaded")


def report(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> None:
    base = results["FileStorage (whole file)"]
    print()
    print(f"one changed key in a room of {args.components:,} components; "
          f"median of {args.file_runs} file saves and {args.runs} incremental saves")
    print(f"{platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} cores, {platform.machine()}")
    print()
    header = (f"{'backend':<26} {'save ms':>9} {'x file':>8} {'bytes':>11} {'x file':>8}"
              f" {'1st save ms':>12} {'load ms':>9}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<26} {r['save'] * 1e3:>9.2f} {r['save'] / base['save']:>8.4f}"
              f" {r['bytes']:>11,.0f} {r['bytes'] / base['bytes']:>8.5f}"
              f" {r['first'] * 1e3:>12.1f} {r['load'] * 1e3:>9.1f}")
    print()
    for name, r in results.items():
        if r is not base:
            print(f"{name}: one-key save takes {100 * r['save'] / base['save']:.2f}% of the "
                  f"whole-file save time and writes {100 * r['bytes'] / base['bytes']:.3f}% "
                  "of its bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--components", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=25, help="incremental saves (25)")
    parser.add_argument("--file-runs", type=int, default=7, help="whole-file saves (7)")
    parser.add_argument("--postgres", help=f"PostgreSQL URL ({DEFAULT_POSTGRES})")
    parser.add_argument("--dir", help="work folder (a new temp folder)")
    trio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()
