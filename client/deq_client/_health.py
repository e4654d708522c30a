"""A hand-written codec for the two messages of ``grpc.health.v1.Health/Check``.

Why by hand: the SDK depends only on grpcio, protobuf and numpy, and the generated health messages
live in grpcio-health-checking. Both messages hold one field, so a few lines of protobuf wire
format (varints and one length-delimited string) replace that dependency:
``HealthCheckRequest {string service = 1}`` and ``HealthCheckResponse {ServingStatus status = 1}``.
The tests check the codec against the real generated messages.
"""

from __future__ import annotations

CHECK_METHOD = "/grpc.health.v1.Health/Check"

SERVING_STATUS: dict[int, str] = {
    0: "UNKNOWN",
    1: "SERVING",
    2: "NOT_SERVING",
    3: "SERVICE_UNKNOWN",
}
"""``HealthCheckResponse.ServingStatus`` values -> names."""

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("HealthCheckResponse: truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def encode_request(service: str) -> bytes:
    """Serialises ``HealthCheckRequest(service=service)``; the empty string is the whole server."""
    raw = service.encode("utf-8")
    if not raw:
        return b""  # proto3 leaves default values off the wire
    return _varint(1 << 3 | _LENGTH_DELIMITED) + _varint(len(raw)) + raw


def decode_response(data: bytes) -> str:
    """Parses a ``HealthCheckResponse`` to its status name; unknown fields are skipped."""
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire_type == _LENGTH_DELIMITED:
            size, pos = _read_varint(data, pos)
            pos += size
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise ValueError(f"HealthCheckResponse: unsupported wire type {wire_type}")
        if pos > len(data):
            raise ValueError("HealthCheckResponse: truncated field")
    if status >= 1 << 63:  # enums are int32 on the wire, negatives sign-extended to 64 bits
        status -= 1 << 64
    return SERVING_STATUS.get(status, f"UNKNOWN_{status}")
