"""Wire messages, sans-IO: parse and check client frames, build server frames.

:func:`parse_client_frame` either returns a whole, checked message or raises
:class:`ProtocolError`; it never raises anything else, whatever bytes come in. A frame
is checked in full before the room sees it, so a frame with one bad entry among many
is refused whole and nothing of it is applied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
import orjson

from ._document import Patch, is_buffer_delta

PROTOCOL_VERSION: Final = 2
"""The sync protocol version spoken; a ``reconnect`` with another gets ``version-mismatch``."""

MessageId = str | int | float


def _limit(default: Any, help: str) -> Any:
    return attrs.field(default=default, metadata={"help": help})


@attrs.frozen
class Limits:
    """Bounds on what one client may send or hold. Every default fits a legitimate client.

    The defaults are sized for a 100k-component document sent as one frame (the client's
    ``seedRoom`` and its offline buffer both do that), and for the benchmark's load
    shapes (50 editors in one room, 1000 rooms, tens of thousands of frames a second).
    Each field is also a ``serve`` option: ``max_rooms`` is ``--max-rooms``.
    """

    max_message_size: int = _limit(
        64 * 1024 * 1024, "bytes in one incoming frame; a larger one closes with 1009"
    )
    max_keys_per_frame: int = _limit(
        1_000_000, "keys summed over every patch of one frame, document and presence"
    )
    max_buffer_length: int = _limit(
        4_000_000, "the len of a buffer delta, and the values its runs carry in all"
    )
    max_ephemeral_keys: int = _limit(10_000, "presence keys one client may hold in a room")
    max_sessions_per_room: int = _limit(1_000, "sessions in one room; the next closes with 1013")
    max_rooms: int = _limit(
        100_000, "rooms open at once; a connection needing one more closes with 1013"
    )
    outbox_max_bytes: int = _limit(
        64 * 1024 * 1024,
        "bytes queued for one slow client before it is closed with 1008 "
        "(one larger frame is still sent when nothing else is queued)",
    )
    max_invalid_frames: int = _limit(
        10,
        "refused frames a session may send within --invalid-frame-window seconds "
        "before it is closed with 1008",
    )
    invalid_frame_window: float = _limit(60.0, "seconds over which refused frames count")
    rate_limit: float | None = _limit(
        None,
        "frames per second one session may send on average; over it the session is "
        "closed with 1008",
    )
    rate_burst: int = _limit(100, "frames a session may send at once before --rate-limit applies")
    max_depth: int = _limit(
        64, "levels of arrays and objects a field value may nest (deeper: an error frame)"
    )
    ping_interval: float | None = _limit(
        30.0, "seconds between pings to each client ('off' for none)"
    )
    ping_timeout: float = _limit(
        30.0, "seconds a client has to answer a ping before it is dropped as dead"
    )


def _as_int(value: object) -> int | None:
    """An integer, also when written as an integral float (``2.0``); else None.

    JavaScript has one number type, so a client may send either; booleans are not
    numbers here.
    """
    if type(value) is int:
        number = value
    elif type(value) is float and value.is_integer():
        number = int(value)
    else:
        return None
    return number if -(2**63) <= number < 2**63 else None  # what can be encoded again


class ProtocolError(Exception):
    """A client frame that is refused whole. ``code`` is stable; ``message`` is for people."""

    def __init__(self, code: str, message: str, message_id: MessageId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.message_id = message_id


@attrs.frozen
class PatchMessage:
    message_id: MessageId | None
    document_patches: Sequence[Patch]
    ephemeral_patches: Sequence[Patch]


@attrs.frozen
class ReconnectMessage:
    last_timestamp: int
    protocol_version: object
    document_patches: Sequence[Patch]
    ephemeral_patches: Sequence[Patch]

    @property
    def version_matches(self) -> bool:
        return _as_int(self.protocol_version) == PROTOCOL_VERSION


@attrs.frozen
class AuthRefreshMessage:
    token: str


ClientMessage = PatchMessage | ReconnectMessage | AuthRefreshMessage


@attrs.define
class _Budget:
    """What is left of one frame's allowances while its patches are checked."""

    keys: int
    padding: int
    """Items the frame's buffer deltas may still add beyond the values they carry."""


