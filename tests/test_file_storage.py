"""FileStorage on real files: the Node format, atomic replace, safe names, corrupt files."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from canvas_store_trio import Document, FileStorage, Snapshot, SnapshotError, StorageError
from canvas_store_trio._document import Changes, RecordChange, encode_snapshot_parts
from canvas_store_trio.storage import _files as _storage
from canvas_store_trio.storage._files import room_file_name, room_id_from_file_name

NODE_FILE = Path(__file__).parent / "data" / "node-room.json"


async def test_a_file_written_by_the_node_server_loads(tmp_path: Path) -> None:
    shutil.copy(NODE_FILE, tmp_path / "node-room.json")
    snapshot = await FileStorage(dir=tmp_path, room_id="node-room").load()
    assert snapshot is not None
    doc = Document.from_snapshot(snapshot)
    assert doc.timestamp == 5
    assert doc.state["e2/stroke"]["points"] == [1, 2, 3, 4, 5, 6]
    assert doc.state["e3/pos"] == {"_exists": False}
    # A client that last saw timestamp 3 learns of the deletion and the new note.
    assert doc.diff_since(3) == {
        "e3/pos": {"_exists": False},
        "e4/note": {"_exists": True, "text": "héllo ✓", "tags": ["a", {"b": None}]},
    }


async def test_save_then_load_round_trips_in_the_node_format(tmp_path: Path) -> None:
    storage = FileStorage(dir=tmp_path / "nested", room_id="room-1")
    doc = Document()
    doc.apply([{"e/c": {"_exists": True, "v": [1, 2]}}])
    doc.apply([{"e/c": {"_exists": False}}])
    await storage.save(doc.snapshot())
    assert (tmp_path / "nested" / "room-1.json").exists()
    loaded = await storage.load()
    assert loaded == Snapshot(2, {"e/c": {"_exists": False}}, {"e/c": {"_exists": 2}})
    assert os.listdir(tmp_path / "nested") == ["room-1.json"]


async def test_a_failed_write_leaves_the_old_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileStorage(dir=tmp_path, room_id="r")
    await storage.save(Snapshot(1, {"a/b": {"_exists": True}}, {"a/b": {"_exists": 1}}))

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="No space left"):
        await storage.save(Snapshot(2, {}, {}))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["r.json"]  # no temp file left behind
    loaded = await storage.load()
    assert loaded is not None and loaded.timestamp == 1


async def test_concurrent_saves_are_serialized_and_the_last_wins(tmp_path: Path) -> None:
    storage = FileStorage(dir=tmp_path, room_id="r")
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(storage.save, Snapshot(i, {}, {}))
            await trio.sleep(0)
    loaded = await storage.load()
    assert loaded is not None and loaded.timestamp == 19


@pytest.mark.parametrize(
    "room_id",
    [
        "../../x",
        "..",
        ".",
        ".hidden",
        "a/b",
        "/etc/passwd",
        "C:\\x",
        "a\\..\\b",
        "é🙂",
        "con",
        "x" * 200,
        "~tilde",
        "a b?c#d",
    ],
)
async def test_hostile_room_ids_stay_inside_the_folder(tmp_path: Path, room_id: str) -> None:
    inside = tmp_path / "data"
    storage = FileStorage(dir=inside, room_id=room_id)
    await storage.save(Snapshot(1, {}, {}))
    [name] = os.listdir(inside)
    assert (inside / name).resolve().parent == inside.resolve()
    assert room_id_from_file_name(name) == room_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_plain_room_ids_keep_the_node_file_name() -> None:
    assert room_file_name("my-room_1.v2") == "my-room_1.v2.json"
    assert room_file_name("../x") != "../x.json"
    assert room_file_name(".x").startswith("~")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"null",
        b"[]",
        b'{"timestamp": "1", "state": {}}',
        b'{"timestamp": 1, "state": {"a/b": 5}, "timestamps": {}}',
        b'{"timestamp": 1, "state": {}, "timestamps": {"a/b": {"x": "1"}}}',
    ],
)
async def test_a_corrupt_file_is_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(content)
    with pytest.raises(SnapshotError):
        await FileStorage(dir=tmp_path, room_id="r").load()
    assert path.read_bytes() == content


async def test_an_unreadable_file_is_an_error_not_an_empty_room(tmp_path: Path) -> None:
    (tmp_path / "r.json").mkdir()  # reading a folder fails with EISDIR
    with pytest.raises(StorageError):
        await FileStorage(dir=tmp_path, room_id="r").load()


def recording_reader_batches(
    monkeypatch: pytest.MonkeyPatch, *, delay: float = 0.0
) -> list[list[Path]]:
    """Make the folder reader's thread record the files of each batch it takes (and
    take ``delay`` seconds over it, so that more loads queue up meanwhile)."""
    batches: list[list[Path]] = []
    do_batch = _storage.FolderReader._do_batch

    def recording(self: _storage.FolderReader, batch: list[_storage._ReadJob]) -> None:
        batches.append([job.path for job in batch])
        time.sleep(delay)
        do_batch(self, batch)

    monkeypatch.setattr(_storage.FolderReader, "_do_batch", recording)
    return batches


async def test_rooms_loading_at_once_share_thread_hand_offs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_storage, "CACHED_READ_LIMIT", 0)  # every saved file is "big"
    batches = recording_reader_batches(monkeypatch, delay=0.02)
    for i in range(0, 30, 2):  # every other room is saved; the rest are new
        await FileStorage(dir=tmp_path, room_id=f"room-{i}").save(Snapshot(timestamp=i))
    (tmp_path / "broken.json").mkdir()  # reading a folder fails with EISDIR
    batches.clear()
    loaded: dict[str, Snapshot | str | None] = {}

    async def load(room_id: str) -> None:
        try:
            loaded[room_id] = await FileStorage(dir=tmp_path, room_id=room_id).load()
        except StorageError as exc:
            loaded[room_id] = str(exc)

    async with trio.open_nursery() as nursery:
        for room_id in [*(f"room-{i}" for i in range(30)), "broken"]:
            nursery.start_soon(load, room_id)
    # The 15 saved rooms and the broken one; a new room's files are not there to read.
    assert sum(map(len, batches)) == 16 and len(batches) <= 3, batches
    for i in range(30):
        snapshot = loaded[f"room-{i}"]
        if i % 2:
            assert snapshot is None
        else:
            assert isinstance(snapshot, Snapshot) and snapshot.timestamp == i
    assert str(loaded["broken"]).startswith(f"cannot read {tmp_path / 'broken.json'}: ")


def evict_from_page_cache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (they are clean: saves fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_small_cached_room_files_load_without_the_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = recording_reader_batches(monkeypatch)
    assert await FileStorage(dir=tmp_path, room_id="new").load() is None
    saved = FileStorage(dir=tmp_path, room_id="saved")
    await saved.save(Snapshot(timestamp=3, state={"e/c": {"_exists": True, "x": 0}}))
    record = {"_exists": True, "x": 1}
    await saved.commit(Changes(4, {"e/c": RecordChange(record, {"_exists": 4, "x": 4})}))
    journal_only = FileStorage(dir=tmp_path, room_id="journal-only")
    await journal_only.commit(Changes(1, {"e/c": RecordChange(record, {"_exists": 1, "x": 1})}))
    for room_id, timestamp in [("saved", 4), ("journal-only", 1)]:
        loaded = await FileStorage(dir=tmp_path, room_id=room_id).load()
        assert loaded is not None and (loaded.timestamp, loaded.state) == (
            timestamp, {"e/c": record}
        )
    assert batches == []


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="reads on the loop need RWF_NOWAIT")
async def test_room_files_not_cached_or_big_are_read_by_the_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = recording_reader_batches(monkeypatch)
    evicted = FileStorage(dir=tmp_path, room_id="evicted")
    await evicted.save(Snapshot(timestamp=1, state={"e/c": {"_exists": True}}))
    evict_from_page_cache(evicted.path)
    big = FileStorage(dir=tmp_path, room_id="big")
    value = "x" * _storage.CACHED_READ_LIMIT
    await big.save(Snapshot(timestamp=2, state={"e/c": {"_exists": True, "v": value}}))
    for storage, timestamp in [(evicted, 1), (big, 2)]:
        loaded = await FileStorage(dir=tmp_path, room_id=storage.room_id).load()
        assert loaded is not None and loaded.timestamp == timestamp
    assert batches == [[evicted.path], [big.path]]


def counting_folder_fsyncs(
    monkeypatch: pytest.MonkeyPatch, *, delay: float = 0.0, fail: tuple[int, ...] = ()
) -> list[float]:
    """Replace the folder fsync with one that records when each call started (and fails
    the calls numbered in ``fail``, from 1)."""
    calls: list[float] = []
    real = _storage.fsync_folder

    def fsync_folder(folder: Path) -> None:
        calls.append(time.monotonic())
        time.sleep(delay)
        if len(calls) in fail:
            raise OSError(errno.EIO, "Input/output error")
        real(folder)

    monkeypatch.setattr(_storage, "fsync_folder", fsync_folder)
    return calls


async def test_many_rooms_saving_at_once_share_folder_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_folder_fsyncs(monkeypatch, delay=0.05)
    doc = Document()
    doc.apply([{"e/c": {"_exists": True, "v": 1}}])
    storages = [FileStorage(dir=tmp_path, room_id=f"room-{i}") for i in range(30)]
    async with trio.open_nursery() as nursery:
        for storage in storages:
            nursery.start_soon(storage.save, doc.snapshot())
    for storage in storages:
        loaded = await storage.load()
        assert loaded is not None and loaded.state == {"e/c": {"_exists": True, "v": 1}}
    assert 1 <= len(calls) <= 10, f"{len(calls)} folder fsyncs for 30 saves"


def recording_syncs_and_renames(
    monkeypatch: pytest.MonkeyPatch, *, syncfs_works: bool
) -> list[tuple[str, str]]:
    """Record, in order, the folder writer's temp files written (``write``), its
    filesystem syncs (``syncfs``; failing unless ``syncfs_works``), the fsyncs of single
    temp files (``fsync``) and the renames of temp files over their targets."""
    events: list[tuple[str, str]] = []
    real_write, real_sync = _storage.write_temp_file, _storage.sync_filesystem
    real_fsync, real_replace = _storage._fsync_file, _storage.replace_with_temp

    def write_temp_file(path: Path, parts: Any, *, sync: bool) -> Path:
        tmp = real_write(path, parts, sync=sync)
        events.append(("write", tmp.name))
        return tmp

    def sync_filesystem(folder: Path) -> bool:
        events.append(("syncfs", ""))
        return real_sync(folder) if syncfs_works else False

    def fsync_file(path: Path) -> None:
        events.append(("fsync", path.name))
        real_fsync(path)

    def replace_with_temp(tmp: Path, path: Path) -> None:
        events.append(("rename", tmp.name))
        real_replace(tmp, path)

    for name, fake in [("write_temp_file", write_temp_file), ("sync_filesystem", sync_filesystem),
                       ("_fsync_file", fsync_file), ("replace_with_temp", replace_with_temp)]:
        monkeypatch.setattr(_storage, name, fake)
    return events


def assert_synced_before_renamed(events: list[tuple[str, str]], *, syncfs_works: bool) -> None:
    written: list[str] = []
    durable: set[str] = set()
    for kind, name in events:
        if kind == "write":
            written.append(name)
        elif kind == "fsync":
            durable.add(name)
        elif kind == "syncfs" and syncfs_works:
            durable.update(written)
        elif kind == "rename":
            assert name in durable, f"{name} renamed before it was synced: {events}"


@pytest.mark.parametrize("syncfs_works", [True, False])
async def test_the_snapshots_of_a_batch_are_synced_together_before_their_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs_works: bool
) -> None:
    """One filesystem sync for every snapshot of a batch, where it works; else one fsync
    each. Either way every temp file is durable before it is renamed over its room."""
    counting_folder_fsyncs(monkeypatch, delay=0.05)  # the first batch is slow: more queue
    events = recording_syncs_and_renames(monkeypatch, syncfs_works=syncfs_works)
    snapshot = Snapshot(timestamp=7, state={"e/c": {"_exists": True}})
    storages = [FileStorage(dir=tmp_path, room_id=f"room-{i}") for i in range(20)]
    async with trio.open_nursery() as nursery:
        for storage in storages:
            nursery.start_soon(storage.save, snapshot)
    assert_synced_before_renamed(events, syncfs_works=syncfs_works)
    kinds = [kind for kind, _ in events]
    assert kinds.count("rename") == 20
    assert 1 <= kinds.count("syncfs") <= 2  # batches of more than one file
    if syncfs_works:
        assert kinds.count("fsync") <= 1  # the first batch, if it held one file only
    else:
        assert kinds.count("fsync") == 20
    for storage in storages:
        loaded = await storage.load()
        assert loaded is not None and loaded.timestamp == 7
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("syncfs_works", [True, False])
async def test_journals_rewritten_by_a_batch_of_folds_are_synced_before_their_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs_works: bool
) -> None:
    record = {"_exists": True, "x": 1}
    storages = [FileStorage(dir=tmp_path, room_id=f"room-{i}") for i in range(10)]
    for storage in storages:
        for timestamp in (5, 9):
            changes = {"e/c": RecordChange(record, {"_exists": timestamp, "x": timestamp})}
            await storage.commit(Changes(timestamp, changes))
    events = recording_syncs_and_renames(monkeypatch, syncfs_works=syncfs_works)
    async with trio.open_nursery() as nursery:  # each keeps the record of 9 in its journal
        for storage in storages:
            parts = encode_snapshot_parts(Snapshot(timestamp=7, state={"e/c": record}))
            nursery.start_soon(functools.partial(storage.save_encoded, parts, fold_through=7))
    assert_synced_before_renamed(events, syncfs_works=syncfs_works)
    journals_renamed = [name for kind, name in events
                        if kind == "rename" and ".journal." in name]
    assert len(journals_renamed) == 10
    for storage in storages:
        loaded = await FileStorage(dir=tmp_path, room_id=storage.room_id).load()
        assert loaded is not None and loaded.timestamp == 9
        assert len(storage.journal_path.read_bytes()) > 0
    assert not list(tmp_path.glob("*.tmp"))


async def test_a_save_waits_for_a_folder_fsync_that_began_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fsync already running when a file is renamed does not count for that file."""
    calls = counting_folder_fsyncs(monkeypatch, delay=0.2)
    first, second = FileStorage(dir=tmp_path, room_id="a"), FileStorage(dir=tmp_path, room_id="b")
    done: dict[str, float] = {}

    async def save(storage: FileStorage) -> None:
        await storage.save(Document().snapshot())
        done[storage.room_id] = time.monotonic()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(save, first)
        while not calls:
            await trio.sleep(0.01)
        renamed = time.monotonic()
        await save(second)  # renamed while the first fsync runs
    assert len(calls) == 2
    assert calls[0] < renamed < calls[1] <= done["b"]


