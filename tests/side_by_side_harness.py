"""Machinery for the side-by-side test (tests/test_side_by_side.py).

It starts servers as subprocesses, plays a scripted scenario (a list of steps) against
one of them with trio-websocket clients, records every frame each socket receives, and
compares two recordings.

Synchronisation is deterministic: each step names the frame types every socket must
receive because of it (``expect``). The driver waits for exactly those (up to a
timeout, so nothing hangs), then for a short quiet period in which any further,
unexpected frame would show up. The annotations are checked against the Node
reference: a Node recording whose per-step frame types differ from the annotation is a
bug in the scenario, reported as such.

Nothing here knows about pytest except ``require_node``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "node"
REFERENCE_SCRIPT = NODE_DIR / "reference-server.mjs"

#: How long a step may wait for the frames it expects.
STEP_TIMEOUT = 3.0
#: ... and once one step of a scenario timed out, how long the later ones wait (a server
#: that stopped answering should fail the scenario fast, not step by step).
STEP_TIMEOUT_AFTER_MISS = 0.3
#: After the expected frames, wait until no socket has received anything for this long.
QUIET = 0.025
#: ... but never longer than this in total.
QUIET_CAP = 0.5
#: After a client closes a socket that nobody in the room can observe, give the server
#: this long to notice before the next step (there is no frame to wait for).
UNOBSERVED_CLOSE_DELAY = 0.1
#: How long a server may take to print its listening line.
START_TIMEOUT = 20.0

# Placeholder for the scenario's room id in Open(room=...).
ROOM = "{room}"


# ----------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------

_LISTEN_RE = re.compile(r"ws://(127\.0\.0\.1|localhost|\[::1\]|[0-9.]+):(\d+)")


def ci_is_set() -> bool:
    return bool(os.environ.get("CI"))


def node_problem() -> str | None:
    """Why the Node reference cannot run here, or None when it can."""
    problems = []
    if shutil.which("node") is None:
        problems.append("`node` is not on PATH")
    if not (NODE_DIR / "node_modules" / "@woven-ecs" / "canvas-store-server").is_dir():
        problems.append(f"{NODE_DIR / 'node_modules'} is missing (run `npm ci` in node/)")
    if not REFERENCE_SCRIPT.is_file():
        problems.append(f"{REFERENCE_SCRIPT} is missing")
    return "; ".join(problems) or None


def require_node() -> None:
    """Skip without Node; but fail when CI is set, so CI cannot silently skip."""
    import pytest

    problem = node_problem()
    if problem is None:
        return
    message = f"side-by-side test needs the Node reference server: {problem}"
    if ci_is_set():
        pytest.fail(message + " (CI is set, so this is a failure, not a skip)")
    pytest.skip(message)


def node_command(data_dir: Path, *extra: str) -> list[str]:
    return [
        "node",
        str(REFERENCE_SCRIPT),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *extra,
    ]


def ours_command(data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,  # the Python running the tests, which has canvas_store_trio
        "-m",
        "canvas_store_trio",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *extra,
    ]


@attrs.define
class ServerProcess:
    """A server subprocess; ``url`` is ``ws://127.0.0.1:PORT``."""

    name: str
    command: list[str]
    data_dir: Path
    proc: subprocess.Popen[str]
    url: str = ""
    log: list[str] = attrs.Factory(list)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, name: str, command: list[str], data_dir: Path) -> ServerProcess:
        data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        src = str(ROOT / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            command,
            cwd=str(data_dir.parent),
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = cls(name=name, command=command, data_dir=data_dir, proc=proc)
        found = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                server.log.append(line.rstrip("\n"))
                if not found.is_set():
                    m = _LISTEN_RE.search(line)
                    if m:
                        server.url = f"ws://{m.group(1)}:{m.group(2)}"
                        found.set()
            found.set()  # EOF: the process is gone

        server._reader = threading.Thread(target=read, name=f"{name}-log", daemon=True)
        server._reader.start()
        found.wait(START_TIMEOUT)
        if not server.url:
            server.kill()
            raise RuntimeError(
                f"{name} server did not print a ws:// URL within {START_TIMEOUT}s "
                f"(exit code {proc.poll()}).\ncommand: {' '.join(command)}\n{server.log_tail()}"
            )
        return server

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"  | {line}" for line in self.log[-lines:]) or "  | (no output)"

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(5)
                self.log.append(f"(killed: no exit {timeout}s after SIGTERM)")
        if self._reader is not None:
            self._reader.join(2)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


