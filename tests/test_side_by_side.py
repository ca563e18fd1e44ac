"""Side by side with the Node reference server (@woven-ecs/canvas-store-server 2.0.2).

Both servers run as subprocesses, once per module, each with its own data directory:
the Node one through node/reference-server.mjs (packages pinned by node/package-lock.json)
and ours through ``python -m canvas_store_trio serve``. Every scenario below opens the
same sockets against both, in a fresh room, sends the same frames in the same order and
records every frame each socket receives. The per-socket sequences of parsed JSON frames
must be equal (object key order ignored; ``true`` is not ``1``). A server-side close of
a socket is recorded as a pseudo-frame ``{"__closed__": {"code", "reason"}}``.

Steps are synchronised by annotation, not by sleeping: each step names the frame types
every socket must receive because of it, and the driver waits for those, then for a
short quiet period that lets any unexpected frame show up. The annotations are checked
against Node on every run, so they are a readable summary of what Node sends.

Where we differ from Node on purpose, the scenarios stay out of the equality tests and
``test_intended_differences`` asserts what we do instead: malformed frames (PROTOCOL.md,
last section; ours only, since they kill Node), the ``error`` frame for unknown frame
types, ``documentPatches: [{}]`` not moving the timestamp, and deleted presence keys
being forgotten instead of kept as tombstones.

The file-format side: ``test_snapshot_files_match`` plays every scenario on a fresh
pair of servers, stops both with SIGTERM, and compares the ``<roomId>.json`` files
they wrote; then both servers start again on copies of Node's files and must serve the
same documents.

Without Node (or without node/node_modules) the module is skipped, but it fails when
the CI environment variable is set. ``SIDE_BY_SIDE_OURS=node`` replaces our server by a
second Node server: a check of the harness itself.

    .venv/bin/pytest tests/test_side_by_side.py           # all of it (~12 s)
    .venv/bin/pytest tests/test_side_by_side.py -k buffer  # one scenario
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from .side_by_side_harness import (
    Close,
    Open,
    Raw,
    Recording,
    Send,
    ServerProcess,
    Step,
    annotation_errors,
    buf,
    canonical,
    compare,
    connect_url,
    describe_steps,
    node_command,
    ours_command,
    patch,
    play,
    read_snapshots,
    reconnect,
    require_node,
    same_json,
)

pytestmark = pytest.mark.node

SELF_CHECK = os.environ.get("SIDE_BY_SIDE_OURS", "") == "node"
OURS = "node2" if SELF_CHECK else "ours"

# The reconnect a client sends as soon as its socket opens (here: with nothing cached).
R0 = reconnect(0)


def _open(
    sock: str, client: str, *frames: Any, expect: dict[str, list[str]] | None = None, **kw: Any
) -> Open:
    return Open(sock, client, send=frames, expect=expect or {}, **kw)


def _joined(sock: str, client: str, last: int = 0) -> Open:
    """A client that connects and reconnects into a room with no presence state."""
    return Open(sock, client, send=[reconnect(last)], expect={sock: ["synced"]})


# ----------------------------------------------------------------------------------------
# Scenarios: name -> steps. Each runs in a fresh room on both servers.
# ----------------------------------------------------------------------------------------

SCENARIOS: dict[str, list[Step]] = {}


def scenario(fn: Any) -> Any:
    SCENARIOS[fn.__name__] = fn()
    return fn


@scenario
def connect_reconnect_empty_room() -> list[Step]:
    return [
        Open("a", "c1"),
        Send("a", R0, expect={"a": ["synced"]}),
        Send("a", R0, expect={"a": ["synced"]}),  # a second reconnect on the same socket
        Close("a"),
        _joined("a", "c1"),  # the same client comes back
        _joined("b", "c2"),
        Close("b"),
        Close("a"),
        _joined("a", "c1"),
    ]


@scenario
def document_patches_ack_and_broadcast() -> list[Step]:
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send(
            "a",
            patch(
                1,
                doc=[
                    {"e1/Pos": {"_exists": True, "_version": "1", "x": 1, "y": 2}},
                    {"e2/Pos": {"_exists": True, "x": 10}},
                ],
            ),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send(
            "b",
            patch(
                "m-2",
                doc=[
                    {"e1/Pos": {"x": 5}},
                    {
                        "e1/Pos": {"y": 7},
                        "e2/Pos": {
                            "x": -11.25,
                            "label": "h\u00e9llo \u2713 \U0001f600",
                            "flag": False,
                            "none": None,
                            "big": 2**40,
                            "nested": {"a": [1, {"b": None}], "c": "d"},
                        },
                    },
                ],
            ),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        Send(
            "a",
            patch(3, doc=[{"SINGLETON/Camera": {"_exists": True, "zoom": 1.5}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        _open("c", "cc", R0, expect={"c": ["patch", "synced"]}),  # full diff
        _open("d", "cd", reconnect(1), expect={"d": ["patch", "synced"]}),  # fields after 1
        _joined("e", "ce", last=3),  # up to date: synced only
    ]


@scenario
def ephemeral_only_patches() -> list[Step]:
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send(
            "a",
            patch(1, eph=[{"ca/Cursor": {"_exists": True, "x": 1, "y": 2}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send("a", patch(2, eph=[{"ca/Cursor": {"x": 3}}]), expect={"a": ["ack"], "b": ["patch"]}),
        # a partial write to a missing ephemeral key: dropped, but still broadcast
        Send("a", patch(3, eph=[{"ca/Missing": {"x": 3}}]), expect={"a": ["ack"], "b": ["patch"]}),
        Send(
            "a",
            patch(
                4,
                eph=[
                    {"ca/Sel": {"_exists": True, "ids": ["e1"]}},
                    {"ca/Sel": {"ids": ["e1", "e2"]}},
                ],
            ),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Open("c", "cc", expect={"c": ["patch"]}),  # presence snapshot before clientCount
        Send("c", R0, expect={"c": ["patch", "synced"]}),
        Send("b", R0, expect={"b": ["patch", "synced"]}),
    ]


@scenario
def mixed_document_and_ephemeral() -> list[Step]:
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send(
            "a",
            patch(
                1,
                doc=[{"e1/Pos": {"_exists": True, "x": 1}}],
                eph=[{"ca/Sel": {"_exists": True, "ids": ["e1"]}}],
            ),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send(
            "b",
            patch(2, doc=[{"e1/Pos": {"x": 2}}], eph=[{"cb/Sel": {"_exists": True, "ids": []}}]),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        Send(
            "a",
            patch(3, doc=[], eph=[{"ca/Sel": {"ids": ["e1", "e2"]}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send(
            "a", patch(4, doc=[{"e1/Pos": {"y": 3}}], eph=[]), expect={"a": ["ack"], "b": ["patch"]}
        ),
        _open("c", "cc", R0, expect={"c": ["patch", "patch", "synced"]}),
    ]


@scenario
def empty_patches_get_nothing() -> list[Step]:
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send("a", patch(1)),
        Send("a", patch(2, doc=[], eph=[])),
        Send("a", patch(3, doc=[])),
        Send("a", patch(4, eph=[])),
        Send("a", patch(5, documentPatches=None, ephemeralPatches=None)),
        Send(
            "a",
            patch(6, doc=[{"e1/Pos": {"_exists": True, "x": 1}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send("b", R0, expect={"b": ["patch", "synced"]}),
    ]


@scenario
def delete_and_recreate() -> list[Step]:
    everyone_else = {"b": ["patch"], "c": ["patch"], "d": ["patch"], "e": ["patch"], "f": ["patch"]}
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send(
            "a",
            patch(
                1,
                doc=[
                    {
                        "e1/Pos": {"_exists": True, "x": 1, "y": 2},
                        "e1/Color": {"_exists": True, "c": "red"},
                    }
                ],
            ),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send(
            "a",
            patch(2, doc=[{"e1/Pos": {"_exists": False}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        # a partial write to a tombstone is dropped (the timestamp still moves)
        Send("a", patch(3, doc=[{"e1/Pos": {"x": 5}}]), expect={"a": ["ack"], "b": ["patch"]}),
        # deleting a key that never existed leaves a tombstone
        Send(
            "b",
            patch(4, doc=[{"e9/Pos": {"_exists": False}}]),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        _open("c", "cc", R0, expect={"c": ["patch", "synced"]}),
        _open("d", "cd", reconnect(1), expect={"d": ["patch", "synced"]}),
        Send(
            "a",
            patch(5, doc=[{"e1/Pos": {"_exists": True, "x": 9}}]),
            expect={"a": ["ack"], "b": ["patch"], "c": ["patch"], "d": ["patch"]},
        ),
        _open("e", "ce", R0, expect={"e": ["patch", "synced"]}),
        _open("f", "cf", reconnect(2), expect={"f": ["patch", "synced"]}),
        # a tombstone carrying other fields, then re-creation without fields
        Send(
            "a",
            patch(6, doc=[{"e1/Pos": {"_exists": False, "x": 1}}]),
            expect={"a": ["ack"], **everyone_else},
        ),
        Send(
            "a",
            patch(7, doc=[{"e1/Pos": {"_exists": True}}]),
            expect={"a": ["ack"], **everyone_else},
        ),
        # create, delete and create again in one frame
        Send(
            "a",
            patch(
                8,
                doc=[
                    {"e2/P": {"_exists": True, "a": 1}},
                    {"e2/P": {"_exists": False}},
                    {"e2/P": {"_exists": True, "b": 2}},
                ],
            ),
            expect={"a": ["ack"], **everyone_else},
        ),
        _open("g", "cg", reconnect(5), expect={"g": ["patch", "synced"]}),
        _open("h", "ch", R0, expect={"h": ["patch", "synced"]}),
    ]


@scenario
def partial_write_to_missing_key() -> list[Step]:
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send("a", patch(1, doc=[{"e1/Pos": {"x": 1}}]), expect={"a": ["ack"], "b": ["patch"]}),
        Send(
            "a",
            patch(2, doc=[{"e1/Pos": {"x": 2}, "e2/Pos": {"_exists": True, "x": 3}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send(
            "b",
            patch(3, doc=[{"e3/Pos": {"x": 1}}, {"e3/Pos": {"y": 1}}]),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        _open("c", "cc", R0, expect={"c": ["patch", "synced"]}),
        _joined("d", "cd", last=2),  # nothing after 2 survived: synced only
    ]


@scenario
def buffer_deltas() -> list[Step]:
    def both(*socks: str) -> dict[str, list[str]]:
        return {"a": ["ack"], **{s: ["patch"] for s in socks}}

    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send(
            "a",
            patch(1, doc=[{"e1/Line": {"_exists": True, "pts": buf(4, (0, [1, 2, 3, 4]))}}]),
            expect=both("b"),
        ),
        Send("a", patch(2, doc=[{"e1/Line": {"pts": buf(6, (4, [5, 6]))}}]), expect=both("b")),
        _open("c", "cc", R0, expect={"c": ["patch", "synced"]}),
        Send("a", patch(3, doc=[{"e1/Line": {"pts": buf(2)}}]), expect=both("b", "c")),  # truncate
        # writes outside 0 <= i < len are ignored; the rest is zero-filled
        Send(
            "a",
            patch(4, doc=[{"e1/Line": {"pts": buf(5, (-2, [9, 9]), (3, [7, 8, 9, 10]))}}]),
            expect=both("b", "c"),
        ),
        # overlapping runs: the later one wins
        Send(
            "a",
            patch(5, doc=[{"e1/Line": {"pts": buf(3, (1, [4.5]), (1, [5.5]), (7, [1]))}}]),
            expect=both("b", "c"),
        ),
        # a delta for a key with no array yet, on creation
        Send(
            "a",
            patch(6, doc=[{"e2/Line": {"_exists": True, "pts": buf(3, (1, [7]))}}]),
            expect=both("b", "c"),
        ),
        Send("a", patch(7, doc=[{"e1/Line": {"pts": buf(0)}}]), expect=both("b", "c")),
        # a delta on a plain array
        Send(
            "a",
            patch(
                8,
                doc=[
                    {"e3/Line": {"_exists": True, "pts": [1, 2, 3]}},
                    {"e3/Line": {"pts": buf(4, (3, [4]))}},
                ],
            ),
            expect=both("b", "c"),
        ),
        # re-created after a tombstone: no base array
        Send(
            "a",
            patch(
                9,
                doc=[
                    {"e2/Line": {"_exists": False}},
                    {"e2/Line": {"_exists": True, "pts": buf(2, (1, [3]))}},
                ],
            ),
            expect=both("b", "c"),
        ),
        # a delta on a buffer field that was never written (the record exists)
        Send("a", patch(10, doc=[{"e3/Line": {"other": buf(2, (0, [1]))}}]), expect=both("b", "c")),
        # in ephemeral state too
        Send(
            "a",
            patch(11, eph=[{"ca/Trail": {"_exists": True, "pts": buf(2, (0, [1, 2]))}}]),
            expect=both("b", "c"),
        ),
        Send("a", patch(12, eph=[{"ca/Trail": {"pts": buf(3, (2, [3]))}}]), expect=both("b", "c")),
        _open("d", "cd", R0, expect={"d": ["patch", "patch", "synced"]}),
        _open("e", "ce", reconnect(5), expect={"e": ["patch", "patch", "synced"]}),
    ]


@scenario
def reconnect_last_timestamp_variants() -> list[Step]:
    return [
        _joined("a", "ca"),
        Send(
            "a", patch(1, doc=[{"e1/P": {"_exists": True, "x": 1, "y": 1}}]), expect={"a": ["ack"]}
        ),
        Send("a", patch(2, doc=[{"e1/P": {"x": 2}}]), expect={"a": ["ack"]}),
        Send("a", patch(3, doc=[{"e2/P": {"_exists": True, "v": 3}}]), expect={"a": ["ack"]}),
        Send("a", patch(4, doc=[{"e1/P": {"y": 4}}]), expect={"a": ["ack"]}),
        _open("b", "cb", reconnect(0), expect={"b": ["patch", "synced"]}),  # everything
        Close("b"),
        _open("b", "cb", reconnect(2), expect={"b": ["patch", "synced"]}),  # the middle
        Close("b"),
        _open("b", "cb", reconnect(3), expect={"b": ["patch", "synced"]}),
        Close("b"),
        _joined("b", "cb", last=4),  # equal: nothing to send
        Close("b"),
        # ahead of the server (it restarted from an older snapshot): resync
        _open("b", "cb", reconnect(99), expect={"b": ["resync", "synced"]}),
        Send(
            "b",
            patch(1, doc=[{"e3/P": {"_exists": True, "w": 1}}]),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        Close("b"),
        # ahead, while someone has presence state: resync, then the presence snapshot
        Send("a", patch(5, eph=[{"ca/Cursor": {"_exists": True, "x": 0}}]), expect={"a": ["ack"]}),
        _open("b", "cb", reconnect(50), expect={"b": ["patch", "resync", "patch", "synced"]}),
        Close("b", expect={"a": []}),
        _open("b", "cb", reconnect(5), expect={"b": ["patch", "patch", "synced"]}),
    ]


@scenario
def reconnect_with_offline_patches() -> list[Step]:
    return [
        _joined("a", "ca"),
        Send("a", patch(1, doc=[{"e1/P": {"_exists": True, "x": 1}}]), expect={"a": ["ack"]}),
        # offline edits in the reconnect frame: broadcast, applied, no ack
        _open(
            "b",
            "cb",
            reconnect(
                0,
                doc=[{"e1/P": {"x": 2}}, {"e2/P": {"_exists": True, "v": 1}}],
                eph=[{"cb/Cur": {"_exists": True, "x": 0}}],
            ),
            expect={"a": ["patch"], "b": ["patch", "synced"]},
        ),
        Close("b", expect={"a": ["patch"]}),
        # offline edits from a client that is ahead: applied, then resync from before them
        _open(
            "b",
            "cb",
            reconnect(10, doc=[{"e1/P": {"x": 3}}]),
            expect={"a": ["patch"], "b": ["resync", "synced"]},
        ),
        Send(
            "b", patch(1, doc=[{"e3/P": {"_exists": True}}]), expect={"b": ["ack"], "a": ["patch"]}
        ),
        # ephemeral-only offline state: no timestamp move
        _open(
            "c",
            "cc",
            reconnect(1, eph=[{"cc/Cur": {"_exists": True, "x": 5}}]),
            expect={"a": ["patch"], "b": ["patch"], "c": ["patch", "synced"]},
        ),
        # a dropped partial write in the reconnect frame still moves the timestamp
        _open(
            "d",
            "cd",
            reconnect(4, doc=[{"e9/P": {"x": 1}}]),
            expect={
                "a": ["patch"],
                "b": ["patch"],
                "c": ["patch"],
                "d": ["patch", "patch", "synced"],
            },
        ),
        # empty lists in the reconnect frame
        _open("e", "ce", reconnect(5, doc=[], eph=[]), expect={"e": ["patch", "patch", "synced"]}),
    ]


@scenario
def protocol_version_mismatch() -> list[Step]:
    return [
        _joined("a", "ca"),
        # the patches of a mismatching reconnect are not applied nor broadcast
        _open(
            "b",
            "cb",
            reconnect(0, version=1, doc=[{"e1/P": {"_exists": True}}]),
            expect={"b": ["version-mismatch"]},
        ),
        Send("b", reconnect(0, version=3), expect={"b": ["version-mismatch"]}),
        Send("b", reconnect(0, version=None), expect={"b": ["version-mismatch"]}),
        Send("b", reconnect(0, version="2"), expect={"b": ["version-mismatch"]}),
        Send(
            "b",
            reconnect(7, version=0, eph=[{"cb/X": {"_exists": True}}]),
            expect={"b": ["version-mismatch"]},
        ),
        Send("b", R0, expect={"b": ["synced"]}),  # nothing was applied
        Send(
            "b", patch(1, doc=[{"e1/P": {"_exists": True}}]), expect={"b": ["ack"], "a": ["patch"]}
        ),
    ]


@scenario
def presence_snapshot_and_leave() -> list[Step]:
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send(
            "a",
            patch(
                1,
                eph=[
                    {
                        "ca/Cursor": {"_exists": True, "x": 1},
                        "ca/Sel": {"_exists": True, "ids": ["e1"]},
                    }
                ],
            ),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send(
            "b",
            patch(2, eph=[{"cb/Cursor": {"_exists": True, "x": 2}}]),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        Send(
            "b",
            patch(3, eph=[{"cb/Cursor": {"x": 3}, "cb/Sel": {"_exists": True}}]),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        # (a presence key deleted with `_exists: false`: see test_intended_differences)
        Open("c", "cc", expect={"c": ["patch"]}),
        Send("c", R0, expect={"c": ["patch", "synced"]}),
        Close("a", expect={"b": ["patch"], "c": ["patch"]}),  # deletion, then clientCount
        Close("b", expect={"c": ["patch"]}),
        _joined("d", "cd"),
        # a client whose ephemeral map exists but is empty: no deletion frame
        Send("d", patch(4, eph=[{"cd/X": {"y": 1}}]), expect={"d": ["ack"], "c": ["patch"]}),
        Close("d"),
        _joined("e", "ce"),
    ]


@scenario
def presence_same_key_from_two_clients() -> list[Step]:
    return [
        _joined("a", "zeta"),
        _joined("b", "alpha"),
        Send(
            "a",
            patch(1, eph=[{"shared/Thing": {"_exists": True, "v": "zeta"}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
        Send(
            "b",
            patch(2, eph=[{"shared/Thing": {"_exists": True, "v": "alpha"}}]),
            expect={"b": ["ack"], "a": ["patch"]},
        ),
        Open("c", "mid", send=[R0], expect={"c": ["patch", "patch", "synced"]}),
        Close("a", expect={"b": ["patch"], "c": ["patch"]}),
        Open("d", "omega", send=[R0], expect={"d": ["patch", "patch", "synced"]}),
    ]


@scenario
def same_client_id_twice() -> list[Step]:
    return [
        _joined("a1", "dup"),
        _joined("a2", "dup"),
        Send(
            "a1",
            patch(1, eph=[{"dup/Cursor": {"_exists": True, "x": 1}}]),
            expect={"a1": ["ack"], "a2": ["patch"]},
        ),
        _joined("a3", "dup"),  # its own clientId's state is not in its snapshot
        Open("b", "other", expect={"b": ["patch"]}),
        Send(
            "a2",
            patch(2, doc=[{"e1/P": {"_exists": True}}], eph=[{"dup/Sel": {"_exists": True}}]),
            expect={"a2": ["ack"], "a1": ["patch"], "a3": ["patch"], "b": ["patch"]},
        ),
        # one of them leaves: the clientId's presence state goes, for everyone
        Close("a1", expect={"a2": ["patch"], "a3": ["patch"], "b": ["patch"]}),
        Send("a3", R0, expect={"a3": ["patch", "synced"]}),
        Close("a2"),
        Send("b", R0, expect={"b": ["patch", "synced"]}),
    ]


@scenario
def frames_before_first_reply() -> list[Step]:
    return [
        _open(
            "a",
            "ca",
            R0,
            patch(1, doc=[{"e1/P": {"_exists": True, "x": 1}}]),
            patch(2, doc=[{"e1/P": {"x": 2}}]),
            patch(3, eph=[{"ca/C": {"_exists": True}}]),
            expect={"a": ["synced", "ack", "ack", "ack"]},
        ),
        _open(
            "b",
            "cb",
            R0,
            patch(1, doc=[{"e1/P": {"x": 3}}]),
            expect={"a": ["patch"], "b": ["patch", "patch", "synced", "ack"]},
        ),
        # a patch before the reconnect
        _open(
            "c",
            "cc",
            patch(1, doc=[{"e2/P": {"_exists": True}}]),
            R0,
            expect={"a": ["patch"], "b": ["patch"], "c": ["patch", "ack", "patch", "synced"]},
        ),
        # a version mismatch queued before registration
        _open(
            "d",
            "cd",
            reconnect(0, version=1),
            patch(1, eph=[{"cd/C": {"_exists": True}}]),
            expect={
                "a": ["patch"],
                "b": ["patch"],
                "c": ["patch"],
                "d": ["patch", "version-mismatch", "ack"],
            },
        ),
    ]


@scenario
def message_ids_are_echoed() -> list[Step]:
    def acked(mid: Any) -> Send:
        return Send(
            "a",
            patch(mid, doc=[{"e1/P": {"_exists": True}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        )

    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        acked(0),
        acked("msg-1"),
        acked(2**53 - 1),
        acked(7),
        acked(7),  # repeated ids are not special
        Send(
            "a",
            {"type": "patch", "documentPatches": [{"e1/P": {"x": 1}}]},  # no messageId
            expect={"a": ["ack"], "b": ["patch"]},
        ),
    ]


@scenario
def auth_refresh_gets_no_reply() -> list[Step]:
    return [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send("a", {"type": "auth-refresh", "token": "t2"}),
        Send(
            "a", patch(1, doc=[{"e1/P": {"_exists": True}}]), expect={"a": ["ack"], "b": ["patch"]}
        ),
        Send("b", {"type": "auth-refresh", "token": "t3"}),
        Send(
            "b", patch(2, eph=[{"cb/C": {"_exists": True}}]), expect={"b": ["ack"], "a": ["patch"]}
        ),
    ]


@scenario
def rooms_are_separate() -> list[Step]:
    other = "{room}-other"
    return [
        _joined("a", "ca"),
        Open("x", "cx", send=[R0], expect={"x": ["synced"]}, room=other),
        Send(
            "a",
            patch(1, doc=[{"e1/P": {"_exists": True}}], eph=[{"ca/C": {"_exists": True}}]),
            expect={"a": ["ack"]},
        ),
        Send(
            "x", patch(1, doc=[{"e1/P": {"_exists": True, "in": "other"}}]), expect={"x": ["ack"]}
        ),
        Send("x", patch(2, doc=[{"e1/P": {"in": "still other"}}]), expect={"x": ["ack"]}),
        _open("b", "cb", R0, expect={"b": ["patch", "patch", "synced"]}),
        Open("y", "cy", send=[R0], expect={"y": ["patch", "synced"]}, room=other),
        Close("a", expect={"b": ["patch"]}),
    ]


@scenario
def missing_query_parameters() -> list[Step]:
    return [
        # no clientId: closed with 1008 and a reason
        Open("x", None, default_expect=False, expect={"x": ["__closed__"]}),
        # no roomId means the room "default"; no token is fine
        Open("a", "ca", send=[R0], expect={"a": ["synced"]}, room=None, token=None),
        Send(
            "a",
            patch(1, doc=[{"SINGLETON/Default": {"_exists": True, "here": True}}]),
            expect={"a": ["ack"]},
        ),
        Open(
            "b",
            "cb",
            send=[R0],
            expect={"a": ["clientCount"], "b": ["patch", "synced"]},
            room="default",
        ),
    ]


# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------


def _start_pair(tmp: Path, *extra: str) -> tuple[ServerProcess, ServerProcess]:
    node = ServerProcess.start("node", node_command(tmp / "node-data", *extra), tmp / "node-data")
    try:
        if SELF_CHECK:
            ours = ServerProcess.start(
                OURS, node_command(tmp / "ours-data", *extra), tmp / "ours-data"
            )
        else:
            ours = ServerProcess.start(
                OURS, ours_command(tmp / "ours-data", *extra), tmp / "ours-data"
            )
    except Exception:
        node.kill()
        raise
    return node, ours


SERVER_ARGS = ("--save-throttle", "3600", "--idle-timeout", "3600")


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    require_node()
    tmp = tmp_path_factory.mktemp("side-by-side")
    node, ours = _start_pair(tmp, *SERVER_ARGS)
    try:
        for server in (node, ours):  # answers at all? Else fail now, not step by step.
            got = trio.run(_one_socket, server.url, _room("health"), "health", [R0], 2, 10.0)
            if got != [{"type": "clientCount", "count": 1}, {"type": "synced", "timestamp": 0}]:
                pytest.fail(
                    f"the {server.name} server does not answer a reconnect: got {got}\n"
                    f"{server.log_tail()}"
                )
        yield node, ours
    finally:
        node.terminate()
        ours.terminate()


def _alive(*procs: ServerProcess) -> None:
    for proc in procs:
        if not proc.alive():
            pytest.fail(
                f"the {proc.name} server died (exit code {proc.proc.returncode}):\n"
                f"{proc.log_tail()}"
            )


def _room(name: str) -> str:
    return f"sbs-{name.replace('_', '-')}-{uuid.uuid4().hex[:8]}"


async def _play_both(
    node: ServerProcess, ours: ServerProcess, name: str, steps: list[Step], room: str | None = None
) -> tuple[Recording, Recording]:
    room = room or _room(name)
    out: dict[str, Recording] = {}

    async def run(server: ServerProcess) -> None:
        out[server.name] = await play(server.name, server.url, room, steps)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, node)
        nursery.start_soon(run, ours)
    return out["node"], out[ours.name]


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_same_frames(servers: tuple[ServerProcess, ServerProcess], name: str) -> None:
    node, ours = servers
    _alive(node, ours)
    steps = SCENARIOS[name]
    node_rec, ours_rec = await _play_both(node, ours, name, steps)
    problems = annotation_errors(steps, node_rec)
    if problems:
        pytest.fail(
            f"scenario {name!r} is annotated wrongly for the Node reference (a test "
            f"bug):\n" + "\n".join(problems) + "\n\nsteps:\n" + describe_steps(steps)
        )
    _alive(node, ours)
    differences = compare(steps, node_rec, ours_rec)
    if differences:
        pytest.fail(
            f"scenario {name!r}: {OURS} differs from node\nsteps:\n"
            + describe_steps(steps)
            + "\n\n"
            + "\n".join(differences)
        )


async def _one_socket(
    url: str, room: str, client: str, frames: list[Any], until: int, timeout: float = 3.0
) -> list[Any]:
    """Open a socket, send ``frames``, return what arrives until ``until`` frames came
    (or the timeout, or the socket closed)."""
    got: list[Any] = []
    with trio.move_on_after(timeout):
        async with trio_websocket.open_websocket_url(connect_url(url, room, client, "t")) as ws:
            for frame in frames:
                await ws.send_message(frame.text if isinstance(frame, Raw) else json.dumps(frame))
            try:
                while len(got) < until:
                    got.append(json.loads(await ws.get_message()))
            except trio_websocket.ConnectionClosed as exc:
                got.append({"__closed__": exc.reason.code if exc.reason else None})
    return got


# Frames that kill the Node process or store garbage (PROTOCOL.md, last section). We
# refuse each whole: an error frame to the sender, nothing applied, nothing broadcast,
# no timestamp move. Never sent to the Node server.
HOSTILE_FRAMES: list[Any] = [
    Raw("null"),
    Raw("[]"),
    Raw('"patch"'),
    Raw("{not json"),
    Raw("[" * 100_000 + "]" * 100_000),
    {"type": "patch", "messageId": 91, "documentPatches": [None]},
    {"type": "patch", "messageId": 92, "documentPatches": [{"e1/P": None}]},
    {"type": "patch", "messageId": 93, "documentPatches": [{"e1/P": "hi"}]},
    {"type": "patch", "messageId": 94, "documentPatches": [{"e1/P": {"_exists": "yes"}}]},
    {
        "type": "patch",
        "messageId": 95,
        "documentPatches": [{"e1/P": {"pts": {"__buf": 1, "len": -1, "runs": []}}}],
    },
    {
        "type": "patch",
        "messageId": 96,
        "documentPatches": [{"e1/P": {"pts": {"__buf": 1, "len": 2, "runs": 5}}}],
    },
    {
        "type": "patch",
        "messageId": 97,
        "documentPatches": [{"e1/P": {"pts": {"__buf": 1, "len": 1e12, "runs": []}}}],
    },
    {
        "type": "patch",
        "messageId": 98,
        "documentPatches": [{"e2/P": {"_exists": True}}, {"e1/P": {"x": {"__buf": 1}}}],
    },
    {"type": "patch", "messageId": 99, "ephemeralPatches": [{"ca/C": None}]},
    {"type": "reconnect", "lastTimestamp": 0, "protocolVersion": 2, "documentPatches": [None]},
]

# Frame types protocol 2 does not have: Node ignores them, we answer with an error frame
# (clients ignore frame types they do not know).
UNKNOWN_TYPE_FRAMES: list[Any] = [
    {"type": "hello"},
    {"type": "ack", "messageId": 1, "timestamp": 5},
    {"type": "synced", "timestamp": 3},
]


def _is_error_frame(frame: Any) -> bool:
    return bool(
        isinstance(frame, dict)
        and frame.get("type") == "error"
        and isinstance(frame.get("code"), str)
        and isinstance(frame.get("message"), str)
    )


@pytest.mark.skipif(SELF_CHECK, reason="SIDE_BY_SIDE_OURS=node: no intended difference to check")
async def test_intended_differences(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """Where we differ from Node on purpose. Asserts what we do, and what Node does where
    it is safe to ask it."""
    node, ours = servers
    _alive(node, ours)

    # 1. A document patch list holding only empty patches changes nothing: Node still
    #    moves the timestamp, we do not.
    room = _room("empty-patch-objects")
    frames = [R0, patch(1, doc=[{}]), patch(2, doc=[{}, {}]), patch(3, doc=[{}], eph=[{}])]
    results: dict[str, list[Any]] = {}

    async def run(server: ServerProcess) -> None:
        results[server.name] = await _one_socket(server.url, room, "ca", frames, until=5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, node)
        nursery.start_soon(run, ours)
    node_acks = [f["timestamp"] for f in results["node"] if f.get("type") == "ack"]
    ours_acks = [f["timestamp"] for f in results["ours"] if f.get("type") == "ack"]
    assert node_acks == [1, 2, 3], results["node"]  # what Node does
    assert ours_acks == [0, 0, 0], results["ours"]
    after = await _one_socket(ours.url, room, "cb", [R0], until=2)
    assert after == [{"type": "clientCount", "count": 1}, {"type": "synced", "timestamp": 0}]

    # 2. Unknown frame types: Node says nothing, we send an error frame.
    def unknown_steps(reply: list[str]) -> list[Step]:
        return [
            _joined("a", "ca"),
            _joined("b", "cb"),
            *[Send("a", frame, expect={"a": reply}) for frame in UNKNOWN_TYPE_FRAMES],
            Send(
                "a",
                patch(1, doc=[{"e1/P": {"_exists": True}}]),
                expect={"a": ["ack"], "b": ["patch"]},
            ),
        ]

    room = _room("unknown-types")
    recs: dict[str, Recording] = {}

    async def play_unknown(server: ServerProcess, reply: list[str]) -> None:
        recs[server.name] = await play(server.name, server.url, room, unknown_steps(reply))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(play_unknown, node, [])
        nursery.start_soon(play_unknown, ours, ["error"])
    unknown = range(2, 2 + len(UNKNOWN_TYPE_FRAMES))
    assert annotation_errors(unknown_steps([]), recs["node"]) == []  # Node: nothing at all
    for i in unknown:
        replies = [f for s, f in recs["ours"].frames["a"] if s == i]
        assert len(replies) == 1 and _is_error_frame(replies[0]), replies
        assert replies[0]["code"] == "unknown-type", replies
    assert recs["ours"].notes == []
    assert [f for s, f in recs["ours"].frames["b"] if s in unknown] == []
    assert recs["ours"].just_frames("a")[-1] == {"type": "ack", "messageId": 1, "timestamp": 1}

    # 3. Malformed frames (ours only: they kill Node): an error frame to the sender,
    #    nothing applied or broadcast, no timestamp move, the server and the room stay up.
    #    Each comes on its own socket (several refused frames in a row close a socket).
    steps: list[Step] = [
        _joined("a", "ca"),
        _joined("b", "cb"),
        Send(
            "a",
            patch(1, doc=[{"e1/P": {"_exists": True, "x": 1}}]),
            expect={"a": ["ack"], "b": ["patch"]},
        ),
    ]
    hostile_steps: dict[int, Any] = {}
    for i, frame in enumerate(HOSTILE_FRAMES):
        hostile_steps[len(steps)] = frame
        steps.append(
            Open(f"h{i}", "ca", send=[reconnect(1), frame], expect={f"h{i}": ["synced", "error"]})
        )
        steps.append(Close(f"h{i}"))
    steps += [
        Send("a", patch(2, doc=[{"e1/P": {"x": 2}}]), expect={"a": ["ack"], "b": ["patch"]}),
        _open("c", "cc", R0, expect={"c": ["patch", "synced"]}),
    ]
    rec = await play(ours.name, ours.url, _room("hostile"), steps)
    _alive(ours)
    assert not rec.notes, rec.notes
    for i, frame in enumerate(hostile_steps.values()):
        got = rec.just_frames(f"h{i}")
        assert got[:2] == [{"type": "clientCount", "count": 3}, {"type": "synced", "timestamp": 1}]
        assert len(got) == 3 and _is_error_frame(got[2]), (frame, got)
    for sock in ("a", "b"):
        assert {frame_type for s in hostile_steps for frame_type in rec.step_types(sock, s)} <= {
            "clientCount"
        }, rec.frames[sock]
    acks = [f for f in rec.just_frames("a") if f.get("type") == "ack"]
    assert [a["timestamp"] for a in acks] == [1, 2], acks
    want_c = [
        {
            "type": "patch",
            "clientId": "",
            "timestamp": 2,
            "documentPatches": [{"e1/P": {"_exists": True, "x": 2}}],
        },
        {"type": "synced", "timestamp": 2},
    ]
    assert same_json(rec.just_frames("c")[-2:], want_c), rec.just_frames("c")

    # 4. A presence key deleted with `_exists: false` is forgotten, not kept as a
    #    tombstone as Node does: newcomers' snapshots and the deletion broadcast when its
    #    client leaves no longer name it. (Every client has deleted it already.)
    def presence_steps(node_like: bool) -> list[Step]:
        return [
            _joined("a", "ca"),
            _joined("b", "cb"),
            Send(
                "b",
                patch(
                    1, eph=[{"cb/Cursor": {"_exists": True, "x": 1}, "cb/Sel": {"_exists": True}}]
                ),
                expect={"b": ["ack"], "a": ["patch"]},
            ),
            Send(
                "b",
                patch(2, eph=[{"cb/Cursor": {"_exists": False}}]),
                expect={"b": ["ack"], "a": ["patch"]},
            ),
            _open("c", "cc", R0, expect={"c": ["patch", "patch", "synced"]}),  # step 4
            Close("b", expect={"a": ["patch"], "c": ["patch"]}),  # step 5
            _joined("d", "cd"),
            Send(
                "d",
                patch(3, eph=[{"cd/X": {"_exists": True}}]),
                expect={"d": ["ack"], "a": ["patch"], "c": ["patch"]},
            ),
            Send(
                "d",
                patch(4, eph=[{"cd/X": {"_exists": False}}]),
                expect={"d": ["ack"], "a": ["patch"], "c": ["patch"]},
            ),
            Close("d", expect={"a": ["patch"], "c": ["patch"]} if node_like else {}),  # step 9
        ]

    room = _room("presence-tombstones")

    async def play_presence(server: ServerProcess, node_like: bool) -> None:
        recs[server.name] = await play(server.name, server.url, room, presence_steps(node_like))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(play_presence, node, True)
        nursery.start_soon(play_presence, ours, False)
    assert annotation_errors(presence_steps(True), recs["node"]) == []
    assert annotation_errors(presence_steps(False), recs["ours"]) == []

    def at(rec: Recording, sock: str, step: int) -> list[Any]:
        return [f for s, f in rec.frames[sock] if s == step]

    def presence(client_id: str, patch: dict[str, Any]) -> dict[str, Any]:
        return {"type": "patch", "ephemeralPatches": [patch], "clientId": client_id}

    live, dead = {"_exists": True}, {"_exists": False}
    expected = {
        # node, ours
        ("c", 4): (
            [
                presence("", {"cb/Cursor": dead, "cb/Sel": live}),
                {"type": "clientCount", "count": 3},
                presence("", {"cb/Cursor": dead, "cb/Sel": live}),
                {"type": "synced", "timestamp": 0},
            ],
            [
                presence("", {"cb/Sel": live}),
                {"type": "clientCount", "count": 3},
                presence("", {"cb/Sel": live}),
                {"type": "synced", "timestamp": 0},
            ],
        ),
        ("a", 5): (
            [
                presence("cb", {"cb/Cursor": dead, "cb/Sel": dead}),
                {"type": "clientCount", "count": 2},
            ],
            [presence("cb", {"cb/Sel": dead}), {"type": "clientCount", "count": 2}],
        ),
        ("a", 9): (
            [presence("cd", {"cd/X": dead}), {"type": "clientCount", "count": 2}],
            [{"type": "clientCount", "count": 2}],
        ),
    }
    for sock in ("a", "c"):  # both see the same deletions when b, then d, leave
        expected[sock, 5] = expected["a", 5]
        expected[sock, 9] = expected["a", 9]
    for (sock, step), (node_frames, ours_frames) in expected.items():
        assert same_json(at(recs["node"], sock, step), node_frames), at(recs["node"], sock, step)
        assert same_json(at(recs["ours"], sock, step), ours_frames), at(recs["ours"], sock, step)
    # Everything else is the same.
    for sock in ("a", "c", "d"):
        for rec in (recs["node"], recs["ours"]):
            rec.frames[sock] = [(s, f) for s, f in rec.frames[sock] if (sock, s) not in expected]
    assert compare(presence_steps(True), recs["node"], recs["ours"]) == []


async def test_snapshot_files_match(tmp_path: Path) -> None:
    """Play every scenario on a fresh pair of servers, SIGTERM both, compare the files.
    Then load Node's files into both and compare what a reconnecting client gets."""
    require_node()
    node, ours = _start_pair(tmp_path / "run", *SERVER_ARGS)
    rooms = {name: _room(name) for name in SCENARIOS}
    try:
        async with trio.open_nursery() as nursery:
            for name in SCENARIOS:
                nursery.start_soon(_play_both, node, ours, name, SCENARIOS[name], rooms[name])
        _alive(node, ours)
    finally:
        node_code = node.terminate()
        ours_code = ours.terminate()
    assert node_code == 0, node.log_tail()
    assert ours_code == 0, f"{OURS} exited with {ours_code} after SIGTERM\n{ours.log_tail()}"

    node_files = read_snapshots(node.data_dir)
    ours_files = read_snapshots(ours.data_dir)
    expected_rooms = {
        room_id for name, room in rooms.items() for room_id in _rooms_used(SCENARIOS[name], room)
    }
    assert set(node_files) == expected_rooms, sorted(node_files)  # Node saves every room
    problems: list[str] = []
    for room_id, snapshot in sorted(node_files.items()):
        if room_id not in ours_files:
            if snapshot == {"timestamp": 0, "state": {}, "timestamps": {}}:
                continue  # an untouched room: no file is as good as an empty one
            problems.append(
                f"{room_id}.json: node wrote {json.dumps(snapshot)}; {OURS} wrote no file"
            )
        elif not same_json(snapshot, ours_files[room_id]):
            problems.append(_snapshot_diff(room_id, snapshot, ours_files[room_id]))
    for room_id in sorted(set(ours_files) - set(node_files)):
        problems.append(f"{room_id}.json: written by {OURS} only")
    leftovers = [
        p.name
        for d in (node.data_dir, ours.data_dir)
        for p in d.iterdir()
        if not p.name.endswith(".json")
    ]
    if leftovers:
        problems.append(f"files other than *.json left in the data dirs: {leftovers}")

    # Both servers load Node's files; a client reconnecting from 0 must get the same.
    shutil.copytree(node.data_dir, tmp_path / "load" / "node-data")
    shutil.copytree(node.data_dir, tmp_path / "load" / "ours-data")
    node2, ours2 = _start_pair(tmp_path / "load", *SERVER_ARGS)
    reload_steps: list[Step] = [_open("a", "reader", R0, expect={"a": ["patch", "synced"]})]
    empty_steps: list[Step] = [_joined("a", "reader")]
    recordings: dict[str, tuple[Recording, Recording]] = {}
    try:

        async def load_one(room_id: str) -> None:
            steps = reload_steps if node_files[room_id]["state"] else empty_steps
            recordings[room_id] = await _play_both(node2, ours2, "reload", steps, room_id)

        async with trio.open_nursery() as nursery:
            for room_id in node_files:
                nursery.start_soon(load_one, room_id)
        _alive(node2, ours2)
    finally:
        node2.terminate()
        ours2.terminate()
    for room_id, (node_rec, ours_rec) in sorted(recordings.items()):
        steps = reload_steps if node_files[room_id]["state"] else empty_steps
        problems += [
            f"room {room_id} loaded from Node's file: " + d
            for d in annotation_errors(steps, node_rec) + compare(steps, node_rec, ours_rec)
        ]
    # And the snapshot each wrote back on shutdown is the one it loaded.
    for data_dir in (node2.data_dir, ours2.data_dir):
        for room_id, snapshot in read_snapshots(data_dir).items():
            if room_id in node_files and not same_json(snapshot, node_files[room_id]):
                problems.append(
                    f"rewritten by {data_dir.name}: "
                    + _snapshot_diff(room_id, node_files[room_id], snapshot)
                )
    assert not problems, "\n".join(problems)


