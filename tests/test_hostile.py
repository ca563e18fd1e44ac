"""Hostile input over real sockets: every bad frame is refused whole, and nobody else notices.

The CLI server runs in-process on a loopback port. For every kind of bad frame, a
client ``h`` in room ``doc`` sends it. Then:

- ``h`` gets an ``error`` frame with the documented code (or the documented close);
- a fresh client that joins ``doc`` and reconnects with lastTimestamp 0 is sent exactly
  what it was sent before (same timestamp, same diff, same presence): nothing of the
  frame was applied, even when one bad entry hides among many good ones;
- the observer in ``doc`` is sent nothing for it (the next frame it sees is ``h``'s next
  valid patch), and ``h``'s session still works;
- a patch in room ``other`` is still acked and broadcast;
- the log has one line naming the room, the client and the reason.

Frames the WebSocket layer itself refuses (bad framing, bad UTF-8, too big, plain HTTP,
half-open handshakes, a ping after the server's close frame) run on both transports.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

from canvas_store_trio import decode_snapshot
from canvas_store_trio.cli._main import build_parser, serve
from canvas_store_trio.testing import FrameClient
from canvas_store_trio.transport import _handshake

TRANSPORTS = ["wire", "trio-websocket"]

# --- helpers (test_limits.py uses them too) ------------------------------------------


async def start_server(nursery: trio.Nursery, *options: str) -> int:
    """Run ``canvas-store-trio serve --port 0 OPTIONS`` in-process; return its port.

    Rooms are kept in memory unless the options name a ``--data-dir``.
    """
    storage = () if "--data-dir" in options else ("--memory",)
    args = build_parser().parse_args(
        ["serve", "--host", "127.0.0.1", "--port", "0", *storage, *options])
    port: int = await nursery.start(serve, args)
    return port


@asynccontextmanager
async def ws_client(port: int, room: str, client_id: str) -> AsyncIterator[FrameClient]:
    url = f"ws://127.0.0.1:{port}/?roomId={room}&clientId={client_id}"
    async with open_websocket_url(url, max_message_size=2**30) as ws:
        yield FrameClient(ws)


def mask_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
               masked: bool = True) -> bytes:
    """One client WebSocket frame, built by hand so that it can be wrong on purpose."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 2**16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = b"\x12\x34\x56\x78"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    """A WebSocket client on bare wsproto that does exactly what it is told.

    It answers nothing by itself (no pongs, no close replies) unless ``auto_pong`` is
    set, and writes hand-made frames (:func:`mask_frame`) that a real client never would.
    """

    def __init__(self, stream: trio.abc.Stream, *, auto_pong: bool = False) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: collections.deque[Event] = collections.deque()
        self.auto_pong = auto_pong
        self.pings = 0

    @classmethod
    async def open(cls, port: int, path: str, **kwargs: Any) -> RawWebSocket:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        raw = cls(stream, **kwargs)
        await raw.handshake(path)
        return raw

    async def handshake(self, path: str) -> None:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target=path)))
        event = await self.next_event()
        assert isinstance(event, AcceptConnection), event

    async def next_event(self, timeout: float = 5.0) -> Event:
        with trio.fail_after(timeout):
            while not self.pending:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self.ws.receive_data(data or None)
                self.pending.extend(self.ws.events())
            return self.pending.popleft()

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text message, parsed (pings are counted, and answered if asked)."""
        parts: list[str] = []
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, Ping):
                self.pings += 1
                if self.auto_pong:
                    await self.stream.send_all(self.ws.send(event.response()))
                continue
            if isinstance(event, CloseConnection):
                raise AssertionError(f"closed: {event.code} {event.reason!r}")
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                frame: dict[str, Any] = orjson.loads("".join(parts))
                return frame

    async def receive_until(self, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        frames = [await self.receive(timeout)]
        while frames[-1]["type"] != kind:
            frames.append(await self.receive(timeout))
        return frames

    async def close_event(self, timeout: float = 5.0) -> CloseConnection:
        """Skip messages until the server's close frame (or EOF, code 1006)."""
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, CloseConnection):
                return event

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(mask_frame(0x1, text.encode()))

    async def send_json(self, **frame: Any) -> None:
        await self.send_text(orjson.dumps(frame).decode())

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def wait_eof(stream: trio.abc.Stream, timeout: float = 5.0) -> bytes:
    """Read until the server closes the TCP connection; return everything read."""
    data = b""
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


def document_of(view: list[dict[str, Any]]) -> tuple[Any, int]:
    """The document part of a view: the reconnect diff and the synced timestamp."""
    diff = [f.get("documentPatches") for f in view if f["type"] == "patch"]
    return [d for d in diff if d], view[-1]["timestamp"]


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# --- the scene: a document, a hostile sender, an observer, and another room ---------

