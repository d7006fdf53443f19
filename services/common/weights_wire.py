"""The UpdateWeights request stream on the wire, without copying the weights through protobuf.

A push is ~540 MB for SmolLM2-135M. Through generated protobuf code every chunk's bytes are
copied into and out of a message object at both ends. Handled here instead, the sender builds
each message with one copy straight from the page cache (services/trainer/weights_push reads
the file through mmap) and the receiver hands the hasher and the file a view of the received
message. Protobuf's wire format stays the contract of `rlhf.v1.PolicyService/UpdateWeights`:
any protobuf client or server interoperates (tests/unit/policy/test_weights_wire.py).

- `encode_chunk` builds the serialized `UpdateWeightsRequest{chunk}` as header + data in one
  join: byte for byte what `SerializeToString` gives.
- `decode_request` parses one serialized request; a chunk's `data` is a memoryview of the
  received bytes (no copy); the manifest is parsed by protobuf. Malformed input raises
  `WireError`. Parsing follows protobuf's rules: unknown fields (and known ones with another
  wire type) are skipped, a field seen twice keeps its last value, and of the oneof's two
  members the last one wins. Groups (a wire type deprecated since proto2) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.genproto.rlhf.v1 import policy_pb2

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Field numbers of rlhf.v1.UpdateWeightsRequest and rlhf.v1.WeightsChunk (policy.proto).
_REQUEST_MANIFEST, _REQUEST_CHUNK = 1, 2
_CHUNK_FILE_NAME, _CHUNK_OFFSET, _CHUNK_DATA = 1, 2, 3

UPDATE_WEIGHTS_METHOD = "/rlhf.v1.PolicyService/UpdateWeights"


class WireError(ValueError):
    """A request that is not a well-formed UpdateWeightsRequest."""


@dataclass
class ChunkView:
    """A WeightsChunk whose data is a view of the received message."""

    file_name: str = ""
    offset: int = 0
    data: memoryview = memoryview(b"")  # noqa: RUF009 - an empty view, never written to


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def encode_chunk(file_name: str, offset: int, data: bytes) -> bytes:
    """The serialized UpdateWeightsRequest carrying one chunk (fields at their defaults are
    omitted, as protobuf does)."""
    inner = bytearray()
    if file_name:
        name = file_name.encode()
        inner += _tag(_CHUNK_FILE_NAME, _LEN) + _varint(len(name)) + name
    if offset:
        inner += _tag(_CHUNK_OFFSET, _VARINT) + _varint(offset)
    if data:
        inner += _tag(_CHUNK_DATA, _LEN) + _varint(len(data))
    head = _tag(_REQUEST_CHUNK, _LEN) + _varint(len(inner) + len(data))
    return b"".join((head, inner, data))


def encode_manifest(manifest: policy_pb2.WeightsManifest) -> bytes:
    return policy_pb2.UpdateWeightsRequest(manifest=manifest).SerializeToString()


def _read_varint(view: memoryview, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = view[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _fields(view: memoryview, start: int, end: int):
    """(field number, wire type, value) for each field in view[start:end]; a LEN field's value
    is its (start, end) span, a varint's its integer; fixed-width fields are skipped."""
    i = start
    while i < end:
        tag, i = _read_varint(view, i, end)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == _VARINT:
            value, i = _read_varint(view, i, end)
        elif wire_type == _LEN:
            length, i = _read_varint(view, i, end)
            if i + length > end:
                raise WireError(f"field {field} runs past the end of its message")
            value, i = (i, i + length), i + length
        elif wire_type in (_I64, _I32):
            i += 8 if wire_type == _I64 else 4
            if i > end:
                raise WireError(f"field {field} runs past the end of its message")
            continue
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {field})")
        yield field, wire_type, value


def _merge_chunk(chunk: ChunkView, view: memoryview, start: int, end: int) -> None:
    for field, wire_type, value in _fields(view, start, end):
        if field == _CHUNK_FILE_NAME and wire_type == _LEN:
            try:
                chunk.file_name = str(view[value[0] : value[1]], "utf-8")
            except UnicodeDecodeError as exc:
                raise WireError("chunk.file_name is not valid UTF-8") from exc
        elif field == _CHUNK_OFFSET and wire_type == _VARINT:
            chunk.offset = value & 0xFFFFFFFFFFFFFFFF
        elif field == _CHUNK_DATA and wire_type == _LEN:
            chunk.data = view[value[0] : value[1]]


def decode_request(raw: bytes) -> policy_pb2.WeightsManifest | ChunkView | None:
    """One serialized UpdateWeightsRequest: its manifest, its chunk, or None when it sets neither."""
    view = memoryview(raw)
    part: policy_pb2.WeightsManifest | ChunkView | None = None
    for field, wire_type, value in _fields(view, 0, len(view)):
        if field not in (_REQUEST_MANIFEST, _REQUEST_CHUNK) or wire_type != _LEN:
            continue  # unknown to this schema (protobuf keeps it as an unknown field)
        if field == _REQUEST_MANIFEST:
            manifest = (
                part
                if isinstance(part, policy_pb2.WeightsManifest)
                else policy_pb2.WeightsManifest()
            )
            try:
                manifest.MergeFromString(bytes(view[value[0] : value[1]]))
            except Exception as exc:  # protobuf's DecodeError
                raise WireError(f"unreadable manifest: {exc}") from exc
            part = manifest
        else:
            chunk = part if isinstance(part, ChunkView) else ChunkView()
            _merge_chunk(chunk, view, *value)
            part = chunk
    return part
