#!/usr/bin/env python3
"""The edit shapes through nginx, in front of 1, 2 and 3 cluster nodes.

    .venv/bin/python bench/cluster_nginx.py                       # 200x2 and 1000x2, 3 rounds
    .venv/bin/python bench/cluster_nginx.py --shape rooms200x2 --rounds 5 --duration 8

Each run starts its servers afresh on a fresh schema of the PostgreSQL at
$CANVAS_STORE_TEST_POSTGRES (default: the local one): N ``serve --cluster`` nodes (durable
acks, as a cluster always has them) behind one nginx worker that routes by room
(``hash $arg_roomId consistent``, the routing of deploy/nginx-cluster.conf without its
TLS), and bench/loadgen.mjs drives the shape through nginx. A fourth setup, ``direct``,
is one node with no nginx: what the proxy itself costs. The setups take turns, round
after round, and the table gives the medians over the rounds.

Columns: deliveries/s and acks/s; p50 and p99 ack latency; the CPU of all nodes and of
nginx per ack; how many connections a node forwarded to another (the hash sends a
room's clients to one node, so this should be 0: the owner is the node that saw the
room first).

All of it runs on one machine: N nodes, nginx, PostgreSQL and the load generator share
its cores, so more nodes cannot mean more throughput beyond the core count. Read the
ratios between setups, never one run's absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.request import urlopen

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as harness  # noqa: E402
from cluster_forwarding import DEFAULT_POSTGRES, cpu_seconds, fresh_schema, node  # noqa: E402

SETUPS = ["direct", "nginx-1", "nginx-2", "nginx-3"]
SHAPES = ["rooms200x2", "rooms1000x2"]


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                      else None)
    if found is None:
        raise SystemExit("nginx is not installed (Debian package: nginx)")
    return found


def nginx_conf(folder: Path, listen: int, upstreams: list[int]) -> Path:
    """A whole nginx.conf: one worker, routing by room to ``upstreams``."""
    servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;"
                        for port in upstreams)
    conf = folder / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        {"user root;" if os.geteuid() == 0 else ""}
        worker_processes 1;
        pid {folder}/nginx.pid;
        error_log {folder}/error.log;
        events {{ worker_connections 8192; }}
        worker_rlimit_nofile 20000;
        http {{
            access_log off;
            client_body_temp_path {folder};
            proxy_temp_path {folder};
            map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
            upstream cluster {{
                hash $arg_roomId consistent;
        {servers}
            }}
            server {{
                listen 127.0.0.1:{listen} backlog=4096;
                location / {{
                    proxy_pass http://cluster;
                    proxy_http_version 1.1;
                    proxy_set_header Upgrade $http_upgrade;
                    proxy_set_header Connection $connection_upgrade;
                    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                    proxy_read_timeout 75s;
                    proxy_buffering off;
                }}
            }}
        }}
        """))
    return conf