SEED: list[dict[str, Any]] = [
    {
        "e1/pos": {"_exists": True, "_version": "1", "x": 1, "y": 2},
        "e1/pts": {"_exists": True, "pts": {"__buf": 1, "len": 4, "runs": [[0, [1, 2, 3, 4]]]}},
        "e2/pos": {"_exists": True, "x": 5},
        "SINGLETON/camera": {"_exists": True, "zoom": 1.5},
    },
    {"e2/pos": {"_exists": False}},
]
PRESENCE = {"cursor/h": {"_exists": True, "x": 0, "y": 0}}

_ids = itertools.count()


class Scene:
    """Room ``doc`` (seeded, with the observer ``w`` and the hostile client ``h``), and
    room ``other`` with two clients that must keep working whatever ``h`` does."""

    observer: FrameClient
    hostile: FrameClient
    a: FrameClient
    b: FrameClient

    def __init__(self, port: int) -> None:
        self.port = port
        self.edits = 0

    async def view(self, room: str = "doc") -> list[dict[str, Any]]:
        """What a fresh client is sent on joining and reconnecting with lastTimestamp 0."""
        async with ws_client(self.port, room, f"probe{next(_ids)}") as probe:
            frames = await probe.reconnect()
        return [f for f in frames if f["type"] != "clientCount"]

    async def other_room_still_works(self) -> None:
        self.edits += 1
        n = self.edits
        key = f"o{n}/c"
        await self.a.send(type="patch", messageId=f"o{n}",
                          documentPatches=[{key: {"_exists": True, "n": n}}])
        assert (await self.a.receive_until("ack"))[-1] == {
            "type": "ack", "messageId": f"o{n}", "timestamp": n}
        got = (await self.b.receive_until("patch"))[-1]
        assert got["documentPatches"] == [{key: {"_exists": True, "n": n}}]

    async def next_edit_is_seen_first(self, sender: FrameClient | None, timestamp: int) -> None:
        """``sender`` (a fresh client if None) edits ``doc``: it is acked as the room's
        next change, and it is the first thing (client counts aside) the observer is
        sent after the hostile frame: nothing of that frame came before it."""
        if sender is None:
            async with ws_client(self.port, "doc", f"editor{next(_ids)}") as editor:
                await editor.reconnect()
                await self.next_edit_is_seen_first(editor, timestamp)
            return
        key = f"ok{next(_ids)}/c"
        await sender.send(type="patch", messageId="ok",
                          documentPatches=[{key: {"_exists": True}}])
        assert (await sender.receive_until("ack"))[-1] == {
            "type": "ack", "messageId": "ok", "timestamp": timestamp + 1}
        seen = []
        while not seen or seen[-1].get("clientId") != sender_id(sender):
            frame = await self.observer.receive()
            if frame["type"] != "clientCount" and not is_a_leave(frame):
                seen.append(frame)
        assert seen == [{"type": "patch", "clientId": sender_id(sender),
                         "documentPatches": [{key: {"_exists": True}}],
                         "timestamp": timestamp + 1}]


def is_a_leave(frame: dict[str, Any]) -> bool:
    """A presence deletion sent when a client leaves."""
    return (frame["type"] == "patch" and "documentPatches" not in frame
            and all(v == {"_exists": False} for p in frame["ephemeralPatches"] for v in p.values()))


def sender_id(client: FrameClient) -> str:
    return client.socket.path.split("clientId=")[1].split("&")[0]  # type: ignore[attr-defined]


@asynccontextmanager
async def scene(*options: str, transport: str = "wire") -> AsyncIterator[Scene]:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, "--transport", transport, *options)
        s = Scene(port)
        async with (
            ws_client(port, "doc", "w") as s.observer,
            ws_client(port, "doc", "h") as s.hostile,
            ws_client(port, "other", "a") as s.a,
            ws_client(port, "other", "b") as s.b,
        ):
            await s.observer.reconnect()
            for i, doc_patch in enumerate(SEED):
                await s.observer.send(type="patch", messageId=f"seed{i}",
                                      documentPatches=[doc_patch])
                await s.observer.receive_until("ack")
            await s.hostile.reconnect(ephemeralPatches=[PRESENCE])
            await s.observer.receive_until("patch")  # h's presence
            await s.a.reconnect()
            await s.b.reconnect()
            yield s
        nursery.cancel_scope.cancel()


# Small limits, so that "too many" frames stay small; many invalid frames allowed, so
# that the sender is not closed for the count in these tests.
HOSTILE_OPTIONS = ("--max-keys-per-frame", "1000", "--max-buffer-length", "1000",
                   "--max-message-size", str(256 * 1024), "--max-invalid-frames", "10000")


# --- the hostile frames ----------------------------------------------------------------


def patch(mid: Any = "bad", **frame: Any) -> str:
    return orjson.dumps({"type": "patch", "messageId": mid, **frame}).decode()


def doc(*patches: Any, mid: Any = "bad") -> str:
    return patch(mid, documentPatches=list(patches))