# ----------------------------------------------------------------------------------------
# Scenario steps
# ----------------------------------------------------------------------------------------

Expect = Mapping[str, Sequence[str]]


@attrs.frozen
class Open:
    """Open socket ``sock`` as ``client_id`` (None: no clientId parameter).

    ``room``: ROOM for the scenario's room, None for no roomId parameter, or a literal.
    ``send``: frames sent right after the handshake, before waiting for anything.
    By default every open socket in the room (the new one included) expects a
    ``clientCount``; ``expect`` adds to that, ``default_expect=False`` replaces it.
    """

    sock: str
    client_id: str | None
    send: Sequence[Any] = ()
    expect: Expect = attrs.Factory(dict)
    room: str | None = ROOM
    token: str | None = "t"
    default_expect: bool = True


@attrs.frozen
class Send:
    """Send one frame (a JSON value, or ``Raw`` text) on ``sock``."""

    sock: str
    frame: Any
    expect: Expect = attrs.Factory(dict)


@attrs.frozen
class Close:
    """The client closes ``sock``. By default, the others in its room expect a
    ``clientCount``; ``expect`` adds to that (an ephemeral deletion ``patch`` first)."""

    sock: str
    expect: Expect = attrs.Factory(dict)
    default_expect: bool = True


@attrs.frozen
class Raw:
    """A frame sent as this exact text."""

    text: str


Step = Open | Send | Close


def reconnect(
    last: int = 0,
    version: Any = 2,
    doc: list[Any] | None = None,
    eph: list[Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "reconnect", "lastTimestamp": last}
    if version is not None:
        frame["protocolVersion"] = version
    if doc is not None:
        frame["documentPatches"] = doc
    if eph is not None:
        frame["ephemeralPatches"] = eph
    frame.update(extra)
    return frame


def patch(
    message_id: Any, doc: list[Any] | None = None, eph: list[Any] | None = None, **extra: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "patch", "messageId": message_id}
    if doc is not None:
        frame["documentPatches"] = doc
    if eph is not None:
        frame["ephemeralPatches"] = eph
    frame.update(extra)
    return frame


def buf(length: int, *runs: tuple[int, list[Any]]) -> dict[str, Any]:
    return {"__buf": 1, "len": length, "runs": [[offset, values] for offset, values in runs]}


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def frame_type(frame: Any) -> str:
    if isinstance(frame, dict):
        for marker in ("__closed__", "__rejected__", "__unparsed__", "__binary__"):
            if marker in frame:
                return marker
        t = frame.get("type")
        return t if isinstance(t, str) else repr(t)
    return f"<{type(frame).__name__}>"


@attrs.define
class Recording:
    """What every socket received: ``frames[sock]`` is a list of (step index, frame)."""

    server: str
    room: str
    frames: dict[str, list[tuple[int, Any]]] = attrs.Factory(dict)
    notes: list[str] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)
    total: int = 0
    stopped: bool = False
    missed: bool = False

    def add(self, sock: str, step: int, frame: Any) -> None:
        if self.stopped:
            return
        self.frames.setdefault(sock, []).append((step, frame))
        self.total += 1
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def just_frames(self, sock: str) -> list[Any]:
        return [f for _, f in self.frames.get(sock, [])]

    def step_types(self, sock: str, step: int) -> list[str]:
        return [frame_type(f) for s, f in self.frames.get(sock, []) if s == step]