@contextmanager
def nginx(folder: Path, upstreams: list[int]) -> Iterator[tuple[int, int]]:
    """nginx in the foreground: (port, pid of its worker)."""
    with tempfile.TemporaryDirectory(dir=folder) as where, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        conf = nginx_conf(Path(where), port, upstreams)
        process = subprocess.Popen(
            [nginx_binary(), "-p", where, "-c", str(conf), "-e", f"{where}/error.log",
             "-g", "daemon off;"], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
                workers = children.read_text().split() if children.exists() else []
                try:
                    with urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                        break
                except OSError as exc:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise SystemExit(f"nginx did not start ({exc}): "
                                         f"{Path(where, 'error.log').read_text()}") from None
                    time.sleep(0.05)
            yield port, int(workers[0])
        finally:
            process.terminate()
            process.wait(10)


def forwarded(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        found = re.search(r"^canvas_store_forwarded_connections_total (\S+)$", text, re.M)
        total += float(found.group(1)) if found else 0.0
    return total


def one_run(setup: str, shape: str, round_no: int, args: argparse.Namespace,
            folder: Path) -> dict[str, float]:
    count = 1 if setup == "direct" else int(setup.split("-")[1])
    base = os.environ.get("CANVAS_STORE_TEST_POSTGRES", DEFAULT_POSTGRES)
    with ExitStack() as stack:
        url = stack.enter_context(fresh_schema(base))
        nodes = [stack.enter_context(node(url, f"n{i}")) for i in range(count)]
        ports, pids = [port for port, _ in nodes], [pid for _, pid in nodes]
        if setup == "direct":
            front, front_pid = ports[0], None
        else:
            front, front_pid = stack.enter_context(nginx(folder, ports))
        _, params, budget = harness.shape_params(
            shape, args, f"{setup}-{round_no}", folder)
        cpu: dict[str, float] = {}
        watched = pids + ([front_pid] if front_pid else [])

        def on_phase(phase: str, epoch: float) -> None:
            if phase in ("measure", "done"):
                cpu[phase] = sum(cpu_seconds(pid) for pid in pids)
                if front_pid:
                    cpu[f"{phase} nginx"] = cpu_seconds(front_pid)

        server = SimpleNamespace(url=f"ws://127.0.0.1:{front}", pid=watched[0])
        parts = harness.run_loadgen(server, "edit", params, args.procs, budget,  # type: ignore[arg-type]
                                    on_phase)
        metrics = harness.summarize("edit", parts, params)
        acks = metrics["acks/s"] * float(params["duration"])
        row = {key: metrics[key] for key in ("deliveries/s", "acks/s", "p50 ack ms",
                                             "p99 ack ms")}
        row["nodes CPU us/ack"] = 1e6 * (cpu["done"] - cpu["measure"]) / max(1.0, acks)
        row["nginx CPU us/ack"] = (1e6 * (cpu["done nginx"] - cpu["measure nginx"]) / max(1.0, acks)
                                   if front_pid else 0.0)
        row["forwarded"] = forwarded(ports)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=SHAPES,
                        help="repeatable (default: both)")
    parser.add_argument("--setup", action="append", choices=SETUPS,
                        help="repeatable (default: all four)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--procs", type=int, default=1, help="loadgen processes")
    args = parser.parse_args()
    setups = args.setup or SETUPS
    columns = ["deliveries/s", "acks/s", "p50 ack ms", "p99 ack ms", "nodes CPU us/ack",
               "nginx CPU us/ack", "forwarded"]
    with tempfile.TemporaryDirectory(prefix="cst-nginx-bench-") as where:
        for shape in args.shape or SHAPES:
            runs: dict[str, list[dict[str, float]]] = {setup: [] for setup in setups}
            for round_no in range(args.rounds):
                order = setups if round_no % 2 == 0 else setups[::-1]
                for setup in order:
                    row = one_run(setup, shape, round_no, args, Path(where))
                    runs[setup].append(row)
                    print(f"  {shape} round {round_no} {setup}: "
                          + ", ".join(f"{k} {v:,.1f}" for k, v in row.items()), flush=True)
            print(f"\n{shape}, medians of {args.rounds} rounds")
            print("| setup | " + " | ".join(columns) + " |")
            print("|---" * (len(columns) + 1) + "|")
            for setup in setups:
                cells = [statistics.median(run[c] for run in runs[setup]) for c in columns]
                print(f"| {setup} | " + " | ".join(f"{cell:,.1f}" for cell in cells) + " |")
            if "nginx-1" in runs:
                def deliveries(setup: str, runs: dict[str, list[dict[str, float]]] = runs) -> Any:
                    return statistics.median(run["deliveries/s"] for run in runs[setup])

                print("deliveries/s against nginx-1: " + ", ".join(
                    f"{setup} {deliveries(setup) / deliveries('nginx-1'):.2f}x"
                    for setup in setups))
            print(flush=True)


if __name__ == "__main__":
    main()