def component(value: Any) -> str:
    """A write to a live key whose value is ``value``."""
    return doc({"e1/pos": value})


def delta(**fields: Any) -> str:
    """A buffer delta written over the live ``e1/pts.pts``."""
    return doc({"e1/pts": {"pts": {"__buf": 1, **fields}}})


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def deep_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


GOOD_KEYS = {f"g{i}/c": {"_exists": True, "i": i} for i in range(500)}

HOSTILE: list[Any] = [
    # not a JSON object
    pytest.param("not json", "invalid-json", None, id="not-json"),
    pytest.param('{"type":"patch","messageId":"m",', "invalid-json", None, id="truncated-json"),
    pytest.param("", "invalid-json", None, id="empty-text"),
    pytest.param("NaN", "invalid-json", None, id="nan"),
    pytest.param("null", "invalid-frame", None, id="json-null"),
    pytest.param("1", "invalid-frame", None, id="json-number"),
    pytest.param('"x"', "invalid-frame", None, id="json-string"),
    pytest.param("[]", "invalid-frame", None, id="json-array"),
    pytest.param("true", "invalid-frame", None, id="json-true"),
    # type
    pytest.param('{"messageId":"m1","documentPatches":[]}', "invalid-frame", "m1",
                 id="missing-type"),
    pytest.param('{"type":null,"messageId":"m1"}', "invalid-frame", "m1", id="null-type"),
    pytest.param('{"type":"explode","messageId":"m1"}', "unknown-type", "m1",
                 id="unknown-type"),
    pytest.param('{"type":5}', "unknown-type", None, id="numeric-type"),
    pytest.param('{"type":["patch"]}', "unknown-type", None, id="list-type"),
    # components
    pytest.param(component(None), "invalid-component", "bad", id="component-null"),
    pytest.param(component("hi"), "invalid-component", "bad", id="component-string"),
    pytest.param(component(5), "invalid-component", "bad", id="component-number"),
    pytest.param(component([]), "invalid-component", "bad", id="component-list"),
    pytest.param(component(True), "invalid-component", "bad", id="component-bool"),
    pytest.param(component({"_exists": "yes"}), "invalid-component", "bad", id="exists-string"),
    pytest.param(component({"_exists": 1}), "invalid-component", "bad", id="exists-one"),
    pytest.param(component({"_exists": None}), "invalid-component", "bad", id="exists-null"),
    pytest.param(component({"_exists": 0}), "invalid-component", "bad", id="exists-zero"),
    pytest.param(doc({"new/c": {"_exists": "yes", "x": 1}}), "invalid-component", "bad",
                 id="exists-string-on-create"),
    # buffer deltas
    pytest.param(delta(len=-1, runs=[]), "invalid-buffer-delta", "bad", id="buf-len-negative"),
    pytest.param(delta(len=2.5, runs=[]), "invalid-buffer-delta", "bad", id="buf-len-float"),
    pytest.param(delta(len="3", runs=[]), "invalid-buffer-delta", "bad", id="buf-len-string"),
    pytest.param(delta(len=10**15, runs=[]), "invalid-buffer-delta", "bad", id="buf-len-huge"),
    pytest.param(delta(len=1001, runs=[]), "invalid-buffer-delta", "bad",
                 id="buf-len-over-limit"),
    pytest.param(delta(len=True, runs=[]), "invalid-buffer-delta", "bad", id="buf-len-bool"),
    pytest.param(delta(runs=[]), "invalid-buffer-delta", "bad", id="buf-len-missing"),
    pytest.param(delta(len=3, runs="x"), "invalid-buffer-delta", "bad", id="buf-runs-string"),
    pytest.param(delta(len=3, runs={"0": [1]}), "invalid-buffer-delta", "bad",
                 id="buf-runs-object"),
    pytest.param(delta(len=3), "invalid-buffer-delta", "bad", id="buf-runs-missing"),
    pytest.param(delta(len=3, runs=[[0]]), "invalid-buffer-delta", "bad", id="buf-run-one"),
    pytest.param(delta(len=3, runs=[[0, [1], 2]]), "invalid-buffer-delta", "bad",
                 id="buf-run-three"),
    pytest.param(delta(len=3, runs=[5]), "invalid-buffer-delta", "bad", id="buf-run-number"),
    pytest.param(delta(len=3, runs=[[0.5, [1]]]), "invalid-buffer-delta", "bad",
                 id="buf-offset-float"),
    pytest.param(delta(len=3, runs=[["0", [1]]]), "invalid-buffer-delta", "bad",
                 id="buf-offset-string"),
    pytest.param(delta(len=3, runs=[[None, [1]]]), "invalid-buffer-delta", "bad",
                 id="buf-offset-null"),
    pytest.param(delta(len=1e29, runs=[]), "invalid-buffer-delta", "bad",
                 id="buf-len-huge-float"),
    pytest.param(delta(len=3, runs=[[0, 5]]), "invalid-buffer-delta", "bad",
                 id="buf-values-number"),
    pytest.param(delta(len=3, runs=[[0, "abc"]]), "invalid-buffer-delta", "bad",
                 id="buf-values-string"),
    pytest.param(delta(len=3, runs=[[0, ["a"]]]), "invalid-buffer-delta", "bad",
                 id="buf-values-strings"),
    pytest.param(delta(len=3, runs=[[0, [{}]]]), "invalid-buffer-delta", "bad",
                 id="buf-values-objects"),
    pytest.param(delta(len=3, runs=[[0, [None]]]), "invalid-buffer-delta", "bad",
                 id="buf-values-null"),
    pytest.param(delta(len=3, runs=[[0, [True]]]), "invalid-buffer-delta", "bad",
                 id="buf-values-bool"),
    pytest.param(delta(len=3, runs=[[0, [1] * 600], [1, [1] * 401]]), "invalid-buffer-delta",
                 "bad", id="buf-values-over-limit"),
    pytest.param(patch(ephemeralPatches=[{"cursor/h": {"p": {"__buf": 1, "len": -1, "runs": []}}}]),
                 "invalid-buffer-delta", "bad", id="buf-in-presence"),
    # field types
    pytest.param('{"type":"reconnect","lastTimestamp":"5","protocolVersion":2}',
                 "invalid-frame", None, id="last-timestamp-string"),
    pytest.param('{"type":"reconnect","lastTimestamp":-1,"protocolVersion":2}',
                 "invalid-frame", None, id="last-timestamp-negative"),
    pytest.param('{"type":"reconnect","lastTimestamp":1.5,"protocolVersion":2}',
                 "invalid-frame", None, id="last-timestamp-float"),
    pytest.param('{"type":"reconnect","lastTimestamp":null,"protocolVersion":2}',
                 "invalid-frame", None, id="last-timestamp-null"),
    pytest.param('{"type":"reconnect","protocolVersion":2}', "invalid-frame", None,
                 id="last-timestamp-missing"),
    pytest.param(doc({"x/c": {"_exists": True}}, mid={"a": 1}), "invalid-frame", None,
                 id="message-id-object"),
    pytest.param(doc({"x/c": {"_exists": True}}, mid=[1]), "invalid-frame", None,
                 id="message-id-list"),
    pytest.param(doc({"x/c": {"_exists": True}}, mid=True), "invalid-frame", None,
                 id="message-id-bool"),
    pytest.param('{"type":"auth-refresh","token":5}', "invalid-frame", None, id="token-number"),
    pytest.param('{"type":"auth-refresh","token":null}', "invalid-frame", None, id="token-null"),
    pytest.param('{"type":"auth-refresh"}', "invalid-frame", None, id="token-missing"),
    # patch lists
    pytest.param(patch(documentPatches="x"), "invalid-frame", "bad", id="document-patches-string"),
    pytest.param(patch(documentPatches={"e1/pos": {"x": 9}}), "invalid-frame", "bad",
                 id="document-patches-object"),
    pytest.param(patch(documentPatches=7), "invalid-frame", "bad", id="document-patches-number"),
    pytest.param(patch(documentPatches=[1, "x", None]), "invalid-frame", "bad",
                 id="document-patches-non-objects"),
    pytest.param(patch(documentPatches=[{"e1/pos": {"x": 9}}, None]), "invalid-frame", "bad",
                 id="document-patches-good-then-null"),
    pytest.param(patch(ephemeralPatches="x"), "invalid-frame", "bad",
                 id="ephemeral-patches-string"),
    pytest.param(patch(ephemeralPatches=[[]]), "invalid-frame", "bad",
                 id="ephemeral-patches-list-of-lists"),
    pytest.param(patch(ephemeralPatches=[{"cursor/h": None}]), "invalid-component", "bad",
                 id="ephemeral-component-null"),
    pytest.param('{"type":"reconnect","lastTimestamp":0,"protocolVersion":2,'
                 '"documentPatches":[{"e1/pos":null}]}', "invalid-component", None,
                 id="reconnect-carrying-bad-patch"),
    # nesting
    pytest.param(doc()[:-2] + '{"e1/pos":{"x":' + nested(100_000) + "}}]}", "invalid-json",
                 None, id="nested-arrays-100k"),
    pytest.param(doc()[:-2] + '{"e1/pos":{"x":' + deep_objects(20_000) + "}}]}",
                 "invalid-json", None, id="nested-objects-20k"),
    pytest.param(nested(100_000), "invalid-json", None, id="nested-arrays-100k-bare"),
    # Deep enough to parse (orjson reads 1024 levels) but too deep to encode again
    # (orjson writes 254): it must be refused, not stored and then broadcast.
    pytest.param(doc()[:-2] + '{"e1/pos":{"x":' + nested(300) + "}}]}", None, "bad",
                 id="nested-arrays-300"),
    pytest.param(patch(ephemeralPatches=[]).replace(
        '"ephemeralPatches":[]', '"ephemeralPatches":[{"cursor/h":{"x":' + nested(300) + "}}]"),
        None, "bad", id="nested-presence-300"),
    # sizes over the configured limits (1000 keys, 1000 buffer values)
    pytest.param(doc({f"k{i}/c": {"_exists": True} for i in range(1001)}), "too-many-keys",
                 "bad", id="too-many-keys"),
    pytest.param(patch(documentPatches=[{f"k{i}/c": {"_exists": True} for i in range(600)}],
                       ephemeralPatches=[{f"c{i}/c": {"_exists": True} for i in range(401)}]),
                 "too-many-keys", "bad", id="too-many-keys-split"),
    pytest.param(doc(*({f"k{i}/c": {"_exists": True}} for i in range(1001))), "too-many-keys",
                 "bad", id="too-many-keys-many-patches"),
    # one bad entry among many good ones: nothing of the frame is applied
    pytest.param(doc({**GOOD_KEYS, "e1/pos": {"x": 9}, "bad/c": None}), "invalid-component",
                 "bad", id="good-keys-then-null"),
    pytest.param(doc(GOOD_KEYS, {"e1/pos": {"x": 9}},
                     {"e1/pts": {"pts": {"__buf": 1, "len": 3, "runs": [[0, ["x"]]]}}}),
                 "invalid-buffer-delta", "bad", id="good-patches-then-bad-delta"),
    pytest.param(patch(documentPatches=[GOOD_KEYS], ephemeralPatches=[{"cursor/h": 5}]),
                 "invalid-component", "bad", id="good-document-bad-presence"),
    pytest.param(patch(documentPatches=[{"e1/pos": {"x": 9}}],
                       ephemeralPatches=[{"cursor/h": {"x": 9}}, "x"]),
                 "invalid-frame", "bad", id="good-document-non-object-presence"),
    # binary frames, even with a valid patch in them
    pytest.param(b"\x00\xff\x10garbage", "binary-frame", None, id="binary-garbage"),
    pytest.param(doc({"e1/pos": {"x": 9}}).encode(), "binary-frame", None, id="binary-json"),
]


