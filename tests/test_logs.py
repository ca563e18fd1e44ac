"""Logs: ``serve --log-format json`` and ``--log-level``, and the lines behind them.

A real ``canvas-store-trio serve`` process and real WebSocket clients: every stderr line
is one JSON object, each refused frame and each abnormal close is one line naming its
room, session, client and close code, and nothing logs a traceback. Then the formatter
on its own, and the closes that are hard to cause from outside (a slow reader, a failed
commit, a room that cannot load or is full), in process.
"""

from __future__ import annotations

import calendar
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from canvas_store_trio import JSONLogFormatter, Limits, RoomManager, StorageError
from canvas_store_trio._logs import TextLogFormatter, log_event
from canvas_store_trio.rooms._session import Session

from .conftest import connect
from .processes import Server, client
from .storage_helpers import CommandedStorage
from .test_front_door import CLI, assert_one_line_error, free_port, run_cli

LIMITS = ("--max-message-size", "1000", "--max-invalid-frames", "2",
          "--rate-limit", "5", "--rate-burst", "6")
"""Small enough to hit from a test; alice's four frames stay under the rate."""


async def run_scenario(server: Server) -> None:
    """One client per kind of line: refused frames then too many of them (alice), a
    frame too big (bob), a flood (carol), a close code of the client's own (dave), and
    a client that comes and goes as it should (erin)."""
    async with client(server, "r", "alice") as alice:
        await alice.reconnect()
        await alice.send_raw("not json")
        await alice.receive_until("error")
        await alice.send(type="patch", messageId="m", documentPatches=[{"k/C": 5}])
        assert (await alice.receive_until("error"))[-1]["code"] == "invalid-component"
        await alice.send_raw("{")
        assert await alice.closed() == (1008, "too many invalid frames")
    async with client(server, "r", "bob") as bob:
        await bob.reconnect()
        await bob.send_raw("x" * 2000)
        assert (await bob.closed())[0] == 1009
    async with client(server, "r", "carol") as carol:
        await carol.reconnect()
        for n in range(20):
            await carol.send(type="patch", messageId=n, ephemeralPatches=[{"c/c": {"n": n}}])
        assert await carol.closed() == (1008, "rate limit exceeded")
    async with client(server, "r", "dave") as dave:
        await dave.reconnect()
        await dave.socket.aclose(4000, "bye now")
    async with client(server, "r", "erin") as erin:
        await erin.reconnect()


async def served(*options: str) -> Server:
    """A server that ran the scenario and was stopped (SIGINT), with its whole log.

    Its port is picked here: with ``--log-level warning`` the log does not say it.
    """
    port = free_port()
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", str(port), "--memory", *LIMITS, *options],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    server = Server(process, port)
    try:
        async with trio.open_nursery() as nursery:

            async def read_log() -> None:
                assert process.stderr is not None
                while chunk := await process.stderr.receive_some(65536):
                    server.log += chunk

            nursery.start_soon(read_log)
            with trio.fail_after(20):
                while True:
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.05)
                await run_scenario(server)
                process.send_signal(signal.SIGINT)
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, server.log.decode()
    assert b"Traceback" not in server.log, server.log.decode()
    return server


def json_lines(server: Server) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in server.log.decode().splitlines()]
    for line in lines:
        assert {"time", "level", "event", "message"} <= line.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
    return lines


def of_client(lines: list[dict[str, Any]], client_id: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("client") == client_id]


async def test_json_lines_name_room_session_client_and_close_code() -> None:
    lines = json_lines(await served("--log-format", "json"))
    assert lines[0]["event"] == "listening" and lines[-1]["event"] == "shut_down"

    def line_of(client_id: str, event: str) -> dict[str, Any]:
        """The one line of this client with a close code: the close it got, or gave."""
        mine = of_client(lines, client_id)
        assert (mine[0]["event"], mine[-1]["event"]) == ("client_joined", "client_left"), mine
        assert {line["session"] for line in mine} == {mine[0]["session"]}, mine
        assert all(line["room"] == "r" for line in mine), mine
        [closed] = [line for line in mine if "code" in line]
        assert closed["event"] == event, mine
        return closed

    alice = of_client(lines, "alice")
    assert [(line["event"], line.get("error_code")) for line in alice[1:-2]] == [
        ("frame_refused", "invalid-json"),
        ("frame_refused", "invalid-component"),
        ("frame_refused", "invalid-json"),
    ]
    assert all(line["level"] == "warning" for line in alice[1:-1])
    assert "'k/C': a component must be an object" in alice[2]["message"]
    closed = line_of("alice", "too_many_invalid_frames")
    assert (closed["code"], closed["reason"]) == (1008, "too many invalid frames")
    closed = line_of("bob", "connection_closed")
    assert (closed["code"], closed["reason"]) == (1009, "message over 1000 bytes")
    closed = line_of("carol", "rate_limited")
    assert (closed["code"], closed["reason"]) == (1008, "rate limit exceeded")
    closed = line_of("dave", "connection_closed")  # the client's own abnormal close
    assert (closed["code"], closed["reason"], closed["level"]) == (4000, "bye now", "warning")
    erin = of_client(lines, "erin")
    assert [line["event"] for line in erin] == ["client_joined", "client_left"]
    assert erin[0]["active"] == 1 and erin[1]["active"] == 0


