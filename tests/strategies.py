"""Hypothesis strategies for the sans-IO document and protocol: shared by the test files.

Everything here builds plain JSON-shaped Python values (dicts, lists, str, int, float,
bool, None), the shapes ``orjson.loads`` gives the server. Nothing here imports trio.

- :func:`json_values`: any JSON value, kept small.
- :func:`field_values`, :func:`buffer_deltas`, :func:`components`, :func:`patches`,
  :func:`patch_lists`: document content. By default keys and field names come from small
  pools so that random frames collide on the same records, which is where the merge rules
  matter. :func:`schema_patch_lists` writes components the way the real client does (a
  fixed set of fields per component, creations carry all of them).
- :func:`patch_frames`, :func:`reconnect_frames`, :func:`auth_refresh_frames`,
  :func:`client_frames`: valid client frames as dicts. With the default sizes every frame
  fits :data:`SMALL_LIMITS`.
- :func:`protocol_json`, :func:`mutated_frames`, :func:`mutated_texts`: hostile input.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
from hypothesis import strategies as st

from canvas_store_trio._protocol import Limits

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

SMALL_LIMITS = Limits(max_keys_per_frame=40, max_buffer_length=1000)
"""Limits small enough to hit in a test. Frames from the default strategies fit them:
at most 18 keys, and at most 18 * 3 * 12 = 648 items of zero padding from deltas
(the items a frame's deltas add beyond the values they carry share max_buffer_length);
values nest far less than ``max_depth`` (64) levels."""

KEYS = ("e1/Position", "e1/Color", "e2/Position", "e3/Shape", "SINGLETON/Camera")
"""A small pool of document keys, so random frames write the same records."""
FIELDS = ("x", "y", "color", "points", "label", "_version")
"""A small pool of field names (``_exists`` is added by :func:`components`)."""
PRESENCE_KEYS = ("alice/Cursor", "bob/Cursor", "shared/Selection", "carol/Cursor")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(I64_MIN, I64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
"""JSON scalars that orjson encodes and decodes to equal values."""


def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Any JSON value, with at most ``max_leaves`` scalars in it."""
    return st.recursive(
        json_scalars,
        lambda children: st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=max_leaves,
    )


buffer_numbers = st.integers(-1000, 1000) | st.floats(
    allow_nan=False, allow_infinity=False, width=32
)
"""Values a buffer (a typed array on the client) holds."""

buffer_arrays = st.lists(buffer_numbers, max_size=12)


def buffer_deltas(
    max_len: int = 12, max_runs: int = 4, max_run_values: int = 6
) -> st.SearchStrategy[dict[str, Any]]:
    """A valid buffer delta: ``{"__buf": 1, "len": N, "runs": [[offset, [v...]], ...]}``.

    Offsets may be negative, past ``len``, or huge; runs may overlap and straddle either
    end. All of that is valid: writes outside ``0 <= index < len`` are ignored.
    """
    offsets = st.integers(-max_run_values - 2, max_len + 2) | st.integers(I64_MIN, I64_MAX)
    runs = st.lists(
        st.tuples(offsets, st.lists(buffer_numbers, max_size=max_run_values)).map(list),
        max_size=max_runs,
    )
    return st.fixed_dictionaries(
        {"__buf": st.just(1), "len": st.integers(0, max_len), "runs": runs}
    )


_plain_json = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text("abxy_", max_size=3), children, max_size=3),
    max_leaves=4,
)
"""Small JSON whose dicts can never be taken for a buffer delta (no key is ``__buf``)."""


def field_values() -> st.SearchStrategy[Any]:
    """A field value: a JSON scalar, small JSON, a number array, or a buffer delta."""
    return st.one_of(json_scalars, _plain_json, buffer_arrays, buffer_deltas())