@pytest.mark.parametrize(("frame", "code", "message_id"), HOSTILE)
async def test_a_hostile_frame_is_refused_whole_and_nothing_else_notices(
    frame: str | bytes, code: str | None, message_id: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    async with scene(*HOSTILE_OPTIONS) as s:
        before = await s.view()
        caplog.clear()

        await s.hostile.send_raw(frame)
        error = (await s.hostile.receive_until("error"))[-1]
        if code is not None:
            assert error["code"] == code, error
        assert isinstance(error["message"], str) and error["message"]
        assert error.get("messageId") == message_id, error

        assert await s.view() == before
        await s.other_room_still_works()
        [line] = log_lines(caplog, "refused a frame")
        assert "'doc'" in line and "'h'" in line and f"({error['code']})" in line
        await s.next_edit_is_seen_first(s.hostile, document_of(before)[1])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_hostile_frame_from_many_clients_at_once_while_others_edit(
    transport: str,
) -> None:
    """Every frame above, from five clients at once, while room ``other`` keeps editing."""
    frames = [p.values[0] for p in HOSTILE]
    async with scene(*HOSTILE_OPTIONS, transport=transport) as s:
        before = await s.view()
        errors: dict[str, int] = {}

        async def attacker(name: str) -> None:
            async with ws_client(s.port, "doc", name) as c:
                await c.reconnect()
                for frame in frames:
                    await c.send_raw(frame)
                got = 0
                with trio.fail_after(20):
                    while got < len(frames):
                        got += (await c.receive())["type"] == "error"
                errors[name] = got

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(attacker, f"x{i}")
            for _ in range(20):
                await s.other_room_still_works()
        assert errors == {f"x{i}": len(frames) for i in range(5)}
        assert document_of(await s.view()) == document_of(before)
        await s.next_edit_is_seen_first(s.hostile, document_of(before)[1])


def offset_delta(offset: str, field: str = "documentPatches", key: str = "e1/pts") -> str:
    return ('{"type":"patch","messageId":"bad","' + field + '":[{"' + key
            + '":{"pts":{"__buf":1,"len":3,"runs":[[' + offset + ",[7]]]}}}]}")


# Frames orjson reads but whose values it cannot write again: nesting between 255 and
# 1024 levels, and integers past 64 bits (an offset written 1e20 is an integer to
# JavaScript, and to the server once it is read as one).
POISON = [
    pytest.param(doc()[:-2] + '{"e1/pos":{"x":' + nested(400) + "}}]}", id="nested-400"),
    pytest.param(patch(ephemeralPatches=[]).replace(
        '"ephemeralPatches":[]', '"ephemeralPatches":[{"cursor/h":{"x":' + nested(400) + "}}]"),
        id="nested-presence-400"),
    pytest.param(offset_delta("1e20"), id="offset-1e20"),
    pytest.param(offset_delta("-1e19"), id="offset-minus-1e19"),
    pytest.param(offset_delta("18446744073709551616"), id="offset-2-to-the-64"),
    pytest.param(offset_delta("1e300", "ephemeralPatches", "cursor/h"), id="presence-offset-1e300"),
    # a buffer delta is broadcast as received, with whatever else it carries
    pytest.param(doc()[:-2] + '{"e1/pts":{"pts":{"__buf":1,"len":3,"runs":[],"junk":'
                 + nested(400) + "}}}]}", id="nested-inside-a-delta"),
    pytest.param(doc()[:-2] + '{"e1/pts":{"pts":{"__buf":1,"len":3,"runs":[],"junk":'
                 + "18446744073709551615" + "}}}]}", id="u64-inside-a-delta"),
]


@pytest.mark.parametrize("frame", POISON)
async def test_a_value_that_cannot_be_encoded_never_poisons_the_room(
    frame: str, tmp_path: Path
) -> None:
    """Refused or stored in a form that can be sent again: either way, stored, such a
    value must not make the room unable to broadcast, to sync a newcomer or to save."""
    async with scene("--data-dir", str(tmp_path), "--save-throttle", "0.01") as s:
        timestamp = document_of(await s.view())[1]
        await s.hostile.send_raw(frame)
        await s.hostile.send(type="patch", messageId="after",
                             ephemeralPatches=[{"cursor/h": {"x": 5}}])
        # h is still served: the frame is refused (an error) or acked, and so is the
        # next one (with durable acks, the ack of a presence-only frame is not held
        # behind an edit's, so the two may come in either order)
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < 2:
            reply = await s.hostile.receive()
            if reply.get("messageId") in ("bad", "after"):
                replies[reply["messageId"]] = reply
        refused = replies["bad"]["type"] == "error"
        timestamp_now = timestamp if refused else replies["bad"]["timestamp"]
        with trio.fail_after(5):
            view = await s.view()  # a newcomer is sent the document, and synced
        assert document_of(view)[1] == timestamp_now
        # the observer is still connected and sees the next edit
        async with ws_client(s.port, "doc", "editor") as editor:
            await editor.reconnect()
            await editor.send(type="patch", messageId="next",
                              documentPatches=[{"e1/pos": {"y": 42}}])
            assert (await editor.receive_until("ack"))[-1]["timestamp"] == timestamp_now + 1
        frame_seen = await s.observer.receive()
        while frame_seen.get("clientId") != "editor":
            frame_seen = await s.observer.receive()
        with trio.fail_after(5):  # and the room saves
            while True:
                await trio.sleep(0.05)
                with contextlib.suppress(FileNotFoundError):
                    saved = decode_snapshot((tmp_path / "doc.json").read_bytes())
                    if saved.timestamp == timestamp_now + 1:
                        break


# --- frames the WebSocket layer refuses ---------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_frame_over_max_message_size_closes_1009_and_changes_nothing(
    transport: str,
) -> None:
    async with scene(*HOSTILE_OPTIONS, transport=transport) as s:
        before = await s.view()
        await s.hostile.send_raw(doc({"e1/pos": {"x": "y" * (300 * 1024)}}))
        code, _ = await s.hostile.closed()
        assert code == 1009
        assert document_of(await s.view()) == document_of(before)
        await s.other_room_still_works()
        # The same frame in fragments is counted whole.
        raw = await RawWebSocket.open(s.port, "/?roomId=doc&clientId=frag")
        chunk = b"y" * (100 * 1024)
        await raw.send_bytes(mask_frame(0x1, b'{"type":"patch","x":"' + chunk, fin=False))
        for _ in range(3):
            with contextlib.suppress(trio.BrokenResourceError):
                await raw.send_bytes(mask_frame(0x0, chunk, fin=False))
        assert (await raw.close_event()).code == 1009
        await raw.aclose()
        assert document_of(await s.view()) == document_of(before)
        await s.next_edit_is_seen_first(None, document_of(before)[1])


