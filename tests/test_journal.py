"""FileStorage's journal on real files: commit, replay, torn tails, folding, failures."""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from canvas_store_trio import Document, FileStorage, Snapshot, StorageError
from canvas_store_trio._document import Changes, encode_snapshot_parts
from canvas_store_trio.storage import FileBackend
from canvas_store_trio.storage import _files as _storage
from canvas_store_trio.storage._files import journal_file_name, write_file_atomically
from canvas_store_trio.storage._journal import HEADER, scan_journal


def edit(doc: Document, patch: dict[str, Any]) -> Changes:
    """Apply one frame's patch to ``doc`` and return what it changed."""
    if doc.unsaved_keys is None:
        doc.unsaved_keys = set()
    assert doc.apply([patch])
    return doc.take_changes()


def journal_timestamps(path: Path) -> list[int]:
    scan = scan_journal(path.read_bytes())
    assert scan.bad_offset is None
    return [record.timestamp for record in scan.records]


def torn_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "replay stops there" in r.getMessage()]


async def commit_edits(storage: FileStorage, doc: Document, count: int) -> list[Changes]:
    """``count`` edits, each committed: a note moved about, another created and deleted."""
    changes = []
    for i in range(count):
        if i == 1:
            patch: dict[str, Any] = {"e2/note": {"_exists": True, "text": "bye"}}
        elif i == 2:
            patch = {"e2/note": {"_exists": False}}
        else:
            patch = {"e1/pos": {"_exists": True, "x": i}, f"e{i + 10}/c": {"_exists": True}}
        changes.append(edit(doc, patch))
        await storage.commit(changes[-1])
    return changes


async def test_commits_replay_with_their_timestamps_and_tombstones(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, "r")
    assert await storage.load() is None and not storage.needs_fold
    doc = Document()
    doc.apply([{"e0/c": {"_exists": True}}])  # never committed: not in the journal
    await commit_edits(storage, doc, 5)
    assert os.listdir(tmp_path) == ["r.journal"]  # a journal alone is a room
    reloaded = FileStorage(tmp_path, "r")
    snapshot = await reloaded.load()
    expected = doc.snapshot()
    del expected.state["e0/c"], expected.timestamps["e0/c"]
    assert snapshot == expected
    assert snapshot.timestamp == 6  # nothing renumbered
    assert snapshot.state["e2/note"] == {"_exists": False}
    assert snapshot.timestamps["e2/note"] == doc.timestamps["e2/note"] == {"_exists": 4}
    assert reloaded.needs_fold
    assert os.listdir(tmp_path) == ["r.journal"]  # a load writes nothing


