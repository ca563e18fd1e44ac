"""Testing helpers for apps and servers built on canvas-store-trio.

- Hypothesis strategies: :func:`patches`, :func:`patch_lists`, :func:`buffer_deltas`,
  :func:`snapshots`, :func:`frames`, :func:`hostile_frames` (and :func:`json_values`,
  :func:`field_values`, :func:`encode_frame`, :data:`SMALL_LIMITS`, the key pools).
  They need hypothesis: ``pip install 'canvas-store-trio[testing]'``.
- :class:`ReferenceModel`: the document model written out longhand, to check a server
  (or a client's view of one) against.
- :func:`memory_socket_pair`: drive a ``Room`` with no network; :class:`FrameClient`
  speaks the wire protocol by hand, on any socket.
- :func:`serve_in_nursery`: a real server on a free loopback port, for
  ``nursery.start``; :func:`open_server`: the same with its own ``RoomManager``, as
  ``async with``.
- The pytest plugin (loaded by its ``pytest11`` entry point) gives the
  ``canvas_store_server`` fixture.

Everything but the strategies works without hypothesis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._model import ReferenceModel as ReferenceModel
from ._server import RunningServer as RunningServer
from ._server import open_server as open_server
from ._server import serve_in_nursery as serve_in_nursery
from ._sockets import FrameClient as FrameClient
from ._sockets import MemorySocket as MemorySocket
from ._sockets import memory_socket_pair as memory_socket_pair

if TYPE_CHECKING:
    from ._strategies import FIELDS as FIELDS
    from ._strategies import KEYS as KEYS
    from ._strategies import PRESENCE_KEYS as PRESENCE_KEYS
    from ._strategies import SCHEMAS as SCHEMAS
    from ._strategies import SMALL_LIMITS as SMALL_LIMITS
    from ._strategies import buffer_deltas as buffer_deltas
    from ._strategies import encode_frame as encode_frame
    from ._strategies import field_values as field_values
    from ._strategies import frames as frames
    from ._strategies import hostile_frames as hostile_frames
    from ._strategies import json_values as json_values
    from ._strategies import patch_lists as patch_lists
    from ._strategies import patches as patches
    from ._strategies import snapshots as snapshots

_STRATEGIES = (
    "FIELDS", "KEYS", "PRESENCE_KEYS", "SCHEMAS", "SMALL_LIMITS", "buffer_deltas",
    "encode_frame", "field_values", "frames", "hostile_frames", "json_values",
    "patch_lists", "patches", "snapshots",
)  # fmt: skip
"""The names imported from ``._strategies`` on first use (those above, for type checkers)."""


def __getattr__(name: str) -> Any:
    """The strategies, imported on first use: the pytest plugin imports this package in
    every environment that has canvas-store-trio, hypothesis or not."""
    if name not in _STRATEGIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        strategies = importlib.import_module("._strategies", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != "hypothesis":
            raise
        raise ImportError(
            f"canvas_store_trio.testing.{name} needs hypothesis: "
            "pip install 'canvas-store-trio[testing]'"
        ) from exc
    return getattr(strategies, name)


__all__ = [
    "FrameClient", "MemorySocket", "ReferenceModel", "RunningServer", "memory_socket_pair",
    "open_server", "serve_in_nursery", *_STRATEGIES,
]  # fmt: skip
