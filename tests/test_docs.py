"""The docs site builds with ``mkdocs build --strict``, and the CLI page documents every
option that ``serve --help`` prints.

mkdocs comes with the docs extra (part of the dev extra). Without it the build test skips
with the reason, and fails under $CI.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import canvas_store_trio

ROOT = Path(__file__).resolve().parent.parent
CLI_PAGE = ROOT / "docs" / "guides" / "cli.md"
REFERENCE = ROOT / "docs" / "reference"


def help_options(*command: str) -> set[str]:
    """The long options ``canvas-store-trio COMMAND --help`` prints."""
    done = subprocess.run(
        [sys.executable, "-m", "canvas_store_trio", *command, "--help"],
        capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", done.stdout)) - {"--help"}


def test_cli_page_documents_every_serve_option() -> None:
    options = help_options("serve")
    assert {"--port", "--durable-acks", "--no-durable-acks", "--max-rooms"} <= options
    page = CLI_PAGE.read_text()
    # Written in the page itself (the generated --help block is not in the source).
    missing = sorted(option for option in options if f"`{option}" not in page)
    assert not missing, f"docs/guides/cli.md does not describe {missing}"


def test_cli_page_documents_every_transfer_option() -> None:
    page = CLI_PAGE.read_text().split("## `export` and `import`", 1)[1]
    for command in ("export", "import"):
        assert f"<!-- cli-help: {command} -->" in page
        # The options shared with serve (--storage, --data-dir) are described there.
        assert help_options(command) - {"--storage", "--data-dir"} <= set(
            re.findall(r"--[a-z][a-z-]*", page)
        ), command


def test_reference_renders_every_public_name() -> None:
    """Each name that ``canvas_store_trio``, ``canvas_store_trio.ops``,
    ``canvas_store_trio.cluster``, ``canvas_store_trio.client`` and
    ``canvas_store_trio.testing`` export has a
    ``::: name`` in an API reference page. ``testing``'s ``__all__`` counts, since its
    strategies are imported on first use."""
    import canvas_store_trio.client as client
    import canvas_store_trio.cluster as cluster
    import canvas_store_trio.ops as ops
    import canvas_store_trio.testing as testing

    pages = "".join(page.read_text() for page in REFERENCE.glob("*.md"))
    rendered = set(re.findall(r"^::: (canvas_store_trio\S*)$", pages, re.M))
    public = {
        f"{module.__name__}.{name}"
        for module in (canvas_store_trio, ops, cluster, client, testing)
        for name in list(getattr(module, "__all__", vars(module)))
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    }
    assert sorted(public - rendered) == []


def test_docs_build_strict(tmp_path: Path) -> None:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as exc:
        message = f"the docs extra is not installed ({exc}): pip install -e '.[docs]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert time.monotonic() - start < 60, "the docs build got slow"
    cli = (tmp_path / "site" / "guides" / "cli" / "index.html").read_text()
    assert "usage: canvas-store-trio serve" in cli  # the generated --help
    reference = (tmp_path / "site" / "reference" / "rooms" / "index.html").read_text()
    assert "open_room" in reference and ":class:" not in reference
