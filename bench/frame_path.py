"""The server's per-frame work, in one process: read, unmask, parse, apply, queue, write.

Rooms of two sessions on real socket pairs; each frame is written to one session's
peer end, read by the wire socket's poller callback, handled by its room, and flushed
once per batch of 1024 frames as the poller does. No epoll and no load generator, so
it isolates our own code (plus the read and write system calls).

    .venv/bin/python bench/frame_path.py                 # CPU time per frame
    bench/frame_path.sh                                  # instructions per frame (callgrind)

CPU time moves with the machine (25-32 us per frame on one idle VM in one hour);
instruction counts under callgrind repeat to 0.1 %, so compare changes with those.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from canvas_store_trio.rooms._room import Room
from canvas_store_trio.rooms._session import Session
from canvas_store_trio.transport._http import HttpRequest
from canvas_store_trio.transport._wire import WireSocket

BATCH = 1024


def client_frame(payload: bytes) -> bytes:
    """A masked client text frame (payloads under 64 KiB)."""
    size = len(payload)
    head = bytes([0x81]) + (
        bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    )
    key = b"\x12\x34\x56\x78"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class InlinePoller:
    """Stands in for ReadPoller: the callbacks are called by the loop below."""

    def __init__(self) -> None:
        self.after_batch: list[Callable[[], None]] = []

    def is_waiting(self, fd: int) -> bool:
        return True

    def call_after_batch(self, callback: Callable[[], None]) -> None:
        self.after_batch.append(callback)


def attach(room: Room, client_id: str, poller: Any, *, outbox_max_bytes: int
           ) -> tuple[WireSocket, socket.socket]:
    """A read-write session of ``room`` on one end of a socket pair, read by ``poller``'s
    callbacks: (its wire socket, the peer end, where the client's frames are written)."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    ws = WireSocket(stream, HttpRequest("GET", "/", {}), max_message_size=1 << 20, poller=poller)
    session = Session(ws, room.room_id, client_id, "readwrite", None,
                      outbox_max_bytes=outbox_max_bytes, pending=room._unflushed,
                      stats=room.stats)
    room._add_session(session)
    ws._on_message = functools.partial(room._handle_frame, session)
    ws._after_messages = room._flush
    return ws, peer


def drain(pair: list[tuple[WireSocket, socket.socket]]) -> None:
    """Read and drop what the server wrote to each peer end so far."""
    for _, peer in pair:
        try:
            while peer.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


async def run(rooms: int, frames: int, warmup: int) -> float:
    poller: Any = InlinePoller()  # has the two methods a WireSocket calls
    members: list[list[tuple[WireSocket, socket.socket]]] = []
    for r in range(rooms):
        room = Room(f"r{r}", save_throttle=1e9)
        room._accepting = True
        pair = [attach(room, f"c{r}-{c}", poller, outbox_max_bytes=1 << 22) for c in range(2)]
        members.append(pair)
    payloads = [
        [
            client_frame(
                f'{{"type":"patch","messageId":"c{r}-{i}","documentPatches":'
                f'[{{"c{r}/pos":{{"x":{i},"y":{i}}}}}]}}'.encode()
            )
            for i in range(4)
        ]
        for r in range(rooms)
    ]

    def drain_peers() -> None:
        for pair in members:
            drain(pair)

    def frames_through(count: int) -> None:
        for n in range(count):
            r = n % rooms
            ws, peer = members[r][(n // rooms) & 1]
            peer.send(payloads[r][n & 3])
            ws._on_readable()
            if n % BATCH == BATCH - 1:
                callbacks, poller.after_batch = poller.after_batch, []
                for callback in callbacks:
                    callback()
                drain_peers()

    drain_peers()
    frames_through(warmup)
    began = time.process_time()
    frames_through(frames)
    return (time.process_time() - began) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--frames", type=int, default=int(os.environ.get("FRAMES", 100_000)))
    parser.add_argument("--warmup", type=int, default=2000)
    args = parser.parse_args()
    per_frame = trio.run(run, args.rooms, args.frames, args.warmup)
    print(f"{per_frame * 1e6:.2f} us CPU per frame ({args.rooms} rooms of 2)")


if __name__ == "__main__":
    main()