def _check_buffer_delta(field: str, delta: dict[str, Any], limits: Limits, budget: _Budget) -> None:
    length = _as_int(delta.get("len"))
    if length is None or not 0 <= length <= limits.max_buffer_length:
        raise ProtocolError(
            "invalid-buffer-delta",
            f"buffer delta {field}: 'len' must be an integer from 0 to {limits.max_buffer_length}",
        )
    runs = delta.get("runs")
    if type(runs) is not list:
        raise ProtocolError("invalid-buffer-delta", f"buffer delta {field}: 'runs' must be a list")
    delta["len"] = length
    carried = 0
    for run in runs:
        offset = _as_int(run[0]) if type(run) is list and len(run) == 2 else None
        if offset is None or type(run[1]) is not list:
            raise ProtocolError(
                "invalid-buffer-delta",
                f"buffer delta {field}: each run must be [integer offset, [numbers...]]",
            )
        run[0] = offset
        values = run[1]
        carried += len(values)
        if carried > limits.max_buffer_length:
            raise ProtocolError(
                "invalid-buffer-delta",
                f"buffer delta {field}: runs carry more than {limits.max_buffer_length} values",
            )
        if not all(type(v) is int or type(v) is float for v in values):
            raise ProtocolError(
                "invalid-buffer-delta", f"buffer delta {field}: run values must be numbers"
            )
    # A few bytes of `len` must not become gigabytes of zeros: the items a frame's deltas
    # add beyond the values they carry (which the frame size bounds) share one allowance.
    budget.padding -= max(0, length - carried)
    if budget.padding < 0:
        raise ProtocolError(
            "invalid-buffer-delta",
            f"buffer delta {field}: the buffer deltas of one frame may add at most "
            f"{limits.max_buffer_length} items beyond the values they carry",
        )


def _short(text: str, limit: int = 80) -> str:
    """A key or field name for an error message: quoted, and cut if long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _deeper_than(value: object, depth: int) -> bool:
    """Whether containers nest more than ``depth`` levels inside ``value``."""
    kind = type(value)
    if kind is dict:
        children: Iterable[object] = value.values()  # type: ignore[attr-defined]
    elif kind is list:
        children = value  # type: ignore[assignment]
    else:
        return False
    if depth <= 0:
        return True
    return any(
        _deeper_than(child, depth - 1)
        for child in children
        if type(child) is dict or type(child) is list
    )


def _check_patches(name: str, patches: object, limits: Limits, budget: _Budget) -> None:
    """Check a list of patches against the frame's budget. Raise ProtocolError if bad."""
    if patches is None:
        return
    if type(patches) is not list:
        raise ProtocolError("invalid-frame", f"'{name}' must be a list of objects")
    for patch in patches:
        if type(patch) is not dict:
            raise ProtocolError("invalid-frame", f"each entry of '{name}' must be an object")
        budget.keys -= len(patch)
        if budget.keys < 0:
            raise ProtocolError(
                "too-many-keys", f"a frame may hold at most {limits.max_keys_per_frame} keys"
            )
        for key, value in patch.items():
            if type(value) is not dict:
                raise ProtocolError(
                    "invalid-component", f"{_short(key)}: a component must be an object"
                )
            exists = value.get("_exists", True)
            if exists is not True and exists is not False:
                raise ProtocolError(
                    "invalid-component", f"{_short(key)}: '_exists' must be a boolean"
                )
            for field, field_value in value.items():
                if type(field_value) is not dict and type(field_value) is not list:
                    continue  # a scalar: nothing to check
                if _deeper_than(field_value, limits.max_depth):
                    raise ProtocolError(
                        "too-deep",
                        f"{_short(key)}.{_short(field)}: values may nest at most "
                        f"{limits.max_depth} levels",
                    )
                if is_buffer_delta(field_value):
                    _check_buffer_delta(
                        f"{_short(key)}.{_short(field)}", field_value, limits, budget
                    )


def _message_id(frame: Mapping[str, Any]) -> MessageId | None:
    message_id = frame.get("messageId")
    return message_id if _is_message_id(message_id) else None


def _is_message_id(value: object) -> bool:
    return value is None or type(value) in (str, int, float)


