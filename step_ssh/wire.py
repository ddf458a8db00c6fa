"""The protobuf wire format's varint, for the two places that handle views as
bytes rather than parsed messages: the control plane assembling a view from
cached encoded records (server/views.py) and the agent walking one
(agent/rawview.py). protobuf's own encoder is internal API, so it lives here."""
from __future__ import annotations

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types


class WireError(ValueError):
    """The bytes are not a well-formed message of the expected type."""


def read_varint(buf, pos: int) -> tuple[int, int]:
    """(value, position after it); WireError when truncated or over 64 bits."""
    result = shift = 0
    while True:
        try:
            b = buf[pos]
        except IndexError:
            raise WireError("truncated varint") from None
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def encode_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
