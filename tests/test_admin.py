"""The admin API (issue 16): every endpoint, with and without the token, on a real server.

A real ``serve`` process with ``--admin-token``, real HTTP requests, and real clients
connected while their room is inspected, replaced, restored to a version, closed and
their sessions changed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from canvas_store_trio import Snapshot, decode_snapshot, encode_snapshot
from canvas_store_trio.testing import FrameClient

from .processes import Server, client, server_process
from .test_demo_http import http

TOKEN = "s3cret-admin"


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


async def call(server: Server, method: str, path: str, body: bytes = b"",
               token: str | None = TOKEN, **headers: str) -> tuple[int, dict[str, str], Any]:
    """One request; returns (status, headers, the JSON body or the text)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    status, got_headers, data = await http(f"http://127.0.0.1:{server.port}", raw)
    try:
        return status, got_headers, orjson.loads(data)
    except orjson.JSONDecodeError:
        return status, got_headers, data.decode()


@asynccontextmanager
async def admin_server(tmp_path: Path, *options: str) -> AsyncIterator[Server]:
    async with server_process("--data-dir", str(tmp_path), "--admin-token", TOKEN,
                              "--save-throttle", "600", *options) as server:
        yield server


async def edit(c: FrameClient, message_id: str, patch: dict[str, Any]) -> None:
    await c.send(type="patch", messageId=message_id, documentPatches=[patch])
    await c.receive_until("ack")