def _rooms_used(steps: list[Step], room: str) -> set[str]:
    """The rooms a scenario creates on the server (sockets with a clientId)."""
    return {
        "default" if step.room is None else step.room.format(room=room)
        for step in steps
        if isinstance(step, Open) and step.client_id is not None
    }


def _snapshot_diff(room_id: str, expected: Any, got: Any) -> str:
    lines = [f"{room_id}.json differs:"]
    if not isinstance(expected, dict) or not isinstance(got, dict):
        return f"{room_id}.json: node {json.dumps(expected)} vs {OURS} {json.dumps(got)}"
    for part in sorted(set(expected) | set(got)):
        e, g = expected.get(part), got.get(part)
        if canonical(e) == canonical(g):
            continue
        if isinstance(e, dict) and isinstance(g, dict):
            for key in sorted(set(e) | set(g)):
                if key not in g:
                    lines.append(f"  {part}[{key!r}]: node {json.dumps(e[key])}, {OURS} missing")
                elif key not in e:
                    lines.append(f"  {part}[{key!r}]: node missing, {OURS} {json.dumps(g[key])}")
                elif not same_json(e[key], g[key]):
                    lines.append(
                        f"  {part}[{key!r}]: node {json.dumps(e[key])}, {OURS} {json.dumps(g[key])}"
                    )
        else:
            lines.append(f"  {part}: node {json.dumps(e)}, {OURS} {json.dumps(g)}")
    return "\n".join(lines)
