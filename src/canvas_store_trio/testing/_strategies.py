"""Hypothesis strategies for documents, snapshots and client frames.

Everything here builds plain JSON-shaped Python values (dicts, lists, str, int, float,
bool, None), the shapes ``orjson.loads`` gives the server, except :func:`snapshots`,
which builds :class:`~canvas_store_trio.Snapshot` objects. Nothing here imports trio.

By default keys and field names come from small pools (:data:`KEYS`, :data:`FIELDS`), so
that random frames collide on the same records, which is where the merge rules matter.
With the default sizes every frame fits :data:`SMALL_LIMITS`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
from hypothesis import strategies as st

from .._document import Patch, Snapshot
from .._protocol import Limits
from ._model import ReferenceModel

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
"""A small pool of field names (``_exists`` is added by :func:`patches` itself)."""
PRESENCE_KEYS = ("alice/Cursor", "bob/Cursor", "shared/Selection", "carol/Cursor")
"""A small pool of presence keys, for ``ephemeralPatches``."""
SCHEMAS: Mapping[str, tuple[str, ...]] = {
    "Position": ("x", "y"),
    "Color": ("color", "_version"),
    "Shape": ("points", "label"),
    "Camera": ("x", "y", "points"),
}
"""Component name -> its fields, for the components of :data:`KEYS`
(``patches(schemas=SCHEMAS)``)."""

FrameType = Literal["patch", "reconnect", "auth-refresh"]
HostileKind = Literal["mutated", "garbled", "noise"]

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


def _pool(names: Sequence[str] | st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return names if isinstance(names, st.SearchStrategy) else st.sampled_from(names)


_EXISTS: st.SearchStrategy[bool | None] = st.sampled_from([True, True, None, None, False])


@st.composite
def _components(
    draw: st.DrawFn,
    fields: st.SearchStrategy[str],
    values: st.SearchStrategy[Any],
    exists: st.SearchStrategy[bool | None],
    max_fields: int,
) -> dict[str, Any]:
    """A component value in a patch: some fields, and ``_exists`` true, false or absent."""
    value: dict[str, Any] = draw(st.dictionaries(fields, values, max_size=max_fields))
    value.pop("_exists", None)
    flag = draw(exists)
    if flag is not None:
        value["_exists"] = flag
    return value


@st.composite
def _schema_component(
    draw: st.DrawFn, schema: Sequence[str], values: st.SearchStrategy[Any]
) -> dict[str, Any]:
    """A write the way the client makes one: a creation with every field of the
    component, a deletion, or an update of some of its fields."""
    kind = draw(st.sampled_from(["create", "update", "update", "delete"]))
    if kind == "delete":
        return {"_exists": False}
    names = list(schema)
    if kind == "update":
        names = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    value = {name: draw(values) for name in names}
    if kind == "create":
        value["_exists"] = True
    return value


@st.composite
def _schema_patch(
    draw: st.DrawFn,
    keys: st.SearchStrategy[str],
    schemas: Mapping[str, Sequence[str]],
    values: st.SearchStrategy[Any],
    max_keys: int,
) -> Patch:
    chosen = draw(st.lists(keys, unique=True, max_size=max_keys))
    return {
        key: draw(_schema_component(schemas[key.rsplit("/", 1)[-1]], values)) for key in chosen
    }


def patches(
    keys: Sequence[str] | st.SearchStrategy[str] = KEYS,
    *,
    fields: Sequence[str] | st.SearchStrategy[str] = FIELDS,
    values: st.SearchStrategy[Any] | None = None,
    exists: st.SearchStrategy[bool | None] = _EXISTS,
    max_keys: int = 4,
    max_fields: int = 3,
    schemas: Mapping[str, Sequence[str]] | None = None,
) -> st.SearchStrategy[Patch]:
    """One document patch, ``key -> component value``: a ``documentPatches`` entry.

    - ``keys``, ``fields``: the key space and the field names, as a sequence to pick from
      or a strategy. Small pools (the default) make writes collide.
    - ``values``: the field values (default :func:`field_values`: JSON, number arrays
      and buffer deltas; ``values=st.integers()`` for plain numbers).
    - ``exists``: ``_exists`` of each component, where None leaves it out. The default
      mixes creations and re-creations (``True``), partial writes (absent) and
      tombstones (``False``); a partial write to a missing or dead key is dropped.
    - ``schemas``: component name (after the last ``/`` of a key) -> its fields. The
      writes then have the real client's shape: a creation carries every field, an
      update some, a deletion none (``fields``, ``exists`` and ``max_fields`` unused).
    """
    key_pool = _pool(keys)
    value_strategy = field_values() if values is None else values
    if schemas is not None:
        return _schema_patch(key_pool, schemas, value_strategy, max_keys)
    return st.dictionaries(
        key_pool,
        _components(_pool(fields), value_strategy, exists, max_fields),
        max_size=max_keys,
    )


def patch_lists(
    max_patches: int = 3, *, min_patches: int = 0, **patch_options: Any
) -> st.SearchStrategy[list[Patch]]:
    """The ``documentPatches`` (or ``ephemeralPatches``) of one frame: a list of
    :func:`patches` (``patch_options`` go to it). It may hold empty patches."""
    return st.lists(patches(**patch_options), min_size=min_patches, max_size=max_patches)


presence_patch_lists = patch_lists(keys=PRESENCE_KEYS)


def snapshots(
    *, reachable: bool = True, max_frames: int = 8, **patch_options: Any
) -> st.SearchStrategy[Snapshot]:
    """A room's persistent state, as a storage's ``load()`` returns it.

    With ``reachable`` (the default) it is what a room holds after up to ``max_frames``
    random frames (``patch_options`` go to :func:`patches`), as
    :class:`~canvas_store_trio.testing.ReferenceModel` computes it: tombstones, field
    timestamps and the room timestamp agree. Without, it is any snapshot a storage may
    hand back (any keys, records and timestamps, unrelated to each other).
    """
    if not reachable:
        return st.builds(
            Snapshot,
            st.integers(0, 2**40),
            st.dictionaries(
                st.text(max_size=8),
                st.dictionaries(st.text(max_size=5), field_values(), max_size=3)
                | st.just({"_exists": False}),
                max_size=4,
            ),
            st.dictionaries(
                st.text(max_size=8),
                st.dictionaries(st.text(max_size=5), st.integers(0, 2**40), max_size=3),
                max_size=4,
            ),
        )

    def replay(frames: list[list[Patch]]) -> Snapshot:
        model = ReferenceModel()
        for frame in frames:
            model.apply(frame)
        return model.snapshot()

    return st.lists(patch_lists(**patch_options), max_size=max_frames).map(replay)


# --- client frames ------------------------------------------------------------------

message_ids = st.integers(I64_MIN, I64_MAX) | st.text(max_size=10)
wire_keys = st.sampled_from(KEYS) | st.text(max_size=10)
"""Keys as a hostile or unusual client might spell them: any string is a valid key."""
wire_fields = st.sampled_from(FIELDS) | st.text(max_size=6)
wire_patch_lists = patch_lists(keys=wire_keys, fields=wire_fields, max_keys=3, max_patches=3)
"""Patch lists with any key and field names; ``3 * 3 * 2 = 18`` keys at most a frame."""


def frames(
    *types: FrameType,
    document_patches: st.SearchStrategy[list[Patch]] = wire_patch_lists,
    ephemeral_patches: st.SearchStrategy[list[Patch]] = wire_patch_lists,
    last_timestamps: st.SearchStrategy[int] = st.integers(0, I64_MAX),  # noqa: B008
) -> st.SearchStrategy[dict[str, Any]]:
    """A valid client frame, as a dict: of the ``types`` given (all three by default).

    ``patch`` frames may lack ``messageId`` or either patch list, or hold ``null`` for
    them. ``reconnect`` frames are of protocol version 2. Any frame may carry an unknown
    field. By default keys and field names are mostly from the small pools, sometimes any
    string, and every frame fits :data:`SMALL_LIMITS`. Send one with :func:`encode_frame`.
    """
    maybe_patches = {
        "documentPatches": st.none() | document_patches,
        "ephemeralPatches": st.none() | ephemeral_patches,
    }
    unknown = {"unknownField": json_values()}
    strategies = {
        "patch": st.fixed_dictionaries(
            {"type": st.just("patch")},
            optional={"messageId": st.none() | message_ids, **maybe_patches, **unknown},
        ),
        "reconnect": st.fixed_dictionaries(
            {
                "type": st.just("reconnect"),
                "lastTimestamp": last_timestamps,
                "protocolVersion": st.just(2),
            },
            optional={**maybe_patches, **unknown},
        ),
        "auth-refresh": st.fixed_dictionaries(
            {"type": st.just("auth-refresh"), "token": st.text(max_size=20)},
            optional=unknown,
        ),
    }
    return st.one_of([strategies[kind] for kind in types or strategies])


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
    frame = copy.deepcopy(draw(frames()))
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
    text = list(encode_frame(draw(frames())))
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


def hostile_frames(*kinds: HostileKind) -> st.SearchStrategy[str]:
    """The text of a frame a broken or hostile client might send (all kinds by default):

    - ``"mutated"``: a valid frame with one value inside it replaced, removed or added
      to (often still valid: a server must then accept it whole);
    - ``"garbled"``: a valid frame's text with a few characters changed (mostly not JSON);
    - ``"noise"``: random JSON in the protocol's words, and random text.

    A server must refuse each whole or accept it whole, and never fail for it.
    """
    strategies: dict[HostileKind, st.SearchStrategy[str]] = {
        "mutated": mutated_frames().map(encode_frame),
        "garbled": mutated_texts(),
        "noise": protocol_json().map(encode_frame) | st.text(max_size=40),
    }
    return st.one_of([strategies[kind] for kind in kinds or strategies])