async def test_every_endpoint_refuses_a_missing_or_wrong_token(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as server:
        for method, path in [("GET", "/admin/rooms"), ("GET", "/admin/rooms/r"),
                             ("GET", "/admin/rooms/r/snapshot"),
                             ("PUT", "/admin/rooms/r/snapshot"),
                             ("POST", "/admin/rooms/r/close"),
                             ("GET", "/admin/rooms/r/history"),
                             ("POST", "/admin/rooms/r/history/1/restore"),
                             ("DELETE", "/admin/rooms/r/sessions/s"),
                             ("PATCH", "/admin/rooms/r/sessions/s"),
                             ("GET", "/admin/nothing")]:
            for token in (None, "wrong", TOKEN + "x", ""):
                status, headers, body = await call(server, method, path, token=token)
                assert status == 401, (method, path, token)
                assert headers["www-authenticate"].startswith("Bearer")
                assert "Bearer" in body["error"]
        status, _, body = await call(server, "GET", "/admin/rooms", token=None,
                                     Authorization=f"Basic {TOKEN}")
        assert status == 401


async def test_without_the_option_there_is_no_admin_api(tmp_path: Path) -> None:
    async with server_process("--memory") as server:
        status, _, body = await call(server, "GET", "/admin/rooms")
        assert status == 404
        assert "--admin-token" in body


async def test_the_token_may_come_from_the_environment(tmp_path: Path) -> None:
    os.environ["CANVAS_STORE_ADMIN_TOKEN"] = "from-env"
    try:
        async with server_process("--memory") as server:
            assert (await call(server, "GET", "/admin/rooms", token="from-env"))[0] == 200
            assert (await call(server, "GET", "/admin/rooms", token=TOKEN))[0] == 401
    finally:
        del os.environ["CANVAS_STORE_ADMIN_TOKEN"]


@pytest.mark.parametrize("transport", ["wire", "trio-websocket"])
async def test_rooms_and_room_details_list_sessions_permissions_and_size(
    tmp_path: Path, transport: str
) -> None:
    async with admin_server(tmp_path, "--transport", transport) as server:
        status, _, body = await call(server, "GET", "/admin/rooms")
        assert (status, body) == (200, {"rooms": []})
        async with client(server, "plans/2026", "alice") as a, client(server, "plans/2026",
                                                                       "bob") as b:
            await a.reconnect()
            await b.reconnect()
            await edit(a, "m1", create("e1/Shape", kind="rect") | create("e2/Shape", kind="o"))
            await edit(a, "m2", {"e2/Shape": {"_exists": False}})
            status, _, listing = await call(server, "GET", "/admin/rooms")
            assert status == 200
            assert listing == {"rooms": [{"room_id": "plans/2026", "sessions": 2,
                                          "timestamp": 2}]}
            status, _, details = await call(server, "GET", "/admin/rooms/plans%2F2026")
            assert status == 200
            assert details["room_id"] == "plans/2026"
            assert details["timestamp"] == 2
            assert details["size"] == {"records": 1, "tombstones": 1}
            assert sorted((s["client_id"], s["permissions"]) for s in details["sessions"]) == [
                ("alice", "readwrite"), ("bob", "readwrite")]
            assert all(len(s["session_id"]) == 36 for s in details["sessions"])
        status, _, body = await call(server, "GET", "/admin/rooms/elsewhere")
        assert (status, body) == (404, {"error": "room 'elsewhere' is not open"})


async def test_bad_ids_methods_and_paths_get_4xx_with_a_message(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as server:
        cases = [
            ("GET", "/admin/rooms/" + "x" * 300, 400, "room id"),
            ("GET", "/admin/rooms/a%00b/snapshot", 400, "NUL"),
            ("DELETE", "/admin/rooms", 405, "not allowed"),
            ("POST", "/admin/rooms/r/snapshot", 405, "not allowed"),
            ("GET", "/admin/rooms/r/sessions/s/extra", 404, "no admin endpoint"),
            ("POST", "/admin/rooms/nobody/close", 404, "not open"),
            ("PUT", "/admin/rooms/r/snapshot", 400, "not a snapshot"),
        ]
        for method, path, status, words in cases:
            got, headers, body = await call(server, method, path)
            assert got == status, (method, path, body)
            assert words in body["error"], (method, path, body)
            if status == 405:
                assert headers["allow"]
        got, _, body = await call(server, "PUT", "/admin/rooms/r/snapshot", b"{not json")
        assert got == 400 and "not a snapshot" in body["error"]


async def test_a_snapshot_is_read_and_replaced_while_a_client_stays_connected(
    tmp_path: Path,
) -> None:
    async with admin_server(tmp_path) as server:
        async with client(server, "r", "alice") as alice:
            await alice.reconnect()
            await edit(alice, "m1", create("keep/c", v=1) | create("change/c", v=1, extra=1)
                       | create("gone/c", v=1))
            status, headers, snapshot = await call(server, "GET", "/admin/rooms/r/snapshot")
            assert status == 200 and headers["content-type"] == "application/json"
            assert snapshot["timestamp"] == 1
            assert set(snapshot["state"]) == {"keep/c", "change/c", "gone/c"}

            wanted = Snapshot(0, create("keep/c", v=1) | create("change/c", v=2)
                              | create("new/c", v=3), {})
            status, _, body = await call(server, "PUT", "/admin/rooms/r/snapshot",
                                         encode_snapshot(wanted))
            assert (status, body) == (200, {"room_id": "r", "timestamp": 2})
            # alice keeps her session and sees the change as ordinary patches.
            frames = await alice.receive_until("patch")
            (patch,) = [f for f in frames if f["type"] == "patch"]
            assert patch["clientId"] == "@server" and patch["timestamp"] == 2
            deletions, writes = patch["documentPatches"]
            # change/c loses a field: deleted and made anew in the same edit.
            assert deletions == {"gone/c": {"_exists": False}, "change/c": {"_exists": False}}
            state = deletions | writes
            assert state["gone/c"] == {"_exists": False}
            assert state["change/c"] == {"_exists": True, "v": 2}
            assert state["new/c"] == {"_exists": True, "v": 3}
            assert "keep/c" not in state  # unchanged records are not sent
            await edit(alice, "m2", create("after/c", v=4))  # still a working session
        # The answer came once saved: the server is killed (the save throttle is 10
        # minutes), yet the file holds the replaced state.
        saved = decode_snapshot((tmp_path / "r.json").read_bytes())
        live = {k: v for k, v in saved.state.items() if v.get("_exists") is not False}
        assert live == create("keep/c", v=1) | create("change/c", v=2) | create("new/c", v=3)


async def test_a_snapshot_of_a_room_nobody_has_open_is_loaded_and_replaced(
    tmp_path: Path,
) -> None:
    (tmp_path / "quiet.json").write_bytes(encode_snapshot(Snapshot(
        7, create("old/c", v=1), {"old/c": {"_exists": 7, "v": 7}})))
    async with admin_server(tmp_path) as server:
        status, _, snapshot = await call(server, "GET", "/admin/rooms/quiet/snapshot")
        assert status == 200 and snapshot["timestamp"] == 7
        assert snapshot["state"] == create("old/c", v=1)
        put = Snapshot(0, create("fresh/c", v=2), {})
        status, _, body = await call(server, "PUT", "/admin/rooms/quiet/snapshot",
                                     encode_snapshot(put))
        assert (status, body) == (200, {"room_id": "quiet", "timestamp": 8})
        saved = decode_snapshot((tmp_path / "quiet.json").read_bytes())
        assert saved.state == {"old/c": {"_exists": False}} | create("fresh/c", v=2)
        # A refused state changes nothing.
        bad = orjson.dumps({"timestamp": 0, "state": {"k": {"_exists": "yes"}},
                            "timestamps": {}})
        status, _, body = await call(server, "PUT", "/admin/rooms/quiet/snapshot", bad)
        assert status in (400, 422), body
        assert decode_snapshot((tmp_path / "quiet.json").read_bytes()) == saved


async def test_close_kick_and_permissions(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as server:
        async with client(server, "r", "alice") as alice, client(server, "r", "bob") as bob:
            await alice.reconnect()
            await bob.reconnect()
            _, _, details = await call(server, "GET", "/admin/rooms/r")
            ids = {s["client_id"]: s["session_id"] for s in details["sessions"]}

            path = f"/admin/rooms/r/sessions/{ids['bob']}"
            status, _, body = await call(server, "PATCH", path, b'{"permissions": "readonly"}')
            assert (status, body) == (200, {"session_id": ids["bob"], "permissions": "readonly"})
            await bob.send(type="patch", messageId="b1", documentPatches=[create("b/c", v=1)])
            await bob.receive_until("ack")
            _, _, snapshot = await call(server, "GET", "/admin/rooms/r/snapshot")
            assert "b/c" not in snapshot["state"]  # readonly now: not applied
            for bad_body, words in [(b'{"permissions": "admin"}', "readonly"),
                                    (b'{"role": "readonly"}', "permissions"),
                                    (b"[", "not JSON")]:
                status, _, body = await call(server, "PATCH", path, bad_body)
                assert status == 400 and words in body["error"], body
            status, _, body = await call(server, "PATCH", "/admin/rooms/r/sessions/nobody",
                                         b'{"permissions": "readonly"}')
            assert status == 404

            status, _, body = await call(server, "DELETE", path)
            assert (status, body) == (200, {"session_id": ids["bob"], "closed": True})
            assert await bob.closed() == (1008, "closed by an administrator")
            _, _, details = await call(server, "GET", "/admin/rooms/r")
            assert [s["client_id"] for s in details["sessions"]] == ["alice"]

            await edit(alice, "a1", create("a/c", v=1))
            status, _, body = await call(server, "POST", "/admin/rooms/r/close")
            assert (status, body) == (200, {"room_id": "r", "closed": True})
            code, _ = await alice.closed()
            assert code == 1001
        with trio.fail_after(5):
            while (await call(server, "GET", "/admin/rooms"))[2]["rooms"]:
                await trio.sleep(0.05)
        assert "a/c" in decode_snapshot((tmp_path / "r.json").read_bytes()).state


async def test_request_bodies_need_a_length_and_fit_the_limit(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as server:
        url = f"http://127.0.0.1:{server.port}"
        head = (f"PUT /admin/rooms/r/snapshot HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKEN}\r\n")
        status, _, body = await http(url, (head + "Transfer-Encoding: chunked\r\n\r\n"
                                           "2\r\n{}\r\n0\r\n\r\n").encode())
        assert status == 411 and b"Content-Length" in body
        status, _, body = await http(url, (head + f"Content-Length: {2**26 + 1}\r\n\r\n").encode())
        assert status == 413
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all((head + "Content-Length: 100\r\n\r\n{").encode())
            await stream.send_eof()
            answer = b""
            while data := await stream.receive_some():
                answer += data
        assert answer.startswith(b"HTTP/1.1 400") and b"ended before" in answer


async def wait_for_versions(server: Server, room: str, count: int) -> list[dict[str, Any]]:
    with trio.fail_after(5):
        while True:
            status, _, body = await call(server, "GET", f"/admin/rooms/{room}/history")
            assert status == 200, body
            if len(body["versions"]) >= count:
                return list(body["versions"])
            await trio.sleep(0.02)


async def test_a_version_is_restored_while_a_client_stays_connected(tmp_path: Path) -> None:
    async with admin_server(tmp_path, "--history-interval", "0.05") as server:
        status, _, body = await call(server, "GET", "/admin/rooms/r/history")
        assert (status, body) == (200, {"room_id": "r", "versions": []})
        async with client(server, "r", "alice") as alice, client(server, "r", "bob") as bob:
            await alice.reconnect()
            await bob.reconnect()
            await edit(alice, "m1", create("keep/c", v=1) | create("change/c", v=1, extra=1)
                       | create("gone/c", v=1))
            await trio.sleep(0.1)
            # This edit keeps version 1: the document as it was before it.
            await edit(alice, "m2", create("change/c", v=2) | {"gone/c": {"_exists": False}}
                       | create("new/c", v=2) | {"keep/c": {"v": 3}})
            (version,) = await wait_for_versions(server, "r", 1)
            assert (version["version"], version["timestamp"]) == (1, 1)
            assert version["saved_at"].endswith("+00:00")
            await bob.drain()
            await trio.sleep(0.1)  # past the interval: the restore keeps a version too

            status, _, body = await call(server, "POST", "/admin/rooms/r/history/1/restore")
            assert (status, body) == (200, {"room_id": "r", "version": 1, "timestamp": 3})
            # Both keep their sessions and see the document go back through a patch.
            for c in (alice, bob):
                frames = await c.receive_until("patch")
                (patch,) = [f for f in frames if f["type"] == "patch"]
                assert patch["clientId"] == "@server" and patch["timestamp"] == 3
                changes: dict[str, Any] = {}
                for p in patch["documentPatches"]:
                    for key, record in p.items():
                        changes[key] = {**changes.get(key, {}), **record}
                assert changes == {
                    "keep/c": {"_exists": True, "v": 1},
                    "change/c": {"_exists": True, "v": 1, "extra": 1},
                    "gone/c": {"_exists": True, "v": 1},
                    "new/c": {"_exists": False},
                }
            # Answered once saved (the save throttle is 10 minutes).
            saved = decode_snapshot((tmp_path / "r.json").read_bytes())
            assert saved.timestamp == 3
            assert {k: r for k, r in saved.state.items() if r.get("_exists") is not False} == (
                create("keep/c", v=1) | create("change/c", v=1, extra=1) | create("gone/c", v=1))
            # The restore was an edit like any: the state it replaced is version 2 now.
            versions = await wait_for_versions(server, "r", 2)
            assert [v["version"] for v in versions] == [1, 2]
            await edit(bob, "b1", create("after/c", v=5))  # still working sessions
            frames = await alice.receive_until("patch")
            assert frames[-1]["documentPatches"] == [create("after/c", v=5)]


async def test_history_endpoints_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    async with admin_server(tmp_path, "--history-interval", "60") as server:
        cases = [
            ("POST", "/admin/rooms/r/history/7/restore", 404, "no version 7"),
            ("POST", "/admin/rooms/r/history/x/restore", 400, "not 'x'"),
            ("POST", "/admin/rooms/r/history/-1/restore", 400, "not '-1'"),
            ("GET", "/admin/rooms/r/history/7/restore", 405, "not allowed"),
            ("POST", "/admin/rooms/r/history", 405, "not allowed"),
            ("GET", "/admin/rooms/a%00b/history", 400, "NUL"),
        ]
        for method, path, status, words in cases:
            got, _, body = await call(server, method, path)
            assert got == status, (method, path, body)
            assert words in body["error"], (method, path, body)
        assert (await call(server, "GET", "/admin/rooms"))[2] == {"rooms": []}  # none loaded
    async with server_process("--memory", "--admin-token", TOKEN) as server:
        for method, path in [("GET", "/admin/rooms/r/history"),
                             ("POST", "/admin/rooms/r/history/1/restore")]:
            status, _, body = await call(server, method, path)
            assert status == 404 and "keeps no history" in body["error"]
