"""The real npm client against our server: runs the Node interop suite in node/interop/.

The suite drives ``@woven-ecs/canvas-store`` (its ``WebsocketAdapter`` frame by frame, and a
whole ``CanvasStore`` on a ``@woven-ecs/core`` World) against ``python -m canvas_store_trio
serve``, which it starts, restarts, SIGTERMs and SIGKILLs itself. See node/interop/harness.mjs.

Needs Node.js (20+) and ``npm ci`` in node/. Without them the test is skipped, except under CI
(the ``CI`` environment variable is set), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "node"
SUITE_DIR = NODE_DIR / "interop"
TESTS_DIR = Path(__file__).resolve().parent
CLIENT_PACKAGE = NODE_DIR / "node_modules" / "@woven-ecs" / "canvas-store" / "package.json"

SUITE_TIMEOUT = 300  # seconds, for the whole Node run
OUTPUT_TAIL = 60_000  # characters of Node output shown on failure


def _missing_prerequisite() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH (the interop suite needs Node.js 20+)"
    if not CLIENT_PACKAGE.is_file():
        return f"{NODE_DIR / 'node_modules'} is missing: run `npm ci` in {NODE_DIR}"
    return None


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CANVAS_STORE_SERVER_CMD"] = json.dumps(
        [sys.executable, "-m", "canvas_store_trio", "serve"]
    )
    env["CANVAS_STORE_SERVER_KIND"] = "trio"
    env["CANVAS_STORE_AUTHORIZE"] = "interop_auth:authorize"
    # `--authorize interop_auth:authorize` imports tests/interop_auth.py in the server process.
    paths = [str(TESTS_DIR), str(ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("NODE_OPTIONS", None)
    return env


@pytest.mark.node
def test_real_client_against_our_server() -> None:
    missing = _missing_prerequisite()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"interop suite cannot run under CI: {missing}", pytrace=False)
        pytest.skip(missing)

    cmd = [
        shutil.which("node") or "node",
        "--test",
        "--test-reporter=spec",
        "--test-timeout=90000",
        str(SUITE_DIR) + os.sep,
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=_node_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=SUITE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode("utf-8", "replace") if isinstance(exc.stdout, bytes) else ""
        pytest.fail(
            f"interop suite did not finish within {SUITE_TIMEOUT} s\n{out[-OUTPUT_TAIL:]}",
            pytrace=False,
        )
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        pytest.fail(
            f"interop suite failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{output[-OUTPUT_TAIL:]}",
            pytrace=False,
        )
    # Guard against a run that passed because it found no tests.
    passed = re.search(r"\bpass (\d+)", output)
    if passed is None or int(passed.group(1)) == 0:
        pytest.fail(f"interop suite ran no tests\n{output[-OUTPUT_TAIL:]}", pytrace=False)