def components(
    fields: st.SearchStrategy[str] = st.sampled_from(FIELDS),  # noqa: B008
    exists: st.SearchStrategy[bool | None] = st.sampled_from([True, True, None, None, False]),  # noqa: B008
    max_fields: int = 3,
) -> st.SearchStrategy[dict[str, Any]]:
    """A component value in a patch: some fields, and ``_exists`` true, false or absent."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        value: dict[str, Any] = draw(
            st.dictionaries(fields, field_values(), max_size=max_fields)
        )
        value.pop("_exists", None)
        flag = draw(exists)
        if flag is not None:
            value["_exists"] = flag
        return value

    return build()


def patches(
    keys: st.SearchStrategy[str] = st.sampled_from(KEYS),  # noqa: B008
    max_keys: int = 4,
    **component_options: Any,
) -> st.SearchStrategy[dict[str, dict[str, Any]]]:
    """One patch: key -> component value."""
    return st.dictionaries(keys, components(**component_options), max_size=max_keys)


def patch_lists(
    max_patches: int = 3, **patch_options: Any
) -> st.SearchStrategy[list[dict[str, dict[str, Any]]]]:
    """The ``documentPatches`` (or ``ephemeralPatches``) of one frame. May be ``[]`` or
    hold empty patches."""
    return st.lists(patches(**patch_options), max_size=max_patches)


presence_patch_lists = patch_lists(keys=st.sampled_from(PRESENCE_KEYS))

# --- the real client's shape: fixed fields per component ----------------------------

SCHEMAS: dict[str, tuple[str, ...]] = {
    "Position": ("x", "y"),
    "Color": ("color", "_version"),
    "Shape": ("points", "label"),
    "Camera": ("x", "y", "points"),
}


@st.composite
def schema_components(draw: st.DrawFn, key: str) -> dict[str, Any]:
    """A write the way the client makes one: a creation with every field of the
    component, a deletion, or an update of some of its fields."""
    schema = SCHEMAS[key.split("/", 1)[1]]
    kind = draw(st.sampled_from(["create", "update", "update", "delete"]))
    if kind == "delete":
        return {"_exists": False}
    if kind == "create":
        names: list[str] = list(schema)
    else:
        names = draw(st.lists(st.sampled_from(schema), min_size=1, unique=True))
    value = {name: draw(field_values()) for name in names}
    if kind == "create":
        value["_exists"] = True
    return value


@st.composite
def schema_patches(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=3))
    return {key: draw(schema_components(key)) for key in keys}


schema_patch_lists = st.lists(schema_patches(), min_size=1, max_size=2)

# --- client frames ------------------------------------------------------------------

message_ids = st.integers(I64_MIN, I64_MAX) | st.text(max_size=10)
wire_keys = st.sampled_from(KEYS) | st.text(max_size=10)
"""Keys as a hostile or unusual client might spell them: any string is a valid key."""
wire_fields = st.sampled_from(FIELDS) | st.text(max_size=6)
wire_patch_lists = patch_lists(
    keys=wire_keys, fields=wire_fields, max_keys=3, max_patches=3
)
"""Patch lists with any key and field names; ``3 * 3 * 2 = 18`` keys at most a frame."""


def patch_frames() -> st.SearchStrategy[dict[str, Any]]:
    """A valid ``patch`` frame (fits :data:`SMALL_LIMITS`)."""
    return st.fixed_dictionaries(
        {"type": st.just("patch")},
        optional={
            "messageId": st.none() | message_ids,
            "documentPatches": st.none() | wire_patch_lists,
            "ephemeralPatches": st.none() | wire_patch_lists,
            "unknownField": json_values(),
        },
    )


def reconnect_frames() -> st.SearchStrategy[dict[str, Any]]:
    """A valid ``reconnect`` frame of protocol version 2 (fits :data:`SMALL_LIMITS`)."""
    return st.fixed_dictionaries(
        {
            "type": st.just("reconnect"),
            "lastTimestamp": st.integers(0, I64_MAX),
            "protocolVersion": st.just(2),
        },
        optional={
            "documentPatches": st.none() | wire_patch_lists,
            "ephemeralPatches": st.none() | wire_patch_lists,
            "unknownField": json_values(),
        },
    )


def auth_refresh_frames() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"type": st.just("auth-refresh"), "token": st.text(max_size=20)},
        optional={"unknownField": json_values()},
    )


def client_frames() -> st.SearchStrategy[dict[str, Any]]:
    """Any valid client frame, as a dict."""
    return st.one_of(patch_frames(), reconnect_frames(), auth_refresh_frames())


def encode_frame(frame: Any) -> str:
    """JSON text for a frame. Integers past 64 bits, which orjson cannot write, are
    written by the json module (orjson then reads them back as floats)."""
    try:
        return orjson.dumps(frame).decode()
    except TypeError:
        return json.dumps(frame, ensure_ascii=False)


# --- hostile input ------------------------------------------------------------------

PROTOCOL_WORDS = (
    "type", "patch", "reconnect", "auth-refresh", "messageId", "documentPatches",
    "ephemeralPatches", "lastTimestamp", "protocolVersion", "token", "_exists", "__buf",
    "len", "runs", "e1/Position", "x",
)  # fmt: skip


def protocol_json(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Random JSON that speaks the protocol's words, so it reaches deep into the parser."""
    words = st.sampled_from(PROTOCOL_WORDS)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-3, 3)
        | st.integers(I64_MIN, I64_MAX)
        | st.floats(allow_nan=False, allow_infinity=False)
        | words
        | st.text(max_size=4)
    )
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(words | st.text(max_size=3), children, max_size=4),
        max_leaves=max_leaves,
    )


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (the empty path too)."""
    out = [path]
    if type(value) is dict:
        for key, child in value.items():
            out.extend(_paths(child, (*path, key)))
    elif type(value) is list:
        for index, child in enumerate(value):
            out.extend(_paths(child, (*path, index)))
    return out


@st.composite
def mutated_frames(draw: st.DrawFn) -> Any:
    """A valid frame with one value somewhere inside it replaced, removed or added to."""
    frame = copy.deepcopy(draw(client_frames()))
    path = draw(st.sampled_from(_paths(frame)))
    if not path:
        return draw(protocol_json())
    parent = frame
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "replace":
        parent[last] = draw(protocol_json())
    elif action == "delete":
        del parent[last]
    elif type(parent[last]) is dict:
        parent[last][draw(st.sampled_from(PROTOCOL_WORDS))] = draw(protocol_json())
    elif type(parent[last]) is list:
        parent[last].insert(0, draw(protocol_json()))
    else:
        parent[last] = [parent[last]]
    return frame


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    """The text of a valid frame with a few characters deleted, inserted or replaced."""
    text = list(encode_frame(draw(client_frames())))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(text)))
        char = draw(st.sampled_from('{}[]",:0-.e\\ ') | st.characters())
        action = draw(st.sampled_from(["delete", "insert", "replace"]))
        if action == "insert" or where == len(text):
            text.insert(where, char)
        elif action == "delete":
            del text[where]
        else:
            text[where] = char
    return "".join(text)
