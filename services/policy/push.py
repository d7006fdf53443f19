"""Client side of UpdateWeights: a manifest built from a folder of safetensors files, then the
files in chunks of any size (the channel's message limit is raised to fit them).

    from services.policy.push import push_folder
    response = push_folder(stub, Path("checkpoints/v2"), weights_version=2)

The trainer pushes with its own bucketing; this is the reference client used by tests and the
weight-swap benchmark.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from services.genproto.rlhf.v1 import policy_pb2
from services.policy.weights import safetensors_specs

DEFAULT_CHUNK_BYTES = 1024 * 1024  # fastest of 1, 4 and 32 MiB in bench/weight_swap.py


def build_manifest(folder: Path, weights_version: int) -> policy_pb2.WeightsManifest:
    manifest = policy_pb2.WeightsManifest(weights_version=weights_version)
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(16 * 1024 * 1024):
                digest.update(block)
        manifest.file_sha256[path.name] = digest.hexdigest()
        manifest.file_size[path.name] = path.stat().st_size
        for name, (shape, dtype) in sorted(safetensors_specs(path).items()):
            manifest.tensors.add(name=name, shape=list(shape), dtype=dtype)
    return manifest


def push_messages(
    folder: Path, manifest: policy_pb2.WeightsManifest, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[policy_pb2.UpdateWeightsRequest]:
    yield policy_pb2.UpdateWeightsRequest(manifest=manifest)
    for name in sorted(manifest.file_size):
        with open(Path(folder) / name, "rb") as f:
            offset = 0
            while data := f.read(chunk_bytes):
                yield policy_pb2.UpdateWeightsRequest(
                    chunk=policy_pb2.WeightsChunk(file_name=name, offset=offset, data=data)
                )
                offset += len(data)


def push_folder(
    stub, folder: Path, weights_version: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    manifest: policy_pb2.WeightsManifest | None = None, timeout_s: float = 300.0,
) -> policy_pb2.UpdateWeightsResponse:
    manifest = manifest or build_manifest(folder, weights_version)
    return stub.UpdateWeights(push_messages(folder, manifest, chunk_bytes), timeout=timeout_s)