async def test_a_frame_too_big_on_trio_websocket_is_the_same_line() -> None:
    lines = json_lines(await served("--log-format", "json", "--transport", "trio-websocket"))
    [closed] = [line for line in of_client(lines, "bob") if "code" in line]
    assert (closed["event"], closed["code"]) == ("connection_closed", 1009)
    assert [line["event"] for line in of_client(lines, "carol") if "code" in line] == [
        "rate_limited"]


async def test_log_level_warning_hides_joins_and_the_env_var_sets_the_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CANVAS_STORE_LOG_FORMAT", "json")
    lines = json_lines(await served("--log-level", "warning"))
    events = {line["event"] for line in lines}
    assert {"frame_refused", "too_many_invalid_frames", "rate_limited"} <= events
    assert {"client_joined", "client_left", "listening"} & events == set()
    assert {line["level"] for line in lines} == {"warning"}


async def test_text_lines_are_as_they_were() -> None:
    log = (await served()).log.decode()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    for pattern in (
        r"INFO client 'erin' joined room 'r' \(1 active\)",
        r"WARNING room 'r': refused a frame from client 'alice': not valid JSON: .+ "
        r"\(invalid-json\)",
        r"WARNING room 'r': client 'alice' closed: too many invalid frames \(over 2 in 60 s\)",
        r"WARNING room 'r': client 'carol' closed: over 5 frames/s",
        r"WARNING room 'r': client 'bob' connection closed: message over 1000 bytes \(1009\)",
        r"INFO client 'erin' left room 'r' \(0 active\)",
    ):
        assert re.search(f"^{stamp} {pattern}$", log, re.M), (pattern, log)
    assert not re.search(r"^\{", log, re.M)


@pytest.mark.parametrize(
    ("env", "args", "words"),
    [
        ({"CANVAS_STORE_LOG_LEVEL": "loud"}, (), ("--log-level", "loud")),
        ({}, ("--log-format", "xml"), ("--log-format", "xml")),
    ],
)
def test_a_bad_log_option_is_one_line_and_status_2(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    assert_one_line_error(run_cli("serve", "--memory", *args, cwd=tmp_path, env=env), *words)


def test_a_usage_error_is_a_json_line_too(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "canvas_store_trio", "serve", "--memory", "--durable-acks",
         "--log-format", "json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    [line] = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert (line["event"], line["level"]) == ("usage_error", "error")
    assert "--memory --durable-acks" in line["message"]


def test_every_event_is_in_the_readme() -> None:
    src = Path(__file__).resolve().parent.parent / "src" / "canvas_store_trio"
    event = re.compile(r'(?:log_event\(\s*[^"]*?,|_log_join_or_leave\()\s*"([a-z_]+)"')
    events = {name for path in src.rglob("*.py") for name in event.findall(path.read_text())}
    assert {"frame_refused", "token_refresh_refused", "client_left"} <= events
    readme = (src.parent.parent / "README.md").read_text().split("### Logs\n")[1]
    missing = sorted(event for event in events if f"`{event}`" not in readme)
    assert not missing, f"events missing from the README: {missing}"


# --- the formatter -----------------------------------------------------------------------


def record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": "app", "levelno": logging.WARNING, "levelname": "WARNING", "msg": message,
         "args": args, **extra}
    )


