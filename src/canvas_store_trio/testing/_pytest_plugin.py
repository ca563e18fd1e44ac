"""The pytest plugin (entry point ``pytest11``): the ``canvas_store_server`` fixture.

pytest loads this module in every environment that has canvas-store-trio installed, so
it imports neither hypothesis nor anything that needs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from ._server import RunningServer, open_server


@pytest.fixture
def canvas_store_server_options() -> dict[str, Any]:
    """The options of :func:`canvas_store_server`: ``RoomManager`` options, and
    ``authorize`` or ``transport`` (see ``open_server``). None by default: rooms in
    memory, our wire transport, every session readwrite. Override this fixture to
    change them (``{"durable_acks": True, "create_storage": ...}``)."""
    return {}


@pytest.fixture
async def canvas_store_server(
    canvas_store_server_options: dict[str, Any],
) -> AsyncIterator[RunningServer]:
    """A running server on a free loopback port: ``.url`` (``ws://127.0.0.1:PORT``),
    ``.port``, ``.manager`` (its ``RoomManager``) and ``.connect(room_id, client_id)``.

    A Trio fixture: the test must run under pytest-trio (``trio_mode = true`` in the
    pytest configuration, or ``@pytest.mark.trio`` on the test). After the test, the
    server stops listening, its sessions are closed with 1001 and its rooms flushed.

    pytest-trio sets a fixture up once per test, not once per hypothesis example (a
    second example would get the first one's server, stopped by then): in a ``@given``
    test, open a server per example with ``async with open_server() as server``.
    """
    async with open_server(**canvas_store_server_options) as server:
        yield server