@attrs.define
class _Socket:
    name: str
    room: str | None
    client_id: str | None
    ws: trio_websocket.WebSocketConnection | None = None
    closing: bool = False
    done: trio.Event = attrs.Factory(trio.Event)


def connect_url(base: str, room: str | None, client_id: str | None, token: str | None) -> str:
    params = {}
    if room is not None:
        params["roomId"] = room
    if client_id is not None:
        params["clientId"] = client_id
    if token is not None:
        params["token"] = token
    return f"{base}/?{urlencode(params)}"


def _encode(frame: Any) -> str:
    if isinstance(frame, Raw):
        return frame.text
    return json.dumps(frame, separators=(",", ":"))


async def play(
    server: str, base_url: str, room: str, steps: Sequence[Step], *, scenario_timeout: float = 20.0
) -> Recording:
    """Play ``steps`` against the server at ``base_url`` in room ``room``."""
    rec = Recording(server=server, room=room)
    sockets: dict[str, _Socket] = {}
    step_index = 0

    async def receive(sock: _Socket) -> None:
        assert sock.ws is not None
        try:
            while True:
                message = await sock.ws.get_message()
                if isinstance(message, bytes):
                    rec.add(sock.name, step_index, {"__binary__": message.hex()})
                    continue
                try:
                    frame = json.loads(message)
                except ValueError:
                    frame = {"__unparsed__": message}
                rec.add(sock.name, step_index, frame)
        except trio_websocket.ConnectionClosed as exc:
            if not sock.closing:
                reason = exc.reason
                rec.add(
                    sock.name,
                    step_index,
                    {
                        "__closed__": {
                            "code": getattr(reason, "code", None),
                            "reason": getattr(reason, "reason", None) or "",
                        }
                    },
                )
        finally:
            sock.done.set()

    def in_room(room_id: str | None, exclude: str) -> list[str]:
        return [
            s.name
            for s in sockets.values()
            if s.room == room_id
            and s.name != exclude
            and s.ws is not None
            and not s.closing
            and not s.done.is_set()
        ]

    async def settle(expect: Expect, before: dict[str, int], what: str) -> None:
        def missing() -> dict[str, list[str]]:
            out = {}
            for name, types in expect.items():
                got = Counter(
                    frame_type(f) for _, f in rec.frames.get(name, [])[before.get(name, 0) :]
                )
                lack = Counter(types) - got
                if lack:
                    out[name] = sorted(lack.elements())
            return out

        timeout = STEP_TIMEOUT_AFTER_MISS if rec.missed else STEP_TIMEOUT
        with trio.move_on_after(timeout):
            while missing():
                await rec.changed()
        lack = missing()
        if lack:
            rec.missed = True
            rec.notes.append(
                f"step {step_index} ({what}): timed out after {timeout}s waiting for {lack}"
            )
        deadline = trio.current_time() + QUIET_CAP
        while trio.current_time() < deadline:
            seen = rec.total
            with trio.move_on_after(QUIET):
                await rec.changed()
            if rec.total == seen:
                break

    with trio.fail_after(scenario_timeout):
        async with trio.open_nursery() as nursery:
            for step_index, step in enumerate(steps):  # step_index is read by receive()
                before = {name: len(rec.frames.get(name, [])) for name in sockets}
                if isinstance(step, Open):
                    room_id = None if step.room is None else step.room.format(room=room)
                    sock = _Socket(step.sock, room_id, step.client_id)
                    assert step.sock not in sockets or sockets[step.sock].done.is_set(), step
                    sockets[step.sock] = sock
                    before[step.sock] = len(rec.frames.get(step.sock, []))
                    expect: dict[str, list[str]] = {}
                    if step.default_expect:
                        for name in [step.sock, *in_room(room_id, step.sock)]:
                            expect[name] = ["clientCount"]
                    for name, types in step.expect.items():
                        expect.setdefault(name, []).extend(types)
                    url = connect_url(base_url, room_id, step.client_id, step.token)
                    try:
                        sock.ws = await trio_websocket.connect_websocket_url(
                            nursery, url, message_queue_size=1000, max_message_size=64 << 20
                        )
                    except trio_websocket.ConnectionRejected as exc:
                        rec.add(step.sock, step_index, {"__rejected__": exc.status_code})
                        sock.done.set()
                        expect.pop(step.sock, None)
                    except (trio_websocket.HandshakeError, OSError) as exc:
                        rec.add(step.sock, step_index, {"__rejected__": type(exc).__name__})
                        sock.done.set()
                        expect.pop(step.sock, None)
                    else:
                        nursery.start_soon(receive, sock)
                        for frame in step.send:
                            await sock.ws.send_message(_encode(frame))
                    await settle(expect, before, f"open {step.sock}")
                elif isinstance(step, Send):
                    sock = sockets[step.sock]
                    assert sock.ws is not None
                    try:
                        await sock.ws.send_message(_encode(step.frame))
                    except trio_websocket.ConnectionClosed:
                        rec.notes.append(f"step {step_index}: {step.sock} was closed; not sent")
                    await settle(step.expect, before, f"send on {step.sock}")
                elif isinstance(step, Close):
                    sock = sockets[step.sock]
                    observers = in_room(sock.room, step.sock)
                    expect = {}
                    if step.default_expect:
                        for name in observers:
                            expect[name] = ["clientCount"]
                    for name, types in step.expect.items():
                        expect.setdefault(name, []).extend(types)
                    if sock.ws is not None and not sock.done.is_set():
                        sock.closing = True
                        with trio.move_on_after(STEP_TIMEOUT):
                            await sock.ws.aclose()
                        with trio.move_on_after(STEP_TIMEOUT):
                            await sock.done.wait()
                    if not expect:
                        await trio.sleep(UNOBSERVED_CLOSE_DELAY)
                    await settle(expect, before, f"close {step.sock}")
                else:  # pragma: no cover
                    raise TypeError(step)
            # What the sockets receive while the scenario tears them down is not part of it.
            rec.stopped = True
            for sock in sockets.values():
                sock.closing = True
            for sock in sockets.values():
                if sock.ws is not None and not sock.done.is_set():
                    with trio.move_on_after(STEP_TIMEOUT):
                        await sock.ws.aclose()
            nursery.cancel_scope.cancel()
    return rec


