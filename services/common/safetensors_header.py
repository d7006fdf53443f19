"""Tensor names, shapes and dtypes from safetensors headers, and the differences between two sets.

A safetensors file starts with an 8-byte little-endian header length, then that many bytes of
JSON: {tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}. Reading it tells
whether a new set of weights fits the served model before any tensor data is read or loaded.
The policy (pushed weights), the reward (published versions) and the trainer (push manifests)
all read it here; each turns `HeaderError` and `differences` into its own refusal.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

TensorSpecs = dict[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, safetensors dtype name such as "F32")."""

MAX_HEADER_BYTES = 100 * 1024 * 1024


class HeaderError(ValueError):
    """The header cannot be read; the message names the file and why."""


def header_length(prefix: bytes, name: str) -> int:
    """The JSON header's length from a file's first 8 bytes."""
    if len(prefix) < 8:
        raise HeaderError(f"{name}: too short for a safetensors file ({len(prefix)} bytes)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise HeaderError(f"{name}: safetensors header of {length} bytes")
    return length


def parse_header(raw: bytes, name: str) -> TensorSpecs:
    """Specs from the JSON header's bytes (the `__metadata__` entry left out)."""
    try:
        header = json.loads(raw)
        return {
            tensor: (tuple(int(d) for d in meta["shape"]), str(meta["dtype"]))
            for tensor, meta in header.items()
            if tensor != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise HeaderError(f"{name}: unreadable safetensors header ({error!r})") from None


def data_layout(raw: bytes, name: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Tensor name -> (dtype, shape, start, end) from the JSON header's bytes; start and end are
    byte offsets into the data that follows the header."""
    try:
        header = json.loads(raw)
        layout = {}
        for tensor, meta in header.items():
            if tensor == "__metadata__":
                continue
            start, end = (int(x) for x in meta["data_offsets"])
            layout[tensor] = (str(meta["dtype"]), tuple(int(d) for d in meta["shape"]), start, end)
        return layout
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise HeaderError(f"{name}: unreadable safetensors header ({error!r})") from None


def bytes_specs(data: bytes, name: str) -> TensorSpecs:
    """Specs of a safetensors file held in memory."""
    length = header_length(data[:8], name)
    if len(data) < 8 + length:
        raise HeaderError(f"{name}: safetensors header of {length} bytes runs past the file end")
    return parse_header(data[8 : 8 + length], name)


def file_specs(path: Path) -> TensorSpecs:
    """Specs of a safetensors file on disk; only its header is read."""
    name = Path(path).name
    with open(path, "rb") as f:
        length = header_length(f.read(8), name)
        raw = f.read(length)
    if len(raw) < length:
        raise HeaderError(f"{name}: safetensors header of {length} bytes runs past the file end")
    return parse_header(raw, name)


def merged_specs(files: Iterable[TensorSpecs]) -> TensorSpecs:
    """The specs of several shards of one model; a tensor in two shards is an error."""
    specs: TensorSpecs = {}
    for shard in files:
        for tensor, spec in shard.items():
            if tensor in specs:
                raise HeaderError(f"tensor {tensor} appears in more than one file")
            specs[tensor] = spec
    return specs


def differences(expected: TensorSpecs, got: TensorSpecs) -> list[str]:
    """Every way `got` differs from `expected`, missing and unexpected tensors first."""
    problems = [f"missing tensor {t}" for t in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected tensor {t}" for t in sorted(got.keys() - expected.keys())]
    for tensor in sorted(expected.keys() & got.keys()):
        (e_shape, e_dtype), (g_shape, g_dtype) = expected[tensor], got[tensor]
        if e_shape != g_shape:
            problems.append(f"tensor {tensor} has shape {list(g_shape)}, expected {list(e_shape)}")
        if e_dtype != g_dtype:
            problems.append(f"tensor {tensor} has dtype {g_dtype}, expected {e_dtype}")
    return problems


def summary(problems: list[str], limit: int) -> str:
    """The first `limit` problems joined, with a count of the rest."""
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