def test_the_formatter_writes_time_level_event_message_and_extra_fields() -> None:
    before = time.time()
    line = JSONLogFormatter().format(
        record("room %r: %d", "r", 3, event="frame_refused", room="r", code=1008,
               session=None, where=Path("a/b"))
    )
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry == {
        "time": entry["time"],
        "level": "warning",
        "event": "frame_refused",
        "logger": "app",
        "message": "room 'r': 3",
        "room": "r",
        "code": 1008,
        "where": "a/b",  # what JSON cannot hold is written as its str
    }
    assert list(entry)[:5] == ["time", "level", "event", "logger", "message"]
    seconds = calendar.timegm(time.strptime(entry["time"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert entry["time"].endswith("Z")
    assert before - 0.002 < seconds + int(entry["time"][20:23]) / 1000 <= time.time()


def test_a_line_without_an_event_gets_the_default_one() -> None:
    assert orjson.loads(JSONLogFormatter().format(record("plain")))["event"] == "log"


def test_an_exception_is_one_line_with_its_traceback() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        line = JSONLogFormatter().format(record("it failed", exc_info=sys.exc_info()))
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "it failed"
    assert entry["exception"].startswith("Traceback (most recent call last):\n")
    assert entry["exception"].endswith("RuntimeError: boom\nsecond line")


def test_log_event_passes_fields_as_extra_and_names_its_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    log_event(logging.DEBUG, "hidden", "not logged", room="r")
    log_event(logging.INFO, "seen", "room %r", "r", room="r", code=1008)
    [seen] = caplog.records
    assert seen.getMessage() == "room 'r'"
    assert fields(seen, "event", "room", "code") == ("seen", "r", 1008)
    assert (seen.funcName, seen.filename) == (
        "test_log_event_passes_fields_as_extra_and_names_its_caller", "test_logs.py")


# --- closes caused from inside ---------------------------------------------------------------


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def fields(record: logging.LogRecord, *names: str) -> tuple[Any, ...]:
    """The record's ``extra`` fields of these names."""
    return tuple(getattr(record, name) for name in names)


class _Socket:
    """Enough of a socket for a session that never gets to write."""


async def test_a_slow_client_close_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    session = Session(_Socket(), "r", "slow", "readwrite", None,  # type: ignore[arg-type]
                      outbox_max_bytes=10, pending=[])
    for _ in range(3):  # the first room step queues 20 bytes; the next finds them unsent
        session.send(b"x" * 10)
        session.send(b"y" * 10)
        session.flush_nowait()
    [line] = events(caplog, "slow_client")
    assert fields(line, "room", "session", "client", "code", "reason") == (
        "r", session.session_id, "slow", 1008, "too slow: outbox full")
    assert line.getMessage() == (
        "room 'r': client 'slow' closed: too slow (20 bytes waiting to be sent)")


async def test_a_failed_commit_logs_each_session_closed_1013(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    storage = CommandedStorage(fail_next=True)
    async with (
        RoomManager(durable_acks=True, create_storage=lambda room_id: storage,
                    limits=Limits(ping_interval=None)) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
        connect(manager, "roomId=r&clientId=b") as b,
    ):
        await a.reconnect()
        await b.reconnect()
        await a.send(type="patch", messageId="m", documentPatches=[{"k/c": {"_exists": True}}])
        assert (await a.closed())[0] == (await b.closed())[0] == 1013
    [failed] = events(caplog, "commit_failed")
    assert failed.levelname == "ERROR"
    assert fields(failed, "room", "error") == ("r", "the disk is full")
    closed = [fields(r, "client", "session", "code") for r in events(caplog, "session_closed")]
    joins = [fields(r, "client", "session") for r in events(caplog, "client_joined")]
    assert sorted(closed) == sorted((*join, 1013) for join in joins)
    assert len(closed) == 2


class _Unloadable:
    async def load(self) -> None:
        raise StorageError("cannot read rooms/r.json")

    async def save(self, snapshot: object) -> None:
        raise AssertionError("never saved")


@pytest.mark.parametrize(("room", "code"), [("broken", 1011), ("full", 1013)])
async def test_a_refused_join_is_one_line(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, room: str, code: int
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    limits = Limits(ping_interval=None, max_sessions_per_room=1)
    async with RoomManager(
        create_storage=lambda room_id: _Unloadable() if room_id == "broken" else None,
        limits=limits,
    ) as manager, connect(manager, "roomId=full&clientId=first") as first:
        await first.reconnect()
        async with connect(manager, f"roomId={room}&clientId=c") as c:
            assert (await c.closed())[0] == code
    [line] = events(caplog, "join_refused")
    assert fields(line, "room", "client", "code") == (room, "c", code)
    assert "rooms/r.json" not in line.getMessage()  # the cause is the room's line
    loads = [fields(r, "room", "error") for r in events(caplog, "room_load_failed")]
    assert loads == ([("broken", "cannot read rooms/r.json")] if code == 1011 else [])


async def test_a_connect_url_refusal_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    async with RoomManager() as manager, connect(manager, "roomId=r") as c:
        assert await c.closed() == (1008, "Missing clientId query parameter")
    [line] = events(caplog, "connect_refused")
    assert fields(line, "code", "error_code") == (1008, "missing-client-id")


def test_text_lines_match_the_plain_formatter_across_seconds() -> None:
    plain = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    text = TextLogFormatter()
    for created in (1765000000.001, 1765000000.999, 1765000001.5, 1765000000.25):
        line = logging.makeLogRecord({"msg": "room %r", "args": ("r",), "levelname": "INFO",
                                      "created": created, "msecs": (created % 1) * 1000})
        assert text.format(line) == plain.format(line)