def parse_client_frame(data: str | bytes, limits: Limits) -> ClientMessage:
    """Parse one client frame and check all of it. Raise :class:`ProtocolError` if bad."""
    if not isinstance(data, str):
        raise ProtocolError("binary-frame", "frames must be UTF-8 text, not binary")
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in exc.msg:
            raise ProtocolError("invalid-json", f"not valid JSON: {exc.msg}") from None
        frame = _loads_with_lone_surrogates(data)
    if type(frame) is not dict:
        raise ProtocolError("invalid-frame", "a frame must be a JSON object")
    kind = frame.get("type")
    try:
        if kind == "patch":
            return _parse_patch(frame, limits)
        if kind == "reconnect":
            return _parse_reconnect(frame, limits)
        if kind == "auth-refresh":
            token = frame.get("token")
            if type(token) is not str:
                raise ProtocolError("invalid-frame", "'token' must be a string")
            return AuthRefreshMessage(token)
    except ProtocolError as exc:
        exc.message_id = _message_id(frame)
        raise
    if kind is None:
        raise ProtocolError("invalid-frame", "the frame has no 'type'", _message_id(frame))
    shown = _short(kind) if type(kind) is str else f"of JSON type {type(kind).__name__}"
    raise ProtocolError("unknown-type", f"unknown frame type {shown}", _message_id(frame))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _loads_with_lone_surrogates(text: str) -> Any:
    """Parse JSON whose strings hold lone UTF-16 surrogates (``"\\ud83d"``).

    JavaScript's JSON.stringify writes them (a label cut in the middle of an emoji),
    but they have no UTF-8 form, so nothing could send or save them again: each
    becomes U+FFFD, the replacement character. The slow path, taken only for them.
    """
    try:
        text = json.dumps(json.loads(text), ensure_ascii=False)
        return orjson.loads(_LONE_SURROGATE.sub("\ufffd", text))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("invalid-json", f"not valid JSON: {exc}") from None


def _parse_patch(frame: dict[str, Any], limits: Limits) -> PatchMessage:
    message_id = frame.get("messageId")
    if not _is_message_id(message_id):
        raise ProtocolError("invalid-frame", "'messageId' must be a string or a number")
    document, ephemeral = _parse_patch_lists(frame, limits)
    return PatchMessage(message_id, document, ephemeral)


def _parse_reconnect(frame: dict[str, Any], limits: Limits) -> ReconnectMessage:
    version = frame.get("protocolVersion")
    last = frame.get("lastTimestamp")
    if _as_int(version) != PROTOCOL_VERSION:
        # A client of another protocol version may speak another frame format:
        # it is answered with version-mismatch, not judged by this one.
        return ReconnectMessage(0, version, (), ())
    last = _as_int(last)
    if last is None or last < 0:
        raise ProtocolError("invalid-frame", "'lastTimestamp' must be a non-negative integer")
    document, ephemeral = _parse_patch_lists(frame, limits)
    return ReconnectMessage(last, version, document, ephemeral)


def _parse_patch_lists(
    frame: dict[str, Any], limits: Limits
) -> tuple[Sequence[Patch], Sequence[Patch]]:
    document = frame.get("documentPatches")
    ephemeral = frame.get("ephemeralPatches")
    budget = _Budget(limits.max_keys_per_frame, limits.max_buffer_length)
    _check_patches("documentPatches", document, limits, budget)
    _check_patches("ephemeralPatches", ephemeral, limits, budget)
    return document or (), ephemeral or ()


# --- server frames -----------------------------------------------------------------
# Built as dicts in the Node server's key order, encoded once with orjson, and sent
# as text. A broadcast is encoded once for every recipient.


encode: Callable[[Mapping[str, Any]], bytes] = orjson.dumps


def ack_frame(message_id: MessageId | None, timestamp: int) -> bytes:
    if message_id is None:
        return encode({"type": "ack", "timestamp": timestamp})
    return encode({"type": "ack", "messageId": message_id, "timestamp": timestamp})


def patch_frame(
    client_id: str,
    document_patches: Sequence[Patch] | None = None,
    timestamp: int | None = None,
    ephemeral_patches: Sequence[Patch] | None = None,
) -> bytes:
    frame: dict[str, Any] = {"type": "patch", "clientId": client_id}
    if document_patches:
        frame["documentPatches"] = document_patches
        frame["timestamp"] = timestamp
    if ephemeral_patches:
        frame["ephemeralPatches"] = ephemeral_patches
    return encode(frame)


def presence_frame(client_id: str, ephemeral: Patch) -> bytes:
    """Presence alone, in the order the Node server writes it (patches before clientId)."""
    return encode({"type": "patch", "ephemeralPatches": [ephemeral], "clientId": client_id})


def client_count_frame(count: int) -> bytes:
    return encode({"type": "clientCount", "count": count})


def resync_frame(since: int) -> bytes:
    return encode({"type": "resync", "since": since})


def synced_frame(timestamp: int) -> bytes:
    return encode({"type": "synced", "timestamp": timestamp})


def version_mismatch_frame() -> bytes:
    return encode({"type": "version-mismatch", "serverProtocolVersion": PROTOCOL_VERSION})


def error_frame(error: ProtocolError) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message}
    if error.message_id is not None:
        frame["messageId"] = error.message_id
    return encode(frame)