async def test_the_record_format(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    changes = edit(doc, {"e/c": {"_exists": True, "v": [1, "é"]}})
    await storage.commit(changes)
    data = (tmp_path / "r.journal").read_bytes()
    length, crc = struct.unpack_from("<II", data)
    payload = data[8:]
    assert len(payload) == length and zlib.crc32(payload) == crc
    assert orjson.loads(payload) == {
        "timestamp": 1,
        "state": {"e/c": {"_exists": True, "v": [1, "é"]}},
        "timestamps": {"e/c": {"_exists": 1, "v": 1}},
    }
    assert journal_file_name("a b") == "~YSBi.journal"  # the snapshot's stem


async def test_records_the_snapshot_holds_are_skipped(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 4)  # timestamps 1 to 4
    # A snapshot at 3 that differs from what records 1-3 say: they must not be replayed.
    write_file_atomically(
        tmp_path / "r.json",
        encode_snapshot_parts(Snapshot(3, {"x/y": {"_exists": True}}, {"x/y": {"_exists": 3}})),
    )
    snapshot = await FileStorage(tmp_path, "r").load()
    assert snapshot is not None and snapshot.timestamp == 4
    assert snapshot.state == {
        "x/y": {"_exists": True},
        "e1/pos": {"_exists": True, "x": 3},
        "e13/c": {"_exists": True},
    }


async def test_every_torn_tail_of_the_last_record_loads_and_is_cut_off_by_the_next_append(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = FileStorage(tmp_path / "source", "r")
    doc = Document()
    await commit_edits(source, doc, 2)
    before_last = doc.snapshot()
    await commit_edits(source, doc, 1)
    data = (tmp_path / "source" / "r.journal").read_bytes()
    start = scan_journal(data).records[-1].data
    last_start = len(data) - len(start)
    later = Document.from_snapshot(before_last)
    later_changes = edit(later, {"z/z": {"_exists": True, "v": "after"}})
    for cut in range(last_start, len(data)):
        folder = tmp_path / f"cut-{cut}"
        folder.mkdir()
        (folder / "r.journal").write_bytes(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="canvas_store_trio"):
            storage = FileStorage(folder, "r")
            assert await storage.load() == before_last, cut
        warnings = torn_warnings(caplog)
        if cut == last_start:
            assert warnings == []
        else:
            assert len(warnings) == 1 and f"at byte {last_start};" in warnings[0], warnings
            assert str(folder / "r.journal") in warnings[0]
        assert (folder / "r.journal").read_bytes() == data[:cut]  # loading wrote nothing
        await storage.commit(later_changes)
        journal = (folder / "r.journal").read_bytes()
        assert journal[:last_start] == data[:last_start]
        assert scan_journal(journal).good_length == len(journal)  # no garbage left
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="canvas_store_trio"):
            assert await FileStorage(folder, "r").load() == later.snapshot()
        assert torn_warnings(caplog) == []


@pytest.mark.parametrize("damage", ["checksum", "shape", "json"])
async def test_a_corrupt_middle_record_ends_the_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 1)
    after_first = doc.snapshot()
    await commit_edits(storage, doc, 2)
    path = tmp_path / "r.journal"
    records = scan_journal(path.read_bytes()).records
    middle = bytearray(records[1].data)
    if damage == "checksum":
        middle[-2] ^= 0x20
    else:
        payload = b"[1,2]" if damage == "shape" else b"{not json"
        middle = bytearray(HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
    path.write_bytes(records[0].data + middle + records[2].data)
    with caplog.at_level(logging.WARNING, logger="canvas_store_trio"):
        assert await FileStorage(tmp_path, "r").load() == after_first
    [warning] = torn_warnings(caplog)
    assert f"at byte {len(records[0].data)};" in warning


async def test_a_save_folds_the_records_it_holds_and_keeps_the_rest(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 3)
    at_3 = doc.snapshot()
    await commit_edits(storage, doc, 2)  # 4 and 5: as if they raced the save
    await storage.save_encoded(encode_snapshot_parts(at_3), fold_through=3)
    assert journal_timestamps(tmp_path / "r.journal") == [4, 5]
    reloaded = FileStorage(tmp_path, "r")
    assert await reloaded.load() == doc.snapshot()
    assert reloaded.needs_fold
    await reloaded.save_encoded(encode_snapshot_parts(doc.snapshot()), fold_through=5)
    assert not reloaded.needs_fold
    assert os.listdir(tmp_path) == ["r.json"]  # no journal, no temp file
    assert await FileStorage(tmp_path, "r").load() == doc.snapshot()


async def test_a_fold_after_a_rewrite_keeps_appending_to_the_new_journal(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 2)
    at_2 = doc.snapshot()
    await commit_edits(storage, doc, 1)
    await storage.save_encoded(encode_snapshot_parts(at_2), fold_through=2)  # rewrites
    await commit_edits(storage, doc, 2)  # appended to the rewritten file
    assert journal_timestamps(tmp_path / "r.journal") == [3, 4, 5]
    assert await FileStorage(tmp_path, "r").load() == doc.snapshot()
    await storage.save_encoded(encode_snapshot_parts(doc.snapshot()), fold_through=5)
    assert os.listdir(tmp_path) == ["r.json"]


async def test_a_plain_save_removes_the_journal(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 3)
    await storage.save(Snapshot(1, {}, {}))  # an import: the snapshot is the whole truth
    assert os.listdir(tmp_path) == ["r.json"]
    assert await FileStorage(tmp_path, "r").load() == Snapshot(1, {}, {})


def open_descriptors_to(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                count += 1
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_a_journal_descriptor_stays_open_until_a_save_folds_the_journal(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 2)
    assert open_descriptors_to(tmp_path / "r.journal") == 1  # one, kept between commits
    at_1 = Snapshot(1, {}, {})
    await storage.save_encoded(encode_snapshot_parts(at_1), fold_through=1)  # a rewrite
    assert open_descriptors_to(tmp_path / "r.journal") == 0
    await commit_edits(storage, doc, 1)
    assert open_descriptors_to(tmp_path / "r.journal") == 1
    await storage.save(doc.snapshot())  # removes the journal
    assert open_descriptors_to(tmp_path / "r.journal") == 0


async def test_the_records_a_journal_keeps_until_its_fold_give_the_collector_nothing_to_scan(
    tmp_path: Path,
) -> None:
    # A busy room keeps every record since its last fold (thousands, for a fold
    # without a re-read); were each a tracked object, every full collection would walk
    # them all.
    storage = FileStorage(tmp_path, "r")
    doc = Document()

    async def commit(count: int) -> None:
        for i in range(count):
            await storage.commit(edit(doc, {"e1/pos": {"_exists": True, "x": i}}))

    await commit(10)
    gc.collect()
    tracked = len(gc.get_objects())
    await commit(300)
    gc.collect()
    assert len(gc.get_objects()) - tracked < 30  # not one (or more) per record
    assert journal_timestamps(tmp_path / "r.journal") == list(range(1, 311))
    await storage.save_encoded(encode_snapshot_parts(Snapshot(300, {}, {})), fold_through=300)
    assert journal_timestamps(tmp_path / "r.journal") == list(range(301, 311))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_journal_descriptors_past_the_limit_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_storage, "MAX_OPEN_JOURNALS", 2)
    docs = {name: Document() for name in "abc"}
    for name, doc in docs.items():  # one batch each: a, then b, then c
        await commit_edits(FileStorage(tmp_path, name), doc, 1)
    assert [open_descriptors_to(tmp_path / f"{name}.journal") for name in "abc"] == [0, 1, 1]
    await commit_edits(FileStorage(tmp_path, "a"), docs["a"], 1)  # reopened; b is closed
    assert [open_descriptors_to(tmp_path / f"{name}.journal") for name in "abc"] == [1, 0, 1]
    assert journal_timestamps(tmp_path / "a.journal") == [1, 2]


async def test_the_ready_gate_runs_after_the_parts_are_taken_and_can_stop_the_write(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 2)
    journal = (tmp_path / "r.journal").read_bytes()
    taken: list[bytes] = []
    seen_at_ready: list[int] = []

    def parts() -> Any:
        for part in encode_snapshot_parts(doc.snapshot()):
            taken.append(part)
            yield part

    async def refuse() -> None:
        seen_at_ready.append(len(taken))
        raise RuntimeError("a commit failed")

    with pytest.raises(RuntimeError, match="a commit failed"):
        await storage.save_encoded(parts(), fold_through=2, ready=refuse)
    assert seen_at_ready == [len(list(encode_snapshot_parts(doc.snapshot())))]
    assert os.listdir(tmp_path) == ["r.journal"]  # nothing written, nothing folded
    assert (tmp_path / "r.journal").read_bytes() == journal

    at_2 = doc.snapshot()

    async def commit_meanwhile() -> None:  # an edit committed while the save waits
        await commit_edits(storage, doc, 1)

    await storage.save_encoded(encode_snapshot_parts(at_2), fold_through=2, ready=commit_meanwhile)
    assert journal_timestamps(tmp_path / "r.journal") == [3]
    assert await FileStorage(tmp_path, "r").load() == doc.snapshot()


def half_then_enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        real(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)


async def test_a_failed_append_is_cut_back_off_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 2)
    committed = doc.snapshot()
    size = (tmp_path / "r.journal").stat().st_size
    half_then_enospc(monkeypatch)
    refused = edit(doc, {"no/no": {"_exists": True}})
    message = f"cannot append to {tmp_path / 'r.journal'}: No space left on device"
    with pytest.raises(StorageError, match=re.escape(message)):
        await storage.commit(refused)
    monkeypatch.undo()
    assert (tmp_path / "r.journal").stat().st_size == size
    assert await FileStorage(tmp_path, "r").load() == committed

    later = Document.from_snapshot(committed)
    changes = edit(later, {"yes/yes": {"_exists": True}})
    await storage.commit(changes)
    assert journal_timestamps(tmp_path / "r.journal") == [1, 2, 3]
    assert await FileStorage(tmp_path, "r").load() == later.snapshot()


