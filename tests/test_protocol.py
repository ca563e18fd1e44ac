"""Property tests of parse_client_frame: it returns a whole, checked message or raises
ProtocolError, whatever comes in, and what it returns is safe to apply and send on."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canvas_store_trio._document import Document, EphemeralState, encode_snapshot
from canvas_store_trio._protocol import (
    AuthRefreshMessage,
    Limits,
    PatchMessage,
    ProtocolError,
    ReconnectMessage,
    error_frame,
    parse_client_frame,
    patch_frame,
    presence_frame,
)
from canvas_store_trio.testing import (
    SMALL_LIMITS,
    buffer_deltas,
    encode_frame,
    frames,
    hostile_frames,
    json_values,
)
from canvas_store_trio.testing._strategies import message_ids, mutated_frames, protocol_json

FUZZ = settings(max_examples=200, deadline=None, report_multiple_bugs=False)
SOME = settings(max_examples=60, deadline=None, report_multiple_bugs=False)

MESSAGES = (PatchMessage, ReconnectMessage, AuthRefreshMessage)
CODES = {
    "binary-frame",
    "invalid-json",
    "invalid-frame",
    "unknown-type",
    "invalid-component",
    "invalid-buffer-delta",
    "too-many-keys",
    "too-deep",
}


def is_two(value: object) -> bool:
    """2 as JavaScript sees it: the number 2, however written (2 or 2.0), not true."""
    return type(value) in (int, float) and value == 2


def parse(data: str | bytes, limits: Limits = SMALL_LIMITS) -> Any:
    """The message, or the ProtocolError. Any other exception fails the test."""
    try:
        message = parse_client_frame(data, limits)
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        assert exc.message_id is None or type(exc.message_id) in (str, int, float)
        assert orjson.loads(error_frame(exc))["code"] == exc.code  # the reply encodes
        return exc
    assert type(message) in MESSAGES, message
    return message


def refused(data: str | bytes, limits: Limits = SMALL_LIMITS) -> ProtocolError:
    result = parse(data, limits)
    assert isinstance(result, ProtocolError), f"accepted: {result!r}"
    return result


def assert_safe_to_use(message: Any) -> None:
    """What parse_client_frame returns, a room can apply and send on without error."""
    if type(message) is AuthRefreshMessage:
        assert type(message.token) is str
        return
    if type(message) is ReconnectMessage and not message.version_matches:
        return
    for patches in (message.document_patches, message.ephemeral_patches):
        assert all(type(p) is dict and all(type(v) is dict for v in p.values()) for p in patches)
    doc = Document()
    doc.apply([{"k/c": {"_exists": True, "x": [1, 2]}}])
    # twice: first on whatever state there is, then over the frame's own records
    for _ in range(2):
        doc.apply(message.document_patches)
        doc.apply([{k: {"_exists": True, **v} for p in message.document_patches
                    for k, v in p.items()}])
    presence = EphemeralState()
    presence.apply("c", message.ephemeral_patches)
    presence.apply("c", message.ephemeral_patches)
    encode_snapshot(doc.snapshot())
    patch_frame("c", message.document_patches, doc.timestamp, message.ephemeral_patches)
    patch_frame("", [doc.diff_since(0)], doc.timestamp, [presence.snapshot_for("other")])
    presence_frame("", presence.snapshot_for("other"))


# --- the fuzz -----------------------------------------------------------------------

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


def check_anything(data: str | bytes) -> None:
    result = parse(data)
    if not isinstance(result, ProtocolError):
        assert_safe_to_use(result)


@FUZZ
@given(st.binary(max_size=64) | st.text(st.characters() | surrogates, max_size=40))
def test_parse_of_random_bytes_or_text_returns_or_raises_protocol_error(
    data: str | bytes,
) -> None:
    check_anything(data)


@FUZZ
@given(hostile_frames())
def test_parse_of_hostile_frames_returns_or_raises_protocol_error(text: str) -> None:
    """Random JSON in the protocol's words, valid frames with one value replaced, removed
    or added to, and their text garbled. Whatever parse returns can be applied and sent
    on."""
    check_anything(text)


@FUZZ
@given(protocol_json() | mutated_frames())
def test_parse_of_random_json_escaped_returns_or_raises_protocol_error(value: Any) -> None:
    """The same JSON with every non-ASCII character escaped, as some clients send it."""
    check_anything(json.dumps(value))


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"patch","documentPatches":[{"k":{"_exists":true,"x":NaN}}]}',
        '{"type":"patch","documentPatches":[{"k":{"x":-Infinity}}]}',
        '{"type":"reconnect","protocolVersion":2,"lastTimestamp":Infinity}',
    ],
)
def test_nan_and_infinity_are_invalid_json(text: str) -> None:
    assert refused(text).code == "invalid-json"


@FUZZ
@given(mutated_frames())
def test_mutated_frames_are_refused_or_accepted_whole(frame: Any) -> None:
    """A mutation either keeps the frame valid (the message is then the frame's content)
    or gets it refused; never a message that holds something the checks refuse."""
    result = parse(encode_frame(frame))
    if isinstance(result, ProtocolError):
        return
    assert_safe_to_use(result)
    assert type(frame) is dict
    if type(result) is PatchMessage:
        assert frame["type"] == "patch"
        assert list(result.document_patches) == (frame.get("documentPatches") or [])
        assert list(result.ephemeral_patches) == (frame.get("ephemeralPatches") or [])
    elif type(result) is ReconnectMessage:
        assert frame["type"] == "reconnect"
        assert result.version_matches == is_two(frame.get("protocolVersion"))
    else:
        assert frame["type"] == "auth-refresh"
        assert result.token == frame["token"]


# --- valid frames -------------------------------------------------------------------


def assert_round_trips(frame: dict[str, Any], message: Any) -> None:
    document = frame.get("documentPatches") or []
    ephemeral = frame.get("ephemeralPatches") or []
    if frame["type"] == "patch":
        assert type(message) is PatchMessage
        assert message.message_id == frame.get("messageId")
        assert list(message.document_patches) == document
        assert list(message.ephemeral_patches) == ephemeral
    elif frame["type"] == "reconnect":
        assert type(message) is ReconnectMessage
        assert message.version_matches is True
        assert message.protocol_version == 2
        assert message.last_timestamp == frame["lastTimestamp"]
        assert list(message.document_patches) == document
        assert list(message.ephemeral_patches) == ephemeral
    else:
        assert message == AuthRefreshMessage(frame["token"])


@FUZZ
@given(frames())
def test_valid_frames_are_accepted_and_round_trip(frame: dict[str, Any]) -> None:
    message = parse_client_frame(encode_frame(frame), SMALL_LIMITS)
    assert_round_trips(frame, message)
    assert_safe_to_use(message)
    # the default limits accept whatever the small ones do
    assert parse_client_frame(encode_frame(frame), Limits()) == message


@SOME
@given(frames())
def test_binary_frames_are_refused_even_when_valid(frame: dict[str, Any]) -> None:
    assert refused(orjson.dumps(frame)).code == "binary-frame"


@SOME
@given(st.binary(max_size=64) | st.builds(bytearray, st.binary(max_size=8)))
def test_binary_garbage_is_refused(data: bytes) -> None:
    assert refused(data).code == "binary-frame"


# --- each kind of invalid input -----------------------------------------------------


@SOME
@given(frames(), st.integers(1, 5))
def test_truncated_json_is_invalid_json(frame: dict[str, Any], cut: int) -> None:
    text = encode_frame(frame)
    assert refused(text[: max(len(text) - cut, 0)]).code == "invalid-json"


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", "nul", "NaN", "Infinity", "[1,]", "{'type': 'patch'}", '{"type":"patch",}',
     "1e400", '{"type":"patch"} x'],
)
def test_non_json_is_invalid_json(text: str) -> None:
    assert refused(text).code == "invalid-json"


@SOME
@given(json_values().filter(lambda v: type(v) is not dict))
def test_non_object_json_is_invalid_frame(value: Any) -> None:
    assert refused(encode_frame(value)).code == "invalid-frame"


@SOME
@given(
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), json_values(), max_size=4),
    st.none() | st.just("absent"),
)
def test_missing_type_is_invalid_frame(frame: dict[str, Any], kind: Any) -> None:
    if kind is None:
        frame["type"] = None
    assert refused(encode_frame(frame)).code == "invalid-frame"


@SOME
@given(
    (json_values() | st.sampled_from(["Patch", "patch ", "ack", "synced", "auth_refresh"]))
    .filter(lambda v: v not in ("patch", "reconnect", "auth-refresh") and v is not None),
    st.none() | message_ids | st.floats(allow_nan=False, allow_infinity=False),
)
def test_unknown_type_is_refused(kind: Any, message_id: Any) -> None:
    error = refused(encode_frame({"type": kind, "messageId": message_id}))
    assert error.code == "unknown-type"
    assert error.message_id == message_id


# Bad entries, each with the code it must be refused with. Each is put among good
# entries of a valid frame (see test_one_bad_entry_among_good_ones_refuses_the_frame).

not_objects = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
    st.text(max_size=4),
    st.lists(json_values(), max_size=3),
)  # fmt: skip
not_booleans = json_values().filter(lambda v: v is not True and v is not False)
not_lists = json_values().filter(lambda v: type(v) is not list)
numbers = st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False)
fractions = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
"""Floats that are not integers. An integral float (3.0) is an integer to JavaScript,
and is accepted wherever an integer is expected."""
bad_lens = st.one_of(
    st.integers(-(2**63), -1),
    st.integers(min_value=SMALL_LIMITS.max_buffer_length + 1, max_value=2**63),
    fractions,
    st.sampled_from([-1.0, SMALL_LIMITS.max_buffer_length + 1.0, 1e300, -0.5]),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 3), max_size=2),
    st.just({"n": 3}),
)
bad_runs = st.one_of(
    not_lists,  # runs is not a list
    st.lists(not_lists, min_size=1, max_size=2),  # a run is not a list
    # wrong arity
    st.lists(st.lists(st.integers(0, 3), max_size=1) | st.lists(st.integers(0, 3),
             min_size=3, max_size=4), min_size=1, max_size=2),
    # offset not an integer
    st.tuples(
        fractions | st.text(max_size=2) | st.none() | st.booleans() | st.lists(numbers, max_size=1),
        st.lists(numbers, max_size=3),
    ).map(lambda run: [list(run)]),
    # values not a list
    st.tuples(st.integers(0, 3), not_lists).map(lambda run: [list(run)]),
    # a value not a number
    st.tuples(
        st.integers(0, 3),
        st.lists(numbers, max_size=2).flatmap(
            lambda good: (st.text(max_size=2) | st.none() | st.booleans()
                          | st.lists(numbers, max_size=1) | st.just({})).map(
                lambda bad: [*good, bad])
        ),
    ).map(lambda run: [list(run)]),
    # more values than max_buffer_length in all
    st.integers(1, 3).map(
        lambda n: [[0, [0] * (SMALL_LIMITS.max_buffer_length // n + 1)] for _ in range(n)]
    ),
)


@st.composite
def bad_components(draw: st.DrawFn) -> tuple[Any, str]:
    """(component value, code): a component the parser must refuse."""
    kind = draw(st.sampled_from(["not-object", "exists", "len", "runs"]))
    if kind == "not-object":
        return draw(not_objects), "invalid-component"
    if kind == "exists":
        return {"_exists": draw(not_booleans), "x": 1}, "invalid-component"
    delta = draw(buffer_deltas())
    if kind == "len":
        delta["len"] = draw(bad_lens)
    else:
        delta["runs"] = draw(bad_runs)
    return {"x": 1, "points": delta}, "invalid-buffer-delta"


@st.composite
def frames_with_a_bad_entry(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid patch or reconnect frame with one bad entry put somewhere inside it:
    a bad component in a patch, or a patch or patch list that is not one."""
    frame = copy.deepcopy(draw(frames("patch", "reconnect")))
    which = draw(st.sampled_from(["documentPatches", "ephemeralPatches"]))
    patches = frame.get(which) or []
    where = draw(st.sampled_from(["component", "component", "patch", "list"]))
    if where == "list":
        frame[which] = draw(not_lists.filter(lambda v: v is not None))
        return frame, "invalid-frame"
    if where == "patch":
        patches.insert(draw(st.integers(0, len(patches))), draw(not_objects))
        frame[which] = patches
        return frame, "invalid-frame"
    value, code = draw(bad_components())
    if not patches or draw(st.booleans()):
        patches.insert(draw(st.integers(0, len(patches))), {})
    patch = patches[draw(st.integers(0, len(patches) - 1))]
    items = list(patch.items())
    items.insert(draw(st.integers(0, len(items))), (draw(st.text(max_size=5)) + "/bad", value))
    patch.clear()
    patch.update(items)
    frame[which] = patches
    return frame, code


@FUZZ
@given(frames_with_a_bad_entry())
def test_one_bad_entry_among_good_ones_refuses_the_frame(case: tuple[dict[str, Any], str]) -> None:
    frame, code = case
    error = refused(encode_frame(frame))
    assert error.code == code
    if frame["type"] == "patch":  # the error frame can name the refused message
        assert error.message_id == frame.get("messageId")


@SOME
@given(bad_components())
def test_bad_components_are_refused_alone_too(case: tuple[Any, str]) -> None:
    value, code = case
    for kind in ("documentPatches", "ephemeralPatches"):
        frame = {"type": "patch", "messageId": 7, kind: [{"e1/Position": value}]}
        error = refused(encode_frame(frame))
        assert (error.code, error.message_id) == (code, 7)


OVER = SMALL_LIMITS.max_buffer_length + 1


@pytest.mark.parametrize(
    ("component", "code"),
    [
        (None, "invalid-component"),
        ("hi", "invalid-component"),
        ([1, 2], "invalid-component"),
        ({"_exists": "yes"}, "invalid-component"),
        ({"_exists": None}, "invalid-component"),
        ({"_exists": 1}, "invalid-component"),
        ({"b": {"__buf": 1, "len": -1, "runs": []}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2.5, "runs": []}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": -1.0, "runs": []}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": True, "runs": []}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": "2", "runs": []}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "runs": []}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": OVER, "runs": []}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": {}}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[0]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[0, [1], 2]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[0.5, [1]]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[True, [1]]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[0, 1]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[0, ["1"]]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[0, [None]]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[0, [0] * OVER]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[2**63, [1]]]}}, "invalid-buffer-delta"),
        ({"b": {"__buf": 1, "len": 2, "runs": [[-(2**64), [1]]]}}, "invalid-buffer-delta"),
    ],
)
def test_bad_component_examples(component: Any, code: str) -> None:
    error = refused(encode_frame({"type": "patch", "messageId": "m",
                                  "documentPatches": [{"e/c": component}]}))
    assert (error.code, error.message_id) == (code, "m")