def expected_types(steps: Sequence[Step]) -> dict[tuple[str, int], list[str]]:
    """The annotated frame types per (socket, step), as ``play`` waits for them.

    Used to check the annotations against the Node reference. Needs the same room
    bookkeeping as ``play``; socket names are unique within a room per scenario.
    """
    out: dict[tuple[str, int], list[str]] = {}
    open_in: dict[str, str | None] = {}
    for i, step in enumerate(steps):
        if isinstance(step, Open):
            if step.default_expect and step.client_id is not None:
                for name in [step.sock, *[n for n, r in open_in.items() if r == step.room]]:
                    out.setdefault((name, i), []).append("clientCount")
            for name, types in step.expect.items():
                out.setdefault((name, i), []).extend(types)
            if step.client_id is not None:
                open_in[step.sock] = step.room
        elif isinstance(step, Send):
            for name, types in step.expect.items():
                out.setdefault((name, i), []).extend(types)
        elif isinstance(step, Close):
            room = open_in.pop(step.sock, None)
            if step.default_expect:
                for name, r in open_in.items():
                    if r == room:
                        out.setdefault((name, i), []).append("clientCount")
            for name, types in step.expect.items():
                out.setdefault((name, i), []).extend(types)
    return out


def annotation_errors(steps: Sequence[Step], rec: Recording) -> list[str]:
    """Where a recording differs from the per-step annotations (exact multisets)."""
    want = expected_types(steps)
    errors = [f"{rec.server}: {note}" for note in rec.notes]
    for sock, frames in rec.frames.items():
        steps_seen = {s for s, _ in frames}
        for i in sorted(steps_seen | {i for (n, i) in want if n == sock}):
            got = sorted(rec.step_types(sock, i))
            exp = sorted(want.get((sock, i), []))
            if got != exp:
                errors.append(
                    f"{rec.server}: step {i} ({steps[i] if i < len(steps) else 'end'}) "
                    f"socket {sock!r}: annotated {exp}, received {got}"
                )
    return errors


