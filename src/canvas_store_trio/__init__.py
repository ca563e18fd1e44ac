"""A Trio sync server for ``@woven-ecs/canvas-store`` apps.

Embed it with :class:`RoomManager` and :func:`serve_connection`, or run
``canvas-store-trio serve``.
"""

from ._document import Changes as Changes
from ._document import Document as Document
from ._document import RecordChange as RecordChange
from ._document import Snapshot as Snapshot
from ._document import SnapshotError as SnapshotError
from ._document import apply_buffer_delta as apply_buffer_delta
from ._document import decode_snapshot as decode_snapshot
from ._document import encode_snapshot as encode_snapshot
from ._logs import JSONLogFormatter as JSONLogFormatter
from ._protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._protocol import Limits as Limits
from ._protocol import ProtocolError as ProtocolError
from ._protocol import parse_client_frame as parse_client_frame
from .auth._jwt import JWTAuthorizer as JWTAuthorizer
from .auth._jwt import TokenRefused as TokenRefused
from .rooms._commits import CommitError as CommitError
from .rooms._connection import Authorize as Authorize
from .rooms._connection import AuthorizeInfo as AuthorizeInfo
from .rooms._connection import ConnectRequest as ConnectRequest
from .rooms._connection import ConnectRequestError as ConnectRequestError
from .rooms._connection import parse_connect_url as parse_connect_url
from .rooms._connection import serve_connection as serve_connection
from .rooms._feed import Change as Change
from .rooms._feed import ChangeFeed as ChangeFeed
from .rooms._feed import ChangeFeedOverflow as ChangeFeedOverflow
from .rooms._manager import ManagerClosedError as ManagerClosedError
from .rooms._manager import RoomLoadError as RoomLoadError
from .rooms._manager import RoomManager as RoomManager
from .rooms._manager import TooManyRoomsError as TooManyRoomsError
from .rooms._room import CHANGE_FEED_BUFFER as CHANGE_FEED_BUFFER
from .rooms._room import SERVER_CLIENT_ID as SERVER_CLIENT_ID
from .rooms._room import MessageSocket as MessageSocket
from .rooms._room import Room as Room
from .rooms._room import RoomClosedError as RoomClosedError
from .rooms._room import RoomFullError as RoomFullError
from .rooms._session import AuthorizeResult as AuthorizeResult
from .rooms._session import Permissions as Permissions
from .rooms._session import SessionInfo as SessionInfo
from .storage._backends import FileBackend as FileBackend
from .storage._backends import MemoryBackend as MemoryBackend
from .storage._backends import StorageBackend as StorageBackend
from .storage._backends import open_storage_backend as open_storage_backend
from .storage._base import CommitGroup as CommitGroup
from .storage._base import HistoryStorage as HistoryStorage
from .storage._base import IncrementalStorage as IncrementalStorage
from .storage._base import JournalStorage as JournalStorage
from .storage._base import MemoryStorage as MemoryStorage
from .storage._base import Storage as Storage
from .storage._base import StorageError as StorageError
from .storage._base import StreamingStorage as StreamingStorage
from .storage._base import VersionInfo as VersionInfo
from .storage._files import FileStorage as FileStorage
from .storage._history import restore_version as restore_version
from .storage._postgres import PostgresDatabase as PostgresDatabase
from .storage._postgres import PostgresStorage as PostgresStorage
from .storage._sqlite import SQLiteDatabase as SQLiteDatabase
from .storage._sqlite import SQLiteStorage as SQLiteStorage
from .storage._transfer import TransferError as TransferError
from .storage._transfer import copy_rooms as copy_rooms
from .storage._transfer import export_room as export_room
from .storage._transfer import export_room_to_file as export_room_to_file
from .storage._transfer import import_directory as import_directory
from .storage._transfer import import_file as import_file
from .storage._transfer import import_room as import_room
from .transport._handshake import HandshakeRequest as HandshakeRequest
from .transport._listener import serve_http as serve_http
from .transport._listener import serve_websocket_stream as serve_websocket_stream
from .transport._listener import serve_websockets as serve_websockets

__version__ = "0.1.0"