async def test_a_failed_fdatasync_is_cut_back_off_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 1)
    committed = doc.snapshot()
    size = (tmp_path / "r.journal").stat().st_size

    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(StorageError, match="Input/output error"):
        await storage.commit(edit(doc, {"no/no": {"_exists": True}}))
    monkeypatch.undo()
    assert (tmp_path / "r.journal").stat().st_size == size
    assert await FileStorage(tmp_path, "r").load() == committed


async def test_a_failed_snapshot_write_folds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 2)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    message = f"cannot write {tmp_path / 'r.json'}: No space left on device"
    with pytest.raises(StorageError, match=re.escape(message)):
        await storage.save_encoded(encode_snapshot_parts(doc.snapshot()), fold_through=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["r.journal"]
    assert journal_timestamps(tmp_path / "r.journal") == [1, 2]


async def test_journal_only_rooms_are_listed_and_folded(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    assert await backend.fold_journals() == 0  # no folder at all
    docs = {}
    for room_id in ("both", "journal-only", "a b"):
        docs[room_id] = doc = Document()
        storage = backend.create_storage(room_id)
        await commit_edits(storage, doc, 1)
        if room_id == "both":
            await storage.save_encoded(encode_snapshot_parts(doc.snapshot()), fold_through=1)
        await commit_edits(storage, doc, 2)
    await backend.create_storage("snapshot-only").save(Snapshot(2, {}, {}))
    (tmp_path / "garbage.journal").write_bytes(b"\x05\x00")  # a torn first record
    (tmp_path / "x.journal.123-4.tmp").write_bytes(b"")  # a temp file: not a room
    assert await backend.list_room_ids() == sorted(
        ["a b", "both", "garbage", "journal-only", "snapshot-only"]
    )
    assert await backend.fold_journals() == 4
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["~YSBi.json", "both.json", "journal-only.json", "snapshot-only.json",
         "x.journal.123-4.tmp"]
    )  # the garbage-only journal is gone and made no room
    for room_id, doc in docs.items():
        assert await backend.create_storage(room_id).load() == doc.snapshot()
    assert await backend.fold_journals() == 0


async def test_a_journal_the_snapshot_already_holds_is_removed_without_a_rewrite(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path, "r")
    doc = Document()
    await commit_edits(storage, doc, 2)
    write_file_atomically(tmp_path / "r.json", encode_snapshot_parts(doc.snapshot()))
    before = (tmp_path / "r.json").stat().st_ino
    assert await FileBackend(tmp_path).fold_journals() == 1
    assert os.listdir(tmp_path) == ["r.json"]
    assert (tmp_path / "r.json").stat().st_ino == before


async def test_commits_of_many_rooms_share_thread_hand_offs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    do_batch = _storage.FolderWriter._do_batch

    def counting(self: _storage.FolderWriter, batch: list[Any]) -> None:
        batches.append(len(batch))
        time.sleep(0.02)  # the rest queue up meanwhile
        do_batch(self, batch)

    monkeypatch.setattr(_storage.FolderWriter, "_do_batch", counting)
    docs = {f"room-{i}": Document() for i in range(50)}

    async def commit(room_id: str) -> None:
        doc = docs[room_id]
        await FileStorage(tmp_path, room_id).commit(edit(doc, {"e/c": {"v": room_id}}))

    async with trio.open_nursery() as nursery:
        for room_id in docs:
            nursery.start_soon(commit, room_id)
    assert sum(batches) == 50 and len(batches) <= 5, batches
    for room_id, doc in docs.items():
        assert await FileStorage(tmp_path, room_id).load() == doc.snapshot()


async def test_a_commit_creates_a_missing_folder(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "new" / "folder", "r")
    doc = Document()
    await commit_edits(storage, doc, 1)
    assert await FileStorage(tmp_path / "new" / "folder", "r").load() == doc.snapshot()
