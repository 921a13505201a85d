"""Protobuf wire-format bytes written by hand, for bodies no generated message would produce."""

from __future__ import annotations


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_struct(depth: int) -> bytes:
    """A Struct {"a": {"a": ...}} ``depth`` levels deep, as bytes (past any parser's limit)."""
    body = b""
    for _ in range(depth):
        value = field_bytes(5, body)  # Value.struct_value
        entry = field_bytes(1, b"a") + field_bytes(2, value)  # map entry key, value
        body = field_bytes(1, entry)  # Struct.fields
    return body


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
