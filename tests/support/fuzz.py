"""Hypothesis strategies built from protobuf descriptors: for any request message
of the API, structurally valid but hostile instances (extreme numbers, unknown
enum values, NULs and control characters, very long and very many strings, random
page tokens, times and spans at and past every bound), and wire forms a typed
client could never send (invalid UTF-8 in a string field, arbitrary bytes)."""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import duration_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

_INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x1b[31m",
    "\r\n",
    "\u202eevil",
    "\ufeff",
    "'; DROP TABLE venues; --",
    "%s%n%x",
    "../../etc/passwd",
    "00000000-0000-4000-8000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "KH-12",
    "+85512345678",
    "x" * 10_000,
    "ក" * 3000,
    "🙂" * 500,
]


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({low, high, 0, 1, -1 if low < 0 else 2, low + 1, high - 1})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=40),
        st.text(st.characters(max_codepoint=0x9F), max_size=20),
        st.uuids().map(str),
    )


def page_tokens() -> st.SearchStrategy[str]:
    return st.one_of(
        strings(),
        st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
        st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    )


def _times(kind: type[Message]) -> st.SearchStrategy[Message]:
    seconds = st.one_of(
        st.sampled_from(
            [0, -1, 1, 2**31, 2**62, -(2**62), 2**63 - 1, -(2**63), 253402300799, 253402300800]
        ),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(1_500_000_000, 2_000_000_000),  # plausible instants
        st.integers(-100_000, 100_000),  # plausible spans
    )
    nanos = st.one_of(
        st.sampled_from([0, -1, 999_999_999, 1_000_000_000, -(2**31), 2**31 - 1]),
        st.integers(-(2**31), 2**31 - 1),
    )
    return st.builds(lambda s, n: kind(seconds=s, nanos=n), seconds, nanos)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return page_tokens() if "token" in field.name else strings()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        known = [v.number for v in enum.values] if enum is not None else [0]
        return st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1))
    low, high = _INT_BOUNDS[kind]
    return _ints(low, high)


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def _repeated(field: FieldDescriptor, depth: int) -> st.SearchStrategy[list[Any]]:
    one = _value(field, depth)
    return st.one_of(
        st.lists(one, max_size=4),
        # Very many of one value: how a server copes with a huge repeated field.
        st.tuples(one, st.integers(1000, 20_000)).map(lambda pair: [pair[0]] * pair[1]),
    )


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> Message:
    made: Message = _class(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = field.message_type.fields_by_name["key"]
            value = field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(_scalar(key), _value(value, depth), max_size=4))
            target = getattr(made, field.name)
            for k, v in entries.items():
                if value.message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            getattr(made, field.name).extend(draw(_repeated(field, depth)))
        elif field.message_type is not None:
            getattr(made, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(made, field.name, draw(_scalar(field)))
    return made


def _class(descriptor: Descriptor) -> type[Message]:
    made: type[Message] = message_factory.GetMessageClass(descriptor)
    return made


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Instances of the message `descriptor` describes (nested at most 3 deep)."""
    if descriptor.full_name == timestamp_pb2.Timestamp.DESCRIPTOR.full_name:
        return _times(timestamp_pb2.Timestamp)
    if descriptor.full_name == duration_pb2.Duration.DESCRIPTOR.full_name:
        return _times(duration_pb2.Duration)
    if depth > 3:
        return st.builds(_class(descriptor))
    return _message(descriptor, depth)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _string_fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    return [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]


@st.composite
def wire(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """The bytes of a request: a hostile message, sometimes with a string field of
    invalid UTF-8 appended (a typed client cannot send one), or arbitrary bytes."""
    body = draw(messages(descriptor)).SerializeToString()
    choice = draw(st.sampled_from(["message", "message", "bad-utf8", "bytes"]))
    fields = _string_fields(descriptor)
    if choice == "bad-utf8" and fields:
        field = draw(st.sampled_from(fields))
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b"]))
        return body + _varint(field.number << 3 | 2) + _varint(len(junk)) + junk
    if choice == "bytes":
        return draw(st.binary(max_size=200))
    return body