# ----------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------


def canonical(value: Any) -> Any:
    """A form whose == is JSON equality as a JS client sees it: object key order is
    ignored, 1 == 1.0, but true != 1 and "1" != 1."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("num", float(value)) if abs(value) < 2**53 else ("num", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", tuple(canonical(v) for v in value))
    if isinstance(value, dict):
        return ("obj", frozenset((k, canonical(v)) for k, v in value.items()))
    return ("other", repr(value))


def same_json(a: Any, b: Any) -> bool:
    return bool(canonical(a) == canonical(b))


def _fmt(frame: Any) -> str:
    return json.dumps(frame, separators=(",", ":"), sort_keys=False)


def compare(steps: Sequence[Step], expected: Recording, got: Recording) -> list[str]:
    """Per socket differences between two recordings, in words. Empty when equal."""
    out: list[str] = []
    for sock in sorted(set(expected.frames) | set(got.frames)):
        exp = expected.frames.get(sock, [])
        act = got.frames.get(sock, [])
        if len(exp) == len(act) and all(
            same_json(a[1], b[1]) for a, b in zip(exp, act, strict=True)
        ):
            continue
        lines = [
            f"socket {sock!r}: {expected.server} sent {len(exp)} frames, "
            f"{got.server} sent {len(act)}"
        ]
        for i in range(max(len(exp), len(act))):
            e = exp[i] if i < len(exp) else None
            a = act[i] if i < len(act) else None
            if e is not None and a is not None and same_json(e[1], a[1]):
                lines.append(f"    [{i}] step {e[0]:>2} ==  {_fmt(e[1])}")
                continue
            if e is not None:
                lines.append(f"    [{i}] step {e[0]:>2} {expected.server:>4}: {_fmt(e[1])}")
            else:
                lines.append(f"    [{i}]         {expected.server:>4}: (nothing)")
            if a is not None:
                lines.append(f"    [{i}] step {a[0]:>2} {got.server:>4}: {_fmt(a[1])}")
            else:
                lines.append(f"    [{i}]         {got.server:>4}: (nothing)")
        out.append("\n".join(lines))
    for note in got.notes:
        out.append(f"{got.server}: {note}")
    return out


def describe_steps(steps: Sequence[Step]) -> str:
    lines = []
    for i, step in enumerate(steps):
        if isinstance(step, Open):
            sent = "".join(
                f"\n         then sends {_fmt(f if not isinstance(f, Raw) else f.text)}"
                for f in step.send
            )
            lines.append(
                f"  {i:>2}. open {step.sock} (clientId={step.client_id!r}, "
                f"room={step.room!r}){sent}"
            )
        elif isinstance(step, Send):
            frame = step.frame.text if isinstance(step.frame, Raw) else step.frame
            lines.append(f"  {i:>2}. {step.sock} sends {_fmt(frame)}")
        else:
            lines.append(f"  {i:>2}. close {step.sock}")
    return "\n".join(lines)


def read_snapshots(data_dir: Path) -> dict[str, Any]:
    """``<name>.json`` files in ``data_dir`` parsed, by file name without ``.json``."""
    out: dict[str, Any] = {}
    for path in sorted(data_dir.glob("*.json")):
        try:
            out[path.name[: -len(".json")]] = json.loads(path.read_text("utf-8"))
        except ValueError as exc:
            out[path.name[: -len(".json")]] = {"__unparsed__": str(exc)}
    return out
