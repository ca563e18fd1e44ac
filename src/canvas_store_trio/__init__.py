"""A Trio sync server for ``@woven-ecs/canvas-store`` apps.

Embed it with :class:`RoomManager` and :func:`serve_connection`, or run
``canvas-store-trio serve``.
"""

from ._backends import FileBackend as FileBackend
from ._backends import MemoryBackend as MemoryBackend
from ._backends import StorageBackend as StorageBackend
from ._backends import open_storage_backend as open_storage_backend
from ._connection import Authorize as Authorize
from ._connection import AuthorizeInfo as AuthorizeInfo
from ._connection import ConnectRequest as ConnectRequest
from ._connection import ConnectRequestError as ConnectRequestError
from ._connection import parse_connect_url as parse_connect_url
from ._connection import serve_connection as serve_connection
from ._document import Changes as Changes
from ._document import Document as Document
from ._document import RecordChange as RecordChange
from ._document import Snapshot as Snapshot
from ._document import SnapshotError as SnapshotError
from ._document import apply_buffer_delta as apply_buffer_delta
from ._document import decode_snapshot as decode_snapshot
from ._document import encode_snapshot as encode_snapshot
from ._listener import serve_websocket_stream as serve_websocket_stream
from ._listener import serve_websockets as serve_websockets
from ._manager import ManagerClosedError as ManagerClosedError
from ._manager import RoomLoadError as RoomLoadError
from ._manager import RoomManager as RoomManager
from ._manager import TooManyRoomsError as TooManyRoomsError
from ._postgres import PostgresDatabase as PostgresDatabase
from ._postgres import PostgresStorage as PostgresStorage
from ._protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._protocol import Limits as Limits
from ._protocol import ProtocolError as ProtocolError
from ._protocol import parse_client_frame as parse_client_frame
from ._room import MessageSocket as MessageSocket
from ._room import Room as Room
from ._room import RoomClosedError as RoomClosedError
from ._room import RoomFullError as RoomFullError
from ._session import AuthorizeResult as AuthorizeResult
from ._session import Permissions as Permissions
from ._session import SessionInfo as SessionInfo
from ._sqlite import SQLiteDatabase as SQLiteDatabase
from ._sqlite import SQLiteStorage as SQLiteStorage
from ._storage import FileStorage as FileStorage
from ._storage import IncrementalStorage as IncrementalStorage
from ._storage import MemoryStorage as MemoryStorage
from ._storage import Storage as Storage
from ._storage import StorageError as StorageError
from ._storage import StreamingStorage as StreamingStorage
from ._transfer import TransferError as TransferError
from ._transfer import copy_rooms as copy_rooms
from ._transfer import export_room as export_room
from ._transfer import export_room_to_file as export_room_to_file
from ._transfer import import_directory as import_directory
from ._transfer import import_file as import_file
from ._transfer import import_room as import_room

__version__ = "0.1.0"