def test_buffer_delta_limits_are_inclusive() -> None:
    top = SMALL_LIMITS.max_buffer_length
    ok = {"__buf": 1, "len": top, "runs": [[0, [1] * (top // 2)], [top // 2, [2] * (top // 2)]]}
    message = parse_client_frame(
        encode_frame({"type": "patch", "documentPatches": [{"e/c": {"b": ok}}]}), SMALL_LIMITS
    )
    assert message.document_patches == [{"e/c": {"b": ok}}]
    # zero padding: one frame's deltas may add max_buffer_length items in all
    pad = {"__buf": 1, "len": top, "runs": []}
    frame = {"type": "patch", "documentPatches": [{"e/c": {"b": pad}}]}
    assert parse_client_frame(encode_frame(frame), SMALL_LIMITS).document_patches
    frame["ephemeralPatches"] = [{"h/c": {"b": {"__buf": 1, "len": 1, "runs": []}}}]
    assert refused(encode_frame(frame)).code == "invalid-buffer-delta"


@st.composite
def frames_with_padding(draw: st.DrawFn, limit: int) -> tuple[dict[str, Any], int]:
    """A patch frame of valid deltas, and the zero padding they add in all."""
    padding = 0
    lists: dict[str, list[dict[str, Any]]] = {"documentPatches": [], "ephemeralPatches": []}
    for i in range(draw(st.integers(0, 5))):
        carried = draw(st.lists(st.integers(0, 4), max_size=3))
        while sum(carried) > limit:  # the values one delta carries have their own bound
            carried.pop()
        length = draw(st.integers(0, limit))
        runs = [[draw(st.integers(-3, limit + 3)), [1] * n] for n in carried]
        padding += max(0, length - sum(carried))
        which = draw(st.sampled_from(sorted(lists)))
        lists[which].append({f"e{i}/c": {"b": {"__buf": 1, "len": length, "runs": runs}}})
    return {"type": "patch", **lists}, padding


@SOME
@given(st.integers(0, 30), st.data())
def test_zero_padding_of_a_frame_is_bounded(limit: int, data: st.DataObject) -> None:
    """A few bytes of ``len`` must not become gigabytes of zeros: the items the deltas
    of one frame add beyond the values they carry share max_buffer_length."""
    frame, padding = data.draw(frames_with_padding(limit))
    result = parse(encode_frame(frame), Limits(max_buffer_length=limit))
    if padding <= limit:
        assert not isinstance(result, ProtocolError), result.code
    else:
        assert isinstance(result, ProtocolError)
        assert result.code == "invalid-buffer-delta"


def nested_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@SOME
@given(st.integers(0, 6), st.integers(0, 9), st.sampled_from(["list", "object"]), st.data())
def test_values_nest_at_most_max_depth_levels(
    max_depth: int, depth: int, shape: str, data: st.DataObject
) -> None:
    value = nested_list(depth)
    if shape == "object":
        value = 1
        for _ in range(depth):
            value = {"a": value}
    where = data.draw(st.sampled_from(["documentPatches", "ephemeralPatches"]))
    frame = {"type": "patch", "messageId": "m", where: [{"e/c": {"_exists": True, "x": value}}]}
    result = parse(encode_frame(frame), Limits(max_depth=max_depth))
    if depth <= max_depth:
        assert not isinstance(result, ProtocolError), result.code
    else:
        assert isinstance(result, ProtocolError)
        assert (result.code, result.message_id) == ("too-deep", "m")


@SOME
@given(
    frames("patch"),
    json_values().filter(lambda v: type(v) not in (str, int, float) and v is not None)
    | st.booleans(),
)
def test_bad_message_id_is_invalid_frame(frame: dict[str, Any], message_id: Any) -> None:
    frame["messageId"] = message_id
    error = refused(encode_frame(frame))
    assert error.code == "invalid-frame"
    assert error.message_id is None


@SOME
@given(
    frames("reconnect"),
    st.one_of(
        st.integers(-(2**63), -1),
        st.integers(2**63, 2**64 - 1),  # past what can be encoded again as a signed int
        fractions,
        st.floats(max_value=-1, allow_infinity=False),
        st.text(max_size=4),
        st.booleans(),
        st.none(),
        st.just("absent"),
        st.lists(st.integers(0, 9), max_size=2),
    ),
)
def test_bad_last_timestamp_is_invalid_frame(frame: dict[str, Any], last: Any) -> None:
    if last == "absent":
        del frame["lastTimestamp"]
    else:
        frame["lastTimestamp"] = last
    assert refused(encode_frame(frame)).code == "invalid-frame"


@SOME
@given(
    frames("auth-refresh"),
    json_values().filter(lambda v: type(v) is not str) | st.just("absent"),
)
def test_bad_token_is_invalid_frame(frame: dict[str, Any], token: Any) -> None:
    if token == "absent":
        del frame["token"]
    else:
        frame["token"] = token
    assert refused(encode_frame(frame)).code == "invalid-frame"


@pytest.mark.parametrize("depth", [1025, 5000, 100_000])
@pytest.mark.parametrize("where", ["field", "frame", "type", "token"])
def test_nesting_deeper_than_orjson_reads_is_invalid_json(depth: int, where: str) -> None:
    deep = "[" * depth + "]" * depth
    text = {
        "field": '{"type":"patch","documentPatches":[{"e/c":{"x":DEEP}}]}',
        "frame": "DEEP",
        "type": '{"type":DEEP}',
        "token": '{"type":"auth-refresh","token":DEEP}',
    }[where].replace("DEEP", deep)
    assert refused(text).code == "invalid-json"


@st.composite
def frames_with_keys(draw: st.DrawFn, total: int) -> dict[str, Any]:
    """A patch frame with exactly ``total`` keys spread over document and presence."""
    keys = [f"e{i}/c" for i in range(total)]
    cut = draw(st.integers(0, total))
    frame: dict[str, Any] = {"type": draw(st.sampled_from(["patch", "reconnect"]))}
    if frame["type"] == "reconnect":
        frame |= {"lastTimestamp": 0, "protocolVersion": 2}
    for name, part in (("documentPatches", keys[:cut]), ("ephemeralPatches", keys[cut:])):
        patches: list[dict[str, Any]] = [{}]
        for key in part:
            if draw(st.integers(0, 3)) == 0:
                patches.append({})
            patches[-1][key] = {"_exists": True}
        frame[name] = patches
    return frame


@SOME
@given(st.integers(0, 12), st.data())
def test_key_limit_counts_document_and_presence_together(limit: int, data: st.DataObject) -> None:
    limits = Limits(max_keys_per_frame=limit)
    total = data.draw(st.integers(0, limit + 3))
    frame = data.draw(frames_with_keys(total))
    result = parse(encode_frame(frame), limits)
    if total <= limit:
        assert not isinstance(result, ProtocolError)
    else:
        assert isinstance(result, ProtocolError)
        assert result.code == "too-many-keys"


def _deltas(patches: Any) -> list[dict[str, Any]]:
    return [
        value
        for patch in patches or ()
        for component in patch.values()
        for value in component.values()
        if type(value) is dict and value.get("__buf") == 1
    ]


def _as_floats(frame: dict[str, Any]) -> dict[str, Any]:
    """The frame with every integer the protocol expects written as a float (3.0),
    where a double holds it exactly."""
    frame = copy.deepcopy(frame)
    exact = 2**53
    for delta in _deltas(frame.get("documentPatches")) + _deltas(frame.get("ephemeralPatches")):
        delta["len"] = float(delta["len"])
        for run in delta["runs"]:
            if abs(run[0]) <= exact:
                run[0] = float(run[0])
    if frame["type"] == "reconnect":
        frame["protocolVersion"] = 2.0
        if frame["lastTimestamp"] <= exact:
            frame["lastTimestamp"] = float(frame["lastTimestamp"])
    return frame


@FUZZ
@given(frames("patch", "reconnect"))
def test_integers_written_as_floats_are_read_as_integers(frame: dict[str, Any]) -> None:
    """JavaScript has one number type, so 3.0 and 3 are the same to the client and the
    Node server: the message is the same, with integers in it."""
    floats = _as_floats(frame)
    message = parse(encode_frame(floats))
    assert not isinstance(message, ProtocolError), message.code
    assert message == parse_client_frame(encode_frame(frame), SMALL_LIMITS)
    assert_safe_to_use(message)
    for delta in _deltas(message.document_patches) + _deltas(message.ephemeral_patches):
        assert type(delta["len"]) is int
        assert all(type(run[0]) is int for run in delta["runs"])
    if type(message) is ReconnectMessage:
        assert message.version_matches
        assert type(message.last_timestamp) is int


@SOME
@given(frames("patch"), st.floats(allow_nan=False, allow_infinity=False))
def test_any_number_is_a_message_id(frame: dict[str, Any], message_id: float) -> None:
    """The Node server echoes whatever messageId it gets; 1.5 too."""
    frame["messageId"] = message_id
    message = parse(encode_frame(frame))
    assert type(message) is PatchMessage
    assert message.message_id == message_id


def delta_frame(where: str, offset: str) -> str:
    return (
        '{"type":"patch","' + where + '":[{"e/c":{"_exists":true,"b":'
        '{"__buf":1,"len":2,"runs":[[' + offset + ",[1]]]}}}]}"
    )


@pytest.mark.parametrize(
    "offset", ["9223372036854775807", "-9223372036854775808", "-1e18", "9.2e18"]
)
@pytest.mark.parametrize("where", ["documentPatches", "ephemeralPatches"])
def test_offsets_within_64_bits_are_usable(where: str, offset: str) -> None:
    message = parse(delta_frame(where, offset), Limits())
    assert not isinstance(message, ProtocolError), message.code
    assert_safe_to_use(message)


# --- protocol versions --------------------------------------------------------------


@FUZZ
@given(
    frames("reconnect") | mutated_frames().filter(lambda f: type(f) is dict),
    protocol_json().filter(lambda v: not is_two(v)) | st.just("absent"),
)
def test_reconnect_of_another_version_is_returned_not_refused(
    frame: dict[str, Any], version: Any
) -> None:
    """Whatever else a reconnect of another version holds: it is answered with
    version-mismatch, so the parser returns it instead of judging it."""
    frame = {**frame, "type": "reconnect"}
    if version == "absent":
        frame.pop("protocolVersion", None)
    else:
        frame["protocolVersion"] = version
    message = parse_client_frame(encode_frame(frame), SMALL_LIMITS)
    assert type(message) is ReconnectMessage
    assert message.version_matches is False
    assert message.protocol_version == frame.get("protocolVersion")
    assert (message.document_patches, message.ephemeral_patches) == ((), ())


# --- regressions: what a frame may hold must be sendable again --------------------
# These failed before 84b9f25 ("Hardening"): each was accepted, applied, and then
# failed to encode in the broadcast (and, for documents, in every later save).


def nested_value_frame(where: str, depth: int) -> str:
    deep = "[" * depth + "]" * depth
    if where == "delta-extra":  # an unknown key inside a delta is broadcast as received
        return (
            '{"type":"patch","documentPatches":[{"e/c":{"_exists":true,"b":'
            '{"__buf":1,"len":1,"runs":[],"extra":' + deep + "}}}]}"
        )
    return '{"type":"patch","' + where + '":[{"e/c":{"_exists":true,"x":' + deep + "}}]}"


@pytest.mark.parametrize("depth", [50, 250, 300, 1000])
@pytest.mark.parametrize("where", ["documentPatches", "ephemeralPatches", "delta-extra"])
def test_an_accepted_frame_can_always_be_encoded_again(depth: int, where: str) -> None:
    """orjson reads 1024 levels of nesting but writes only 254: a frame accepted with a
    value nested 300 deep was applied, then its broadcast raised TypeError (the sender's
    socket closed without an ack, the others never saw the change though the timestamp
    moved, every later save failed, and so did every reconnect diff holding the key).
    Whatever is accepted must encode again; deeper values must be refused."""
    result = parse(nested_value_frame(where, depth), Limits())
    if not isinstance(result, ProtocolError):
        assert_safe_to_use(result)


@pytest.mark.parametrize(
    ("where", "offset"),
    [
        ("documentPatches", "1e20"),
        ("documentPatches", "-1e19"),
        ("documentPatches", "18446744073709551616"),  # orjson reads it as a float
        ("documentPatches", "18446744073709551615"),  # an int to orjson, past signed
        ("documentPatches", "1e19"),
        ("ephemeralPatches", "1e300"),
    ],
)
def test_offsets_past_64_bits_are_refused_or_usable(where: str, offset: str) -> None:
    """An integral float offset past 64 bits (1e20) was read as an integer and written
    back into the frame as a Python int that orjson cannot encode: the frame was applied
    and its broadcast raised TypeError("Integer exceeds 64-bit range")."""
    result = parse(delta_frame(where, offset), Limits())
    if not isinstance(result, ProtocolError):
        assert_safe_to_use(result)


@pytest.mark.parametrize("depth", [1, 100, 500, 1000, 1023])
def test_a_deeply_nested_type_is_unknown_type(depth: int) -> None:
    """``{"type": [[[...]]]}`` 1000 deep (orjson reads it) made the unknown-type message,
    which formatted the value with repr(), raise RecursionError instead of ProtocolError."""
    text = '{"type":' + "[" * depth + "]" * depth + "}"
    assert refused(text, Limits()).code == "unknown-type"


def test_buf_true_is_not_a_buffer_delta() -> None:
    """A buffer delta is ``"__buf": 1``; the client and the Node server test
    ``value.__buf === 1``, so ``{"__buf": true, ...}`` is an ordinary object to them. The
    parser tested ``== 1`` (True == 1 in Python) and refused this frame, which the Node
    server accepts. (Document: test_document.py::test_buf_true_is_not_a_buffer_delta.)"""
    frame = {"type": "patch", "documentPatches": [
        {"e/c": {"_exists": True, "meta": {"__buf": True, "len": "long", "runs": "none"}}}
    ]}
    message = parse(encode_frame(frame))
    assert not isinstance(message, ProtocolError), message.code
    assert list(message.document_patches) == frame["documentPatches"]


def test_a_valid_reconnect_matches_the_version() -> None:
    message = parse_client_frame(
        '{"type":"reconnect","lastTimestamp":3,"protocolVersion":2}', SMALL_LIMITS
    )
    assert message == ReconnectMessage(3, 2, (), ())
    assert message.version_matches


def test_an_empty_patch_frame_is_accepted_with_nothing_in_it() -> None:
    """The room, not the parser, decides that a frame without patches gets no ack."""
    for text in ('{"type":"patch"}', '{"type":"patch","documentPatches":null}',
                 '{"type":"patch","documentPatches":[],"ephemeralPatches":[]}'):
        assert parse_client_frame(text, SMALL_LIMITS) == PatchMessage(None, (), ())


def test_lone_surrogates_from_javascript_become_replacement_characters() -> None:
    """JSON.stringify writes a string cut inside an emoji as a lone surrogate escape.
    It has no UTF-8 form, so it is kept as U+FFFD rather than refusing the frame."""
    text = '{"type":"patch","messageId":"m","documentPatches":[{"e/c":{"label":"hi \\ud83d"}}]}'
    message = parse_client_frame(text, Limits())
    assert isinstance(message, PatchMessage)
    assert message.document_patches == [{"e/c": {"label": "hi \ufffd"}}]
    assert_safe_to_use(message)
