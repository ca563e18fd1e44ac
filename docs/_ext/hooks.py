"""mkdocs hooks for the docs build.

``<!-- cli-help: serve -->`` (or ``export``, ``import``) in a page becomes that command's
``--help``, made from the parser itself at build time, so the page cannot drift from it.
"""

from __future__ import annotations

import os
import re
from typing import Any

PLACEHOLDER = re.compile(r"<!-- cli-help: (\w+) -->")


def command_help(command: str) -> str:
    """What ``canvas-store-trio COMMAND --help`` prints, wrapped at 80 columns."""
    from canvas_store_trio.cli._main import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        parser = build_parser()
        subparsers = next(
            action for action in parser._actions if action.dest == "command"
        )
        return subparsers.choices[command].format_help()  # type: ignore[attr-defined,no-any-return]
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return PLACEHOLDER.sub(lambda match: f"```text\n{command_help(match.group(1))}```", markdown)
