"""deploy/: the systemd unit passes systemd-analyze, and the nginx config really fronts a
server: TLS, WebSocket upgrades, the client's address forwarded, /metrics kept private.

The tools come from Debian's packages (systemd, nginx, openssl, haproxy); .ci/run installs them.
Without one a test skips with the reason, and fails under $CI.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .processes import server_process

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "canvas-store-trio.service"
NGINX_CONF = DEPLOY / "nginx.conf"


def require_tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        package = "systemd" if name.startswith("systemd") else name
        missing = f"{name} is not installed (Debian package: {package})"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return path


# --- systemd -----------------------------------------------------------------------


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's command (verify checks that
    the program exists)."""
    command = Path(sys.executable).with_name("canvas-store-trio")
    assert command.exists(), command
    text = UNIT.read_text().replace("/opt/canvas-store-trio/bin/canvas-store-trio", str(command))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 for unknown keys and bad values too; it only says so.
    complaints = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stderr


def test_systemd_unit_is_sandboxed(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    text = UNIT.read_text()
    for setting in (
        "DynamicUser=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "NoNewPrivileges=yes", "StateDirectory=canvas-store-trio", "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes", "Restart=on-failure", "KillSignal=SIGTERM",
    ):
        assert setting in text, setting
    # The final save: each room's is bounded by the flush timeout (10 s), after the
    # sessions' closes (5 s); systemd must not SIGKILL before.
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert stop and int(stop.group(1)) >= 30
    # The data folder is the state directory.
    assert "--data-dir /var/lib/canvas-store-trio" in text
    # systemd's own score: 0 (locked down) to 10 (none). Ours is about 1.2 with 252.
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


# --- nginx -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=sync.example.com", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def installed(source: Path, replacements: dict[str, str]) -> str:
    """``source`` as it would be installed, with only ``replacements`` made: each string
    must occur exactly once (a config that changed under the test fails it)."""
    text = source.read_text()
    for old, new in replacements.items():
        assert text.count(old) == 1, (source.name, old)
        text = text.replace(old, new)
    return text


def nginx_setup(tmp_path: Path, site: Path, *, https: int, http: int,
                upstreams: dict[str, str]) -> Path:
    """A whole nginx.conf around ``site`` (deploy/nginx.conf or deploy/nginx-cluster.conf),
    as it would be installed, with only its listen addresses, certificate paths and the
    ``upstreams`` lines changed to this test's."""
    cert, key = self_signed_cert(tmp_path)
    (tmp_path / "site.conf").write_text(installed(site, {
        "listen 443 ssl;": f"listen 127.0.0.1:{https} ssl;",
        "listen [::]:443 ssl;": "",
        "listen 80;": f"listen 127.0.0.1:{http};",
        "listen [::]:80;": "",
        "/etc/letsencrypt/live/sync.example.com/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/sync.example.com/privkey.pem": str(key),
        **upstreams,
    }))
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        {"user root;" if os.geteuid() == 0 else ""}
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log;
        events {{}}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/client_body;
            proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fastcgi;
            uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            include {tmp_path}/site.conf;
        }}
        """))
    return conf


def nginx_test(tmp_path: Path, conf: Path) -> None:
    """``nginx -t`` on ``conf`` passes."""
    nginx = require_tool("nginx")
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr and "test is successful" in done.stderr


def test_nginx_config_is_valid(tmp_path: Path) -> None:
    nginx_test(tmp_path, nginx_setup(tmp_path, NGINX_CONF, https=free_port(), http=free_port(),
                                     upstreams={}))


AUTHORIZE = '''
def authorize(info):
    """Refuses the token "whoami", telling the client what the server was told."""
    if info.token == "whoami":
        headers = info.request.headers
        raise ValueError(
            f"real={headers.get('x-real-ip')} proto={headers.get('x-forwarded-proto')}"
        )
    return {"permissions": "readwrite"}
'''


async def https_get(port: int, path: str, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    """One HTTP/1.1 GET to 127.0.0.1:port (over TLS when ``context``): status, body."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if context is not None:
        stream = trio.SSLStream(stream, context, server_hostname="sync.example.com")
    request = f"GET {path} HTTP/1.1\r\nHost: sync.example.com\r\nConnection: close\r\n\r\n"
    await stream.send_all(request.encode())
    answer = b""
    with trio.fail_after(10):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # a TLS close without close_notify
                break
            if not chunk:
                break
            answer += chunk
    await trio.aclose_forcefully(stream)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def insecure_context() -> ssl.SSLContext:
    """A TLS client context that takes the tests' self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@asynccontextmanager
async def proxy_process(command: list[str], https: int) -> AsyncIterator[trio.Process]:
    """Runs ``command`` (nginx or HAProxy in the foreground) until the way out; yields once
    it answers ``GET /healthz`` with 200 over TLS on ``https``."""
    process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL)
    try:
        context = insecure_context()
        with trio.fail_after(10):  # up once it answers
            while True:
                try:
                    status, body = await https_get(https, "/healthz", context)
                    break
                except OSError:
                    assert process.poll() is None, f"{command[0]} exited: {process.returncode}"
                    await trio.sleep(0.05)
        assert (status, body) == (200, b"ok\n")
        yield process
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def nginx_command(tmp_path: Path, conf: Path) -> list[str]:
    return [require_tool("nginx"), "-p", str(tmp_path), "-c", str(conf),
            "-e", str(tmp_path / "error.log"), "-g", "daemon off;"]


async def test_nginx_fronts_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("nginx")
    (tmp_path / "deploy_hook.py").write_text(AUTHORIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    metrics_port, https, http = free_port(), free_port(), free_port()
    async with server_process(
        "--memory", "--metrics-port", str(metrics_port), "--authorize", "deploy_hook:authorize"
    ) as server:
        conf = nginx_setup(tmp_path, NGINX_CONF, https=https, http=http, upstreams={
            "server 127.0.0.1:8087;": f"server 127.0.0.1:{server.port};"})
        async with proxy_process(nginx_command(tmp_path, conf), https):
            context = insecure_context()
            # /metrics: never through the front; on the metrics port, yes.
            assert (await https_get(https, "/metrics", context))[0] == 404
            status, body = await https_get(metrics_port, "/metrics", None)
            assert status == 200 and b"canvas_store_sessions" in body

            # Plain HTTP only redirects.
            assert (await https_get(http, "/?roomId=r&clientId=a", None))[0] == 301

            # A session over wss, through nginx: two clients see each other's edit.
            base = f"wss://127.0.0.1:{https}/?roomId=board"
            async with (
                open_websocket_url(f"{base}&clientId=a", ssl_context=context) as a,
                open_websocket_url(f"{base}&clientId=b", ssl_context=context) as b,
            ):
                for ws in (a, b):
                    await ws.send_message(orjson.dumps(
                        {"type": "reconnect", "lastTimestamp": 0, "protocolVersion": 2}
                    ).decode())
                    while orjson.loads(await ws.get_message())["type"] != "synced":
                        pass
                patch = {"n/Note": {"_exists": True, "text": "through nginx"}}
                await a.send_message(orjson.dumps(
                    {"type": "patch", "messageId": 1, "documentPatches": [patch]}
                ).decode())
                with trio.fail_after(10):
                    while (frame := orjson.loads(await b.get_message()))["type"] != "patch":
                        pass
                assert frame["documentPatches"] == [patch] and frame["clientId"] == "a"

            # The hook sees the client's real address and scheme, forwarded by nginx.
            async with open_websocket_url(
                f"{base}&clientId=c&token=whoami", ssl_context=context
            ) as c:
                with pytest.raises(ConnectionClosed) as closed:
                    with trio.fail_after(10):
                        await c.get_message()
            assert closed.value.reason.code == 1008
            assert closed.value.reason.reason == "real=127.0.0.1 proto=https"
