"""Log lines with structure: the fields each line carries, and a JSON formatter for them.

Every line the package logs names its kind in ``event`` (``frame_refused``,
``client_joined``...) and passes its facts as ``extra`` fields (``room``, ``session``,
``client``, ``code``...). The text format shows only the message, as it always has;
:class:`JSONLogFormatter` writes the fields too. The package never configures logging
itself: ``canvas-store-trio serve`` does, and an embedding app may use the formatter.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

logger = logging.getLogger("canvas_store_trio")

DEFAULT_EVENT = "log"
"""The ``event`` of a line logged without one (by another library, or an app)."""

_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
"""What every LogRecord has; anything else on a record came in through ``extra``."""


def log_event(
    level: int,
    event: str,
    message: str,
    /,
    *args: object,
    exc_info: BaseException | None = None,
    **fields: Any,
) -> None:
    """Log ``message % args`` on the package's logger, with ``event`` and ``fields`` as
    ``extra``. No record is made, and nothing formatted, when ``level`` is off. Fields
    that are None are left out of the JSON. The record names the caller (file, line,
    function) from its frame: logging's own search up the stack costs a line on the
    hot path (a join) a tenth of its time."""
    if logger.isEnabledFor(level):
        fields["event"] = event
        caller = sys._getframe(1)
        code = caller.f_code
        exc = (type(exc_info), exc_info, exc_info.__traceback__) if exc_info is not None else None
        logger.handle(logger.makeRecord(
            logger.name, level, code.co_filename, caller.f_lineno, message, args, exc,
            code.co_name, fields,
        ))


class TextLogFormatter(logging.Formatter):
    """``serve``'s text lines: local time with milliseconds, level, message. The time's
    seconds are formatted once a second, not once a line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second: int | None = None
        self._seconds_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:  # the handler's lock is held: one line at a time
            self._second = second
            self._seconds_text = time.strftime(self.default_time_format,
                                               self.converter(record.created))
        return f"{self._seconds_text},{int(record.msecs):03d}"


class JSONLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC, milliseconds), ``level``,
    ``event``, ``logger``, ``message``, then the record's ``extra`` fields (None ones
    left out), and ``exception`` (the traceback, as text) if there is one.

    Use it like any formatter: ``handler.setFormatter(JSONLogFormatter())``. Values that
    JSON has no type for are written as their ``str``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": DEFAULT_EVENT,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and value is not None:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()