async def test_a_failed_folder_fsync_fails_the_saves_it_was_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_folder_fsyncs(monkeypatch, delay=0.1, fail=(2,))
    failed: list[str] = []

    async def save(room_id: str) -> None:
        try:
            await FileStorage(dir=tmp_path, room_id=room_id).save(Document().snapshot())
        except StorageError as exc:
            failed.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(save, "first")
        while not calls:
            await trio.sleep(0.01)
        # Queued while the first batch runs: the next batch, one failing fsync for both.
        nursery.start_soon(save, "a")
        nursery.start_soon(save, "b")
    assert len(calls) == 2
    assert sorted(failed) == [
        f"cannot write {tmp_path / name}.json: Input/output error" for name in "ab"
    ]
    await save("c")  # the next save fsyncs again, and succeeds
    assert len(calls) == 3 and len(failed) == 2


async def test_one_file_that_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "blocked.json").mkdir()  # a rename cannot replace a folder
    outcomes: dict[str, str] = {}

    async def save(room_id: str) -> None:
        try:
            await FileStorage(dir=tmp_path, room_id=room_id).save(Document().snapshot())
            outcomes[room_id] = "saved"
        except StorageError as exc:
            outcomes[room_id] = str(exc)

    async with trio.open_nursery() as nursery:
        for room_id in ("before", "blocked", "after"):
            nursery.start_soon(save, room_id)
    assert outcomes["before"] == outcomes["after"] == "saved"
    assert outcomes["blocked"].startswith(f"cannot write {tmp_path / 'blocked.json'}: ")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["after.json", "before.json", "blocked.json"]  # no temp file left


async def test_a_big_save_lets_other_tasks_run_while_it_is_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = Document()
    doc.apply([{f"e{i}/c": {"_exists": True, "text": "x" * 200} for i in range(10_000)}])
    other_steps = 0
    steps_before_writing: list[int] = []
    write = _storage.FolderWriter.write

    async def noting_write(
        self: _storage.FolderWriter, path: Path, parts: list[bytes] | None, **options: Any
    ) -> None:
        steps_before_writing.append(other_steps)
        await write(self, path, parts, **options)

    monkeypatch.setattr(_storage.FolderWriter, "write", noting_write)

    async def other_task() -> None:
        nonlocal other_steps
        while True:
            other_steps += 1
            await trio.sleep(0)

    storage = FileStorage(dir=tmp_path, room_id="big")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.sleep(0)
        other_steps = 0
        await storage.save_encoded(doc.encode_in_steps(chunk_size=1000))
        nursery.cancel_scope.cancel()
    # 10 pieces of about 240 KB each: the other task ran between them, before the
    # encoding was handed to the worker thread.
    assert steps_before_writing[0] >= 9
    assert await storage.load() == doc.snapshot()
