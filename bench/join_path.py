"""Instructions the server spends per join when many rooms open at once, by callgrind.

The join300 shapes of bench/run.py time joins, and on this shared machine those timings
move by 20 % between runs. This counts instead: it starts ``serve`` under
``valgrind --tool=callgrind`` (every thread), joins one warm-up room, zeroes the
counters, opens ``--bursts`` bursts of ``--rooms`` rooms at once (one client each, a
``reconnect`` with ``lastTimestamp: 0`` sent once the 101 is in, as the npm client
does, and read up to its ``synced``), dumps the counters and prints the instructions
per join. Every session stays open to the end, as in join300. The count repeats to
about 1 % from run to run, whatever else the machine is doing; compare two trees with
``PYTHONPATH=<tree>/src``.

    .venv/bin/python bench/join_path.py                 # 2 bursts of 300 new rooms
    .venv/bin/python bench/join_path.py --saved         # rooms saved on disk, loaded
    .venv/bin/python bench/join_path.py --no-callgrind  # plain run: wall time per burst

User-space instructions only: the kernel's share of the system calls is not counted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import LISTEN_RE, write_small_room

ROOT = Path(__file__).resolve().parent.parent


def _masked_text(payload: bytes) -> bytes:
    """One masked client text frame (payloads under 126 bytes)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


_RECONNECT = _masked_text(b'{"type":"reconnect","lastTimestamp":0,"protocolVersion":2}')


class _Client:
    """One joining client on a non-blocking socket: handshake, reconnect, up to synced."""

    def __init__(self, port: int, room: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        key = base64.b64encode(os.urandom(16)).decode()
        self.request = (
            f"GET /?roomId={room}&clientId={room}-c HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.received = b""
        self.opened = False
        self.synced = False

    def on_readable(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError(f"the server closed a joining connection: {self.received[:200]!r}")
        self.received += data
        if not self.opened:
            head, sep, rest = self.received.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"the upgrade was refused: {head[:200]!r}")
            self.opened, self.received = True, rest
            self.sock.sendall(_RECONNECT)
        self.synced = b'"type":"synced"' in self.received


def _join_all(clients: list[_Client], timeout: float) -> None:
    """Send every request head first (as one tick of the npm client would), then serve
    every client's reads until all have synced."""
    with selectors.DefaultSelector() as selector:
        for client in clients:
            client.sock.sendall(client.request)
            selector.register(client.sock, selectors.EVENT_READ, client)
        waiting = len(clients)
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{waiting} of {len(clients)} clients did not sync in time")
            for key, _ in selector.select(1.0):
                client = key.data
                client.on_readable()
                if client.synced:
                    selector.unregister(client.sock)
                    waiting -= 1


def _callgrind_total(out_file: Path) -> int:
    for line in out_file.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out_file}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rooms", type=int, default=300, help="rooms per burst (default 300)")
    ap.add_argument("--bursts", type=int, default=2, help="bursts (default 2)")
    ap.add_argument("--saved", action="store_true", help="rooms saved on disk (10 components)")
    ap.add_argument("--no-callgrind", action="store_true", help="no valgrind: time the bursts")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per burst")
    args = ap.parse_args()
    callgrind = not args.no_callgrind
    if callgrind and shutil.which("valgrind") is None:
        print("join_path: needs valgrind (Debian package valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="join-path-") as tmp:
        folder = Path(tmp)
        data = folder / "data"
        data.mkdir()
        if args.saved:
            for b in range(args.bursts):
                for i in range(args.rooms):
                    write_small_room(data / f"b{b}-room-{i}.json", i)
        out = folder / "callgrind.out"
        cmd = [sys.executable, "-m", "canvas_store_trio", "serve", "--host", "127.0.0.1",
               "--port", "0", "--data-dir", str(data)]
        if callgrind:
            cmd = ["valgrind", "--tool=callgrind", "--separate-threads=no",
                   f"--callgrind-out-file={out}", *cmd]
        log_path = folder / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      stdin=subprocess.DEVNULL)
        try:
            port = None
            deadline = time.monotonic() + 300
            while port is None and time.monotonic() < deadline and server.poll() is None:
                m = LISTEN_RE.search(log_path.read_text(errors="replace"))
                port = int(m.group(1)) if m else None
                time.sleep(0.2)
            if port is None:
                print(f"join_path: the server did not start:\n{log_path.read_text()[-2000:]}",
                      file=sys.stderr)
                return 1
            held = [_Client(port, "warm")]
            _join_all(held, args.timeout)
            time.sleep(1.0)
            if callgrind:
                subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True,
                               capture_output=True)
            walls = []
            for b in range(args.bursts):
                clients = [_Client(port, f"b{b}-room-{i}") for i in range(args.rooms)]
                started = time.monotonic()
                _join_all(clients, args.timeout)
                walls.append(time.monotonic() - started)
                held += clients
                if args.saved and any(b'"timestamp":0' in c.received for c in clients):
                    raise RuntimeError("a saved room synced at timestamp 0: it was not loaded")
            joins = args.bursts * args.rooms
            if callgrind:
                subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True,
                               capture_output=True)
                dumps = sorted(folder.glob("callgrind.out*"), key=os.path.getmtime)
                total = _callgrind_total(dumps[-1])
                print(json.dumps({"joins": joins, "instructions_per_join": total // joins}))
            else:
                wall = sorted(walls)[len(walls) // 2]
                print(json.dumps({"joins": joins, "median_burst_ms": round(wall * 1000, 1)}))
            for client in held:
                client.sock.close()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
