"""A property test of patch merging, to copy into your own suite.

Two clients edit one room through a real server, in random patches; then a third
joins, as a client coming back online with an old timestamp does. What it is sent, and
what the room keeps, must be exactly what ``ReferenceModel`` (the protocol's document
model, written out longhand) says.

It needs ``pip install 'canvas-store-trio[testing]'``. The tests are Trio tests, hence
the trio marker below (or set ``trio_mode = true`` in your pytest configuration). Each
hypothesis example opens a server of its own; a plain test can take the
``canvas_store_server`` fixture of the package's pytest plugin instead.
"""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canvas_store_trio.testing import ReferenceModel, RunningServer, open_server, patches

pytestmark = pytest.mark.trio

# The app's own key space: a few sticky notes and their fields, so that edits collide.
note_patches = patches(
    keys=["note1/Note", "note2/Note", "note3/Note"],
    fields=["text", "x", "y", "color"],
)
edits = st.lists(
    st.tuples(st.sampled_from(["alice", "bob"]), st.lists(note_patches, min_size=1, max_size=2)),
    max_size=10,
)


@settings(max_examples=25, deadline=None)
@given(edits=edits, since=st.integers(0, 12))
async def test_a_late_joiner_gets_what_the_model_says(
    edits: list[tuple[str, list[Any]]], since: int
) -> None:
    async with open_server() as server:
        await check_late_joiner(server, edits, since)


async def check_late_joiner(
    server: RunningServer, edits: list[tuple[str, list[Any]]], since: int
) -> None:
    model = ReferenceModel()
    async with server.connect("board", "alice") as alice, server.connect("board", "bob") as bob:
        clients = {"alice": alice, "bob": bob}
        for client in clients.values():
            await client.reconnect()
        for number, (who, edit) in enumerate(edits):
            await clients[who].send(type="patch", messageId=number, documentPatches=edit)
            model.apply(edit)
            *_, ack = await clients[who].receive_until("ack")  # skipping the other's edits
            assert ack == {"type": "ack", "messageId": number, "timestamp": model.timestamp}

    async with server.connect("board", "carol") as carol:
        frames = await carol.reconnect(last_timestamp=since)
    diffs = [f["documentPatches"] for f in frames if "documentPatches" in f]
    expected = model.diff_since(since)
    assert diffs == ([[expected]] if expected else [])
    assert frames[-1] == {"type": "synced", "timestamp": model.timestamp}

    room = server.manager.get_existing_room("board")
    assert room is not None
    assert room.get_snapshot() == model.snapshot()


async def test_a_room_closed_and_opened_again_keeps_its_edits(
    canvas_store_server: RunningServer,
) -> None:
    """The fixture: one server for the test, rooms kept in memory while it runs."""
    edit = [{"note1/Note": {"_exists": True, "text": "hello"}}]
    await check_late_joiner(canvas_store_server, [("alice", edit)], since=0)
    await canvas_store_server.manager.close_room("board")
    async with canvas_store_server.connect("board", "dave") as dave:
        frames = await dave.reconnect()
    assert [f["documentPatches"] for f in frames if "documentPatches" in f] == [
        [{"note1/Note": {"_exists": True, "text": "hello"}}]
    ]
