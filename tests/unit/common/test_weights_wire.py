"""The hand-written UpdateWeights wire format against protobuf's own: the encoder gives the same
bytes as SerializeToString, the decoder reads what protobuf writes (with unknown fields, repeated
fields and both oneof members), and garbage raises WireError instead of being half-read."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from services.common.weights_wire import (
    ChunkView,
    WireError,
    decode_request,
    encode_chunk,
    encode_manifest,
)
from services.genproto.rlhf.v1 import policy_pb2


def protobuf_chunk(name: str, offset: int, data: bytes) -> bytes:
    chunk = policy_pb2.WeightsChunk(file_name=name, offset=offset, data=data)
    return policy_pb2.UpdateWeightsRequest(chunk=chunk).SerializeToString()


CASES = [
    ("model.safetensors", 0, b"\x00\x01\x02"),
    ("model-00001-of-00002.safetensors", 2**40 + 17, bytes(range(256)) * 700),
    ("ü.safetensors", 2**64 - 1, b"x"),
    ("", 5, b""),
    ("a.safetensors", 127, b"y" * 128),
]


@pytest.mark.parametrize("name,offset,data", CASES)
def test_encoding_is_protobufs_encoding(name, offset, data):
    assert encode_chunk(name, offset, data) == protobuf_chunk(name, offset, data)


@pytest.mark.parametrize("name,offset,data", CASES)
def test_decoding_reads_protobufs_encoding(name, offset, data):
    part = decode_request(protobuf_chunk(name, offset, data))
    assert isinstance(part, ChunkView)
    assert (part.file_name, part.offset, bytes(part.data)) == (name, offset, data)


def test_chunk_data_is_a_view_of_the_received_bytes():
    raw = encode_chunk("m.safetensors", 3, b"abcdef" * 1000)
    part = decode_request(raw)
    assert isinstance(part.data, memoryview) and part.data.obj is raw


def test_manifest_round_trips():
    manifest = policy_pb2.WeightsManifest(
        weights_version=7,
        file_sha256={"m.safetensors": "ab" * 32},
        file_size={"m.safetensors": 99},
        tensors=[policy_pb2.TensorSpec(name="w", shape=[2, 3], dtype="F32")],
    )
    assert decode_request(encode_manifest(manifest)) == manifest


def test_random_messages_decode_as_protobuf_parses_them():
    """Unknown fields of every wire type, fields repeated (last wins), both oneof members in
    turn (the last one wins): each read as protobuf reads it."""
    rng = random.Random(0)
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.3:
                m = policy_pb2.WeightsManifest(weights_version=rng.randint(1, 2**63))
                parts.append(policy_pb2.UpdateWeightsRequest(manifest=m).SerializeToString())
            else:
                parts.append(
                    protobuf_chunk(
                        rng.choice(["a.safetensors", "b.safetensors", ""]),
                        rng.randint(0, 2**64 - 1),
                        rng.randbytes(rng.randint(0, 300)),
                    )
                )
            if rng.random() < 0.5:
                parts.append(_unknown_field(rng))
        raw = b"".join(parts)
        expected = policy_pb2.UpdateWeightsRequest.FromString(raw)
        got = decode_request(raw)
        if expected.WhichOneof("part") == "manifest":
            assert got == expected.manifest
        elif expected.WhichOneof("part") == "chunk":
            c = expected.chunk
            assert (got.file_name, got.offset, bytes(got.data)) == (c.file_name, c.offset, c.data)
        else:
            assert got is None


def _unknown_field(rng: random.Random) -> bytes:
    """A field this schema does not know, or a known one (1, 2) with a wire type it does not
    have, which protobuf also keeps as unknown."""
    field = rng.randint(1, 2000)
    wire_type = rng.choice([0, 1, 5] if field <= 2 else [0, 1, 2, 5])
    tag = _varint(field << 3 | wire_type)
    if wire_type == 0:
        return tag + _varint(rng.randint(0, 2**64 - 1))
    if wire_type == 1:
        return tag + rng.randbytes(8)
    if wire_type == 5:
        return tag + rng.randbytes(4)
    payload = rng.randbytes(rng.randint(0, 40))
    return tag + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x12\x05\x0a\x03ab",  # chunk longer than the message
        b"\x12\x03\x0a\x05abc",  # name longer than its chunk
        b"\x12\x02\x10\xff",  # truncated varint
        b"\x12\x03\x0a\x01\xff",  # file name not UTF-8
        b"\x12\x02\x1d\x00",  # data with a fixed32 wire type: truncated
        b"\x12\x01\x1b",  # group wire type
        b"\x00\x01",  # field number 0
        b"\x0a\x01\x08",  # manifest that protobuf cannot read
        b"\xff" * 11,  # overlong varint
    ],
)
def test_malformed_input_is_refused(raw):
    with pytest.raises(WireError):
        decode_request(raw)
    with pytest.raises(DecodeError):
        policy_pb2.UpdateWeightsRequest.FromString(raw)