# (frame bytes, the close codes the sender may see; 1006 is a dropped connection)
BAD_WIRE = [
    pytest.param(mask_frame(0x1, b'{"type":"patch","messageId":"\xff\xfe"}'), (1007,),
                 id="invalid-utf8"),
    pytest.param(mask_frame(0x1, b'{"type":"pat\xc3'), (1007,), id="truncated-utf8"),
    pytest.param(mask_frame(0x1, b'"\xed\xa0\x80"'), (1007,), id="utf8-surrogate"),
    pytest.param(mask_frame(0x1, doc({"e1/pos": {"x": 9}}).encode(), masked=False), (1002,),
                 id="unmasked"),
    pytest.param(mask_frame(0x3, b"{}"), (1002,), id="reserved-opcode"),
    pytest.param(mask_frame(0xB, b""), (1002,), id="reserved-control-opcode"),
    pytest.param(mask_frame(0x1, b"{}", rsv=4), (1002,), id="rsv-bit"),
    pytest.param(mask_frame(0x0, b"{}"), (1002,), id="continuation-first"),
    pytest.param(mask_frame(0x9, b"x" * 200), (1002,), id="control-frame-too-long"),
    pytest.param(mask_frame(0x9, b"x", fin=False), (1002,), id="fragmented-ping"),
    pytest.param(mask_frame(0x1, b"{", fin=False) + mask_frame(0x1, b"}"), (1002,),
                 id="text-inside-text"),
    pytest.param(mask_frame(0x1, b"x" * 10)[:-3], (), id="truncated-then-eof"),
    pytest.param(b"\x81\xff" + (2**63 + 5).to_bytes(8, "big"), (1009, 1002),
                 id="length-2-to-the-63"),
    # A client's own close frame, however odd, just closes the connection.
    pytest.param(mask_frame(0x8, (999).to_bytes(2, "big")), None, id="close-code-999"),
    pytest.param(mask_frame(0x8, b"\x03"), None, id="close-payload-one-byte"),
    pytest.param(mask_frame(0x8, b"\x03\xe8\xff\xfe"), None, id="close-reason-not-utf8"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("data", "codes"), BAD_WIRE)
async def test_a_broken_websocket_frame_closes_only_its_connection(
    data: bytes, codes: tuple[int, ...] | None, transport: str
) -> None:
    async with scene(*HOSTILE_OPTIONS, transport=transport) as s:
        before = await s.view()
        raw = await RawWebSocket.open(s.port, "/?roomId=doc&clientId=raw")
        await raw.send_json(type="reconnect", lastTimestamp=0, protocolVersion=2)
        await raw.receive_until("synced")
        await raw.send_bytes(data)
        if codes == ():
            await raw.stream.send_eof()  # type: ignore[attr-defined]
        event = await raw.close_event()
        if codes is not None:
            assert event.code in (*codes, 1006), event
        await raw.aclose()
        assert await s.view() == before
        await s.other_room_still_works()
        await s.next_edit_is_seen_first(s.hostile, document_of(before)[1])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_ping_after_the_servers_close_frame_does_not_stop_the_server(
    transport: str,
) -> None:
    """Regression: trio-websocket's serve_websocket died of this (wsproto cannot pong
    after its close frame, and the error escaped the server's nursery)."""
    async with scene("--max-invalid-frames", "0", transport=transport) as s:
        raws = []
        # No clientId: the server closes with 1008 at once. We ping instead of
        # answering the close frame.
        for i in range(3):
            raw = await RawWebSocket.open(s.port, f"/?roomId=doc&n={i}")
            event = await raw.close_event()
            assert (event.code, event.reason) == (1008, "Missing clientId query parameter")
            await raw.send_bytes(mask_frame(0x9, b"late ping") * 3)
            raws.append(raw)
            await s.other_room_still_works()
        # The same after a close for an invalid frame, in the middle of a session. (On
        # trio-websocket the shielded close then waits out its whole timeout: wire only.)
        if transport == "wire":
            raw = await RawWebSocket.open(s.port, "/?roomId=doc&clientId=spam")
            await raw.send_text("garbage")
            event = await raw.close_event()
            assert (event.code, event.reason) == (1008, "too many invalid frames")
            await raw.send_bytes(mask_frame(0x9, b"late ping") * 3)
            raws.append(raw)
            await s.other_room_still_works()
        with trio.fail_after(5):
            for raw in raws:
                await wait_eof(raw.stream)
                await raw.aclose()
        await s.other_room_still_works()
        async with ws_client(s.port, "doc", "late") as c:
            assert (await c.reconnect())[-1]["type"] == "synced"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_server_closes_tcp_promptly_once_the_close_handshake_is_done(
    transport: str,
) -> None:
    """RFC 6455 7.1.1: after the close handshake the server closes the TCP connection
    first. A server that waits for the client's EOF instead holds every closed socket
    for its whole close timeout (browsers and trio-websocket clients wait for the
    server)."""
    async with scene(transport=transport) as s:
        raw = await RawWebSocket.open(s.port, "/?roomId=doc")
        event = await raw.close_event()
        assert event.code == 1008
        await raw.send_bytes(raw.ws.send(event.response()))
        start = trio.current_time()
        await wait_eof(raw.stream)
        assert trio.current_time() - start < 0.5
        await raw.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /?roomId=doc&clientId=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 id="plain-get"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", id="post"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n", id="upgrade-without-key"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
                 id="wrong-websocket-version"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",
                 id="tls-hello"),
    pytest.param(b"\x00" * 100 + b"\r\n\r\n", id="binary-garbage"),
    pytest.param(b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 200_000 + b"\r\n\r\n",
                 id="huge-header"),
])
async def test_http_that_is_not_a_websocket_upgrade_is_answered_and_closed(
    request_bytes: bytes, transport: str
) -> None:
    async with scene(transport=transport) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        with contextlib.suppress(trio.BrokenResourceError):  # it may hang up early
            await stream.send_all(request_bytes)
        reply = await wait_eof(stream)
        # an HTTP answer that is not a switch to WebSocket, or nothing at all
        assert reply == b"" or (reply.startswith(b"HTTP/1.1 ") and reply[9:12] != b"101"), \
            reply[:200]
        await stream.aclose()
        await s.other_room_still_works()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_half_open_handshakes_block_nobody_and_time_out_quietly(
    transport: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    monkeypatch.setattr(_handshake, "HANDSHAKE_TIMEOUT", 1.0)
    async with scene(transport=transport) as s:
        lorises = []
        for i in range(30):
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            lorises.append(stream)
            if i % 3:  # a third send nothing at all
                await stream.send_all(b"GET /?roomId=doc&clientId=loris HTTP/1.1\r\nHost: x\r\n")
        start = trio.current_time()
        # While they hang, everyone else is served at once.
        with trio.fail_after(0.9):
            for _ in range(5):
                await s.other_room_still_works()
            async with ws_client(s.port, "doc", "newcomer") as c:
                await c.reconnect()

        # Trickling a header line now and then does not keep a handshake alive.
        async def trickle(stream: trio.abc.Stream) -> None:
            with trio.move_on_after(3):
                while True:
                    await trio.sleep(0.2)
                    try:
                        await stream.send_all(b"X-A: b\r\n")
                    except trio.BrokenResourceError:
                        return

        async with trio.open_nursery() as nursery:
            for stream in lorises[1::3]:
                nursery.start_soon(trickle, stream)
            for stream in lorises:
                reply = await wait_eof(stream, timeout=3)
                assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply
        assert trio.current_time() - start < 3
        for stream in lorises:
            await stream.aclose()
        await s.other_room_still_works()
        # A timed-out handshake is not a failure of the server.
        assert log_lines(caplog, "failed") == []


# --- a client that keeps sending garbage ---------------------------------------------


async def test_a_client_that_keeps_sending_garbage_is_closed_1008_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    async with scene() as s:  # default limits: 10 refused frames a minute
        before = await s.view()
        caplog.clear()
        for i in range(10):
            await s.hostile.send_raw(f"garbage {i}")
            assert (await s.hostile.receive_until("error"))[-1]["code"] == "invalid-json"
        # Ten refused frames are tolerated; the session still works.
        await s.hostile.send(type="patch", messageId="fine",
                             ephemeralPatches=[{"cursor/h": {"x": 1}}])
        assert (await s.hostile.receive_until("ack"))[-1]["messageId"] == "fine"
        await s.hostile.send_raw("one too many")
        assert await s.hostile.closed() == (1008, "too many invalid frames")
        await s.other_room_still_works()

        # The observer saw h's presence move, then h leave (its presence is removed).
        frames = [await s.observer.receive()]
        while not (is_a_leave(frames[-1]) and frames[-1]["clientId"] == "h"):
            frames.append(await s.observer.receive())
        assert [f for f in frames if f["type"] == "patch"] == [
            {"type": "patch", "clientId": "h", "ephemeralPatches": [{"cursor/h": {"x": 1}}]},
            {"type": "patch", "clientId": "h",
             "ephemeralPatches": [{"cursor/h": {"_exists": False}}]},
        ]
        assert document_of(await s.view()) == document_of(before)

        lines = log_lines(caplog, "refused a frame")
        assert len(lines) == 11
        assert all("'doc'" in line and "'h'" in line and "(invalid-json)" in line
                   for line in lines)
        closing = log_lines(caplog, "too many invalid frames")
        assert len(closing) == 1, [r.getMessage() for r in caplog.records]
        assert "'doc'" in closing[0] and "'h'" in closing[0]


async def test_frames_behind_the_one_that_closes_the_session_are_not_applied() -> None:
    async with scene("--max-invalid-frames", "2") as s:
        before = await s.view()
        raw = await RawWebSocket.open(s.port, "/?roomId=doc&clientId=burst")
        burst = b"".join(mask_frame(0x1, f"junk{i}".encode()) for i in range(3))
        burst += mask_frame(0x1, doc({"e1/pos": {"x": 99}}, mid="late").encode())
        await raw.send_bytes(burst)
        frames = []
        while True:
            event = await raw.next_event()
            if isinstance(event, CloseConnection):
                break
            if isinstance(event, TextMessage):
                frames.append(orjson.loads(event.data))
        assert (event.code, event.reason) == (1008, "too many invalid frames")
        assert [f["type"] for f in frames if f["type"] in ("error", "ack")] == ["error"] * 3
        await raw.aclose()
        assert document_of(await s.view()) == document_of(before)
        await s.next_edit_is_seen_first(s.hostile, document_of(before)[1])
