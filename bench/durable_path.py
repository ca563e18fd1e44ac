"""The server's per-edit work with durable acks on file storage, in one process.

Like bench/frame_path.py (rooms on real socket pairs, frames fed to the wire socket's
poller callback, no epoll and no load generator), but the rooms run for real
(``Room.run``: load, committer, saver) on a temporary folder, and it goes in rounds as
the load generator does: every editor sends one edit, then the round waits until every
room has committed them, by when the committer has written their acks and broadcasts
(each editor keeps one edit in flight), and reads the peers' ends empty. So it
measures the whole durable path of an edit, on the event loop and in the folder's
writer thread: applying it, holding its frames, committing (one batch per round, or
more), releasing and writing them.

    .venv/bin/python bench/durable_path.py                  # 10 rooms of 5, durable
    .venv/bin/python bench/durable_path.py --rooms 200 --editors 2
    .venv/bin/python bench/durable_path.py --memory         # the same, acks from memory

It prints CPU time per edit (the process's, every thread) and wall time per round.
CPU time moves with the machine: compare runs made one after another, several times.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from typing import Any

import trio
from frame_path import InlinePoller, attach, client_frame, drain

from canvas_store_trio.rooms._room import Room
from canvas_store_trio.storage import FileStorage
from canvas_store_trio.transport._wire import WireSocket


async def run(
    folder: str, rooms: int, editors: int, rounds: int, warmup: int, durable: bool
) -> tuple[float, float]:
    """CPU seconds per edit and wall seconds per round."""
    poller: Any = InlinePoller()
    members: list[tuple[Room, list[tuple[WireSocket, socket.socket]]]] = []
    async with trio.open_nursery() as nursery:
        for r in range(rooms):
            room = Room(
                f"r{r}",
                storage=FileStorage(folder, f"r{r}"),
                save_throttle=5.0,
                idle_timeout=1e9,
                durable_acks=durable,
            )
            nursery.start_soon(room.run)
            await room.wait_accepting_or_closed()
            pair = [attach(room, f"c{r}-{c}", poller, outbox_max_bytes=1 << 24)
                    for c in range(editors)]
            members.append((room, pair))

        def frame(r: int, c: int, n: int) -> bytes:
            return client_frame(
                f'{{"type":"patch","messageId":"c{r}-{c}-{n}","documentPatches":'
                f'[{{"c{r}-{c}/pos":{{"x":{n},"y":{n}}}}}]}}'.encode()
            )

        frames = [
            [[frame(r, c, n) for n in range(4)] for c in range(editors)] for r in range(rooms)
        ]

        async def one_round(n: int) -> None:
            for r, (_, pair) in enumerate(members):
                for c, (ws, peer) in enumerate(pair):
                    peer.send(frames[r][c][n & 3])
                    ws._on_readable()
            callbacks, poller.after_batch = poller.after_batch, []
            for callback in callbacks:
                callback()
            # Every ack is written once its commit has returned (the committer flushes).
            for room, _ in members:
                if room.committer is not None:
                    await room.committer.commit_through(room.document.timestamp)
            for _, pair in members:
                drain(pair)

        for n in range(warmup):
            await one_round(n)
        began, cpu = time.perf_counter(), time.process_time()
        for n in range(rounds):
            await one_round(n)
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - began
        nursery.cancel_scope.cancel()
    return cpu / (rounds * rooms * editors), wall / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--editors", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 2000)))
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--memory", action="store_true", help="acks from memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="durable-path-") as folder:
        per_edit, per_round = trio.run(
            run, folder, args.rooms, args.editors, args.rounds, args.warmup, not args.memory
        )
    kind = "memory" if args.memory else "durable files"
    print(
        f"{per_edit * 1e6:.2f} us CPU per edit, {per_round * 1e3:.3f} ms per round "
        f"({args.rooms} rooms of {args.editors}, {kind})"
    )


if __name__ == "__main__":
    main()
