"""safetensors files written straight from tensor memory, hashed as they are written.

`safetensors.torch.save` builds the whole file in memory first (a copy of every byte), and a
digest then reads the file back. `write_safetensors` writes the header, then each tensor's bytes
from its own memory, and feeds the same buffers to the hashers: the trainer's weight versions
(services/trainer/weights_push.py) and checkpoints (services/trainer/checkpoint.py) use it; the
policy's swap reads tensors with `TORCH_DTYPES` (services/policy/triton_model.py).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from services.common.digest import new_hasher

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype name -> torch dtype, for the dtypes the platform reads and writes."""
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], digests=()) -> dict[str, str]:
    """Writes `tensors` as a safetensors file, fsynced, hashing the bytes with each of
    `digests` as they are written; returns {algorithm: hex digest}. Names are sorted; each
    tensor's storage should be its own (tied weights once, as `save` requires)."""
    specs, arrays, offset = {}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        specs[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        arrays.append(tensor.reshape(-1).view(torch.uint8).numpy())
        offset += size
    header = json.dumps(specs, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes
    hashers = {algorithm: new_hasher(algorithm) for algorithm in digests}
    with open(path, "wb") as f:
        for part in (struct.pack("<Q", len(header)), header, *arrays):
            view = memoryview(part)
            f.write(view)
            for hasher in hashers.values():
                hasher.update(view)
        f.flush()
        os.fsync(f.fileno())
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}
