"""The real process, real files, real signals.

- SIGKILL at random moments while a writer keeps a big-ish room saving all the time
  (``--save-throttle 0.01``): the room file always parses and is consistent (old or new
  snapshot, never half of one), leftover temp files are never loaded, and the next
  process serves exactly what the file holds.
- SIGTERM under load: the process exits 0, and after a restart every edit that was
  acked before the shutdown is there.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed

from canvas_store_trio import Snapshot, decode_snapshot

from .conftest import frames_of
from .processes import client, server_process


def check_consistent(snapshot: Snapshot) -> None:
    """A snapshot as one save wrote it: every field it holds was written at or before
    its timestamp, and every live key has field timestamps."""
    for key, fields in snapshot.timestamps.items():
        assert key in snapshot.state, key
        assert all(0 < ts <= snapshot.timestamp for ts in fields.values()), (key, fields)
    for key, record in snapshot.state.items():
        assert set(record) <= set(snapshot.timestamps.get(key, {})), key


def big_document(n: int) -> dict[str, Any]:
    return {f"{i:06d}/shape": {"_exists": True, "_version": "1", "x": i, "y": -i,
                               "label": f"shape number {i}", "tags": ["a", "b", "c"]}
            for i in range(n)}


async def test_sigkill_during_saves_always_leaves_a_loadable_snapshot(tmp_path: Path) -> None:
    room_file = tmp_path / "crash.json"
    rng = random.Random(1234)
    timestamps = []
    stray = tmp_path / "crash.json.0123456789abcdef.tmp"
    with trio.fail_after(40):
        for round_ in range(5):
            async with (
                server_process("--data-dir", str(tmp_path), "--save-throttle", "0.01",
                               "--no-durable-acks") as server,
                client(server, "crash", f"w{round_}") as w,
            ):
                frames = await w.reconnect()
                if round_ == 0:
                    await w.send(type="patch", messageId="seed",
                                 documentPatches=[big_document(15_000)])
                    await w.receive_until("ack", timeout=20)
                    while not room_file.exists():  # the first save, before any kill
                        await trio.sleep(0.01)
                else:
                    # It serves exactly what the file held when the last one died.
                    assert frames[-1]["timestamp"] == timestamps[-1]
                kill_at = trio.current_time() + rng.uniform(0.05, 0.6)
                n = 0
                while trio.current_time() < kill_at:
                    n += 1
                    key = f"{rng.randrange(15_000):06d}/shape"
                    await w.send(type="patch", messageId=n,
                                 documentPatches=[{key: {"x": n, "label": "moved" * 20}}])
                    await w.receive_until("ack")
                server.process.send_signal(signal.SIGKILL)
                await server.process.wait()
            assert server.process.returncode == -signal.SIGKILL
            snapshot = decode_snapshot(room_file.read_bytes())  # never half a file
            check_consistent(snapshot)
            assert len(snapshot.state) == 15_000
            if timestamps:
                assert snapshot.timestamp >= timestamps[-1]  # old or new, never older
            timestamps.append(snapshot.timestamp)
            # A temp file left by a kill mid-write is harmless; so is a broken one.
            stray.write_bytes(b'{"timestamp": 99999999, "state": {"trunc')
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert stray.name in leftovers
        print(f"{len(leftovers) - 1} temp files left by kills mid-write; timestamps {timestamps}")
        async with (
            server_process("--data-dir", str(tmp_path)) as server,
            client(server, "crash", "reader") as reader,
        ):
            frames = await reader.reconnect()
        snapshot = decode_snapshot(room_file.read_bytes())
        assert frames[-1] == {"type": "synced", "timestamp": snapshot.timestamp}
        [diff] = frames_of(frames, "patch")[0]["documentPatches"]
        assert diff == {key: dict(record) for key, record in snapshot.state.items()}
        assert timestamps == sorted(timestamps) and timestamps[-1] > timestamps[0]


async def test_sigterm_under_load_keeps_every_acked_edit(tmp_path: Path) -> None:
    acked: dict[str, dict[str, int]] = {}
    with trio.fail_after(40):
        async with server_process("--data-dir", str(tmp_path), "--save-throttle", "2") as server:

            async def writer(room: str, name: str) -> None:
                mine = acked.setdefault(room, {})
                n = 0
                try:
                    async with client(server, room, name) as w:
                        await w.reconnect()
                        while True:
                            n += 1
                            key = f"{name}-{n}/c"
                            # a few in flight at a time, as a busy client has
                            await w.send(type="patch", messageId=key,
                                         documentPatches=[{key: {"_exists": True, "v": n}}])
                            if n % 4 == 0:
                                while True:
                                    frame = await w.receive(timeout=10)
                                    if frame["type"] == "ack":
                                        k = frame["messageId"]
                                        mine[k] = int(k.rsplit("-", 1)[1].split("/")[0])
                                        if k == key:
                                            break
                except ConnectionClosed:
                    pass

            async with trio.open_nursery() as nursery:
                for room, name in (("a", "w1"), ("a", "w2"), ("b", "w3"), ("c", "w4")):
                    nursery.start_soon(writer, room, name)
                with trio.fail_after(10):
                    while sum(map(len, acked.values())) < 400:
                        await trio.sleep(0.01)
                server.process.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    await server.process.wait()
        assert server.process.returncode == 0, server.log.decode(errors="replace")
        assert b"all rooms saved" in server.log
        assert all(len(keys) > 10 for keys in acked.values()), {r: len(k) for r, k in acked.items()}

        for room, keys in acked.items():  # on disk, before any restart
            snapshot = decode_snapshot((tmp_path / f"{room}.json").read_bytes())
            check_consistent(snapshot)
            missing = [k for k, v in keys.items() if snapshot.state.get(k, {}).get("v") != v]
            assert not missing, (room, missing[:5], len(missing))

        # and as a restarted server serves it
        async with server_process("--data-dir", str(tmp_path)) as server:
            for room, keys in acked.items():
                async with client(server, room, "check") as c:
                    frames = await c.reconnect()
                [diff] = frames_of(frames, "patch")[0]["documentPatches"]
                missing = [k for k, v in keys.items() if diff.get(k, {}).get("v") != v]
                assert not missing, (room, missing[:5], len(missing))


def test_helpers_know_an_inconsistent_snapshot() -> None:
    """check_consistent must be able to fail, or the kill test proves little."""
    good = decode_snapshot(orjson.dumps({"timestamp": 2, "state": {"k": {"_exists": True}},
                                         "timestamps": {"k": {"_exists": 2}}}))
    check_consistent(good)
    for bad in ({"timestamp": 1, "state": {"k": {"_exists": True}},
                 "timestamps": {"k": {"_exists": 2}}},
                {"timestamp": 2, "state": {"k": {"_exists": True, "x": 1}},
                 "timestamps": {"k": {"_exists": 2}}}):
        try:
            check_consistent(decode_snapshot(orjson.dumps(bad)))
        except AssertionError:
            continue
        raise AssertionError(f"not caught: {bad}")
