#!/usr/bin/env python3
"""Benchmark canvas-store-trio against the Node reference server, one command.

    .venv/bin/python bench/run.py                 # every shape, 3 runs per server
    .venv/bin/python bench/run.py --quick         # smoke run, a few seconds per shape
    .venv/bin/python bench/run.py --shape fanout1x50 --reps 5
    .venv/bin/python bench/run.py --ours node     # Node vs Node: checks the harness itself
    .venv/bin/python bench/run.py --durable       # durable acks: files, SQLite, PostgreSQL

For every shape and every repetition it starts a fresh server (file storage in a temporary
folder, the same save throttle and idle timeout for both), drives it with the Node load
generator bench/loadgen.mjs in separate process(es), and stops it. Repetitions alternate
which server goes first. It prints medians for both servers and the ratio ours / Node, and
can write every raw number as JSON (--json). Only 127.0.0.1 is used; every wait is bounded.

--durable runs the edit shapes against five servers: Node, ours with acks once in memory,
and ours with durable acks on files, SQLite and PostgreSQL (a fresh database per run, if
one answers), and also reports commits/s and edits per commit (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import queue
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN = BENCH / "loadgen.mjs"
NODE_SERVER = ROOT / "node" / "reference-server.mjs"
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = VENV_PY if VENV_PY.exists() else Path(sys.executable)
"""Runs our server: the repo's .venv, else (a worktree without one) the Python running this.
Our server inherits $PYTHONPATH, so point it at the tree to measure."""
NODE_MODULES_ENV = "CANVAS_STORE_NODE_MODULES"
"""Names a node_modules folder to use instead of node/node_modules (e.g. in a worktree)."""
POSTGRES_ENVS = ("CANVAS_STORE_BENCH_POSTGRES", "CANVAS_STORE_TEST_POSTGRES")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LISTEN_RE = re.compile(r"ws://127\.0\.0\.1:(\d+)")

# name -> (loadgen shape, parameters). Durations are filled in from --quick / --duration.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "rooms10x5": ("edit", {"rooms": 10, "editors": 5}),
    "fanout1x50": ("edit", {"rooms": 1, "editors": 50}),
    "rooms200x2": ("edit", {"rooms": 200, "editors": 2}),
    "rooms1000x2": ("edit", {"rooms": 1000, "editors": 2}),
    "join100k": ("join", {}),
    "save100k": ("stall", {}),
    "idle-sessions": ("idle", {"mode": "sessions"}),
    "idle-rooms": ("idle", {"mode": "rooms"}),
    "join300": ("burst", {"n": 300, "saved": False}),
    "join300saved": ("burst", {"n": 300, "saved": True}),
}
DEFAULT_SHAPES = [name for name in SHAPES if name != "rooms200x2"]
DURABLE_SHAPES = ["rooms10x5", "fanout1x50", "rooms200x2", "rooms1000x2"]


@dataclass(frozen=True)
class Variant:
    """One server configuration: a column of the tables."""

    side: str
    """Key of its runs in the results (and the JSON): node, ours, durable-files, ..."""
    label: str
    kind: str  # "node" or "trio"
    tag: str
    """One letter, in run ids and data folder names."""
    storage: str = "files"  # files | sqlite | postgres
    durable: bool | None = None
    """Pass --durable-acks (True) or --no-durable-acks (False); None: no flag."""


DURABLE_VARIANTS = ["node", "ours", "durable-files", "durable-sqlite", "durable-pg"]


# ------------------------------------------------------------------ servers


def node_modules() -> Path:
    env = os.environ.get(NODE_MODULES_ENV)
    return Path(env).resolve() if env else ROOT / "node" / "node_modules"


def node_server_script(tmp: Path) -> Path:
    """The reference server to run. With $CANVAS_STORE_NODE_MODULES, a copy of it in
    ``tmp`` beside a link to that folder, since its imports resolve from where it lies."""
    modules = node_modules()
    if not (modules / "ws").is_dir():
        raise SystemExit(f"no ws in {modules}: run `make test` once, or set ${NODE_MODULES_ENV}")
    if modules == ROOT / "node" / "node_modules":
        return NODE_SERVER
    here = tmp / "node-reference"
    here.mkdir()
    shutil.copyfile(NODE_SERVER, here / NODE_SERVER.name)
    shutil.copyfile(NODE_SERVER.parent / "package.json", here / "package.json")
    (here / "node_modules").symlink_to(modules, target_is_directory=True)
    return here / NODE_SERVER.name


def server_cmd(
    v: Variant, data_dir: Path, storage_url: str | None, throttle: float, args: argparse.Namespace
) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", "0"]
    common += ["--save-throttle", str(throttle), "--idle-timeout", str(args.idle_timeout)]
    where = ["--data-dir", str(data_dir)] if storage_url is None else ["--storage", storage_url]
    if v.kind == "node":
        return ["node", str(args.node_server), *where, *common]
    cmd = [str(PYTHON), "-m", "canvas_store_trio", "serve", *where, *common]
    if v.durable is not None:
        cmd.append("--durable-acks" if v.durable else "--no-durable-acks")
    return cmd


class Server:
    """A server process, listening once this returns. With ``tracer`` (a command that
    runs the rest, as strace does), :attr:`pid` is the server's, the tracer's child."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, tracer: list[str] | None = None):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(tracer or []), *cmd],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        self.url = ""
        while time.monotonic() < deadline:
            m = LISTEN_RE.search(log_path.read_text(errors="replace"))
            if m:
                self.url = f"ws://127.0.0.1:{m.group(1)}"
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self._pid = self.proc.pid
        if self.url and tracer:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            kids = children.read_text().split() if children.exists() else []
            if len(kids) != 1:
                self.url = ""
            else:
                self._pid = int(kids[0])
        if not self.url:
            self.stop()
            raise RuntimeError(f"{name} server did not start; log:\n{log_path.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        return self._pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self._pid != self.proc.pid:  # the tracer ends with its child
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


# ------------------------------------------------------------------ big document


def write_big_snapshot(path: Path, components: int) -> int:
    """A snapshot file in the Node FileStorage shape with `components` component records.

    Entities have four components each (a block, a colour, a text and an ownership tag),
    with field timestamps spread over the history.
    """
    state: dict[str, dict[str, Any]] = {}
    stamps: dict[str, dict[str, int]] = {}
    ts = 0
    n = 0
    e = 0
    while n < components:
        eid = f"{e:08x}-0000-4000-8000-{e:012x}"
        recs: dict[str, dict[str, Any]] = {
            "block": {
                "_exists": True,
                "position": [e % 997 * 10.5, e // 997 * 7.25],
                "size": [120, 80],
                "rotation": 0,
                "rank": f"a{e:06d}",
            },
            "color": {"_exists": True, "red": e % 256, "green": 128, "blue": 64, "alpha": 255},
            "text": {"_exists": True, "content": f"note {e}: the quick brown fox", "fontSize": 16},
            "owner": {"_exists": True, "clientId": f"client-{e % 17}"},
        }
        for comp, rec in recs.items():
            if n >= components:
                break
            if n % 50 == 0:
                ts += 1
            key = f"{eid}/{comp}"
            state[key] = rec
            stamps[key] = {f: ts for f in rec}
            n += 1
        e += 1
    path.write_text(
        json.dumps({"timestamp": ts, "state": state, "timestamps": stamps}, separators=(",", ":"))
    )
    return n


SMALL_ROOM_KEYS = 10


def write_small_room(path: Path, i: int) -> None:
    """A small saved room: a few shapes someone drew, as the Node FileStorage writes it."""
    state = {}
    stamps = {}
    for k in range(SMALL_ROOM_KEYS // 2):
        eid = f"{i:08x}-{k:04x}-4000-8000-000000000000"
        state[f"{eid}/block"] = {"_exists": True, "position": [k * 10, i], "size": [100, 50]}
        state[f"{eid}/color"] = {"_exists": True, "red": k, "green": 0, "blue": 255}
        stamps[f"{eid}/block"] = {"_exists": k + 1, "position": k + 1, "size": k + 1}
        stamps[f"{eid}/color"] = {"_exists": k + 1, "red": k + 1, "green": k + 1, "blue": k + 1}
    snap = {"timestamp": SMALL_ROOM_KEYS // 2, "state": state, "timestamps": stamps}
    path.write_text(json.dumps(snap, separators=(",", ":")))


# ------------------------------------------------------------------ load generator


def run_loadgen(
    server: Server,
    shape: str,
    params: dict[str, Any],
    procs: int,
    max_seconds: float,
    on_phase: Callable[[str, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `procs` loadgen processes on one shape; returns their results.

    `on_phase(name, epoch)` is called when shard 0 enters a phase ("connect", "connected",
    "measure", "done"); `epoch` is when it did, in Unix seconds by the loadgen's clock.
    """
    barrier = procs > 1
    children = []
    lines: queue.Queue[tuple[int, str]] = queue.Queue()
    for i in range(procs):
        cfg = {
            "url": server.url,
            "serverPid": server.pid,
            "clkTck": os.sysconf("SC_CLK_TCK"),
            "maxSeconds": max_seconds,
            "shape": shape,
            "params": params,
            "shard": {"index": i, "count": procs},
            "barrier": barrier,
        }
        p = subprocess.Popen(
            ["node", str(LOADGEN), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, NODE_MODULES_ENV: str(node_modules())},
        )
        children.append(p)

        def pump(idx: int = i, proc: subprocess.Popen[str] = p) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put((idx, line))
            lines.put((idx, ""))

        threading.Thread(target=pump, daemon=True).start()

    results: dict[int, dict[str, Any]] = {}
    stages: dict[str, set[int]] = {}
    finished: set[int] = set()
    deadline = time.monotonic() + max_seconds + 15
    error = None
    try:
        while len(finished) < procs and time.monotonic() < deadline:
            try:
                idx, line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line == "":
                finished.add(idx)
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev["event"] == "stage":
                got = stages.setdefault(ev["name"], set())
                got.add(idx)
                if len(got) == procs:
                    start = time.time() * 1000 + 200
                    for c in children:
                        assert c.stdin is not None
                        c.stdin.write(f"go {start}\n")
                        c.stdin.flush()
            elif ev["event"] == "phase":
                if on_phase is not None and idx == 0:
                    on_phase(ev["name"], float(ev.get("epochMs", time.time() * 1000)) / 1000)
            elif ev["event"] == "result":
                results[idx] = ev["result"]
            elif ev["event"] == "error":
                error = f"loadgen {idx}: {ev['error']}"
                break
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait(timeout=10)
    if error or len(results) < procs:
        err = "".join((c.stderr.read() if c.stderr else "") for c in children)[-3000:]
        raise RuntimeError(error or f"loadgen gave {len(results)}/{procs} results; stderr:\n{err}")
    return [results[i] for i in range(procs)]


def hist_percentile(buckets: dict[str, int], q: float) -> float:
    """Percentile in ms from merged log buckets (bucket k covers exp(k/100) us, ~1% wide)."""
    items = sorted((int(k), v) for k, v in buckets.items())
    total = sum(v for _, v in items)
    if not total:
        return math.nan
    target = q * total
    seen = 0
    for k, v in items:
        seen += v
        if seen >= target:
            return math.exp((k + 0.5) / 100) / 1000
    return math.exp((items[-1][0] + 0.5) / 100) / 1000


def summarize(shape: str, parts: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, float]:
    """One repetition's metrics (name -> number)."""
    if shape == "edit":
        buckets: dict[str, int] = {}
        for p in parts:
            for k, v in p["hist"]["buckets"].items():
                buckets[k] = buckets.get(k, 0) + v
        win = float(parts[0]["windowS"])
        wall = max(float(p["wallS"]) for p in parts)
        for p in parts:
            if p["badFrames"] or p["unexpectedCloses"]:
                raise RuntimeError(
                    f"bad run: {p['badFrames']} bad frames, {p['unexpectedCloses']} closes"
                )
        acks = sum(p["acks"] for p in parts)
        dels = sum(p["deliveries"] for p in parts)
        fanout = int(extra["editors"]) - 1
        if acks and abs(dels / acks - fanout) > 0.05 * fanout:
            print(
                f"    warning: {dels / acks:.2f} deliveries per ack, expected {fanout}", flush=True
            )
        return {
            "acks/s": sum(p["acks"] for p in parts) / win,
            "deliveries/s": sum(p["deliveries"] for p in parts) / win,
            "p50 ack ms": hist_percentile(buckets, 0.50),
            "p99 ack ms": hist_percentile(buckets, 0.99),
            "server CPU %": 100 * float(parts[0]["serverCpuS"]) / wall,
            "loadgen CPU %": 100 * sum(float(p["loadgenCpuS"]) for p in parts) / wall,
            "server CPU us/ack": 1e6
            * float(parts[0]["serverCpuS"])
            / max(1, sum(p["acks"] for p in parts)),
            "  of which kernel us/ack": 1e6 * float(parts[0]["serverSysS"]) / max(1, acks),
            "connect s": max(float(p["connectS"]) for p in parts),
        }
    r = parts[0]
    if shape == "join":
        return {
            "cold join ms": statistics.median(r["coldMs"]),
            "warm join ms": statistics.median(r["warmMs"]),
            "server CPU s (cold join)": statistics.median(r["coldServerCpuS"]),
            "RSS per loaded 100k room MB": float(r["rssPerBigRoomKB"]) / 1024,
        }
    if shape == "stall":
        wins = r["windows"]
        saves = [w for w in wins if w["kind"] == "save"]
        base = [w for w in wins if w["kind"] == "baseline"]
        if any(w["savedAtMs"] is None for w in saves):
            print(
                f"    warning: no file changed in the data dir during a save window: {saves}",
                flush=True,
            )
        return {
            # Per window: the longest probe ack latency (send -> ack), i.e. the longest time the
            # server left a frame unanswered. (The gap between acks also counts the probe's own
            # scheduling delays.) Median over the windows, robust to a one-off hiccup of this
            # shared machine, then the worst window; the no-save windows give the noise floor.
            "stall ms (save, median)": statistics.median(w["maxLatMs"] for w in saves),
            "stall ms (save, worst)": max(w["maxLatMs"] for w in saves),
            "stall ms (no save, median)": statistics.median(w["maxLatMs"] for w in base),
            "ack gap ms (save, median)": statistics.median(w["maxGapMs"] for w in saves),
            "probe p99 ms (save)": statistics.median(w["p99LatMs"] or 0 for w in saves),
            "probe own loop delay ms": statistics.median(w["probeMaxLoopDelayMs"] for w in wins),
            "save seen after ms": statistics.median(w["savedAtMs"] or math.nan for w in saves),
        }
    if shape == "burst":
        if r["unexpectedCloses"]:
            raise RuntimeError(f"bad run: {r['unexpectedCloses']} sockets closed")
        bursts = r["bursts"]

        def med(key: str) -> float:
            return statistics.median(float(b[key]) for b in bursts)

        # Per burst: the percentile over its clients; then the median over the bursts.
        return {
            "p50 join ms": med("p50Ms"),
            "p99 join ms": med("p99Ms"),
            "  p50 to open ms": med("openP50Ms"),
            "  p50 open to synced ms": med("afterOpenP50Ms"),
            "burst ms (first open to last synced)": med("wallMs"),
            "server CPU ms per burst": 1000 * med("serverCpuS"),
        }
    if shape == "idle":
        label = "KB per idle session" if r["mode"] == "sessions" else "KB per idle room"
        return {label: float(r["perItemBytes"]) / 1024}
    raise ValueError(shape)


# Lower-is-better metrics; the others are throughput.
LOWER_BETTER = re.compile(r"ms|KB|MB|CPU|connect")
# metric -> (kind, limit): ratio ours/node must be >= / <= limit, or ours absolute must be <= limit.
TARGETS: dict[str, tuple[str, float]] = {
    "deliveries/s": ("ratio>=", 1.0),
    "p99 ack ms": ("ratio<=", 1.0),
    "stall ms (save, median)": ("abs<=", 5.0),
    "cold join ms": ("ratio<=", 1.0),
    "warm join ms": ("ratio<=", 1.0),
    "p50 join ms": ("ratio<=", 1.0),
    "KB per idle session": ("ratio<=", 2.0),
    "KB per idle room": ("ratio<=", 2.0),
}


# A ratio that misses its target by at most this much is reported as "≈", not "SHORT":
# repeated Node-vs-Node runs on the 2-core machine differ by about that much.
NOISE = 0.10


def shape_params(
    name: str, args: argparse.Namespace, run_id: str, data_dir: Path
) -> tuple[str, dict[str, Any], float]:
    shape, base = SHAPES[name]
    params = dict(base)
    params["prefix"] = f"{name}-{run_id}"
    if shape == "edit":
        params["warmup"] = args.warmup
        params["duration"] = args.duration
        rooms = int(base["rooms"])
        budget = args.warmup + args.duration + 60 + rooms * 0.1
    elif shape == "join":
        params["bigRooms"] = [f"big-{i}" for i in range(args.join_rooms)]
        params["expectKeys"] = args.components
        params["warmReps"] = args.join_warm
        budget = 120.0 * args.join_rooms
    elif shape == "stall":
        params.update(
            bigRoom="big-0",
            probeRoom="probe",
            throttle=args.stall_throttle,
            saves=args.saves,
            baseline=args.saves,
            settle=1.0,
            dataDir=str(data_dir),
        )
        budget = 180 + 2 * args.saves * (args.stall_throttle + 3)
    elif shape == "burst":
        params["bursts"] = args.bursts
        budget = 60 + 70 * args.bursts
    else:
        params["n"] = args.idle_n
        params["settle"] = args.idle_settle
        budget = 120 + args.idle_n * 0.1
    return shape, params, budget


def print_profile(path: Path, label: str, top: int = 12) -> None:
    """Summarize a py-spy raw file (collapsed stacks, --threads): the event-loop thread's
    self and inclusive shares per function, then what the worker threads did while busy."""
    if not path.exists():
        print(f"    profile {label}: py-spy wrote nothing", flush=True)
        return

    def short(frame: str) -> str:
        func, _, where = frame.partition(" (")
        return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else func

    main_self: dict[str, int] = {}
    main_incl: dict[str, int] = {}
    worker_self: dict[str, int] = {}
    main_total = worker_total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *rest = stack.split(";")  # "thread (TID): NAME;frame;frame..."
        frames = [short(f) for f in rest] or ["?"]
        if thread.endswith("MainThread"):
            main_total += n
            main_self[frames[-1]] = main_self.get(frames[-1], 0) + n
            for f in set(frames):
                main_incl[f] = main_incl.get(f, 0) + n
        elif frames[-1] != "WorkerThread._work (_thread_cache.py)":  # an idle worker
            worker_total += n
            worker_self[frames[-1]] = worker_self.get(frames[-1], 0) + n
    print(f"    profile {label}: raw stacks in {path}", flush=True)
    if main_total:
        print(f"      event-loop thread, {main_total} samples; self% then incl%:", flush=True)
        for f, n in sorted(main_self.items(), key=lambda kv: -kv[1])[:top]:
            print(f"      {100 * n / main_total:5.1f}  {f}", flush=True)
        print("      --", flush=True)
        for f, n in sorted(main_incl.items(), key=lambda kv: -kv[1])[:top]:
            print(f"      {100 * n / main_total:5.1f}  {f}", flush=True)
    if worker_total:
        print(f"      worker threads, {worker_total} busy samples (% of event-loop samples):")
        for f, n in sorted(worker_self.items(), key=lambda kv: -kv[1])[:5]:
            print(f"      {100 * n / max(1, main_total):5.1f}  {f}", flush=True)


def fmt(v: float) -> str:
    if v != v:  # NaN
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def spread(vals: list[float]) -> str:
    vals = [v for v in vals if v == v]
    if len(vals) < 2 or not min(vals):
        return ""
    return f"±{100 * (max(vals) - min(vals)) / 2 / statistics.median(vals):.0f}%"


# ------------------------------------------------------------------ storage and commits


def postgres_url(args: argparse.Namespace) -> str:
    if args.postgres:
        return str(args.postgres)
    return next((os.environ[e] for e in POSTGRES_ENVS if os.environ.get(e)), DEFAULT_POSTGRES)


def postgres_problem(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used for the bench, or None."""
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        return f"{url!r} is not a postgresql:// URL"
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error as exc:
        return " ".join(str(exc).split())
    return None


@contextmanager
def postgres_database(url: str) -> Iterator[tuple[str, str]]:
    """A fresh database on the server of ``url``, dropped afterwards: (its URL, its name)."""
    import psycopg
    from psycopg import sql

    name = f"cst_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}")), name
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


@contextmanager
def run_storage(
    v: Variant, data_dir: Path, args: argparse.Namespace
) -> Iterator[tuple[str | None, str | None]]:
    """Where one run keeps its rooms: (the --storage URL or None for --data-dir, the
    PostgreSQL database's name or None)."""
    if v.storage == "files":
        yield None, None
    elif v.storage == "sqlite":
        yield f"sqlite:///{data_dir.resolve() / 'rooms.db'}", None
    else:
        with postgres_database(postgres_url(args)) as (url, name):
            yield url, name


class PgCommits:
    """Counts the committed transactions of one PostgreSQL database over the measured
    window: ``pg_stat_database.xact_commit``, polled every 0.1 s from a connection to
    another database. Backends publish their counts about once a second, so the rate is
    the least-squares slope through the samples where the count moved, not the
    difference of the first and last (off by up to a second's commits at either end)."""

    def __init__(self, url: str, dbname: str):
        self.url = url
        self.dbname = dbname
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def on_phase(self, phase: str, epoch: float = 0.0) -> None:
        if phase == "measure" and self._thread is None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        elif phase == "done":
            self._stop.set()

    def _poll(self) -> None:
        import psycopg

        query = "SELECT xact_commit FROM pg_stat_database WHERE datname = %s"
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                while True:
                    row = conn.execute(query, (self.dbname,)).fetchone()
                    self.samples.append((time.monotonic(), int(row[0]) if row else 0))
                    if self._stop.wait(0.1):
                        break
        except psycopg.Error as exc:
            self.error = " ".join(str(exc).split())

    def rate(self) -> float:
        """Commits per second over the window (NaN if it could not be measured)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.error:
            print(f"    warning: commit count from PostgreSQL failed: {self.error}", flush=True)
        # The first sample after each publication is within 0.1 s of it: fit those.
        steps = [b for a, b in itertools.pairwise(self.samples) if b[1] != a[1]]
        if len(steps) < 2:
            return math.nan
        t0 = steps[0][0]
        xs = [t - t0 for t, _ in steps]
        ys = [float(n) for _, n in steps]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


SYNC_CALLS = ("fdatasync", "syncfs", "fsync")
SYNC_LINE = re.compile(r"^\d+\s+(\d+\.\d+)\s+(" + "|".join(SYNC_CALLS) + r")\(")


class SyncCalls:
    """How often the server called fdatasync, syncfs and fsync in the measured window.

    The server runs under ``strace -f --seccomp-bpf``, which stops it only at those
    calls (an attach with ``-p`` stops it at every call, and halved its throughput),
    and logs each with its time; the calls that began inside the window (the loadgen's
    clock) are counted once the server has stopped. Still slows the server down a little:
    only for the counts."""

    def __init__(self, out: Path):
        self.out = out
        self.start = self.end = math.nan

    def tracer(self) -> list[str]:
        cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-ttt"]
        return [*cmd, "-e", f"trace={','.join(SYNC_CALLS)}", "-o", str(self.out)]

    def on_phase(self, phase: str, epoch: float) -> None:
        if phase == "measure":
            self.start = epoch
        elif phase == "done":
            self.end = epoch

    def rates(self) -> dict[str, float]:
        """Calls per second in the window, per call (NaN: not measured)."""
        seconds = self.end - self.start
        if not self.out.exists() or not seconds > 0:
            print("    warning: no strace log, or no measured window", flush=True)
            return dict.fromkeys(SYNC_CALLS, math.nan)
        counts = dict.fromkeys(SYNC_CALLS, 0)
        with self.out.open() as f:
            for line in f:
                m = SYNC_LINE.match(line)
                if m and self.start <= float(m.group(1)) < self.end:
                    counts[m.group(2)] += 1
        return {name: n / seconds for name, n in counts.items()}


def run_once(
    name: str,
    rep: int,
    v: Variant,
    tmp: Path,
    big: Path,
    args: argparse.Namespace,
    count_syncs: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One fresh server, one loadgen run on one shape: (metrics, raw loadgen results).

    With durable acks on PostgreSQL the run also counts commits; with ``count_syncs``
    the server runs under strace, which counts its fdatasync and fsync calls.
    """
    run_id = f"{rep}{v.tag}{'t' if count_syncs else ''}"
    data_dir = tmp / f"{name}-{run_id}"
    data_dir.mkdir()
    with run_storage(v, data_dir, args) as (storage_url, pg_db):
        return _run_once(
            name, run_id, rep, v, tmp, big, args, data_dir, storage_url, pg_db, count_syncs
        )


def _run_once(
    name: str,
    run_id: str,
    rep: int,
    v: Variant,
    tmp: Path,
    big: Path,
    args: argparse.Namespace,
    data_dir: Path,
    storage_url: str | None,
    pg_db: str | None,
    count_syncs: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    side, kind = v.side, v.kind
    shape, params, budget = shape_params(name, args, run_id, data_dir)
    if shape in ("join", "stall"):
        rooms = params["bigRooms"] if shape == "join" else [params["bigRoom"]]
        for room in rooms:
            shutil.copyfile(big, data_dir / f"{room}.json")
    if name == "idle-rooms":
        for i in range(args.idle_n):
            write_small_room(data_dir / f"{params['prefix']}-room-{i}.json", i)
        params["expectKeys"] = SMALL_ROOM_KEYS
    if shape == "burst" and params["saved"]:
        for b in range(params["bursts"]):
            for i in range(params["n"]):
                write_small_room(data_dir / f"{params['prefix']}-b{b}-room-{i}.json", i)
    procs = args.procs if shape == "edit" else 1
    throttle = args.stall_throttle if shape == "stall" else args.save_throttle
    log = tmp / f"{name}-{run_id}.log"
    syncs = SyncCalls(tmp / f"strace-{name}-{run_id}.txt") if count_syncs else None
    cmd = server_cmd(v, data_dir, storage_url, throttle, args)
    server = Server(side, cmd, log, syncs.tracer() if syncs is not None else None)
    profiler = Profiler(server.pid, tmp / f"profile-{name}-{run_id}.txt", args.profile)
    hooks: list[Callable[[str, float], None]] = []
    if args.profile and kind == "trio":
        hooks.append(profiler.on_phase)
    pg = PgCommits(postgres_url(args), pg_db) if pg_db and v.durable and shape == "edit" else None
    if pg is not None:
        hooks.append(pg.on_phase)
    if syncs is not None:
        hooks.append(syncs.on_phase)

    def on_phase(phase: str, epoch: float) -> None:
        for hook in hooks:
            hook(phase, epoch)

    try:
        parts = run_loadgen(server, shape, params, procs, budget, on_phase if hooks else None)
        metrics = summarize(shape, parts, params)
        if profiler.stop():
            print_profile(profiler.out, f"{name} [{rep}] {side}")
        if pg is not None:
            metrics["commits/s"] = pg.rate()
    finally:
        profiler.stop()
        server.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    if syncs is not None:  # its log is complete once the server has stopped
        rates = syncs.rates()
        # A commit is one call that makes edits durable: a journal's fdatasync, or one
        # syncfs for a batch of journals (files); the WAL's fdatasync (SQLite).
        metrics["commits/s"] = rates["fdatasync"] + rates["syncfs"]
        metrics["fsyncs/s"] = rates["fsync"]
    if "commits/s" in metrics:
        commits = metrics["commits/s"]
        metrics["edits per commit"] = metrics["acks/s"] / commits if commits else math.nan
    for p in parts:
        p.pop("hist", None)
    return metrics, parts


PHASE_ENDS = {"measure": "done", "connect": "connected"}
"""The loadgen phase that ends each phase --profile can sample."""


class Profiler:
    """py-spy on the server, sampling one phase: the measured window ("measure", from
    the loadgen's "measure" to "done") or the editors connecting ("connect", to
    "connected")."""

    def __init__(self, pid: int, out: Path, phase: str | None):
        self.pid = pid
        self.out = out
        self.phase = phase or "measure"
        self.proc: subprocess.Popen[bytes] | None = None

    def on_phase(self, phase: str, epoch: float = 0.0) -> None:
        if phase == self.phase and self.proc is None:
            cmd = [str(PYTHON.parent / "py-spy"), "record", "--threads", "--rate", "250"]
            cmd += ["--format", "raw", "--output", str(self.out), "--pid", str(self.pid)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif phase == PHASE_ENDS[self.phase] and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> bool:
        """Let py-spy write its file; True if it ran."""
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return True


def verdict_for(metric: str, ratio: float, ours: float) -> tuple[str, str]:
    """(target text, verdict) for a metric with a target, else ("", "")."""
    if metric not in TARGETS:
        return "", ""
    kind, lim = TARGETS[metric]
    if kind == "ratio>=":
        target, ok = f"≥ {lim}x", ratio >= lim
    elif kind == "ratio<=":
        target, ok = f"≤ {lim}x", ratio <= lim
    else:
        target, ok = f"≤ {lim} ms", ours <= lim
    if ours != ours or (kind != "abs<=" and ratio != ratio):
        return target, "-"
    if ok:
        return target, "ok"
    if kind != "abs<=" and abs(ratio - lim) <= NOISE * lim:
        return target, "≈"  # misses by less than run-to-run noise
    return target, "SHORT"


def table(
    shapes: list[str], raw: dict[str, dict[str, list[dict[str, float]]]], sides: list[str]
) -> str:
    rows = []
    for name in shapes:
        per_side = raw[name]
        names: list[str] = []
        for runs in per_side.values():
            for m in runs:
                names += [k for k in m if k not in names]
        for metric in names:
            med = {}
            spr = {}
            for side in sides:
                vals = [m[metric] for m in per_side[side] if metric in m]
                med[side] = statistics.median(vals) if vals else math.nan
                spr[side] = spread(vals)
            n, o = med.get("node", math.nan), med.get("ours", math.nan)
            ratio = o / n if n and n == n and o == o else math.nan
            target, verdict = verdict_for(metric, ratio, o)
            sn, so = spr.get("node", ""), spr.get("ours", "")
            rows.append((name, metric, fmt(n), sn, fmt(o), so, fmt(ratio), target, verdict))
    head = ("shape", "metric", "Node", "±", "ours", "±", "ours/Node", "target", "")
    return markdown(head, rows)


def markdown(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


STRACE = "+strace"
"""Suffix of a variant's side for its extra run under strace (the commit counts)."""
DURABLE_METRICS = [
    "acks/s",
    "deliveries/s",
    "p50 ack ms",
    "p99 ack ms",
    "server CPU %",
    "server CPU us/ack",
    "commits/s",
    "edits per commit",
    "fsyncs/s",
]
COUNTED = {"commits/s", "edits per commit", "fsyncs/s"}
"""Metrics that come from the strace run when the variant's own runs lack them."""
DURABLE_RATIOS = ["acks/s", "deliveries/s", "p50 ack ms", "p99 ack ms", "server CPU us/ack"]
# metric -> (kind, limit) for durable acks on files against Node (from the issue).
DURABLE_TARGETS: dict[str, tuple[str, float]] = {
    "deliveries/s": ("ratio>=", 1.0),
    "p99 ack ms": ("ratio<=", 2.0),
}
REPORTED_ONLY = {"rooms1000x2"}
"""Shapes whose durable figures are reported, not held to the targets."""
MAX_COST = 0.10
"""Durable acks are the default if they cost at most this share of deliveries/s on
every shape (files, against ours acking once in memory)."""


def durable_tables(
    shapes: list[str], raw: dict[str, dict[str, list[dict[str, float]]]], variants: list[Variant]
) -> str:
    """Medians per variant, then the ratios against Node and the cost of durable acks."""
    sides = [v.side for v in variants]
    label = {v.side: v.label for v in variants}
    medians: dict[tuple[str, str, str], float] = {}
    rows1 = []
    strace_used = False
    for name in shapes:
        for metric in DURABLE_METRICS:
            cells = []
            for side in sides:
                runs = [m for m in raw[name].get(side, []) if metric in m]
                mark = ""
                if not runs and metric in COUNTED:
                    runs = [m for m in raw[name].get(side + STRACE, []) if metric in m]
                    mark = " †" if runs else ""
                vals = [m[metric] for m in runs]
                med = statistics.median(vals) if vals else math.nan
                medians[name, metric, side] = med
                strace_used = strace_used or bool(mark)
                cells.append(f"{fmt(med)} {spread(vals)}".strip() + mark)
            if any(c != "-" for c in cells):
                rows1.append((name, metric, *cells))
        traced = [m["acks/s"] for side in sides for m in raw[name].get(side + STRACE, [])]
        if traced:
            cells = []
            for side in sides:
                vals = [m["acks/s"] for m in raw[name].get(side + STRACE, [])]
                cells.append(fmt(statistics.median(vals)) if vals else "-")
            rows1.append((name, "acks/s in the strace run †", *cells))
    out = [markdown(("shape", "metric", *(label[s] for s in sides)), rows1)]
    if strace_used:
        out.append(
            "† from one extra run under strace: commits = fdatasync + syncfs calls, fsyncs = "
            "fsync calls (snapshot saves, folder syncs); strace slows the server a little, "
            "see its acks/s"
        )

    def ratio(name: str, metric: str, a: str, b: str) -> float:
        x, y = medians.get((name, metric, a), math.nan), medians.get((name, metric, b), math.nan)
        return x / y if y and x == x and y == y else math.nan

    cols = [s for s in sides if s != "node"]
    have = set(sides)
    rows2 = []
    worst: tuple[float, str] | None = None
    for name in shapes:
        for metric in DURABLE_RATIOS:
            cells = [fmt(ratio(name, metric, s, "node")) for s in cols]
            target = verdict = cost = ""
            files_node = ratio(name, metric, "durable-files", "node")
            files_ours = ratio(name, metric, "durable-files", "ours")
            if metric in DURABLE_TARGETS and "durable-files" in have:
                kind, lim = DURABLE_TARGETS[metric]
                target = f"{'≥' if kind == 'ratio>=' else '≤'} {lim}x"
                if name in REPORTED_ONLY:
                    verdict = "(reported)"
                elif files_node != files_node:
                    verdict = "-"
                elif files_node >= lim if kind == "ratio>=" else files_node <= lim:
                    verdict = "ok"
                else:
                    verdict = "≈" if abs(files_node - lim) <= NOISE * lim else "SHORT"
            if metric == "deliveries/s" and files_ours == files_ours:
                lost = 100 * (1 - files_ours)
                cost = "ok" if files_ours >= 1 - MAX_COST else f"costs {lost:.0f}%"
                if worst is None or files_ours < worst[0]:
                    worst = (files_ours, name)
            row = (name, metric, *cells)
            if "durable-files" in have:
                row += (
                    (fmt(files_ours), target, verdict, cost)
                    if "ours" in have
                    else (target, verdict)
                )
            rows2.append(row)
    head2: tuple[str, ...] = ("shape", "metric", *(f"{label[s]}/Node" for s in cols))
    if "durable-files" in have:
        head2 += ("durable files/ours",) if "ours" in have else ()
        head2 += ("target (durable files/Node)", "")
        head2 += (f"cost ≤ {100 * MAX_COST:.0f}%",) if "ours" in have else ()
    out += ["", markdown(head2, rows2)]
    if worst is not None:
        ok = worst[0] >= 1 - MAX_COST
        out.append(
            f"durable acks on files cost {'at most' if ok else 'more than'} "
            f"{100 * MAX_COST:.0f}% of deliveries/s on every shape measured "
            f"(worst: {worst[1]}, durable files/ours {fmt(worst[0])})"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repetition, short windows, small N"
    )
    ap.add_argument(
        "--shape", action="append", choices=list(SHAPES), help="run only this shape (repeatable)"
    )
    ap.add_argument(
        "--durable",
        action="store_true",
        help="durable acks: the edit shapes " + ", ".join(DURABLE_SHAPES) + " against Node, "
        "ours acking in memory, and ours with durable acks on files, SQLite and PostgreSQL, "
        "with commits/s and edits per commit",
    )
    ap.add_argument(
        "--variant",
        action="append",
        choices=DURABLE_VARIANTS,
        help="--durable: run only this server configuration (repeatable; default all)",
    )
    ap.add_argument(
        "--postgres",
        metavar="URL",
        help="--durable: PostgreSQL server to make a fresh database on for each run "
        f"(default ${POSTGRES_ENVS[0]}, ${POSTGRES_ENVS[1]}, or {DEFAULT_POSTGRES})",
    )
    ap.add_argument(
        "--strace-duration",
        type=float,
        help="--durable: measured seconds of the extra run under strace that counts the "
        "commits on files and SQLite (default 5, quick: as --duration); 0: no such run",
    )
    ap.add_argument("--reps", type=int, help="runs per server per shape (default 3, quick 1)")
    ap.add_argument(
        "--ours",
        choices=["trio", "node"],
        default="trio",
        help="what to run as 'ours': the Trio server, or Node again to check the harness",
    )
    ap.add_argument("--only", choices=["node", "ours"], help="run one side only")
    ap.add_argument(
        "--warmup", type=float, help="edit shapes: seconds before the window (default 2, quick 0.5)"
    )
    ap.add_argument(
        "--duration", type=float, help="edit shapes: measured seconds (default 8, quick 2)"
    )
    ap.add_argument(
        "--save-throttle",
        type=float,
        default=5.0,
        help="both servers, every shape but save100k (default 5 s, as the example server)",
    )
    ap.add_argument(
        "--stall-throttle",
        type=float,
        default=1.0,
        help="both servers, save100k: the edit-to-save wait in each window (default 1 s)",
    )
    ap.add_argument(
        "--idle-timeout", type=float, default=600.0, help="both servers (default 600 s)"
    )
    ap.add_argument("--components", type=int, default=100_000, help="size of the big document")
    ap.add_argument("--join-rooms", type=int, help="cold joins per run (default 3, quick 1)")
    ap.add_argument("--join-warm", type=int, default=3, help="warm joins per cold join")
    ap.add_argument(
        "--saves",
        type=int,
        help="saves of the big room per run, and as many windows "
        "without a save (default 5, quick 2)",
    )
    ap.add_argument(
        "--bursts", type=int, help="join300 shapes: bursts of 300 joins per run (default 3)"
    )
    ap.add_argument("--idle-n", type=int, help="idle sessions / rooms (default 1000)")
    ap.add_argument(
        "--idle-settle",
        type=float,
        default=5.0,
        help="idle shapes: seconds to wait before reading RSS (default 5)",
    )
    ap.add_argument(
        "--procs", type=int, default=1, help="loadgen processes for edit shapes (default 1)"
    )
    ap.add_argument("--json", type=Path, help="write every raw number here")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="measure",
        choices=["measure", "connect"],
        help="sample ours with py-spy during each run's measured window (or, with "
        "'connect', while the edit shapes' editors connect) and print the hot spots "
        "(perturbs the numbers: use for diagnosis, not for the table)",
    )
    ap.add_argument("--verbose", action="store_true", help="print every loadgen result")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (data, logs)")
    args = ap.parse_args()
    q = args.quick
    args.reps = args.reps or (1 if q else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 2.0)
    args.duration = args.duration or (2.0 if q else 8.0)
    args.join_rooms = args.join_rooms or (1 if q else 3)
    args.saves = args.saves or (2 if q else 5)
    args.idle_n = args.idle_n or 1000
    args.bursts = args.bursts or (1 if q else 3)
    if args.strace_duration is None:
        args.strace_duration = args.duration if q else 5.0
    shapes = args.shape or (DURABLE_SHAPES if args.durable else DEFAULT_SHAPES)
    if args.durable and (args.ours != "trio" or args.only):
        ap.error("--durable picks its servers with --variant, not --ours or --only")
    if args.durable and any(SHAPES[s][0] != "edit" for s in shapes):
        ap.error("--durable runs edit shapes only: " + ", ".join(DURABLE_SHAPES))
    if args.variant and not args.durable:
        ap.error("--variant needs --durable")

    # 1000 rooms x 2 editors is 2000 sockets on each side.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    variants = [
        Variant("node", "Node", "node", "n"),
        Variant("ours", "ours", "node" if args.ours == "node" else "trio", "o"),
    ]
    if args.only:
        variants = [v for v in variants if v.side == args.only]
    ours_from = ""
    skipped: list[str] = []
    if args.durable or any(v.kind == "trio" for v in variants):
        check = subprocess.run(
            [str(PYTHON), "-m", "canvas_store_trio", "serve", "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        if check.returncode != 0:
            print(
                f"ours does not answer `serve --help` yet:\n{check.stderr[-2000:]}", file=sys.stderr
            )
            return 2
        where = subprocess.run(
            [str(PYTHON), "-c", "import canvas_store_trio as m; print(m.__file__)"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        ours_from = str(Path(where.stdout.strip()).parent.parent)
        if args.durable:
            has_flag = "--durable-acks" in check.stdout
            variants = [
                Variant("node", "Node", "node", "n"),
                Variant("ours", "ours", "trio", "o", durable=False if has_flag else None),
                Variant("durable-files", "durable files", "trio", "f", "files", True),
                Variant("durable-sqlite", "durable SQLite", "trio", "s", "sqlite", True),
                Variant("durable-pg", "durable PG", "trio", "p", "postgres", True),
            ]
            if args.variant:
                variants = [v for v in variants if v.side in args.variant]
            keep = []
            for v in variants:
                why = None
                if v.durable and not has_flag:
                    why = "ours has no `serve --durable-acks` (not on this tree yet)"
                elif v.storage == "postgres":
                    why = postgres_problem(postgres_url(args))
                if why:
                    skipped.append(f"{v.side}: {why}")
                else:
                    keep.append(v)
            variants = keep
            if not has_flag:
                skipped.append("ours runs without a flag: it acks once in memory")
            if shutil.which("strace") is None or not args.strace_duration:
                skipped.append("commits/s on files and SQLite: no strace run (n/a)")

    tmp = Path(tempfile.mkdtemp(prefix="canvas-bench-"))
    args.node_server = node_server_script(tmp)
    big = tmp / "big.json"
    if any(SHAPES[s][0] in ("join", "stall") for s in shapes):
        t = time.monotonic()
        write_big_snapshot(big, args.components)
        print(
            f"big document: {args.components} components, {big.stat().st_size / 1e6:.1f} MB "
            f"({time.monotonic() - t:.1f} s to write)",
            flush=True,
        )

    node_version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; "
        f"node {node_version.strip()}, python {platform.python_version()}; ours = {args.ours}; "
        f"save throttle {args.save_throttle} s (save100k: {args.stall_throttle} s); "
        f"{args.reps} run(s) per server per shape; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if ours_from:
        commit = ""
        if Path(ours_from).resolve().is_relative_to(ROOT):
            rev = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
            commit = subprocess.run(rev, capture_output=True, text=True).stdout.strip()
            dirty = ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]
            if subprocess.run(dirty, capture_output=True, text=True).stdout.strip():
                commit += " + uncommitted changes in src"
        print(f"ours: {ours_from}{f' at {commit}' if commit else ''}", flush=True)
    if args.durable:
        print("servers: " + ", ".join(v.side for v in variants), flush=True)
        for why in skipped:
            print(f"  skipped: {why}", flush=True)
    trace_syncs = args.durable and bool(args.strace_duration) and shutil.which("strace") is not None

    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    details: list[dict[str, Any]] = []  # every loadgen result, minus histograms
    failures: list[str] = []
    width = max(len(v.side) for v in variants) + len(STRACE) if variants else 4
    traced_args = argparse.Namespace(**{**vars(args), "duration": args.strace_duration})
    for name in shapes:
        raw[name] = {v.side: [] for v in variants}
        runs = []
        for rep in range(args.reps):
            order = variants if rep % 2 == 0 else list(reversed(variants))
            runs += [(rep, v, False) for v in order]
        if trace_syncs:  # one extra run each, for the commit counts
            runs += [(0, v, True) for v in variants if v.durable and v.storage != "postgres"]
        for rep, v, traced in runs:
            side = v.side + (STRACE if traced else "")
            t0 = time.monotonic()
            try:
                metrics, parts = run_once(
                    name, rep, v, tmp, big, traced_args if traced else args, count_syncs=traced
                )
            except Exception as e:  # report and carry on with the next run
                failures.append(f"{name} rep {rep} {side}: {e}")
                print(f"  {name} [{rep}] {side}: FAILED {str(e)[:500]}", flush=True)
                continue
            raw[name].setdefault(side, []).append(metrics)
            details.append({"shape": name, "rep": rep, "side": side, "loadgen": parts})
            if args.verbose:
                print(f"    {json.dumps(parts)[:3000]}", flush=True)
            shown = list(metrics.items())[:4]
            shown += [(k, metrics[k]) for k in ("commits/s", "edits per commit") if k in metrics]
            short = ", ".join(f"{k} {fmt(x)}" for k, x in shown)
            took = time.monotonic() - t0
            load = os.getloadavg()[0]
            print(
                f"  {name} [{rep}] {side:{width}}: {short}  ({took:.0f} s, load {load:.1f})",
                flush=True,
            )

    print()
    print(f"medians of {args.reps} run(s) per server; ± is half the min-max range over runs")
    if args.durable:
        print(durable_tables(shapes, raw, variants))
        for why in skipped:
            print(f"skipped: {why}")
    else:
        print(table(shapes, raw, [v.side for v in variants]))
    if failures:
        print("\nfailed runs:\n  " + "\n  ".join(failures))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "machine": platform.node(),
                    "cores": os.cpu_count(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "raw": raw,
                    "details": details,
                    "failures": failures,
                },
                indent=1,
            )
        )
    if args.keep:
        print(f"\nlogs and data kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
