"""The demo page, built from the npm client, in headless Chromium against ``serve --demo``.

The browser side is ``demo/browser.test.mjs`` (node:test and playwright-core). It runs the
server command given here itself, because one of its steps stops the server and starts
it again on the same port and data folder. It checks, with real mouse and keyboard input:
an edit in one window shows in the other; a reload gets the document back from the
server; edits made while the server is down reach the other window after the restart;
a new browser sees it all; the room file is on disk.

Needs Node, ``node/node_modules`` (``npm ci``) and Chromium (``apt-get install
chromium``; nothing is downloaded). Without them the test is skipped, or fails when the
``CI`` environment variable is set. ``DEMO_SCREENSHOT=docs/demo.png`` refreshes the
README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "node" / "node_modules"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.node


def _require_browser_tools() -> str:
    """The node executable; fail in CI, skip elsewhere, when something is missing."""
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (NODE_MODULES / "playwright-core").is_dir() or not (NODE_MODULES / "esbuild").is_dir():
        missing = "node/node_modules is missing (run `cd node && npm ci`)"
    elif not os.access(CHROMIUM, os.X_OK):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must install it")
        pytest.skip(missing)
    assert node is not None
    return node


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_demo_in_chromium(tmp_path: Path) -> None:
    node = _require_browser_tools()
    # Build the page from demo/ first, so what is tested is what is in the tree.
    build = subprocess.run(
        [node, str(ROOT / "demo" / "build.mjs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, f"demo build failed:\n{build.stdout}{build.stderr}"

    port = _free_port()
    data_dir = tmp_path / "data"
    command = [
        sys.executable, "-m", "canvas_store_trio", "serve", "--demo",
        "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--save-throttle", "0.2",
    ]  # fmt: skip
    screenshot = os.environ.get("DEMO_SCREENSHOT")
    env = {
        **os.environ,
        "DEMO_SERVER_COMMAND": json.dumps(command),
        "DEMO_PORT": str(port),
        "DEMO_DATA_DIR": str(data_dir),
        "DEMO_ROOM": "demo",
        "DEMO_SCREENSHOT": str(Path(screenshot).resolve()) if screenshot else "",
        "CHROMIUM": CHROMIUM,
    }
    run = subprocess.run(
        [node, "--test", "--test-reporter=spec", str(ROOT / "demo" / "browser.test.mjs")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"browser test failed:\n{run.stdout}\n{run.stderr}"
    assert (data_dir / "demo.json").is_file()
