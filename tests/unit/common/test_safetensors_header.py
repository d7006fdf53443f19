"""Safetensors headers read without the tensor data, checked against the safetensors library."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.common.safetensors_header import (
    HeaderError,
    bytes_specs,
    differences,
    file_specs,
    merged_specs,
    summary,
)

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "emb": torch.zeros(10, 4, dtype=torch.bfloat16),
            "head.weight": torch.ones(1, 4),
            "step": torch.tensor(3),
        },
        str(path),
        metadata={"format": "pt"},
    )
    return path


def test_specs_match_what_safetensors_itself_reads(weights):
    with safe_open(str(weights), framework="pt") as f:
        names = f.keys()
        reference = {
            name: (tuple(f.get_slice(name).get_shape()), DTYPE_NAMES[f.get_tensor(name).dtype])
            for name in names
        }
    assert reference == {
        "emb": ((10, 4), "BF16"),
        "head.weight": ((1, 4), "F32"),
        "step": ((), "I64"),
    }
    assert file_specs(weights) == reference
    assert bytes_specs(weights.read_bytes(), weights.name) == reference


def _with_header(header: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01\x02", "too short for a safetensors file (2 bytes)"),
        (_with_header(b"{}", length=200 * 1024 * 1024), "safetensors header of 209715200 bytes"),
        (_with_header(b'{"a": 1}', length=64), "runs past the file end"),
        (_with_header(b"not json"), "unreadable safetensors header"),
        (_with_header(b'["a"]'), "unreadable safetensors header"),
        (
            _with_header(json.dumps({"a": {"dtype": "F32"}}).encode()),
            "unreadable safetensors header",
        ),
    ],
)
def test_a_broken_header_names_the_file_and_why(tmp_path, data, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    for read in (lambda: file_specs(path), lambda: bytes_specs(data, "bad.safetensors")):
        with pytest.raises(HeaderError) as error:
            read()
        assert str(error.value).startswith("bad.safetensors: ")
        assert reason in str(error.value)


def test_shards_merge_and_a_tensor_in_two_shards_is_an_error():
    a, b = {"x": ((2,), "F32")}, {"y": ((3, 1), "BF16")}
    assert merged_specs([a, b]) == {"x": ((2,), "F32"), "y": ((3, 1), "BF16")}
    with pytest.raises(HeaderError, match="tensor x appears in more than one file"):
        merged_specs([a, b, {"x": ((2,), "F32")}])


def test_differences_list_every_one_in_a_fixed_order():
    expected = {"a": ((2, 3), "F32"), "b": ((4,), "F32"), "c": ((1,), "F32")}
    assert differences(expected, dict(expected)) == []
    got = {"a": ((2, 4), "BF16"), "b": ((4,), "F32"), "d": ((1,), "F32"), "e": ((1,), "F32")}
    problems = differences(expected, got)
    assert problems == [
        "missing tensor c",
        "unexpected tensor d",
        "unexpected tensor e",
        "tensor a has shape [2, 4], expected [2, 3]",
        "tensor a has dtype BF16, expected F32",
    ]
    assert summary(problems, limit=2) == "missing tensor c; unexpected tensor d (and 3 more)"
    assert summary(problems, limit=5) == "; ".join(problems)
