"""What a newcomer meets first: the command line's errors, the examples and the README.

Every command here is the real one, run as a process; the servers are stopped with real
signals, and real clients read the close code they get.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from canvas_store_trio import (
    AuthorizeInfo,
    Limits,
    RoomManager,
    __version__,
    serve_connection,
    serve_websockets,
)
from canvas_store_trio.rooms._session import AuthorizeResultError, as_authorize_result

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "canvas_store_trio"]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit status 2 and a last stderr line naming every word, with no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, last


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "http"])
def test_port_outside_0_to_65535_is_refused(tmp_path: Path, port: str) -> None:
    assert_one_line_error(
        run_cli("serve", "--memory", "--port", port, cwd=tmp_path), "--port", "65535"
    )


def test_bad_port_variable_breaks_only_serve(tmp_path: Path) -> None:
    env = {"PORT": "eighty"}
    assert run_cli("--help", cwd=tmp_path, env=env).returncode == 0
    assert run_cli("serve", "--help", cwd=tmp_path, env=env).returncode == 0
    assert run_cli("export", "--help", cwd=tmp_path, env=env).returncode == 0
    assert_one_line_error(run_cli("serve", "--memory", cwd=tmp_path, env=env), "$PORT", "eighty")


def test_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"canvas-store-trio {__version__}"


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--memory", "--port", str(port), cwd=tmp_path)
    assert_one_line_error(result, f"127.0.0.1:{port}", "in use")


def test_unknown_host_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "serve", "--memory", "--host", "no-such-host.invalid", "--port", "0", cwd=tmp_path
    )
    assert_one_line_error(result, "no-such-host.invalid")


def test_memory_with_durable_acks_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--memory", "--durable-acks", "--port", "0", cwd=tmp_path)
    assert_one_line_error(result, "--memory", "--durable-acks")


def test_data_dir_that_is_a_file_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "rooms").write_text("not a folder")
    result = run_cli("serve", "--data-dir", "rooms", "--port", "0", cwd=tmp_path)
    assert_one_line_error(result, "--data-dir", "not a folder")


def test_export_reads_and_creates_nothing(tmp_path: Path) -> None:
    result = run_cli("export", "room", "--storage", "sqlite:///missing.db", cwd=tmp_path)
    assert_one_line_error(result, "missing.db")
    result = run_cli("export", "--all", "-o", "out", "--data-dir", "nowhere", cwd=tmp_path)
    assert_one_line_error(result, "nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_import_names_the_flag(tmp_path: Path) -> None:
    snapshot = tmp_path / "r.json"
    snapshot.write_text('{"timestamp": 1, "state": {}, "timestamps": {}}')
    assert run_cli("import", str(snapshot), "--data-dir", "d", cwd=tmp_path).returncode == 0
    result = run_cli("import", str(snapshot), "--data-dir", "d", cwd=tmp_path)
    assert_one_line_error(result, "--force")
    assert "overwrite" not in result.stderr


def test_bad_permissions_name_the_allowed_values() -> None:
    for bad in ({"permissions": "admin"}, {"permissions": "readwrite", "role": 1}, {}):
        with pytest.raises(AuthorizeResultError, match=r"readonly|permissions"):
            as_authorize_result(bad)
    with pytest.raises(AuthorizeResultError, match="'readonly' or 'readwrite'"):
        as_authorize_result({"permissions": "admin"})


async def test_set_session_permissions_names_the_allowed_values() -> None:
    async with RoomManager() as manager:
        room = await manager.get_or_create_room("r")
        with pytest.raises(ValueError, match="'readonly' or 'readwrite', not 'admin'"):
            room.set_session_permissions("any", "admin")  # type: ignore[arg-type]


async def test_hook_returning_bad_permissions_is_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def authorize(info: AuthorizeInfo) -> object:
        return {"permissions": "owner"}

    async with RoomManager() as manager, trio.open_nursery() as nursery:

        async def handler(request: object) -> None:
            await serve_connection(manager, request, authorize=authorize)  # type: ignore[arg-type]

        listeners = await nursery.start(_listen, handler)
        port = listeners[0].socket.getsockname()[1]
        async with open_websocket_url(f"ws://127.0.0.1:{port}/?roomId=r&clientId=c") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 1008
        nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("'readonly' or 'readwrite'" in r.getMessage() for r in errors)


async def _listen(handler: object, *, task_status: trio.TaskStatus[object]) -> None:
    await serve_websockets(
        handler,  # type: ignore[arg-type]
        "127.0.0.1",
        0,
        max_message_size=Limits().max_message_size,
        task_status=task_status,
    )


# --- servers stopped with Ctrl-C: exit 0, clients closed with 1001 -------------------


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(1, len(readme_python_blocks())))
def test_every_other_readme_snippet_runs_as_written(tmp_path: Path, index: int) -> None:
    """The first snippet is a server, run by the Ctrl-C test below; the others end."""
    (tmp_path / "snippet.py").write_text(readme_python_blocks()[index])
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def start_server(argv: list[str], cwd: Path, port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[0])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("the server did not start listening")


SERVERS = {
    "examples/server.py": lambda tmp: [sys.executable, str(ROOT / "examples" / "server.py")],
    "examples/embed.py": lambda tmp: [sys.executable, str(ROOT / "examples" / "embed.py")],
    "examples/server_edits.py": lambda tmp: [
        sys.executable, str(ROOT / "examples" / "server_edits.py")
    ],
    "README snippet": lambda tmp: [sys.executable, str(tmp / "snippet.py")],
    "serve": lambda tmp: [*CLI, "serve", "--data-dir", "data"],
    # In memory there is nothing to save, so the listener stops right after the sessions
    # are told to close: a close handshake still under way must finish all the same.
    "serve --memory --transport trio-websocket": lambda tmp: [
        *CLI, "serve", "--memory", "--transport", "trio-websocket"
    ],
}
SHUTDOWN_SECONDS = 3.0
"""Time from the signal to the exit, with one client connected: its close handshake takes
milliseconds, so this is far from the 5 s a close that waits out ``CLOSE_TIMEOUT`` takes."""


@pytest.mark.parametrize("name", sorted(SERVERS))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_ctrl_c_exits_0_and_clients_get_1001(
    tmp_path: Path, name: str, signum: signal.Signals
) -> None:
    blocks = readme_python_blocks()
    assert blocks, "the README has its embedding snippet"
    (tmp_path / "snippet.py").write_text(blocks[0])
    port = free_port()
    process = start_server(SERVERS[name](tmp_path), tmp_path, port)
    try:
        token = "alice-token" if "embed" in name else "t"
        room = "plans" if "embed" in name else "r"
        url = f"ws://127.0.0.1:{port}/?roomId={room}&clientId=c&token={token}"
        async with open_websocket_url(url) as ws:
            await ws.send_message(
                '{"type":"patch","messageId":"m","documentPatches":[{"k":{"x":1}}]}'
            )
            while '"ack"' not in await ws.get_message():
                pass
            process.send_signal(signum)
            signalled = time.monotonic()
            with trio.fail_after(15), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            # As a browser does, the client answers the close and leaves the TCP close
            # to the server: the server must not wait out a close handshake it cut.
            output, _ = await trio.to_thread.run_sync(process.communicate, None, 15)
        assert closed.value.reason.code == 1001
        assert time.monotonic() - signalled < SHUTDOWN_SECONDS, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    if name.startswith("serve"):
        # Durable acks are opt-in (bench/README.md has why); the start-up line says which.
        assert "acks once in memory" in output, output
