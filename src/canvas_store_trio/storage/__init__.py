"""Where rooms keep their documents: the ``Storage`` protocols and every backend.

``_base`` holds the protocols and memory; ``_files`` the Node-compatible snapshot files
and ``_journal`` their append-only journal of durable commits;
``_sql``, ``_sqlite`` and ``_postgres`` the databases; ``_backends`` opens a backend from a
``--data-dir`` or ``--storage`` URL; ``_transfer`` copies rooms between them; ``_history``
lists and restores the versions a room keeps.
"""

from ._backends import FileBackend as FileBackend
from ._backends import MemoryBackend as MemoryBackend
from ._backends import StorageBackend as StorageBackend
from ._backends import open_storage_backend as open_storage_backend
from ._base import CommitGroup as CommitGroup
from ._base import HistoryStorage as HistoryStorage
from ._base import IncrementalStorage as IncrementalStorage
from ._base import JournalStorage as JournalStorage
from ._base import MemoryStorage as MemoryStorage
from ._base import Storage as Storage
from ._base import StorageError as StorageError
from ._base import StreamingStorage as StreamingStorage
from ._base import VersionInfo as VersionInfo
from ._files import FileStorage as FileStorage
from ._history import restore_version as restore_version
from ._postgres import PostgresDatabase as PostgresDatabase
from ._postgres import PostgresStorage as PostgresStorage
from ._sqlite import SQLiteDatabase as SQLiteDatabase
from ._sqlite import SQLiteStorage as SQLiteStorage
from ._transfer import TransferError as TransferError
from ._transfer import copy_rooms as copy_rooms
from ._transfer import export_room as export_room
from ._transfer import export_room_to_file as export_room_to_file
from ._transfer import import_directory as import_directory
from ._transfer import import_file as import_file
from ._transfer import import_room as import_room
