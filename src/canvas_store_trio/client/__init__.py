"""A Trio client for canvas-store rooms, speaking protocol v2 as the npm client does.

``async with connect(url, room_id=...) as client:`` joins a room, on our server or the
Node one: ``client.document``, ``client.presence``, ``await client.patch(...)``,
``async for update in client.updates()``. It reconnects on its own; see :func:`connect`.
"""

from ._client import Client as Client
from ._client import connect as connect
from ._errors import ClientClosed as ClientClosed
from ._errors import ClientError as ClientError
from ._errors import ClientTimeout as ClientTimeout
from ._errors import PatchRefused as PatchRefused
from ._errors import ServerClosed as ServerClosed
from ._errors import UpdatesOverflow as UpdatesOverflow
from ._errors import VersionMismatch as VersionMismatch
from ._updates import Update as Update
